"""``napari-clip-ad evaluate``: score anomaly maps of a cohort against its ground truth.

Maps are ``<case_id>_anomaly.nii.gz`` files saved on each case's grid (e.g. with
:func:`napari_clip_ad.io.save_volume`). Writes ``per_case.csv`` and ``summary.json`` (see
``docs/metrics.md`` for every column, key and convention), only once every case has been scored.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path
from typing import Any

from ..atomic import write_json, write_text
from ..outputs import check_output_folder, output_lock, staged_files
from ..report.collect import (
    LESION_COLUMNS,
    LITERATURE_NAMES,
    METRIC_NAMES,
    ScoringOptions,
    match_cohort,
    parse_threshold,
    score_maps,
    summarise,
)

CSV_COLUMNS = ("case_id", *METRIC_NAMES, "tumour_voxels", "predicted_voxels", "slice_dice_mean", "n_lesion_slices", "map")
LITERATURE_COLUMNS = (*LITERATURE_NAMES, "slice_score")
"""Per-case pixel AP, AUPRO, slice AUROC / AP and the slice score used: after every other column."""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``evaluate`` command."""
    parser = subparsers.add_parser(
        "evaluate",
        help="score anomaly maps against a cohort's segmentations (Dice, sensitivity, ..., AUROC, F1-max)",
        description="Score <case_id>_anomaly.nii.gz maps (values in [0, 1]) against the whole-tumour "
        "masks of the cases in --data. Writes per_case.csv and summary.json to --out.",
    )
    parser.add_argument("--maps", required=True, type=Path, metavar="MAPS_DIR", help="folder of <case_id>_anomaly.nii.gz maps")
    parser.add_argument("--data", required=True, type=Path, metavar="COHORT_DIR", help="cohort folder (case folders with segmentations)")
    parser.add_argument("--threshold", default="0.5", metavar="0.5|f1max",
                        help="a number in [0, 1] (voxels >= it are tumour), or 'f1max' for the pooled F1-max threshold (default 0.5)")
    parser.add_argument("--region", choices=("all", "brain"), default="all",
                        help="voxels scored: all voxels (as the reference code does) or the brain mask only (default all)")
    parser.add_argument("--restrict-to-brain", action="store_true",
                        help="zero every map outside its case's brain mask before scoring (AUROC and F1-max too)")
    parser.add_argument("--min-component", type=int, default=0, metavar="VOXELS",
                        help="drop 26-connected components smaller than VOXELS from the thresholded mask (default 0: keep all)")
    parser.add_argument("--lesionwise", action="store_true",
                        help="add BraTS-MET 2023 lesion-wise Dice and lesion counts per case, and their mean and sd")
    parser.add_argument("--slice-score", choices=("image", "max"), default="image",
                        help="slice detection score: the method's image score (<case_id>_scores.json from infer; "
                        "map maximum where missing) or always the map maximum per slice (default image)")
    parser.add_argument("--out", required=True, type=Path, metavar="OUT_DIR", help="output folder for per_case.csv and summary.json")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Evaluate every map; returns 0 (user errors raise :class:`InputError`)."""
    threshold_rule = parse_threshold(args.threshold)
    check_output_folder(args.out)
    options = ScoringOptions(restrict_to_brain=args.restrict_to_brain, min_component=args.min_component,
                             lesionwise=args.lesionwise, slice_score=args.slice_score)
    pairs, missing = match_cohort(args.maps, args.data)
    if missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        print(f"warning: {len(missing)} of {len(pairs) + len(missing)} cases in {args.data} have no map in {args.maps} "
              f"and are not scored: {shown}", file=sys.stderr)
    _, summary = evaluate_pairs(pairs, threshold_rule, args.region, args.data, options, args.out, missing)
    lesion = f", lesion-wise dice {summary['lesion_dice_mean']:.4f}" if args.lesionwise else ""
    print(f"evaluated {len(pairs)} cases: dice {summary['dice_mean']:.4f}{lesion}, AUROC {_fmt(summary['auroc'])}, "
          f"F1-max {_fmt(summary['f1max'])}, pixel AP {_fmt(summary['pixel_ap'])}, AUPRO {_fmt(summary['aupro'])}, "
          f"slice AUROC {_fmt(summary['slice_auroc'])} ({summary['slice_score']}) -> {args.out}")
    return 0


def evaluate_pairs(pairs: list, threshold_rule: str | float, region: str, data: Path, options: ScoringOptions,
                   out: Path, missing: list[str] | None = None) -> tuple[Any, dict[str, Any]]:
    """Score map/case pairs and write ``per_case.csv`` and ``summary.json`` to ``out`` (the command's files).

    Written under the output folder's lock, staged and moved into place whole. The napari Cohort widget
    calls this too, so its table and files are the command's.
    """
    missing = list(missing or [])
    scores = score_maps(pairs, threshold_rule, region, data, options=options)
    summary = {**summarise(scores), "n_cases_missing_map": len(missing), "missing_maps": missing}
    columns = (*CSV_COLUMNS[:-1], *LESION_COLUMNS, CSV_COLUMNS[-1]) if options.lesionwise else CSV_COLUMNS
    columns = (*columns, *LITERATURE_COLUMNS)
    with output_lock(Path(out), "evaluate"), staged_files(Path(out), last="summary.json") as staging:
        write_text(staging / "per_case.csv", _csv([case.row() for case in scores.cases], columns))
        write_json(staging / "summary.json", summary)
    return scores, summary


def _csv(rows: list[dict[str, Any]], columns: tuple[str, ...] = CSV_COLUMNS) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: repr(v) if isinstance(v, float) else v for k, v in row.items()})
    return buffer.getvalue()


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
