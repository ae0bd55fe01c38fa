"""napari reader: a BraTS-style case folder (any known layout) or a single NIfTI volume.

``get_reader`` only claims paths it can read (a folder holding a recognised case, a ``.nii`` /
``.nii.gz`` file) and returns None for everything else, so other readers get their turn. A claimed
path that turns out broken raises one readable :class:`~napari_clip_ad.errors.InputError`.
"""

from __future__ import annotations

from collections.abc import Callable
import json
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ..io import Geometry, find_cases, load_case, read_nifti
from ..io.header import MAP_PROVENANCE, MASK_PROVENANCE, read_provenance
from ..io.nifti import check_finite, strip_nifti_ext
from .layers import LayerData, case_layers, map_kwargs, mask_kwargs, placement

ReaderFunction = Callable[[Any], list[LayerData]]

_LABEL_HINTS = ("seg", "label", "mask", "otmulticlass")
"""File-name parts (lower case) that mark a label volume."""


def get_reader(path: str | list[str]) -> ReaderFunction | None:
    """The reader for ``path`` when it is a case folder or one NIfTI file, else None."""
    if not isinstance(path, (str, Path)):
        return None
    path = Path(path)
    if path.is_dir():
        if _is_case_folder(path):
            return read_case_folder
        return read_cohort_folder if _cohort_cases(path) else None
    if path.is_file() and path.name.lower().endswith((".nii", ".nii.gz")):
        return read_nifti_file
    return None


def _is_case_folder(folder: Path) -> bool:
    try:
        return find_cases(folder, max_depth=0) == [folder]
    except (InputError, OSError):
        return False


def _cohort_cases(folder: Path) -> list[Path]:
    try:
        return find_cases(folder)
    except (InputError, OSError):
        return []


def read_cohort_folder(path: str | Path) -> list[LayerData]:
    """A cohort folder: its first case (by name), and a note that the Cohort widget runs them all.

    Every layer records ``cohort_root`` in its metadata, which the Cohort widget picks up.
    """
    from napari.utils.notifications import show_info

    cases = _cohort_cases(Path(path))
    if not cases:
        raise InputError(f"{path}: no case folder found in it; see docs/io.md for the layouts read")
    layers = case_layers(load_case(cases[0]))
    for _, kwargs, _ in layers:
        kwargs["metadata"]["cohort_root"] = str(path)
    show_info(f"{path} is a cohort of {len(cases)} cases: its first case, {cases[0].name}, is open. To run every case, "
              "use Plugins > napari-clip-ad > Cohort (the folder is filled in)")
    return layers


def read_case_folder(path: str | Path) -> list[LayerData]:
    """All modalities of a case as Image layers, and its segmentation as a Labels layer."""
    return case_layers(load_case(Path(path)))


