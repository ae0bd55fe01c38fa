"""``napari-clip-ad report``: the study's Table 1, Fig. 1-3 and Table 3 from inference runs.

Each RUN_DIR holds one method x setup's ``<case_id>_anomaly.nii.gz`` maps and its ``infer.json``.
Every run is scored exactly as ``evaluate`` scores it (same functions, same threshold rule); nothing
is written until every run has been scored and every figure drawn. See ``docs/report.md``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..atomic import atomic_path, write_text
from ..errors import InputError
from ..outputs import check_output_folder, output_lock, staged_files
from ..report.collect import ScoringOptions, match_maps, parse_threshold, read_run, score_maps, summarise
from ..report.tables import (
    FIG1_COLUMNS,
    FIG2_COLUMNS,
    FIG3_COLUMNS,
    RUNS_COLUMNS,
    TABLE1_COLUMNS,
    TABLE1_LESION_COLUMNS,
    TABLE3_COLUMNS,
    ScoredRun,
    fig1_rows,
    literature_markdown,
    fig2_rows,
    fig3_rows,
    runs_rows,
    table1_markdown,
    table1_rows,
    table3_markdown,
    table3_rows,
    to_csv,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``report`` command."""
    parser = subparsers.add_parser(
        "report", help="Table 1, Fig. 1-3 and Table 3 of the study from inference runs",
        description="Score every RUN_DIR (maps of one method x setup, written by 'napari-clip-ad infer') against "
        "the cohort in --data, as 'evaluate' does, and write tables, figures, their data as CSV and report.md.",
    )
    parser.add_argument("runs", nargs="*", type=Path, metavar="RUN_DIR", help="inference run folders")
    parser.add_argument("--data", required=True, type=Path, metavar="COHORT_DIR", help="cohort folder (cases with segmentations)")
    parser.add_argument("--out", required=True, type=Path, metavar="REPORT_DIR", help="output folder")
    parser.add_argument("--threshold", default="0.5", metavar="0.5|f1max",
                        help="a number in [0, 1], or 'f1max' for each run's pooled F1-max threshold (default 0.5)")
    parser.add_argument("--region", choices=("all", "brain"), default="all",
                        help="voxels scored: all (default, as the reference code) or the brain mask only")
    parser.add_argument("--setup", default=None,
                        help="setup for runs whose infer.json has none (default: from folder names <method>-<setup>)")
    parser.add_argument("--lesionwise", action="store_true",
                        help="add lesion_dice_mean, lesion_dice_sd (BraTS-MET 2023 lesion-wise Dice) after Table 1's columns")
    parser.add_argument("--slice-score", choices=("image", "max"), default="image",
                        help="slice detection score: the method's image score (<case_id>_scores.json; map maximum "
                        "where missing) or always the map maximum per slice (default image)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Score the runs and write the report; returns 0 (user errors raise :class:`InputError`)."""
    if not args.runs:
        raise InputError("no RUN_DIR given; pass the folders written by 'napari-clip-ad infer --out'")
    check_output_folder(args.out)
    rule = parse_threshold(args.threshold)
    infos = [read_run(path, args.setup) for path in args.runs]
    seen: dict[tuple[str, str], Path] = {}
    for info in infos:
        if (info.method, info.setup) in seen:
            raise InputError(f"{info.path}: same method and setup ({info.name}) as {seen[(info.method, info.setup)]}; "
                             "give each run its own setup")
        seen[(info.method, info.setup)] = info.path
    pairs = [match_maps(info.path, args.data) for info in infos]
    scored = []
    for info, run_pairs in zip(infos, pairs):
        # A run's --min-component cleaned its masks, not its saved maps: score the masks the run made.
        # (--restrict-to-brain and the 3D options already shaped the saved maps.)
        options = ScoringOptions(lesionwise=args.lesionwise, min_component=int(info.options.get("min_component") or 0),
                                 slice_score=args.slice_score)
        scores = score_maps(run_pairs, rule, args.region, args.data, what=f"{info.name}: ", options=options)
        scored.append(ScoredRun(info, scores, summarise(scores)))
    scored.sort(key=lambda run: run.info.method != "intensity")  # the model-free baseline's row leads (stable)
    files = _render(scored, args.lesionwise)
    # Staged, then moved in with report.md last: a full disk leaves the old report as it was.
    with output_lock(args.out, "report"), staged_files(args.out, last="report.md") as staging:
        for name, content in files.items():
            if isinstance(content, bytes):
                with atomic_path(staging / name) as tmp:
                    tmp.write_bytes(content)
            else:
                write_text(staging / name, content)
    print(f"report of {len(scored)} runs -> {args.out / 'report.md'}")
    return 0


def _render(runs: list[ScoredRun], lesionwise: bool = False) -> dict[str, str | bytes]:
    from ..report.figures import fig1_png, fig2_png, fig3_png

    t1, t3 = table1_rows(runs), table3_rows(runs)
    f1, f2, f3 = fig1_rows(runs), fig2_rows(runs), fig3_rows(runs)
    files: dict[str, str | bytes] = {
        "table1.csv": to_csv(t1, TABLE1_LESION_COLUMNS if lesionwise else TABLE1_COLUMNS), "table1.md": table1_markdown(t1),
        "table3.csv": to_csv(t3, TABLE3_COLUMNS), "runs.csv": to_csv(runs_rows(runs), RUNS_COLUMNS),
        "fig1.csv": to_csv(f1, FIG1_COLUMNS), "fig2.csv": to_csv(f2, FIG2_COLUMNS), "fig3.csv": to_csv(f3, FIG3_COLUMNS),
        "fig1.png": fig1_png(f1), "fig2.png": fig2_png(f2), "fig3.png": fig3_png(f3),
    }
    files["report.md"] = _markdown(runs, table1_markdown(t1), table3_markdown(t3))
    return files


def _markdown(runs: list[ScoredRun], table1: str, table3: str) -> str:
    random = [run.info for run in runs if run.info.random_weights]
    lines = ["# Report", ""]
    if random:
        lines += ["> **Warning: random weights.** These runs used a backbone with random weights, so their numbers "
                  "mean nothing about CLIP: " + ", ".join(f"{i.name} ({i.backbone})" for i in random) + ".", ""]
    rules = {(r.scores.threshold_rule, r.scores.region) for r in runs}
    lines += [f"{len(runs)} runs; cases per run: " + ", ".join(f"{r.info.name} {len(r.scores.cases)}" for r in runs) + ".",
              "Thresholds: " + ", ".join(f"{r.info.name} {r.scores.threshold:.4g} ({r.scores.threshold_rule})" for r in runs)
              + f"; region scored: {', '.join(sorted({region for _, region in rules}))}. Provenance: [runs.csv](runs.csv).",
              *_options_lines(runs),
              "", "## Table 1: overall performance", "",
              "Dice, sensitivity, specificity, PPV: per volume, mean ± sd (ddof=1) over cases; AUROC and F1-max pooled "
              "over all voxels of all cases. Data: [table1.csv](table1.csv), [table1.md](table1.md).", "", table1,
              *_lesion_lines(runs),
              "### Literature metrics", "",
              "Pooled over all voxels of all cases: pixel AUROC, pixel AP (scikit-learn's step-wise definition), AUPRO "
              "(MVTec AD definition, 3D 26-connected ground-truth regions, FPR up to 0.3, normalised); slice AUROC / AP: "
              "axial brain slices, positive when they hold lesion, scored by the method's image score or the map "
              "maximum (last column). Columns `pixel_ap, aupro, slice_auroc, slice_ap` of table1.csv; definitions in "
              "docs/metrics.md.", "", literature_markdown(runs),
              "## Fig. 1: 3D Dice by method and setup", "", "![Fig. 1](fig1.png)", "", "Data: [fig1.csv](fig1.csv).", "",
              "## Fig. 2: per-subject 2D Dice", "",
              "Boxes: 2D Dice of the axial slices with lesion in the ground truth or the prediction; red crosses: 3D Dice.",
              "", "![Fig. 2](fig2.png)", "", "Data: [fig2.csv](fig2.csv).", "",
              "## Fig. 3: 2D Dice against distance from the brain centre", "",
              "Mean 2D Dice of slices with ground-truth lesion per bin of normalised distance (-1 inferior, 1 superior); "
              "bars: lesion slices per bin.", "", "![Fig. 3](fig3.png)", "", "Data: [fig3.csv](fig3.csv).", "",
              "## Table 3: lesion size against Dice (Spearman)", "",
              "Slices: lesion area of each slice with ground-truth lesion against its 2D Dice (the study's Table 3); "
              "volumes: tumour voxels of each case against its 3D Dice. Data: [table3.csv](table3.csv).", "", table3]
    return "\n".join(lines)


def _options_lines(runs: list[ScoredRun]) -> list[str]:
    """One line naming the inference options of runs that used any beyond the study (none: no line)."""
    labels = []
    for run in runs:
        o = run.info.options
        parts = [f"views {o['views']}" + (f" ({o['fuse']})" if o.get("fuse") else "")] if o.get("views") not in (None, "axial") else []
        parts += ["restricted to brain"] if o.get("restrict_to_brain") else []
        parts += [f"3D smoothing {o['smooth3d_mm']:g} mm"] if o.get("smooth3d_mm") else []
        parts += [f"masks without components < {o['min_component']} voxels"] if o.get("min_component") else []
        if parts:
            labels.append(f"{run.info.name}: " + ", ".join(parts))
    return ["Options beyond the study (see [runs.csv](runs.csv)): " + "; ".join(labels) + "."] if labels else []


def _lesion_lines(runs: list[ScoredRun]) -> list[str]:
    """Lesion-wise Dice per run, when scored (``--lesionwise``)."""
    if not all("lesion_dice_mean" in run.summary for run in runs):
        return []
    cells = [f"{r.info.name} {r.summary['lesion_dice_mean']:.2f}"
             + (f" ± {r.summary['lesion_dice_sd']:.2f}" if r.summary["lesion_dice_sd"] is not None else "") for r in runs]
    return ["Lesion-wise Dice (BraTS-MET 2023 definition, mean ± sd over cases; columns `lesion_dice_mean`, "
            "`lesion_dice_sd` of table1.csv): " + ", ".join(cells) + ".", ""]
