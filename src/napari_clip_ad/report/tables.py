"""Rows of Table 1, Table 3 and the data behind Fig. 1-3, from scored runs.

Every figure is drawn from these rows (also written as CSV), so the CSVs are exactly what is plotted.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..metrics import distance_profile, size_dice_spearman
from .collect import DISTANCE_BINS, LITERATURE_NAMES, METRIC_NAMES, RUN_OPTION_KEYS, RunInfo, RunScores, lesion_slices

STUDY_TABLE1_COLUMNS = ("method", "setup", "dice_mean", "dice_sd", "sensitivity_mean", "sensitivity_sd",
                        "specificity_mean", "specificity_sd", "ppv_mean", "ppv_sd", "auroc", "f1max")
"""The study's Table 1 columns: always first, unchanged."""
TABLE1_COLUMNS = (*STUDY_TABLE1_COLUMNS, *LITERATURE_NAMES)
"""The study's 12 columns, then pooled pixel AP, AUPRO and slice-level AUROC / AP."""
TABLE1_LESION_COLUMNS = (*TABLE1_COLUMNS, "lesion_dice_mean", "lesion_dice_sd")
"""Table 1 with ``report --lesionwise``: the columns above, then lesion-wise Dice."""
TABLE3_COLUMNS = ("method", "setup", "slice_rho", "slice_p", "n_slices", "case_rho", "case_p", "n_cases")
FIG1_COLUMNS = ("method", "setup", "case_id", "dice")
FIG2_COLUMNS = ("method", "setup", "case_id", "slice", "slice_dice", "lesion_voxels", "dice_3d")
FIG3_COLUMNS = ("method", "setup", "bin_low", "bin_high", "bin_centre", "mean_dice", "n_lesion_slices")
RUNS_COLUMNS = ("method", "setup", "backbone", "random_weights", "threshold_rule", "threshold", "region", "n_cases",
                "pooled_exact", "run_dir", *RUN_OPTION_KEYS)


@dataclass(frozen=True)
class ScoredRun:
    """A run's provenance, its scores and its ``summary.json`` (as ``evaluate`` writes it)."""

    info: RunInfo
    scores: RunScores
    summary: dict[str, Any]


def _key(run: ScoredRun) -> dict[str, Any]:
    return {"method": run.info.method, "setup": run.info.setup}


def table1_rows(runs: Sequence[ScoredRun]) -> list[dict[str, Any]]:
    """Per-volume metrics as mean and sd (ddof=1), pooled AUROC and F1-max: one row per run."""
    rows = []
    for run in runs:
        row = _key(run)
        for name in METRIC_NAMES:
            row[f"{name}_mean"] = run.summary[f"{name}_mean"]
            row[f"{name}_sd"] = run.summary[f"{name}_sd"]
        row.update(auroc=run.summary["auroc"], f1max=run.summary["f1max"])
        row.update({name: run.summary[name] for name in LITERATURE_NAMES})
        if "lesion_dice_mean" in run.summary:
            row.update(lesion_dice_mean=run.summary["lesion_dice_mean"], lesion_dice_sd=run.summary["lesion_dice_sd"])
        rows.append(row)
    return rows


def runs_rows(runs: Sequence[ScoredRun]) -> list[dict[str, Any]]:
    """Provenance and threshold of every run."""
    return [{**_key(run), "backbone": run.info.backbone, "random_weights": run.info.random_weights,
             "threshold_rule": run.scores.threshold_rule, "threshold": run.scores.threshold, "region": run.scores.region,
             "n_cases": len(run.scores.cases), "pooled_exact": run.scores.pooled.is_exact, "run_dir": str(run.info.path),
             **{key: run.info.options.get(key) for key in RUN_OPTION_KEYS}}
            for run in runs]


def table3_rows(runs: Sequence[ScoredRun]) -> list[dict[str, Any]]:
    """Spearman rho of lesion size with Dice: per lesion slice (area vs 2D Dice) and per volume (voxels vs 3D Dice)."""
    rows = []
    for run in runs:
        _, dices, sizes = lesion_slices(run.scores)
        slice_rho, slice_p = size_dice_spearman(sizes, dices)
        cases = run.scores.cases
        case_rho, case_p = size_dice_spearman([c.metrics["tumour_voxels"] for c in cases], [c.metrics["dice"] for c in cases])
        rows.append({**_key(run), "slice_rho": slice_rho, "slice_p": slice_p, "n_slices": int(dices.size),
                     "case_rho": case_rho, "case_p": case_p, "n_cases": len(cases)})
    return rows


