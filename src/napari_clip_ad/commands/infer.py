"""``napari-clip-ad infer``: anomaly maps, masks and per-case metrics for a case or a cohort."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from ..atomic import write_json
from ..errors import Cancelled, ClipAdError, OutputError
from ..io import case_id_of, find_cases, load_case


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
    p.set_defaults(func=run)


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

    options = options_from_args(args)
    check_output_folder(args.out)
    device = resolve_device(args.device)
    all_cases = find_cases(args.path)
    # Under torchrun the ranks share the cohort round-robin, each on its own GPU; gloo carries only the barrier.
    ranks = init_distributed(torch.device("cpu"))
    cases = all_cases[ranks.rank :: ranks.world]
    with rank_output_lock(args.out, "infer", ranks):
        method = build_pipeline_method(args.method, args.backbone, options, weights=args.weights, image_size=args.image_size,
                                       device=rank_device(device, ranks), **({"prompts": args.prompts} if args.prompts else {}))
        description = method.describe()
        if method.backbone.random_weights:
            print(f"note: backbone {method.backbone.label}: results come from random weights and mean nothing", file=sys.stderr)
        # --references auto in a cohort: the other cases of the cohort (never the analysed patient).
        pool = ReferencePool(options, method, training_cases=all_cases) if options.few_shot else None
        log, written = CohortLog(), []
        for path in tqdm(cases, desc="cases", unit="case", file=sys.stderr, disable=True if len(cases) < 2 else None):
            try:
                files = _infer_case(path, method, options, args.out, pool)
            except (OutputError, Cancelled):
                raise
            except Exception as exc:  # a broken case: the cohort goes on; a single case fails as before
                if len(all_cases) == 1:
                    raise
                reason = str(exc) if isinstance(exc, ClipAdError) else f"{type(exc).__name__}: {exc}"
                log.failure(case_id_of(path), reason)
                continue
            log.success(case_id_of(path), files)
            written.extend(files)
        log = gather_cohort_logs(log, args.out, ranks)
        if ranks.main:  # one summary for the whole cohort, written once every rank has finished
            write_json(args.out / "infer.json", {**description, **options.describe(),
                                                 "weights": getattr(method, "weights_source", None),
                                                 "world_size": ranks.world, "cases": [case_id_of(p) for p in all_cases],
                                                 **log.summary()})
    for path in written:
        print(path)
    if ranks.main:
        log.report(args.out / "infer.json")
    return log.exit_code


def _infer_case(path: Path, method, options, out: Path, pool=None) -> list[Path]:  # noqa: ANN001
    """Load, run and save one case; on failure its files of this run are removed (all or nothing)."""
    from ..engine.pipeline import CASE_OUTPUT_SUFFIXES, run_case, write_case_outputs

    case = load_case(path, modalities=options.modalities_to_load)
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
        result = run_case(case, method, options, progress_for=progress_for, references=pool)
    finally:
        for bar in bars:
            bar.close()
    stem = out / case_id_of(path)
    try:
        return write_case_outputs(result, case, stem)
    except BaseException as exc:
        for suffix in CASE_OUTPUT_SUFFIXES:
            Path(f"{stem}{suffix}").unlink(missing_ok=True)
        if isinstance(exc, ClipAdError) and not isinstance(exc, OutputError):
            raise OutputError(str(exc)) from None  # a write failure (full or read-only disk) stops the whole run
        raise
