"""Seconds per volume and peak memory of cross-subject scoring vs pool size; bf16 vs float32 feature storage.

A target volume is scored against pools of 1, 4 and 16 subjects of 155 axial slices (145 with brain), with
ViT-S/14 shapes at 224 px: 256 patches x 384 channels per slice and block (anomalydino: 1 block; musc: its 4
official blocks scaled). Random features stand in for the cached ones (the backbone is not timed: pool
features are read from the warm safetensors cache, as in a cohort run after the first case), so the timings
are those of reading the pool, choosing the references, the chunked exact kNN / MSM, map resizing and the
sigma-4 Gaussian. Each configuration runs in its own process, which reports its peak resident memory
(``ru_maxrss``) beside the memory before the volumes are made (imports, model); the pool's features alone are listed for comparison.

anomalydino scores the whole 145-slice target. musc costs seconds per slice on a CPU, so it scores a
35-slice target (25 brain slices) and its per-volume figure is extrapolated x 145 / 25 (labelled so; an upper
bound: the pool is read once per run, not once per 25 slices).

``--dtype-check``: the same configuration with the pool and target features held in float32 and in bfloat16
(``CrossSubjectSettings.feature_dtype``) in one process: time ratio and the largest map difference.

Usage: python benchmarks/crosssubject_speed.py [--pools 1 4 16] [--methods anomalydino musc] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import napari_clip_ad.crosssubject as cs
from napari_clip_ad.methods import build_method

POOL_SLICES = 155
TARGET_SLICES = {"anomalydino": 155, "musc": 35}
BRAIN_MARGIN = 5
"""Slices without brain at each end (155 slices -> 145 brain slices, as a BraTS volume)."""
VOLUME_BRAIN_SLICES = POOL_SLICES - 2 * BRAIN_MARGIN


def _subject(case_id: str, n_slices: int, seed: int) -> cs.Subject:
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[:n_slices, :240, :240]
    brain = ((y - 120) ** 2 + (x - 120) ** 2 < 90**2) & (z >= BRAIN_MARGIN) & (z < n_slices - BRAIN_MARGIN)
    return cs.Subject(case_id, (brain * rng.random(brain.shape)).astype(np.float32), brain)


def _random_tap(method, images: torch.Tensor) -> torch.Tensor:
    # Random 384-channel tokens stand in for cached ViT-S/14 features (the backbone is not timed).
    return torch.randn(images.shape[0], len(method.layers), 256, 384, device=images.device)


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _method(name: str, device: str):
    options = {"layers": [6]} if name == "anomalydino" else {}
    return build_method(name, backbone="tiny-dinov2", image_size=224, device=device, **options)


def run_one(name: str, k: int | None, n_pool: int, dtype: str, cache: Path, device: str) -> dict:
    """One configuration in this process: warm the cache, then time one ``score_volume``."""
    cs._tap = _random_tap
    method = _method(name, device)
    base = _rss_mib()
    target = _subject("target", TARGET_SLICES[name], 0)
    pool = [_subject(f"s{i}", POOL_SLICES, i + 1) for i in range(n_pool)]
    for subject in (target, *pool):  # features on disk (each computed once, then freed)
        cs.subject_features(method, subject, cache)
    settings = cs.CrossSubjectSettings(k=k, feature_dtype=dtype)
    start = time.perf_counter()
    result = cs.score_volume(method, target, pool, settings, cache_dir=cache)
    seconds = time.perf_counter() - start
    n_slices = result.info["slices_analysed"]
    per_slice_bytes = len(method.layers) * 256 * 384 * (2 if dtype == "bfloat16" else 4)
    return {"method": name, "k": k, "pool": n_pool, "dtype": dtype, "seconds": seconds, "target_slices": n_slices,
            "seconds_per_volume": seconds * VOLUME_BRAIN_SLICES / n_slices, "rss_base_mib": base, "rss_peak_mib": _rss_mib(),
            "pool_features_mib": n_pool * VOLUME_BRAIN_SLICES * per_slice_bytes / 2**20,
            "references_per_slice": result.info["references_per_slice"]}


def dtype_check(name: str, n_pool: int, cache: Path, device: str) -> dict:
    """float32 vs bfloat16 feature storage on the same random features: time and largest map difference."""
    cs._tap = _random_tap
    method = _method(name, device)
    target = _subject("target", TARGET_SLICES[name], 0)
    pool = [_subject(f"s{i}", POOL_SLICES, i + 1) for i in range(n_pool)]
    out = {}
    for dtype in ("float32", "bfloat16", "float32"):  # float32 twice: the first run warms the cache
        start = time.perf_counter()
        result = cs.score_volume(method, target, pool, cs.CrossSubjectSettings(feature_dtype=dtype), cache_dir=cache)
        out[dtype] = (time.perf_counter() - start, result.anomaly_map, result.scores)
    (t32, m32, s32), (t16, m16, s16) = out["float32"], out["bfloat16"]
    return {"method": name, "pool": n_pool, "seconds_fp32": t32, "seconds_bf16": t16, "ratio": t16 / t32,
            "max_map_diff": float(np.abs(m32 - m16).max()), "mean_map_diff": float(np.abs(m32 - m16).mean()),
            "max_slice_score_diff": float(np.abs(s32 - s16).max())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pools", type=int, nargs="*", default=[1, 4, 16])
    parser.add_argument("--methods", nargs="*", default=["anomalydino", "musc"])
    parser.add_argument("--ks", nargs="*", default=["16", "all"], help="references per slice: a number or 'all' (in the window)")
    parser.add_argument("--dtypes", nargs="*", default=["float32"])
    parser.add_argument("--dtype-check", action="store_true", help="float32 vs bfloat16 map difference (pool of 4)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument("--one", nargs=4, metavar=("METHOD", "K", "POOL", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    cache = args.cache or Path(tempfile.mkdtemp(prefix="cs_speed_"))
    if args.one:
        name, k, n_pool, dtype = args.one
        print(json.dumps(run_one(name, None if k == "all" else int(k), int(n_pool), dtype, cache, args.device)))
        return
    if args.dtype_check:
        for name in args.methods:
            print(json.dumps(dtype_check(name, 4, cache, args.device)), flush=True)
        return
    print("| method | references per slice | pool subjects | features | s / volume | peak RSS (MiB) | before scoring (MiB) | pool features (MiB) |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.methods:
        for k in args.ks:
            for dtype in args.dtypes:
                for n in args.pools:
                    cmd = [sys.executable, __file__, "--one", name, k, str(n), dtype, "--cache", str(cache), "--device", args.device]
                    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
                    if done.returncode != 0:
                        print(f"| {name} | {k} | {n} | {dtype} | failed: {done.stderr.strip().splitlines()[-1:]} |", flush=True)
                        continue
                    row = json.loads(done.stdout.strip().splitlines()[-1])
                    seconds = f"{row['seconds_per_volume']:.1f}"
                    if row["target_slices"] != VOLUME_BRAIN_SLICES:
                        seconds += f" (extrapolated: {row['seconds']:.1f} s for {row['target_slices']} slices)"
                    refs = "16 closest" if k != "all" else f"all in +-5 % ({row['references_per_slice']['max']} max)"
                    print(f"| {name} | {refs} | {n} | {dtype} | {seconds} | {row['rss_peak_mib']:.0f} | {row['rss_base_mib']:.0f} "
                          f"| {row['pool_features_mib']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
