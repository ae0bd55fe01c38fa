"""``napari-clip-ad infer``: anomaly maps, masks and per-case metrics for a case or a cohort."""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from ..atomic import write_json
from ..errors import Cancelled, ClipAdError, InputError, OutputError
from ..io import case_id_of, find_cases, load_case

if TYPE_CHECKING:  # pragma: no cover
    from ..engine.overlap import CaseOutcome, CaseSteps


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``infer`` command."""
    p = subparsers.add_parser("infer", help="run a method on a case or cohort folder; write maps, masks, metrics")
    p.add_argument("path", type=Path, help="a case folder or a cohort folder of cases")
    p.add_argument("--method", default="vand", help="method name (see 'napari-clip-ad weights list' for weights)")
    p.add_argument("--backbone", default=None, help="backbone registry name, ARCH:TAG, hf-hub: name or file")
    p.add_argument("--weights", default=None, help="method weights: released name or file (.pth as published, or .safetensors)")
    from ..case_options import add_case_arguments

    add_case_arguments(p)
    p.add_argument("--axis", default=None, choices=["axial", "coronal", "sagittal"], help="slicing axis (default axial); same as --views with one view")
    p.add_argument("--prompts", default=None, metavar="industrial|medical|FILE",
                   help="prompt set of methods with hand-written prompts (vand, winclip, anovl, adaclip)")
    p.add_argument("--device", default="auto")
    p.add_argument("--image-size", type=int, default=None,
                   help="square input size (default 240, the study's; 224 for anomalydino/musc in cross-subject mode)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--serial-io", action="store_true",
                   help="load, run and write each case in turn (default: load the next case and write the previous "
                        "one in background threads while a case runs; same files)")
    p.add_argument("--shard", default=None, metavar="K/N",
                   help="run only shard K of N (every N-th case of the sorted cohort) into the shared --out; then --merge")
    p.add_argument("--merge", action="store_true",
                   help="after --shard runs: write infer.json and metrics for the cases the shards wrote, name the missing ones")
    p.add_argument("--executor", choices=["local", "slurm"], default="local",
                   help="slurm: --shards N shards as one Slurm job array (submitit), then --merge after them")
    p.add_argument("--shards", type=int, default=None, metavar="N", help="with --executor slurm: how many shards (array tasks)")
    p.add_argument("--detach", action="store_true", help="with --executor slurm: return after submitting")
    from ..cluster import add_slurm_arguments

    add_slurm_arguments(p)
    p.set_defaults(func=run, infer_parser=p)


def run(args: argparse.Namespace) -> int:
    """Run inference and write ``<id>_anomaly.nii.gz``, ``<id>_mask.nii.gz``, ``<id>_metrics.json``.

    A cohort goes on past a broken case: ``infer.json`` lists what succeeded and what failed (with the
    reason) and the exit status is 1. A single case that fails raises (exit 2, nothing written).
    """
    import torch

    from ..distributed import init_distributed, rank_device
    from ..engine.pipeline import ReferencePool, build_pipeline_method, options_from_args
    from ..methods import resolve_device
    from ..outputs import CohortLog, check_output_folder, gather_cohort_logs, rank_output_lock

    from ..cohort import finish_shard, parse_shard, shard_cases, start_shard
    from ..engine.overlap import run_cases

    if args.merge:
        return _merge(args)
    if args.executor == "slurm":
        return _submit(args)
    options = options_from_args(args)
    check_output_folder(args.out)
    device = resolve_device(args.device)
    all_cases = find_cases(args.path)
    shard = parse_shard(args.shard) if args.shard else None
    # Under torchrun the ranks share the cohort (or the shard) round-robin, each on its own GPU; gloo carries only the barrier.
    ranks = init_distributed(torch.device("cpu"))
    cases = (shard_cases(all_cases, shard) if shard else all_cases)[ranks.rank :: ranks.world]
    # One writer per output folder; shards of one run share it by design (each records itself, --merge joins them).
    lock = contextlib.nullcontext() if shard else rank_output_lock(args.out, "infer", ranks)
    with lock:
        method = build_pipeline_method(args.method, args.backbone, options, weights=args.weights, image_size=args.image_size,
                                       device=rank_device(device, ranks), **({"prompts": args.prompts} if args.prompts else {}))
        description = method.describe()
        if method.backbone.random_weights:
            print(f"note: backbone {method.backbone.label}: results come from random weights and mean nothing", file=sys.stderr)
        # --references auto in a cohort: the other cases of the cohort (never the analysed patient).
        pool = ReferencePool(options, method, training_cases=all_cases) if options.few_shot else None
        summary = {**description, **options.describe(), "weights": getattr(method, "weights_source", None),
                   "world_size": ranks.world}
        if shard and ranks.main:
            start_shard(args.out, shard, shard_cases(all_cases, shard), summary)
        log, written = CohortLog(), []
        single = len(all_cases) == 1

        def record(outcome: CaseOutcome) -> None:
            case_id = case_id_of(outcome.path)
            if outcome.ok:
                log.success(case_id, outcome.files)
                written.extend(outcome.files)
                return
            exc = outcome.error
            log.failure(case_id, str(exc) if isinstance(exc, ClipAdError) else f"{type(exc).__name__}: {exc}")

        def fatal(outcome: CaseOutcome) -> bool:
            # A write failure (full or read-only disk) and a cancel stop the run; a broken case does not,
            # except when it is the only one (it fails as before).
            return single or isinstance(outcome.error, (OutputError, Cancelled))

        bar = tqdm(total=len(cases), desc="cases", unit="case", file=sys.stderr, disable=True if len(cases) < 2 else None)
        try:
            run_cases(cases, case_steps(method, options, args.out, pool), overlap=not getattr(args, "serial_io", False),
                      fatal=fatal, on_outcome=lambda outcome: (record(outcome), bar.update(1)))
        finally:
            bar.close()
        log = gather_cohort_logs(log, args.out, ranks)
        if ranks.main and shard:  # a shard records itself; 'infer --merge' writes infer.json for the union
            finish_shard(args.out, shard, shard_cases(all_cases, shard), summary)  # failed cases: missing at --merge
        elif ranks.main:  # one summary for the whole cohort, written once every rank has finished
            write_json(args.out / "infer.json", {**summary, "cases": [case_id_of(p) for p in all_cases], **log.summary()})
    for path in written:
        print(path)
    if ranks.main:
        log.report(args.out / ("infer.json" if not shard else "shards"))
    return log.exit_code


def case_steps(method, options, out: Path, pool=None) -> CaseSteps:  # noqa: ANN001
    """Load, run and write steps of one case as ``infer`` does them (for :func:`~..engine.overlap.run_cases`)."""
    from ..engine.overlap import CaseSteps, without_images

    def load(path: Path):  # noqa: ANN202
        return load_case(path, modalities=options.modalities_to_load)

    def compute(path: Path, case):  # noqa: ANN001, ANN202
        from ..engine.pipeline import run_case

        bars: list[tqdm] = []

        def progress_for(view: str, case_id: str = case.case_id):
            label = case_id if len(options.views) == 1 else f"{case_id} {view}"
            bar = tqdm(total=0, desc=label, unit="slice", file=sys.stderr, leave=False, disable=None)
            bars.append(bar)

            def progress(done: int, total: int) -> None:
                bar.total = total
                bar.n = done
                bar.refresh()

            return progress

        try:
            return run_case(case, method, options, progress_for=progress_for, references=pool)
        finally:
            for bar in bars:
                bar.close()

    def write(path: Path, case, result) -> list[Path]:  # noqa: ANN001
        return write_outputs(result, case, out / case_id_of(path))

    return CaseSteps(load, compute, write, slim=without_images)


def write_outputs(result, case, stem: Path) -> list[Path]:  # noqa: ANN001
    """Write one case's files; on failure its files of this run are removed (all or nothing).

    A :class:`ClipAdError` while writing becomes an :class:`OutputError` (full or read-only disk: it stops the run).
    """
    from ..engine.pipeline import CASE_OUTPUT_SUFFIXES, write_case_outputs

    try:
        return write_case_outputs(result, case, stem)
    except BaseException as exc:
        for suffix in CASE_OUTPUT_SUFFIXES:
            Path(f"{stem}{suffix}").unlink(missing_ok=True)
        if isinstance(exc, ClipAdError) and not isinstance(exc, OutputError):
            raise OutputError(str(exc)) from None
        raise


def _submit(args: argparse.Namespace) -> int:
    """``--executor slurm``: the shards as one array and the merge after it (see napari_clip_ad.cluster.submit)."""
    from ..cluster import slurm_options_from_args
    from ..cluster.sbatch import rebuild_command
    from ..cluster.submit import submit_shards

    if not args.shards or args.shards < 1 or args.shard:
        raise InputError("--executor slurm needs --shards N (N >= 1, one array task each) and no --shard")
    line = [str(args.path.resolve()), *rebuild_command(args, args.infer_parser, drop=("executor", "shards", "detach", "shard", "merge"))]
    return submit_shards(args.out, args.shards, line, slurm_options_from_args(args), attach=not args.detach,
                         log=lambda text: print(text, file=sys.stderr))


def _merge(args: argparse.Namespace) -> int:
    """``infer --merge``: infer.json for the shards' union, ``evaluate`` metrics, the missing cases named."""
    from ..cli import main
    from ..cohort import merge_shards
    from ..io import find_cases

    if args.shard:
        raise InputError("--merge joins the shards' outputs: give it without --shard (same PATH and --out)")
    result = merge_shards(find_cases(args.path), args.out)
    print(args.out / "infer.json")
    for line in result.problems:
        print(f"missing: {line}", file=sys.stderr)
    if result.problems:
        print(f"error: {len(result.problems)} of {len(result.done) + len(result.problems)} cases missing; "
              "rerun their shards, then --merge again", file=sys.stderr)
        return 1
    if any((args.out / f"{case_id}_metrics.json").is_file() for case_id in result.done):  # ground truth present
        status = main(["evaluate", "--maps", str(args.out), "--data", str(args.path), "--out", str(args.out / "evaluate"),
                       "--threshold", str(result.summary.get("threshold", 0.5))])
        if status:
            return status
        print(args.out / "evaluate" / "summary.json")
    return 0
