"""``napari-clip-ad study``: the source study's whole grid and report from one command, resumable."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import InputError


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``study`` command."""
    from ..study import STUDY_METHODS

    p = subparsers.add_parser("study", help="split, train, infer and report the methods x setups grid on a cohort")
    p.add_argument("--data", type=Path, default=None, help="BraTS-layout cohort folder (cases with segmentations); required")
    p.add_argument("--out", type=Path, default=None, help="study folder (split, cells/, report/); rerun to resume; required")
    p.add_argument("--methods", nargs="+", default=list(STUDY_METHODS), help="methods, space- or comma-separated (default: the study's four; others: mvfa, aaclip, ...)")
    p.add_argument("--setups", nargs="+", default=["industrial", "finetune", "brats", "pmc"],
                   help="industrial, finetune, brats, pmc, biomedclip (BiomedCLIP backbone, from scratch; not in the default grid); trainfree = anomalydino/musc against the training split's subjects")
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
    work = p.add_argument_group("one cell at a time (many processes or machines filling one --out)")
    work.add_argument("--list-cells", action="store_true", help="print the grid's cell IDs (stable across runs), one a line, and exit")
    work.add_argument("--cell", default=None, metavar="ID", help="run only this cell (an ID from --list-cells) into --out; no report")
    work.add_argument("--report-only", action="store_true",
                      help="build the report from the cells finished in --out; name the missing ones (exit 1 if any)")
    work.add_argument("--emit-sbatch", type=Path, default=None, metavar="DIR",
                      help="write cells.sbatch (one array task per cell), report.sbatch (afterany) and submit.sh to DIR; run nothing")
    work.add_argument("--executor", choices=["local", "slurm"], default="local",
                      help="local: every cell in this process (default); slurm: the unfinished cells as one Slurm job "
                      "array (submitit, extra 'napari-clip-ad[cluster]'), the report as a job after it")
    work.add_argument("--detach", action="store_true", help="with --executor slurm: return after submitting (see --status)")
    work.add_argument("--status", type=Path, default=None, metavar="OUT",
                      help="finished / running / pending / failed cells of the study in OUT (folder and Slurm), with logs")
    from ..cluster import add_slurm_arguments

    add_slurm_arguments(p)
    p.set_defaults(func=run, study_parser=p)


def settings_from_args(args: argparse.Namespace):
    """The :class:`~napari_clip_ad.study.StudySettings` of parsed ``study`` flags."""
    from ..engine.views import PostOptions
    from ..report.collect import parse_threshold
    from ..study import StudySettings

    rule = parse_threshold(args.threshold)
    post = PostOptions(views=PostOptions.parse_views(args.views), fuse=args.fuse, restrict_to_brain=args.restrict_to_brain,
                       smooth3d_mm=args.smooth3d, min_component=args.min_component)
    settings = StudySettings(
        data=args.data, out=args.out, methods=[m.lower() for given in args.methods for m in given.split(",") if m], setups=args.setups,
        backbone=args.backbone, epochs=args.epochs, device=args.device, seed=args.seed,
        max_slices_per_case=args.max_slices_per_case, batch_size=args.batch_size,
        threshold=rule if isinstance(rule, float) else 0.5, modality=args.modality, post=post,
        baseline=not args.no_baseline, k_shots=_k_shots(args.k_shot), references=args.references, prompts=args.prompts,
    )
    return settings


