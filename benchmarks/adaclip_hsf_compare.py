"""AdaCLIP's HSF: the batched torch k-means (``hsf="fast"``) against scikit-learn (``hsf="exact"``) on real cases.

For every analysed slice of the real BraTS cases (t2w, axial, every ``--step``-th slice), both modes run
through ``run_volume`` on the same seeded model; the JSON gives the largest |score| and |map| differences,
how many slices differ by more than 1e-4 in score, and the time of each mode's HSF (k-means + fusion) alone,
measured on the same tokens. Random backbone weights (the clustering does not care what the weights mean).

Usage:
    python benchmarks/adaclip_hsf_compare.py --backbone tiny-test --step 4
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from napari_clip_ad import build_method, run_volume
from napari_clip_ad.io import load_case
from napari_clip_ad.methods.adaclip_hsf import hybrid_semantic_fusion

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "brats2023"


def main() -> None:
    """Print one JSON report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="tiny-test")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--step", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    exact = build_method("adaclip", args.backbone, device="cpu", hsf="exact")
    fast = build_method("adaclip", args.backbone, device="cpu", hsf="fast")
    rows, hsf_times = [], {"exact": 0.0, "fast": 0.0}
    for case_dir in sorted(p for p in args.data.iterdir() if p.is_dir()):
        case = load_case(case_dir)
        volume = case.image("t2w")[:: args.step]
        brain = case.brain_mask[:: args.step]
        a = run_volume(volume, exact, brain_mask=brain, batch_size=args.batch_size)
        b = run_volume(volume, fast, brain_mask=brain, batch_size=args.batch_size)
        analysed = a.analysed
        score_diff = np.abs(a.scores - b.scores)[analysed]
        rows.append({
            "case": case_dir.name, "slices": int(analysed.sum()), "max_abs_score_diff": float(score_diff.max()),
            "slices_score_diff_over_1e-4": int((score_diff > 1e-4).sum()),
            "max_abs_map_diff": float(np.abs(a.anomaly_map - b.anomaly_map).max()),
        })
    # HSF alone on one batch of random normalised tokens shaped like the method's (3 layers, ViT grid).
    g = torch.Generator().manual_seed(0)
    n_tokens, embed = exact.n_patches, int(exact.clip.visual.proj.shape[1])
    tokens = [torch.nn.functional.normalize(torch.randn(args.batch_size, n_tokens, embed, generator=g), dim=-1) for _ in exact.layers]
    logits = [100 * t @ torch.nn.functional.normalize(torch.randn(embed, 2, generator=g), dim=0) for t in tokens]
    for mode in ("exact", "fast", "exact", "fast"):
        start = time.perf_counter()
        hybrid_semantic_fusion(tokens, logits, exact.k_clusters, mode)
        hsf_times[mode] = min(hsf_times[mode] or float("inf"), time.perf_counter() - start)
    print(json.dumps({"backbone": exact.backbone.label, "torch": torch.__version__, "rows": rows,
                      "hsf_seconds_per_batch": hsf_times, "hsf_batch": args.batch_size,
                      "hsf_speedup": hsf_times["exact"] / hsf_times["fast"]}, indent=2))


if __name__ == "__main__":
    main()
