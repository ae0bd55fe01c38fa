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
from ..io import Case
from .pipeline import CaseResult
from .pipeline import write_case_outputs as pipeline_outputs


def write_case_outputs(case: Case, result: CaseResult, out: Path, case_id: str) -> list[Path]:
    """Write one case's files into ``out`` exactly as ``infer`` does (see :func:`.pipeline.write_case_outputs`)."""
    return pipeline_outputs(result, case, Path(out) / case_id)


def write_run_summary(out: Path, description: dict[str, Any], options: CaseOptions, weights: str | None,
                      case_ids: list[str], world_size: int = 1) -> Path:
    """Write ``infer.json``: the method, the options and the cases of the run."""
    path = Path(out) / "infer.json"
    write_json(path, {**description, **options.describe(), "weights": weights, "world_size": world_size,
                      "cases": case_ids})
    return path
