"""The engine's Gaussian smoothing of slice maps: fp32 (now) against float64 (before), same run, taking turns.

Usage:
    python benchmarks/smooth_bench.py --batch 8 --sigma 4 --rounds 7
Prints the median seconds of each over the rounds, their ratio, and the max |difference| of the results.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from napari_clip_ad.methods import smooth_maps


def main() -> None:
    """Print one JSON row."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=240)
    parser.add_argument("--sigma", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    maps = torch.rand(args.batch, args.size, args.size, generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {"fp32": [], "float64": []}
    for _ in range(args.rounds):
        for name, x in (("fp32", maps), ("float64", maps.double())):
            start = time.perf_counter()
            smooth_maps(x, args.sigma)
            times[name].append(time.perf_counter() - start)
    median = {k: statistics.median(v) for k, v in times.items()}
    diff = float((smooth_maps(maps, args.sigma).double() - smooth_maps(maps.double(), args.sigma)).abs().max())
    print(json.dumps({"batch": args.batch, "size": args.size, "sigma": args.sigma, "rounds": args.rounds, "threads": torch.get_num_threads(),
                      "fp32_s": round(median["fp32"], 4), "float64_s": round(median["float64"], 4),
                      "speedup": round(median["float64"] / median["fp32"], 2), "max_abs_diff": diff}))


if __name__ == "__main__":
    main()
