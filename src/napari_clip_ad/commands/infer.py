"""``napari-clip-ad infer``: anomaly maps, masks and per-case metrics for a case or a cohort."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

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
    p.add_argument("--device", default="auto")
    p.add_argument("--image-size", type=int, default=240)
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run inference and write ``<id>_anomaly.nii.gz``, ``<id>_mask.nii.gz``, ``<id>_metrics.json``."""
    import torch
    from tqdm import tqdm

    from ..distributed import init_distributed, rank_device
    from ..engine.outputs import write_case_outputs, write_run_summary
    from ..engine.pipeline import options_from_args, run_case
    from ..methods import build_method, resolve_device

    options = options_from_args(args)
    all_cases = find_cases(args.path)
    # Under torchrun the ranks share the cohort round-robin, each on its own GPU; gloo carries only the barrier.
    ranks = init_distributed(torch.device("cpu"))
    cases = all_cases[ranks.rank :: ranks.world]
    method = build_method(args.method, args.backbone, weights=args.weights, image_size=args.image_size,
                          device=rank_device(resolve_device(args.device), ranks))
    description = method.describe()
    if method.backbone.random_weights:
        print(f"note: backbone {method.backbone.label}: results come from random weights and mean nothing", file=sys.stderr)
    written: list[Path] = []
    for path in tqdm(cases, desc="cases", unit="case", file=sys.stderr, disable=len(cases) < 2):
        case = load_case(path, modalities=options.modalities_to_load)
        bars: list[tqdm] = []

        def progress_for(view: str, case_id: str = case.case_id, bars: list = bars):
            label = case_id if len(options.views) == 1 else f"{case_id} {view}"
            bar = tqdm(total=0, desc=label, unit="slice", file=sys.stderr, leave=False)
            bars.append(bar)

            def progress(done: int, total: int) -> None:
                bar.total = total
                bar.n = done
                bar.refresh()

            return progress

        try:
            result = run_case(case, method, options, progress_for=progress_for)
        finally:
            for bar in bars:
                bar.close()
        written += write_case_outputs(case, result, args.out, case_id_of(path))
    ranks.barrier()
    if ranks.main:  # one summary for the whole cohort, written once every rank has finished
        write_run_summary(args.out, description, options, getattr(method, "weights_source", None),
                          [case_id_of(p) for p in all_cases], ranks.world)
    for path in written:
        print(path)
    return 0
