"""Slices per second of ``run_volume`` against a plain per-slice loop, on the same model, in one run.

The plain loop is how the official test scripts run: batch 1, fp32, every slice (no skipping of
brainless slices), one forward per slice. ``run_volume`` batches, skips brainless slices, and uses
runs its frozen backbone in the method's precision (``--precision``; bf16 on CUDA by default, heads fp32).
Both produce the same [0, 1] maps up to that precision (checked on the analysed slices).

Usage:
    python benchmarks/infer_bench.py --method vand --backbone tiny-test                  # CPU, here
    python benchmarks/infer_bench.py --method vand --backbone random:ViT-L-14-336 --device cuda
Random weights are used (no download needed): speed does not depend on the weight values.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from napari_clip_ad import build_method, run_volume
from napari_clip_ad.engine import preprocess_slices
from napari_clip_ad.methods import smooth_maps


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plain_loop(volume: np.ndarray, method) -> np.ndarray:
    """The official way: each slice alone, fp32, no skipping."""
    out = np.zeros(volume.shape, dtype=np.float32)
    for k in range(volume.shape[0]):
        raw = torch.from_numpy(np.ascontiguousarray(volume[k : k + 1], dtype=np.float32)).to(method.device)
        images = preprocess_slices(raw, method.image_size, method.backbone.mean, method.backbone.std)
        maps = smooth_maps(method.predict(images).unit_maps().float(), method.default_sigma)
        if tuple(maps.shape[-2:]) != volume.shape[1:]:
            maps = F.interpolate(maps[:, None], size=volume.shape[1:], mode="bilinear", align_corners=False)[:, 0]
        out[k] = maps.clamp(0, 1)[0].cpu().numpy()
    return out


def timed_interleaved(variants: dict[str, Callable[[], object]], device: torch.device, repeats: int) -> dict[str, tuple[float, object]]:
    """Best wall time of each variant over ``repeats`` rounds, the variants taking turns in every round.

    Taking turns (after one warm-up call each) spreads the load of a shared machine evenly over the
    variants, so their ratio is fair even when absolute times drift.
    """
    results = {name: fn() for name, fn in variants.items()}
    best = {name: float("inf") for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            _sync(device)
            start = time.perf_counter()
            results[name] = fn()
            _sync(device)
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: (best[name], results[name]) for name in variants}


def main() -> None:
    """Run the benchmark and print one JSON object."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="vand")
    parser.add_argument("--backbone", default="tiny-test")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", default=None,
                        help="run_volume batch: a number or 'auto' (default: the engine's: 8 on CPU, auto from a memory probe on CUDA)")
    parser.add_argument("--precision", default=None, choices=("auto", "fp32", "bf16"),
                        help="engine precision (default: the library's: fp32 on CPU, bf16 autocast on CUDA); the plain loop is always fp32")
    parser.add_argument("--slices", type=int, default=155, help="slices of the synthetic volume (155 = BraTS)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-plain", action="store_true", help="only time run_volume")
    parser.add_argument("--compare-batches", default="", help="also time run_volume at these batch sizes, e.g. 1,8")
    args = parser.parse_args()

    from napari_clip_ad import sample_case

    case = sample_case(seed=0)
    start = max(0, (case.shape[0] - args.slices) // 2)
    volume = case.images["t2w"][start : start + args.slices]
    batch_size = None if args.batch_size is None else (args.batch_size if args.batch_size == "auto" else int(args.batch_size))
    method = build_method(args.method, args.backbone, device=args.device, precision=args.precision)
    device = method.device
    variants: dict[str, Callable[[], object]] = {"engine": lambda: run_volume(volume, method, batch_size=batch_size)}
    if not args.skip_plain:
        # The official scripts' way is fp32: a second, identically seeded fp32 model when the engine's is not.
        plain_method = method if method.precision == "fp32" else build_method(args.method, args.backbone, device=args.device, precision="fp32")
        variants["plain"] = lambda: plain_loop(volume, plain_method)
    batches = [int(b) for b in args.compare_batches.split(",") if b]
    for batch in batches:
        variants[f"engine_batch{batch}"] = lambda b=batch: run_volume(volume, method, batch_size=b)
    timings = timed_interleaved(variants, device, args.repeats)
    engine_s, engine = timings["engine"]
    report = {
        "method": args.method, "backbone": method.backbone.label, "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "slices": int(volume.shape[0]), "slices_analysed": int(engine.analysed.sum()), "batch_size": engine.info["batch_size"],
        "precision": engine.info["precision"],
        "repeats": args.repeats, "threads": torch.get_num_threads(),
        "engine_s": round(engine_s, 4), "engine_slices_per_s": round(volume.shape[0] / engine_s, 1),
    }
    if not args.skip_plain:
        plain_s, plain = timings["plain"]
        diff = float(np.abs(plain[engine.analysed] - engine.anomaly_map[engine.analysed]).max())
        report.update({
            "plain_s": round(plain_s, 4), "plain_slices_per_s": round(volume.shape[0] / plain_s, 1),
            "speedup": round(plain_s / engine_s, 2), "max_abs_map_difference": diff,
        })
    for batch in batches:
        report[f"engine_batch{batch}_s"] = round(timings[f"engine_batch{batch}"][0], 4)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
