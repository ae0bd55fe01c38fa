"""GPU correctness in one run: each method on CUDA (autocast) against the CPU (fp32), and OOM halving.

For every registered method, the same seeded model runs the same slices of the synthetic case on the
CPU and on the GPU through ``run_volume``; the JSON says how far the [0, 1] maps and the scores differ
and how many voxels change side of the 0.5 threshold. Then ``run_volume`` runs with the GPU capped to a
small memory fraction and a batch that cannot fit: it must halve the batch and still give the same maps.
Runs on the CPU too (``--device cpu``: both sides CPU; a check of this script, not of a GPU).

Usage (on the GPU machine; see benchmarks/gpu_session.sh):
    python benchmarks/gpu_check.py --backbone tiny-test --slices 16 > gpu_check.json
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from napari_clip_ad import build_method, run_volume, sample_case
from napari_clip_ad.methods import list_methods


def compare(name: str, backbone: str, volume: np.ndarray, device: str, image_size: int, precision: str | None = None) -> dict[str, object]:
    """CPU fp32 against ``device`` in ``precision`` (None: the library default, bf16 on CUDA) for one method."""
    reference = build_method(name, backbone, image_size=image_size, device="cpu", precision="fp32")
    tested = build_method(name, backbone, image_size=image_size, device=device, precision=precision)
    expected = run_volume(volume, reference, batch_size=4)
    run_volume(volume[:2], tested)  # warm-up (kernels, text features)
    start = time.perf_counter()
    got = run_volume(volume, tested)  # batch None: 'auto' from the memory probe on CUDA
    if tested.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    difference = np.abs(got.anomaly_map - expected.anomaly_map)
    flipped = (got.anomaly_map >= 0.5) != (expected.anomaly_map >= 0.5)
    above = (got.anomaly_map >= 0.5) | (expected.anomaly_map >= 0.5)
    return {
        "method": name, "backbone": tested.backbone.label, "device": str(tested.device), "precision": got.info["precision"],
        "batch_size": got.info["batch_size"],
        "seconds": round(seconds, 4), "max_abs_map_diff": float(difference.max()), "mean_abs_map_diff": float(difference.mean()),
        "p99.9_abs_map_diff": float(np.quantile(difference, 0.999)),
        "dice_at_0.5": 1.0 if not above.any() else float(1 - flipped.sum() / ((got.anomaly_map >= 0.5).sum() + (expected.anomaly_map >= 0.5).sum())),
        "max_abs_score_diff": float(np.abs(got.scores - expected.scores).max()), "voxels_flipped_at_0.5": int(flipped.sum()),
    }


def oom_halving(backbone: str, volume: np.ndarray, image_size: int) -> dict[str, object]:
    """A batch too big for a capped GPU must be halved until it fits, with the same maps as batch 2."""
    method = build_method("vand", backbone, image_size=image_size, device="cuda")
    small = run_volume(volume, method, batch_size=2)
    free, total = torch.cuda.mem_get_info()
    torch.cuda.empty_cache()
    fraction = min(0.9, (torch.cuda.memory_allocated() + (1 << 30)) / total)  # ~1 GiB of headroom
    torch.cuda.set_per_process_memory_fraction(fraction)
    try:
        big = run_volume(np.concatenate([volume] * 16), method, batch_size=4096)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    same = np.abs(big.anomaly_map[: len(volume)] - small.anomaly_map).max()
    return {"requested_batch": 4096, "batch_used": big.info["batch_size"], "max_abs_diff_vs_batch2": float(same),
            "memory_fraction": round(fraction, 4), "free_gib_before": round(free / (1 << 30), 1)}


def main() -> None:
    """Print one JSON object with a row per method (and the OOM check on CUDA)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="tiny-test")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--slices", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=240)
    parser.add_argument("--methods", default=",".join(list_methods()))
    parser.add_argument("--precisions", default="default,fp32",
                        help="precisions of the tested side, e.g. default,fp32,bf16 ('default': the library's, bf16 on CUDA)")
    args = parser.parse_args()
    case = sample_case(seed=0)
    start = (case.shape[0] - args.slices) // 2
    volume = case.images["t2w"][start : start + args.slices]
    precisions = [None if p == "default" else p for p in args.precisions.split(",")]
    rows = [compare(name, args.backbone, volume, args.device, args.image_size, p) for name in args.methods.split(",") for p in precisions]
    report: dict[str, object] = {"torch": torch.__version__, "rows": rows}
    if torch.device(args.device).type == "cuda":
        report["gpu"] = torch.cuda.get_device_name()
        report["oom_halving"] = oom_halving(args.backbone, volume, args.image_size)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
