"""``napari-clip-ad study``: the source study's whole grid and report from one command, resumable."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``study`` command."""
    from ..study import STUDY_METHODS

    p = subparsers.add_parser("study", help="split, train, infer and report the methods x setups grid on a cohort")
    p.add_argument("--data", type=Path, required=True, help="BraTS-layout cohort folder (cases with segmentations)")
    p.add_argument("--out", type=Path, required=True, help="study folder (split, cells/, report/); rerun to resume")
    p.add_argument("--methods", nargs="+", default=list(STUDY_METHODS), help="methods (default: the study's four)")
    p.add_argument("--setups", nargs="+", default=["industrial", "finetune", "brats", "pmc"],
                   help="industrial, finetune, brats, pmc; trainfree = anomalydino/musc against the training split's subjects")
    p.add_argument("--backbone", default=None, help="override every cell's backbone (e.g. tiny-test for a smoke run)")
    p.add_argument("--epochs", type=int, default=None, help="override the configs' epochs (quick runs)")
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-slices-per-case", type=int, default=None, help="training slices per case (quick runs)")
    p.add_argument("--batch-size", type=int, default=None, help="inference batch size (default: 16 on a GPU, 8 on the CPU)")
    p.add_argument("--threshold", default="0.5", metavar="0.5|f1max", help="report threshold (masks use a number)")
    p.add_argument("--modality", default="t2w")
    p.add_argument("--views", default="axial", choices=["axial", "coronal", "sagittal", "all"])
    p.add_argument("--fuse", default="mean", choices=["mean", "max"])
    p.add_argument("--restrict-to-brain", action="store_true")
    p.add_argument("--smooth3d", type=float, default=0.0, metavar="SIGMA_MM")
    p.add_argument("--min-component", type=int, default=0, metavar="VOXELS")
    p.add_argument("--lesionwise", action="store_true", help="add BraTS-MET lesion-wise Dice to the report")
    p.add_argument("--k-shot", default="0", metavar="K[,K...]",
                   help="few-shot dimension, e.g. 0,4: K > 0 adds <setup>+<K>shot cells for methods with a few-shot mode")
    p.add_argument("--references", default="auto", metavar="auto|PATH",
                   help="normal references of the K > 0 cells: auto (tumour-free slices of the training split) or a folder")
    p.add_argument("--prompts", default=None, metavar="industrial|medical|FILE",
                   help="prompt set for the methods that take one; a non-default set labels the runs <setup>+<set>")
    p.add_argument("--no-baseline", action="store_true",
                   help="skip the model-free intensity baseline (robust z-score) whose row otherwise leads table 1")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the grid, then ``report`` on every cell."""
    from ..cli import main
    from ..engine.views import PostOptions
    from ..report.collect import parse_threshold
    from ..study import StudySettings, run_study

    rule = parse_threshold(args.threshold)
    post = PostOptions(views=PostOptions.parse_views(args.views), fuse=args.fuse, restrict_to_brain=args.restrict_to_brain,
                       smooth3d_mm=args.smooth3d, min_component=args.min_component)
    settings = StudySettings(
        data=args.data, out=args.out, methods=[m.lower() for m in args.methods], setups=args.setups,
        backbone=args.backbone, epochs=args.epochs, device=args.device, seed=args.seed,
        max_slices_per_case=args.max_slices_per_case, batch_size=args.batch_size,
        threshold=rule if isinstance(rule, float) else 0.5, modality=args.modality, post=post,
        baseline=not args.no_baseline, k_shots=_k_shots(args.k_shot), references=args.references, prompts=args.prompts,
    )
    runs = run_study(settings)
    report = ["report", *map(str, runs), "--data", str(args.data), "--out", str(args.out / "report"), "--threshold", args.threshold]
    if args.lesionwise:
        report.append("--lesionwise")
    status = main(report)
    if status == 0:
        print(args.out / "report" / "report.md")
    return status


def _k_shots(text: str) -> list[int]:
    """``--k-shot 0,4`` -> [0, 4] (distinct, whole numbers >= 0)."""
    from ..errors import InputError

    try:
        values = [int(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or any(v < 0 for v in values):
        raise InputError(f"--k-shot {text!r}: give whole numbers >= 0 separated by commas, e.g. 0,4")
    return list(dict.fromkeys(values))
