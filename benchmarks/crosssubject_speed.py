"""Seconds per volume of cross-subject scoring vs pool size (backbone passes excluded: features are cached).

A target of 155 axial slices is scored against pools of 1, 4 and 16 subjects (155 slices each, ViT-S/14 at
224 px: 256 patches x 384 channels per slice; random features stand in for the cached ones, so only the
matching, map resizing and smoothing are timed, features read from the warm safetensors cache). Beside it, in the same run, the chunked exact 1-NN of
``methods/knn.py`` against the naive ``torch.cdist(q, bank).min(1)`` on the largest bank, and the largest
difference bf16 bank storage makes to the distances.

Usage: python benchmarks/crosssubject_speed.py [--pools 1 4 16] [--slices 155]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import napari_clip_ad.crosssubject as cs
from napari_clip_ad.methods import build_method
from napari_clip_ad.methods.knn import nearest_sq_l2


def _subject(case_id: str, n_slices: int, seed: int) -> cs.Subject:
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[:n_slices, :240, :240]
    brain = ((y - 120) ** 2 + (x - 120) ** 2 < 90**2) & (z >= 10) & (z < n_slices - 10)
    return cs.Subject(case_id, (brain * rng.random(brain.shape)).astype(np.float32), brain)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pools", type=int, nargs="*", default=[1, 4, 16])
    parser.add_argument("--slices", type=int, default=155)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    # Random 384-channel tokens stand in for cached ViT-S/14 features (the backbone is not timed).
    cs._tap = lambda method, images: torch.randn(images.shape[0], len(method.layers), 256, 384, device=images.device)
    import tempfile

    cache = Path(tempfile.mkdtemp(prefix="cs_speed_"))
    target = _subject("target", args.slices, 0)
    subjects = [_subject(f"s{i}", args.slices, i + 1) for i in range(max(args.pools))]
    print("| method | references per slice | pool subjects | seconds per volume |")
    print("|---|---|---|---|")
    for name, settings in (("anomalydino", cs.CrossSubjectSettings(k=16)), ("anomalydino", cs.CrossSubjectSettings(k=None)), ("musc", cs.CrossSubjectSettings(k=16))):
        method = build_method(name, backbone="tiny-dinov2", image_size=224, device=args.device, layers=[6])
        for n in args.pools:
            pool = subjects[:n]
            cs.score_volume(method, target, pool, settings, cache_dir=cache)  # warm the feature cache
            start = time.perf_counter()
            cs.score_volume(method, target, pool, settings, cache_dir=cache)
            seconds = time.perf_counter() - start
            k = "16 closest" if settings.k else "all in +-5 %"
            print(f"| {name} | {k} | {n} | {seconds:.1f} |", flush=True)
    # chunked exact 1-NN vs naive cdist on the biggest all-in-window bank, and bf16 storage
    bank = torch.nn.functional.normalize(torch.randn(16 * 16 * 256, 384), dim=-1)
    queries = torch.nn.functional.normalize(torch.randn(256, 384), dim=-1)
    start = time.perf_counter()
    ours = nearest_sq_l2(queries, bank)
    t_ours = time.perf_counter() - start
    start = time.perf_counter()
    naive = torch.cdist(queries, bank).min(dim=1).values ** 2
    t_naive = time.perf_counter() - start
    bf16 = nearest_sq_l2(queries, bank.bfloat16())
    print(f"\n1-NN of 256 patches in {bank.shape[0]} (16 subjects x 16 slices x 256): chunked {t_ours * 1e3:.0f} ms, "
          f"naive cdist {t_naive * 1e3:.0f} ms (ratio {t_naive / t_ours:.2f}); max |diff| {float((ours - naive).abs().max()):.1e}; "
          f"bf16 bank: max |diff| of the cosine distance {float(((bf16 - ours) / 2).abs().max()):.1e}")


if __name__ == "__main__":
    main()
