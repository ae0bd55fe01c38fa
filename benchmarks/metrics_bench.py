"""Benchmark: pooled pixel AUROC, F1-max, AP and AUPRO over 5 and 50 BraTS-sized volumes vs scikit-learn.

Each measurement runs in its own subprocess so its peak resident memory (``ru_maxrss`` of that
process: interpreter, imports, the volume being generated and the metric's buffers) is its own.
Volumes (240x240x155, a brain-shaped ellipsoid with a ~1-2 % lesion and a smooth noisy map) are
generated one at a time from a per-volume seed, so both sides see identical data; only the metric
work is timed, not the generation. scikit-learn must hold every voxel at once, so it runs on 5
volumes only.

Run: ``.venv/bin/python benchmarks/metrics_bench.py`` (prints a Markdown table).
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time

import numpy as np

SHAPE = (155, 240, 240)  # canonical z, y, x


def make_volume(index: int) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic (scores float32 in [0, 1], whole-tumour bool) pair with a realistic lesion fraction."""
    rng = np.random.default_rng(index)
    z, y, x = (np.arange(n, dtype=np.float32)[:, None, None] for n in SHAPE)
    y, x = y.reshape(1, -1, 1), x.reshape(1, 1, -1)
    brain = ((z - 75) / 68) ** 2 + ((y - 120) / 95) ** 2 + ((x - 120) / 78) ** 2 <= 1
    centre = rng.uniform([55, 85, 70], [105, 155, 170])
    radii = rng.uniform([20, 25, 22], [30, 38, 32])
    r2 = ((z - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2 + ((x - centre[2]) / radii[2]) ** 2
    tumour = (r2 <= 1) & brain
    noise = rng.random(SHAPE, dtype=np.float32)
    scores = 0.5 * np.exp(-0.8 * r2) + 0.45 * noise * brain + 0.05 * noise
    return np.clip(scores, 0, 1).astype(np.float32), tumour


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_ours(n_volumes: int) -> dict[str, float]:
    from napari_clip_ad.metrics import PixelAccumulator

    import_rss = peak_rss_mb()
    acc = PixelAccumulator()
    seconds, lesion = 0.0, 0
    for index in range(n_volumes):
        scores, tumour = make_volume(index)
        lesion += int(tumour.sum())
        start = time.perf_counter()
        acc.update(scores, tumour)
        seconds += time.perf_counter() - start
        del scores, tumour
    start = time.perf_counter()
    auroc, f1max, threshold = acc.auroc(), acc.f1max(), acc.f1max_threshold()
    ap, aupro = acc.average_precision(), acc.aupro()
    seconds += time.perf_counter() - start
    return {"seconds": seconds, "auroc": auroc, "f1max": f1max, "threshold": threshold, "ap": ap, "aupro": aupro,
            "ap_bound": acc.average_precision_bound(), "aupro_bound": acc.aupro_bound(), "regions": acc.n_regions,
            "lesion_fraction": lesion / (n_volumes * np.prod(SHAPE)), "peak_rss_mb": peak_rss_mb(),
            "import_rss_mb": import_rss}


def run_sklearn(n_volumes: int) -> dict[str, float]:
    from sklearn.metrics import precision_recall_curve, roc_auc_score

    import_rss = peak_rss_mb()
    n = int(np.prod(SHAPE))
    scores = np.empty(n_volumes * n, np.float32)
    labels = np.empty(n_volumes * n, bool)
    for index in range(n_volumes):
        volume, tumour = make_volume(index)
        scores[index * n:(index + 1) * n], labels[index * n:(index + 1) * n] = volume.ravel(), tumour.ravel()
        del volume, tumour
    start = time.perf_counter()
    auroc = roc_auc_score(labels, scores)
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))
    best = int(np.argmax(f1))
    ap = float(-np.sum(np.diff(recall) * precision[:-1]))  # average_precision_score's formula, same curve
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "auroc": float(auroc), "f1max": float(f1[best]), "ap": ap, "aupro": float("nan"),
            "threshold": float(thresholds[min(best, thresholds.size - 1)]), "peak_rss_mb": peak_rss_mb(),
            "import_rss_mb": import_rss}


def child(kind: str, n_volumes: int) -> dict[str, float]:
    """Run one measurement in a fresh interpreter and return its JSON result."""
    out = subprocess.run([sys.executable, __file__, kind, str(n_volumes)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def main() -> None:
    if len(sys.argv) == 3:  # child mode
        kind, n_volumes = sys.argv[1], int(sys.argv[2])
        print(json.dumps(run_ours(n_volumes) if kind == "ours" else run_sklearn(n_volumes)))
        return
    ours5, ours50, sk5 = child("ours", 5), child("ours", 50), child("sklearn", 5)
    voxels = int(np.prod(SHAPE))
    sk_rate = 5 * voxels / sk5["seconds"]
    print("| run | volumes | metric time (s) | Mvoxel/s | speed vs scikit-learn (per voxel) | peak RSS (MiB) "
          "| RSS after imports (MiB) | AUROC | F1-max | F1-max threshold |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows = (("PixelAccumulator (65,536-bin histogram)", 5, ours5), ("PixelAccumulator (65,536-bin histogram)", 50, ours50),
            ("scikit-learn roc_auc_score + precision_recall_curve", 5, sk5))
    for name, n, r in rows:
        rate = n * voxels / r["seconds"]
        print(f"| {name} | {n} | {r['seconds']:.2f} | {rate / 1e6:.0f} | {rate / sk_rate:.0f}x | {r['peak_rss_mb']:.0f} "
              f"| {r['import_rss_mb']:.0f} | {r['auroc']:.6f} | {r['f1max']:.6f} | {r['threshold']:.6f} |")
    print(f"\n5 volumes, ours vs scikit-learn: |AUROC diff| {abs(ours5['auroc'] - sk5['auroc']):.1e}, "
          f"F1-max (scikit-learn - ours) {sk5['f1max'] - ours5['f1max']:.1e}; lesion fraction "
          f"{ours50['lesion_fraction']:.2%} of voxels; 50-volume time / 5-volume scikit-learn time: "
          f"{ours50['seconds'] / sk5['seconds']:.3f}")
    print("\n| run | volumes | pixel AP | AP bound | AUPRO (3D regions) | AUPRO bound | regions |")
    print("|---|---|---|---|---|---|---|")
    for name, n, r in rows:
        print(f"| {name} | {n} | {r['ap']:.6f} | {r.get('ap_bound', float('nan')):.1e} | {r['aupro']:.6f} "
              f"| {r.get('aupro_bound', float('nan')):.1e} | {r.get('regions', '')} |")
    print(f"\n5 volumes: |pixel AP ours - scikit-learn| {abs(ours5['ap'] - sk5['ap']):.1e}")

if __name__ == "__main__":
    main()