def read_nifti_file(path: str | Path) -> list[LayerData]:
    """One NIfTI volume as an Image (or Labels, for segmentations and masks) layer in canonical orientation.

    A Decathlon 4D case file (``imagesTr/<id>.nii.gz``) is read as its whole case. Anomaly maps and
    masks written by ``napari-clip-ad infer`` or the plugin's writer (named ``<id>_anomaly.nii.gz`` /
    ``<id>_mask.nii.gz``, or under any name when the header carries our provenance) come back as the
    widgets make them: display settings, ``kind``, case id, threshold and minimum component.
    """
    path = Path(path)
    data, img = read_nifti(path, ndim=None)
    if data.ndim == 4:
        return case_layers(load_case(path))
    if data.ndim != 3:
        raise InputError(f"{path}: expected a 3D volume, got shape {tuple(data.shape)}; give one 3D volume per file")
    check_finite(data, path)
    geometry = Geometry.from_image(img)
    canonical = np.ascontiguousarray(geometry.to_canonical(data))
    stem = strip_nifti_ext(path.name)
    meta = {"geometry": geometry, "case_id": stem, "source": str(path)}
    where = placement(geometry)
    ours = read_provenance(img.header)
    kind = ours.get("kind") if ours else None
    if kind == MAP_PROVENANCE or (kind is None and _looks_like_map(stem, canonical)):
        if not np.issubdtype(canonical.dtype, np.floating):
            raise InputError(f"{path}: marked as an anomaly map but holds {canonical.dtype} voxels; give the float map")
        meta = {**meta, **result_metadata(path, stem, "_anomaly", ours)}
        kwargs = map_kwargs(stem, meta, where["scale"], where["translate"])
        return [(canonical.astype(np.float32, copy=False), kwargs, "image")]
    if kind == MASK_PROVENANCE or (kind is None and stem.endswith("_mask") and _looks_like_labels(stem, canonical)):
        meta = {**meta, **result_metadata(path, stem, "_mask", ours)}
        return [(canonical.astype(np.uint8), mask_kwargs(stem, meta, where["scale"], where["translate"]), "labels")]
    if _looks_like_labels(stem, canonical):
        labels = canonical.astype(np.int32 if canonical.max(initial=0) > np.iinfo(np.int16).max else np.int16)
        return [(labels, {"name": stem, **where, "metadata": {**meta, "kind": "segmentation"}, "opacity": 0.5}, "labels")]
    return [(canonical.astype(np.float32, copy=False), {"name": stem, **where, "metadata": meta}, "image")]


def result_metadata(path: Path, stem: str, suffix: str, ours: dict[str, str] | None) -> dict[str, Any]:
    """Layer metadata of a reopened map or mask, as a fresh result has it (as far as the file tells).

    The case id, threshold, minimum component and method come from our header provenance, else from
    ``infer``'s names (``<id>_anomaly``) and its ``<id>_metrics.json`` beside the file. A map and a mask of
    the same case in the same folder share a ``link``, so the threshold widget writes into that mask.
    """
    ours = ours or {}
    case_id = ours.get("case") or (stem[: -len(suffix)] if stem.endswith(suffix) and len(stem) > len(suffix) else stem)
    meta: dict[str, Any] = {"case_id": case_id, "link": f"file:{path.parent.resolve() / case_id}",
}
    record: dict[str, Any] = {}
    metrics = path.parent / f"{case_id}_metrics.json"
    if metrics.is_file():
        try:
            record = json.loads(metrics.read_text())
        except (OSError, ValueError):
            record = {}
    threshold = ours.get("thr", record.get("threshold"))
    minimum = ours.get("minc", record.get("min_component"))
    try:
        if threshold is not None:
            meta["threshold"] = float(threshold)
        if minimum is not None:
            meta["min_component"] = int(minimum)
    except (TypeError, ValueError):
        pass  # a hand-edited header or record: the widget's defaults apply
    method = ours.get("method", record.get("method"))
    if method is not None:
        meta["method"] = str(method)
    return meta


def _looks_like_map(stem: str, data: np.ndarray) -> bool:
    """An anomaly map: ``<id>_anomaly`` (infer) or a saved map layer ``<image> anomaly (<method>, ...)``, float in [0, 1]."""
    if not np.issubdtype(data.dtype, np.floating):
        return False
    if stem.endswith("_anomaly"):
        return True
    if " anomaly (" not in stem or "mask" in stem or "errors" in stem:
        return False
    return bool(data.size == 0 or (np.nanmin(data) >= 0.0 and np.nanmax(data) <= 1.0))


def _looks_like_labels(stem: str, data: np.ndarray) -> bool:
    """A label volume: named like one and holding non-negative whole numbers."""
    name = stem.lower()
    if not any(hint in name for hint in _LABEL_HINTS):
        return False
    if data.dtype == bool or np.issubdtype(data.dtype, np.integer):
        return bool(data.min(initial=0) >= 0)
    return bool(data.min(initial=0) >= 0 and np.array_equal(data, np.round(data)))