def fig1_rows(runs: Sequence[ScoredRun]) -> list[dict[str, Any]]:
    """3D Dice of every case of every run."""
    return [{**_key(run), "case_id": case.case_id, "dice": case.metrics["dice"]} for run in runs for case in run.scores.cases]


def fig2_rows(runs: Sequence[ScoredRun]) -> list[dict[str, Any]]:
    """2D Dice of every slice with lesion in the ground truth or the prediction, with the case's 3D Dice."""
    return [{**_key(run), "case_id": case.case_id, "slice": int(index), "slice_dice": float(dice),
             "lesion_voxels": int(lesion), "dice_3d": case.metrics["dice"]}
            for run in runs for case in run.scores.cases
            for index, dice, lesion in zip(case.slices.index, case.slices.dice, case.slices.lesion_voxels)]


def fig3_rows(runs: Sequence[ScoredRun], bins: int = DISTANCE_BINS) -> list[dict[str, Any]]:
    """Mean 2D Dice of lesion slices per bin of normalised distance from the brain centre, per run."""
    rows = []
    for run in runs:
        distances, dices, _ = lesion_slices(run.scores)
        profile = distance_profile(distances, dices, bins=bins)
        for low, high, centre, mean, count in zip(profile.edges[:-1], profile.edges[1:], profile.centres,
                                                  profile.mean_dice, profile.n_slices):
            rows.append({**_key(run), "bin_low": round(float(low), 12), "bin_high": round(float(high), 12),
                         "bin_centre": round(float(centre), 12), "mean_dice": float(mean), "n_lesion_slices": int(count)})
    return rows


def to_csv(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """CSV text; floats written with ``repr`` (full precision), NaN and ``None`` as empty cells."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _cell(row[k]) for k in columns})
    return buffer.getvalue()


def _cell(value: Any) -> Any:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return repr(value) if isinstance(value, float) else value


def _num(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def table1_markdown(rows: Sequence[dict[str, Any]], digits: int = 2) -> str:
    """Table 1 as Markdown, in the study's layout (``mean ± sd``)."""
    lines = ["| Model | Training Setup | Dice Score | Sensitivity | Specificity | PPV | AUROC | F1-max |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        cells = [f"{_num(row[f'{n}_mean'], digits)} ± {_num(row[f'{n}_sd'], digits)}" for n in METRIC_NAMES]
        lines.append(f"| {row['method']} | {row['setup']} | " + " | ".join(cells)
                     + f" | {_num(row['auroc'], digits)} | {_num(row['f1max'], digits)} |")
    return "\n".join(lines) + "\n"


def literature_markdown(runs: Sequence[ScoredRun], digits: int = 2) -> str:
    """The literature's metrics per run as Markdown: pixel AUROC / AP, AUPRO, slice-level AUROC / AP."""
    lines = ["| Model | Training Setup | Pixel AUROC | Pixel AP | AUPRO (3D regions) | Slice AUROC | Slice AP | slice score |",
             "|---|---|---|---|---|---|---|---|"]
    for run in runs:
        s = run.summary
        lines.append(f"| {run.info.method} | {run.info.setup} | " + " | ".join(
            _num(s[k], digits) for k in ("auroc", "pixel_ap", "aupro", "slice_auroc", "slice_ap")) + f" | {s['slice_score']} |")
    return "\n".join(lines) + "\n"


def table3_markdown(rows: Sequence[dict[str, Any]], digits: int = 2) -> str:
    """Table 3 as Markdown: Spearman rho (slice level, and volume level)."""
    lines = ["| Model | Training Setup | rho (slices) | slices | rho (volumes) | volumes |", "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['method']} | {row['setup']} | {_num(row['slice_rho'], digits)} | {row['n_slices']} | "
                     f"{_num(row['case_rho'], digits)} | {row['n_cases']} |")
    return "\n".join(lines) + "\n"
