"""Cost of the load-time weight checks (NaN/inf, dtypes) against a plain copy of the same tensors.

Usage: python benchmarks/bench_weight_checks.py [MILLION_PARAMETERS]  (default 86: a ViT-B/16 state dict)

Loading a state dict copies every tensor once (``load_state_dict``), so "checks / copy" is the share the
checks add to that step. The fast path sums each tensor (a NaN or inf anywhere makes the sum non-finite);
the element-wise ``isfinite().all()`` it replaced is timed for comparison.
"""

from __future__ import annotations

import sys
import time

import torch

from napari_clip_ad.backbones.local_file import check_tensors


def _time(fn, rounds: int = 3) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    millions = float(sys.argv[1]) if len(sys.argv) > 1 else 86.0
    n = int(millions * 1e6)
    # ViT-like: many 2D weights of a few sizes.
    shapes = [(768, 768)] * max(1, n // (768 * 768))
    state = {f"w{i}": torch.randn(shape) for i, shape in enumerate(shapes)}
    total = sum(t.numel() for t in state.values())
    copy = _time(lambda: {k: v.clone() for k, v in state.items()})
    checks = _time(lambda: check_tensors(state, "bench"))
    exact = _time(lambda: [bool(torch.isfinite(v).all()) for v in state.values()])
    print(f"| {total / 1e6:.0f}M fp32 | {torch.get_num_threads()} | {copy:.3f} | {checks:.3f} | {exact:.3f} | "
          f"{checks / copy:.2f} | {exact / copy:.2f} |")


if __name__ == "__main__":
    main()
