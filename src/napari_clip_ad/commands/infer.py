"""``napari-clip-ad infer``: anomaly maps, masks and per-case metrics for a case or a cohort."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..atomic import write_json
from ..io import case_id_of, find_cases, load_case, save_volume
from ..io.layouts import MODALITIES

if TYPE_CHECKING:
    from ..engine.views import PostOptions


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``infer`` command."""
    p = subparsers.add_parser("infer", help="run a method on a case or cohort folder; write maps, masks, metrics")
    p.add_argument("path", type=Path, help="a case folder or a cohort folder of cases")
    p.add_argument("--method", default="vand", help="method name (see 'napari-clip-ad weights list' for weights)")
    p.add_argument("--backbone", default=None, help="backbone registry name, ARCH:TAG, hf-hub: name or file")
    p.add_argument("--weights", default=None, help="method weights: released name or file (.pth as published, or .safetensors)")
    p.add_argument("--modality", default="t2w", help="t1n, t1c, t2w, t2f, or three joined by '+' (e.g. t1c+t2w+t2f)")
    p.add_argument("--axis", default=None, choices=["axial", "coronal", "sagittal"], help="slicing axis (default axial); same as --views with one view")
    p.add_argument("--views", default=None, choices=["axial", "coronal", "sagittal", "all"],
                   help="slicing view; 'all' runs axial, coronal and sagittal and fuses the maps (see --fuse)")
    p.add_argument("--fuse", default="mean", choices=["mean", "max"], help="voxel-wise fusion of the views with --views all (default mean)")
    p.add_argument("--restrict-to-brain", action="store_true", help="zero the map outside the case's brain mask")
    p.add_argument("--smooth3d", type=float, default=0.0, metavar="SIGMA_MM",
                   help="3D Gaussian of SIGMA_MM millimetres on the (fused) map, using the case's voxel size (default 0: none)")
    p.add_argument("--min-component", type=int, default=0, metavar="VOXELS",
                   help="drop 26-connected components of the mask smaller than VOXELS (default 0: keep all)")
    p.add_argument("--threshold", type=float, default=0.5, help="mask threshold on the [0,1] map (voxel positive if >=)")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=None, help="slices per forward pass (default: 16 on a GPU, 8 on the CPU)")
    p.add_argument("--image-size", type=int, default=240)
    p.add_argument("--sigma", type=float, default=None, help="Gaussian sigma per slice map (default: the method's official one)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.set_defaults(func=run)


def _options(args: argparse.Namespace) -> PostOptions:
    """The run's :class:`~napari_clip_ad.engine.views.PostOptions` (``--axis`` and ``--views`` must agree)."""
    from ..engine.views import PostOptions
    from ..errors import InputError

    if args.views and args.axis and args.views != args.axis:
        raise InputError(f"--axis {args.axis} and --views {args.views} disagree; give only --views")
    views = PostOptions.parse_views(args.views or args.axis or "axial")
    return PostOptions(views=views, fuse=args.fuse, restrict_to_brain=args.restrict_to_brain,
                       smooth3d_mm=args.smooth3d, min_component=args.min_component)


def run(args: argparse.Namespace) -> int:
    """Run inference and write ``<id>_anomaly.nii.gz``, ``<id>_mask.nii.gz``, ``<id>_metrics.json``."""
    import torch
    from tqdm import tqdm

    from ..distributed import init_distributed, rank_device
    from ..engine import parse_modality
    from ..engine.views import run_views, threshold_mask
    from ..errors import InputError
    from ..methods import build_method, resolve_device
    from ..metrics import volume_metrics

    modalities = parse_modality(args.modality)
    if not 0.0 <= args.threshold <= 1.0:
        raise InputError(f"--threshold must be in [0, 1] (maps are in [0, 1]), got {args.threshold}")
    options = _options(args)
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
    for path in tqdm(cases, desc="cases", unit="case", file=sys.stderr, disable=True if len(cases) < 2 else None):
        case = load_case(path, modalities=sorted(set(modalities), key=MODALITIES.index))
        bars: list[tqdm] = []

        def progress_for(view: str, case_id: str = case.case_id, bars: list = bars):
            label = case_id if len(options.views) == 1 else f"{case_id} {view}"
            bar = tqdm(total=0, desc=label, unit="slice", file=sys.stderr, leave=False, disable=None)
            bars.append(bar)

            def progress(done: int, total: int) -> None:
                bar.total = total
                bar.n = done
                bar.refresh()

            return progress

        anomaly_map, info, _ = run_views(case, method, options, modality=modalities, batch_size=args.batch_size,
                                         sigma=args.sigma, progress_for=progress_for)
        for bar in bars:
            bar.close()
        mask = threshold_mask(anomaly_map, args.threshold, options.min_component)
        stem = args.out / case_id_of(path)
        written.append(save_volume(anomaly_map.astype(np.float32), case, f"{stem}_anomaly.nii.gz"))
        written.append(save_volume(mask, case, f"{stem}_mask.nii.gz"))
        if case.whole_tumour is not None:
            metrics = volume_metrics(mask.astype(bool), case.whole_tumour)
            write_json(f"{stem}_metrics.json", {"case_id": case.case_id, "threshold": args.threshold, **metrics, **info})
            written.append(Path(f"{stem}_metrics.json"))
    ranks.barrier()
    if ranks.main:  # one summary for the whole cohort, written once every rank has finished
        write_json(args.out / "infer.json", {**description, "modality": "+".join(modalities), "axis": "+".join(options.views),
                                             **options.describe(), "threshold": args.threshold,
                                             "weights": getattr(method, "weights_source", None),
                                             "world_size": ranks.world, "cases": [case_id_of(p) for p in all_cases]})
    for path in written:
        print(path)
    return 0
