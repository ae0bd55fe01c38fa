"""``napari-clip-ad train``: train a method's parts on a BraTS cohort (frozen CLIP), headless."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``train`` command."""
    from ..train.config import SETUPS

    p = subparsers.add_parser("train", help="train a method's trainable parts on a cohort (CLIP stays frozen)")
    p.add_argument("--method", required=True, help="vand, anomalyclip, adaclip (anovl is training-free)")
    p.add_argument("--setup", required=True, choices=SETUPS,
                   help="industrial: released weights, no training; finetune: train from released weights; "
                        "brats: random-init parts; pmc: PMC-CLIP backbone, random-init parts; "
                        "biomedclip: BiomedCLIP backbone, random-init parts")
    p.add_argument("--data", type=Path, required=True, help="cohort folder of labelled cases")
    p.add_argument("--split", type=Path, default=None, help="split.json (default: a seeded 70/30 patient split saved in --out)")
    p.add_argument("--out", type=Path, required=True, help="run folder (config, split, metrics.jsonl, checkpoints/)")
    p.add_argument("--config", type=Path, default=None, help="JSON config (e.g. training/configs/vand-brats.json)")
    p.add_argument("--resume", action="store_true", help="continue from --out/checkpoints/last.safetensors")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out (default: refuse to touch it)")
    p.add_argument("--backbone", default=None)
    p.add_argument("--weights", default=None, help="starting weights for finetune (released name or file)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--modality", default=None, help="t2w (default), t1n, t1c, t2f, or three joined by '+'")
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--max-slices-per-case", type=int, default=None, help="keep this many brain slices per case (quick runs)")
    p.add_argument("--no-cache", action="store_true", help="run the frozen encoder every step (no feature cache)")
    p.add_argument("--cache-memory-gb", type=float, default=None,
                   help="RAM for the feature cache per process before it spills to RUN_DIR/feature_cache (default: half the RAM)")
    p.add_argument("--stop-after-epoch", type=int, default=None, help="stop after this epoch (resume later with --resume)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Resolve the config, then train (or, for ``industrial``, write the config and stop)."""
    from ..atomic import write_json
    from ..errors import InputError
    from ..methods import resolve_device
    from ..outputs import check_output_folder, output_lock
    from ..train import resolve_config, run_training
    from ..train.config import FROM_SCRATCH_SETUPS

    if args.weights is not None and args.setup in FROM_SCRATCH_SETUPS:
        raise InputError(f"--weights is for setups industrial/finetune; setup {args.setup!r} trains from random init")
    config = resolve_config(
        args.method, args.setup, args.config, backbone=args.backbone, weights=args.weights, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, modality=args.modality, device=args.device, seed=args.seed,
        max_slices_per_case=args.max_slices_per_case, stop_after_epoch=args.stop_after_epoch,
        cache=False if args.no_cache else None, cache_memory_gb=args.cache_memory_gb,
    )
    resolve_device(config.device)
    from ..train.config import STUDY_DEFAULTS

    study = STUDY_DEFAULTS.get(config.method, {})
    if config.setup in ("industrial", "finetune") and config.weights is None and study.get("lr") and study.get("released") is None:
        raise InputError(f"--setup {config.setup}: {config.method} has no released weights (its authors published none); "
                         "give --weights FILE (e.g. a checkpoint its official train.py wrote), or train it with --setup brats or pmc")
    check_output_folder(args.out)
    if config.setup == "industrial" or config.epochs == 0:
        with output_lock(args.out, "train"):
            saved = args.out / "config.json"
            if saved.is_file() and not args.overwrite and not _same_config(saved, config.to_dict()):
                raise InputError(f"{saved}: holds another run's config; give --overwrite to replace it, or a new --out")
            write_json(saved, config.to_dict())
        what = f"released weights {config.weights!r} are used as published" if config.weights else f"{config.method} runs 0 epochs (training-free, or --epochs 0)"
        print(f"setup {config.setup!r}: {what}; nothing to train "
              f"(resolved config written to {args.out / 'config.json'})", file=sys.stderr)
        return 0
    history = run_training(config, args.data, args.out, args.split, resume=args.resume, overwrite=args.overwrite)
    for record in history:
        print(json.dumps(record))
    print(args.out / "checkpoints" / "last.safetensors")
    return 0


def _same_config(path: Path, config: dict) -> bool:
    """True when ``path`` holds exactly ``config`` (a damaged file is not the same)."""
    try:
        return json.loads(path.read_text(encoding="utf-8")) == config
    except (OSError, UnicodeDecodeError, ValueError):
        return False
