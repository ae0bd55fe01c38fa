"""bf16 vs fp32 on the CPU: per-slice speed (extrapolated per volume) and map differences on real cases.

One method on one backbone per run. Two copies of the same seeded model are built, one with
``precision="fp32"`` and one with ``precision="bf16"`` (visual weights cast once); they take turns for
``--rounds`` rounds (order fp32, bf16 | bf16, fp32 | ..., so a drifting machine load cancels) on the same real slices (the middle tumour slice of each real BraTS 2023 case, t2w,
through ``run_volume``), and the best round of each is kept. Seconds per slice are extrapolated to a
volume of ``--volume-slices`` analysed slices (a BraTS volume has ~145 brain slices of 155): an
extrapolation from a few slices, not a whole-volume run. The maps of the two precisions are compared
on the same slices: max and 99.9th percentile of |bf16 - fp32|, Dice of the masks at 0.5, and max
|score difference|. Random backbone weights (speed does not depend on them; map differences on random
weights only show the size of bf16 rounding, not its clinical effect).

Usage:
    python benchmarks/precision_bench.py --method vand --backbone random:ViT-L-14-336
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
from napari_clip_ad.methods.precision import cpu_bf16_supported

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "brats2023"


def real_slices(root: Path, per_case: int) -> tuple[np.ndarray, np.ndarray]:
    """``per_case`` axial t2w slices around the largest tumour cross-section of each real case, and their brain masks."""
    volumes, brains = [], []
    for case_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        case = load_case(case_dir, modalities=["t2w"])
        z = int(np.argmax(case.whole_tumour.sum(axis=(1, 2))))
        part = slice(z - per_case // 2, z - per_case // 2 + per_case)
        volumes.append(case.images["t2w"][part])
        brains.append(case.brain_mask[part])
    return np.concatenate(volumes), np.concatenate(brains)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two bool masks (1.0 when both are empty)."""
    total = int(a.sum() + b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def main() -> None:
    """Print one JSON row."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", required=True)
    parser.add_argument("--backbone", required=True)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--per-case", type=int, default=1, help="slices per real case")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-slices", type=int, default=None, help="use only the first N of those slices (slow methods)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--volume-slices", type=int, default=145)
    args = parser.parse_args()
    volume, brain = real_slices(args.data, args.per_case)
    volume, brain = volume[: args.max_slices], brain[: args.max_slices]
    models = {p: build_method(args.method, args.backbone, device="cpu", precision=p) for p in ("fp32", "bf16")}
    best = {p: float("inf") for p in models}
    results = {}
    for round_index in range(args.rounds):
        order = list(models.items()) if round_index % 2 == 0 else list(models.items())[::-1]  # fp32, bf16, bf16, fp32, ...
        for precision, model in order:
            start = time.perf_counter()
            results[precision] = run_volume(volume, model, brain_mask=brain, batch_size=args.batch_size)
            best[precision] = min(best[precision], time.perf_counter() - start)
    a, b = results["fp32"].anomaly_map, results["bf16"].anomaly_map
    diff = np.abs(a - b)
    n = len(volume)
    print(json.dumps({
        "method": args.method, "backbone": models["fp32"].backbone.label, "slices": n, "rounds": args.rounds,
        "cpu_bf16_native": cpu_bf16_supported(), "threads": torch.get_num_threads(),
        "fp32_s_per_slice": round(best["fp32"] / n, 3), "bf16_s_per_slice": round(best["bf16"] / n, 3),
        "fp32_s_per_volume_extrapolated": round(best["fp32"] / n * args.volume_slices, 1),
        "bf16_s_per_volume_extrapolated": round(best["bf16"] / n * args.volume_slices, 1),
        "speedup": round(best["fp32"] / best["bf16"], 2),
        "max_abs_map_diff": float(diff.max()), "p99.9_abs_map_diff": float(np.quantile(diff, 0.999)),
        "dice_at_0.5": dice(a >= 0.5, b >= 0.5), "voxels_at_0.5_fp32": int((a >= 0.5).sum()),
        "max_abs_score_diff": float(np.abs(results["fp32"].scores - results["bf16"].scores).max()),
    }))


if __name__ == "__main__":
    main()
