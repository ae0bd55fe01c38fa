"""Seconds per training epoch with and without the frozen-feature cache, in one run.

Without the cache the frozen CLIP encoder runs on every slice at every step; with it the encoder runs
once per (slice, augmented view) and later epochs only run the trainable head (and, for AnomalyCLIP,
the text encoder through its learned prompts). Epoch 1 with the cache includes filling it; the
steady-state epoch (epoch 2 onwards, all views cached) is what the ratio compares. The final weights
of the two modes agree up to float rounding (checked and printed). AdaCLIP (no cache possible:
prompts inside the encoder) is timed at batch 1 vs 8 when the method exists. MVFA-AD's adapters change
the input of every later block, so its cache holds only the stream up to the first adapter.

Usage:
    python benchmarks/train_bench.py --backbone tiny-test --slices 48
    python benchmarks/train_bench.py --backbone random:ViT-L-14-336 --device cuda --slices 256
Random weights are used (no download needed): speed does not depend on the weight values.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from napari_clip_ad.io import find_cases
from napari_clip_ad.methods import list_methods
from napari_clip_ad.train import Trainer, build_trainable, resolve_config
from napari_clip_ad.train.data import SliceSet, load_slices

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "brats2023"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def epoch_times(method_name: str, backbone: str, device: str, train: SliceSet, val: SliceSet, epochs: int, **changes) -> dict:
    """Wall time of each epoch and the final trainable weights."""
    config = resolve_config(method_name, "brats", backbone=backbone, device=device, epochs=epochs, views=1, **changes)
    method = build_trainable(config, torch.device(device))
    times = []
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(config, method, train, val, Path(run_dir), progress=False)
        for epoch in range(1, epochs + 1):
            _sync(method.device)
            start = time.perf_counter()
            trainer.train_epoch(epoch)
            _sync(method.device)
            times.append(time.perf_counter() - start)
    return {"epoch_s": times, "weights": {k: v.detach().cpu().clone() for k, v in method.trainable_state_dict().items()}}


def main() -> None:
    """Run the benchmark and print one JSON object."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="tiny-test")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--slices", type=int, default=48, help="training slices (evenly spaced brain slices of the real cases)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--data", type=Path, default=DATA, help="BraTS cohort folder (default: ../shared/data/brats2023)")
    parser.add_argument("--methods", default="vand,anomalyclip,mvfa,adaclip",
                        help="methods to time (mvfa caches only the stream up to its first adapter)")
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (the first cached epoch fills the cache; later ones are the steady rate)")
    cases = find_cases(args.data)
    per_case = max(1, args.slices // len(cases))
    train = load_slices(cases, ["t2w"], max_slices_per_case=per_case)
    val = load_slices(cases[:1], ["t2w"], max_slices_per_case=4)
    report: dict = {"backbone": args.backbone, "device": args.device, "slices": len(train), "threads": torch.get_num_threads()}
    chosen = [m.strip() for m in args.methods.split(",") if m.strip()]
    for name in [m for m in ("vand", "anomalyclip", "mvfa") if m in chosen]:
        if name not in list_methods():
            report[name] = "not available"
            continue
        cached = epoch_times(name, args.backbone, args.device, train, val, args.epochs, cache=True)
        plain = epoch_times(name, args.backbone, args.device, train, val, 1, cache=False)
        steady = min(cached["epoch_s"][1:])
        report[name] = {
            "no_cache_epoch_s": plain["epoch_s"][0],
            "cache_first_epoch_s (fills cache)": cached["epoch_s"][0],
            "cache_epoch_s (steady)": steady,
            "speedup_per_epoch": plain["epoch_s"][0] / steady,
        }
        once = epoch_times(name, args.backbone, args.device, train, val, 1, cache=True)
        report[name]["max_abs_weight_diff_cache_vs_no_cache_after_1_epoch"] = max(
            float((once["weights"][k] - plain["weights"][k]).abs().max()) for k in plain["weights"])
    if "adaclip" in chosen and "adaclip" in list_methods():
        batch1 = epoch_times("adaclip", args.backbone, args.device, train, val, 1, batch_size=1)
        batch8 = epoch_times("adaclip", args.backbone, args.device, train, val, 1, batch_size=8)
        report["adaclip"] = {"batch1_epoch_s": batch1["epoch_s"][0], "batch8_epoch_s": batch8["epoch_s"][0],
                             "speedup": batch1["epoch_s"][0] / batch8["epoch_s"][0]}
    elif "adaclip" in chosen:
        report["adaclip"] = "not available"
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
