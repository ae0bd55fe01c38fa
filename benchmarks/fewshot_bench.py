"""Cost of few-shot references: zero-shot vs K-shot ``run_volume`` on the same slices, same run.

For each (backbone, method), the same seeded model analyses the same slices of the synthetic case
zero-shot, then with K normal reference slices (``set_references``); the JSON gives the time of
building the memory, both volume times and their ratio (random weights: speed only).

Usage:
    python benchmarks/fewshot_bench.py --runs tiny-test:vand tiny-test:winclip random:ViT-B-16-plus-240:vand \
        --slices 16 --k-shot 4 > fewshot_bench.json
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from napari_clip_ad import build_method, run_volume, sample_case
from napari_clip_ad.engine import preprocess_slices


def bench(backbone: str, name: str, volume: np.ndarray, references: np.ndarray, rounds: int) -> dict[str, object]:
    method = build_method(name, backbone, device="cpu")
    run_volume(volume[:2], method)  # warm-up (text features, kernels)

    def timed() -> float:
        best = float("inf")
        for _ in range(rounds):
            start = time.perf_counter()
            run_volume(volume, method, batch_size=8)
            best = min(best, time.perf_counter() - start)
        return best

    zero = timed()
    images = preprocess_slices(torch.from_numpy(references), method.image_size, method.backbone.mean, method.backbone.std)
    start = time.perf_counter()
    method.set_references(images)
    memory = time.perf_counter() - start
    few = timed()
    return {"backbone": method.backbone.label, "method": name, "slices": int(len(volume)), "k_shot": int(len(references)),
            "memory_s": round(memory, 3), "zero_shot_s": round(zero, 3), "few_shot_s": round(few, 3),
            "few_over_zero": round(few / zero, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", default=["tiny-test:vand", "tiny-test:winclip"], help="BACKBONE:METHOD")
    parser.add_argument("--slices", type=int, default=16)
    parser.add_argument("--k-shot", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    case = sample_case(seed=0)
    t2w = case.images["t2w"]
    middle = t2w.shape[0] // 2
    volume = np.ascontiguousarray(t2w[middle - args.slices // 2 : middle + (args.slices + 1) // 2])
    references = np.ascontiguousarray(t2w[middle - args.slices // 2 - args.k_shot : middle - args.slices // 2])
    results = []
    for run in args.runs:
        backbone, name = run.rsplit(":", 1)
        results.append(bench(backbone, name, volume, references, args.rounds))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
