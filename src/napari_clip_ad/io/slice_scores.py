"""Per-slice image scores beside a map: ``<case_id>_scores.json``, written by ``infer``, read by ``evaluate``.

The file holds the method's image-level score of every axial slice (the engine's
``VolumeResult.scores``, 0 for slices without brain, which the engine skips) and which slices were
analysed. Slice-level detection (``docs/metrics.md``) uses these scores; without the file it uses
the map maximum of each slice.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import write_json
from ..errors import InputError

SCORES_SUFFIX = "_scores.json"


def write_axial_scores(stem: str | Path, case_id: str, views: Sequence[str], results: Sequence[Any]) -> list[Path]:
    """Write ``<stem>_scores.json`` from the axial view's result, if the run had one.

    Args:
        stem: Output path without suffix (``OUT/<case_id>``).
        case_id: The case id.
        views: The run's views in the order of ``results``.
        results: One engine result per view (objects with ``scores`` and ``analysed`` per slice).

    Returns:
        The written path in a list, or an empty list without an axial view.
    """
    if "axial" not in views:
        return []
    result = results[list(views).index("axial")]
    path = Path(f"{stem}{SCORES_SUFFIX}")
    write_json(path, {"case_id": case_id, "axis": "axial", "score": "method image score",
                      "scores": [float(v) for v in np.asarray(result.scores, dtype=np.float64)],
                      "analysed": [bool(v) for v in np.asarray(result.analysed)]})
    return [path]


def read_axial_scores(path: Path, n_slices: int) -> np.ndarray | None:
    """The image score of every axial slice from a ``_scores.json`` file, or None when there is no file.

    Raises:
        InputError: The file is unreadable, not for the axial axis, or has another slice count.
    """
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        scores = np.asarray(record["scores"], dtype=np.float64)
        axis = record.get("axis", "axial")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{path}: not a readable slice-scores file ({exc}); rerun inference or delete it") from None
    if axis != "axial" or scores.shape != (n_slices,):
        raise InputError(f"{path}: {scores.size} {axis} slice scores but the case has {n_slices} axial slices; "
                         "it belongs to another run or case: rerun inference or delete it")
    if not np.all(np.isfinite(scores)):
        raise InputError(f"{path}: NaN or infinite slice scores; rerun inference or delete it")
    return scores
