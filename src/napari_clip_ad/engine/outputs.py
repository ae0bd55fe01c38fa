"""The files ``napari-clip-ad infer`` writes for a case and a run, as library functions.

The CLI and the napari Cohort widget both call these, so a cohort run from the GUI leaves exactly
the files the command leaves: ``<id>_anomaly.nii.gz``, ``<id>_mask.nii.gz``, ``<id>_metrics.json``
(when the case has a segmentation) and one ``infer.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..atomic import write_json
from ..case_options import CaseOptions
from ..io import Case, save_volume
from ..metrics import volume_metrics
from .pipeline import CaseResult


def write_case_outputs(case: Case, result: CaseResult, out: Path, case_id: str) -> list[Path]:
    """Write the map, the mask and (with a ground truth) the metrics JSON of one case; returns the paths."""
    stem = Path(out) / case_id
    written = [save_volume(result.anomaly_map, case, f"{stem}_anomaly.nii.gz"),
               save_volume(result.mask, case, f"{stem}_mask.nii.gz")]
    if case.whole_tumour is not None:
        metrics = volume_metrics(result.mask.astype(bool), case.whole_tumour)
        write_json(f"{stem}_metrics.json", {"case_id": case.case_id, "threshold": result.options.threshold, **metrics,
                                            **result.info})
        written.append(Path(f"{stem}_metrics.json"))
    return written


def write_run_summary(out: Path, description: dict[str, Any], options: CaseOptions, weights: str | None,
                      case_ids: list[str], world_size: int = 1) -> Path:
    """Write ``infer.json``: the method, the options and the cases of the run."""
    path = Path(out) / "infer.json"
    write_json(path, {**description, **options.describe(), "weights": weights, "world_size": world_size,
                      "cases": case_ids})
    return path