def run(args: argparse.Namespace) -> int:
    """Run the grid (or one cell, or only the report), then ``report`` on every finished cell."""
    from ..study import cell_ids, finished_runs, prepare_study, run_study

    if args.status:
        return _status(args.status)
    if args.data is None or args.out is None:
        raise InputError("study needs --data COHORT_DIR and --out STUDY_DIR (or --status OUT)")
    settings = settings_from_args(args)
    if sum(map(bool, (args.list_cells, args.cell, args.report_only, args.emit_sbatch))) > 1:
        raise InputError("give one of --list-cells, --cell ID, --report-only, --emit-sbatch DIR")
    if args.emit_sbatch:
        return _emit_sbatch(args, cell_ids(settings))
    if args.list_cells:
        print("\n".join(cell_ids(settings)))
        return 0
    if args.cell:
        run_study(settings, only=args.cell)
        print(settings.out / "cells" / args.cell / "done.json")
        return 0
    if args.report_only:
        _, _, grid = prepare_study(settings)
        runs, missing = finished_runs(settings, grid)
        for name in missing:
            print(f"missing: cell {name} not finished; run 'study ... --cell {name}' (or rerun the study)", file=sys.stderr)
        if not runs:
            raise InputError(f"{args.out}: no finished cells to report yet ({len(missing)} missing)")
        status = _report(args, runs)
        return status or (1 if missing else 0)
    if args.executor == "slurm":
        return _run_on_slurm(args, settings)
    return _report(args, run_study(settings))


def _run_on_slurm(args: argparse.Namespace, settings) -> int:
    """Submit the unfinished cells (one array) and the report (afterany); attached, wait and report here too."""
    from ..cluster import slurm_options_from_args
    from ..cluster.sbatch import rebuild_command
    from ..cluster.submit import submit_cells, wait_and_report
    from ..study import finished_runs, prepare_study

    _, _, grid = prepare_study(settings)
    _, todo = finished_runs(settings, grid)
    if not todo:
        settings.log("every cell finished earlier; writing the report")
        return _report(args, finished_runs(settings, grid)[0])
    line = rebuild_command(args, args.study_parser, drop=("emit_sbatch", "list_cells", "cell", "report_only",
                                                          "executor", "detach", "status"))
    record = submit_cells(args.out, todo, line, slurm_options_from_args(args))
    settings.log(f"submitted {len(todo)} cells as Slurm array {record['array']} (logs in {record['folder']}), "
                 f"report as job {record['report']} after it; 'study --status {args.out}' shows progress")
    if args.detach:
        return 0
    failed = wait_and_report(args.out, todo, settings.log)
    runs, missing = finished_runs(settings, grid)
    status = _report(args, runs) if runs else 1
    if failed or missing:
        print(f"error: {len(missing)} cells not finished; rerun the same command to resubmit only those", file=sys.stderr)
        return 1
    return status


def _status(out: Path) -> int:
    """``study --status OUT``: each cell's state from the folder and Slurm, with its log."""
    import json

    from ..cluster.state import cell_states, summarize

    from ..cluster.state import read_jobs

    info = out / "study.json"
    recorded = [cell for record in read_jobs(out).get("submissions", []) for cell in record["cells"]]
    if not info.is_file() and not recorded:
        raise InputError(f"{out}: no study.json and no Slurm submission recorded; give the --out of a study")
    # Before any cell task ran (study.json is written by the first), the submitted cells are the grid.
    ids = json.loads(info.read_text())["cells"] if info.is_file() else list(dict.fromkeys(recorded))
    states = cell_states(out, ids)
    for cell, (kind, log, slurm_state) in states.items():  # cell, state, then (unless finished) log and Slurm's state
        print("\t".join([cell, kind, *([log, slurm_state] if log and kind != "finished" else [])]))
    print(summarize(states), file=sys.stderr)
    return 0


def _emit_sbatch(args: argparse.Namespace, ids: list[str]) -> int:
    """Write the plain-Slurm scripts for this grid (see :mod:`napari_clip_ad.cluster.sbatch`)."""
    from ..cluster import slurm_options_from_args
    from ..cluster.sbatch import rebuild_command, write_sbatch

    line = rebuild_command(args, args.study_parser, drop=("emit_sbatch", "list_cells", "cell", "report_only", "executor", "detach", "status"))
    paths = write_sbatch(args.emit_sbatch, ids, line, slurm_options_from_args(args), out=args.out)
    for path in paths:
        print(path)
    print(f"{len(ids)} cells; submit with: bash {paths[-1]}", file=sys.stderr)
    return 0


def _report(args: argparse.Namespace, runs: list[Path]) -> int:
    """``report`` on the given map folders into ``<out>/report``."""
    from ..cli import main

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
