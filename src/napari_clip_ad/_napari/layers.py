"""Layer data for cases, anomaly maps and masks, and the geometry stored in layer metadata.

Arrays are canonical ``[z, y, x]`` (see :mod:`napari_clip_ad.io.nifti`). Every layer made here keeps
the source :class:`~napari_clip_ad.io.Geometry` under ``metadata["geometry"]``, so the writer saves
it back with the source file's affine and orientation.
"""

from __future__ import annotations

from typing import Any

import nibabel as nib
import numpy as np

from ..io import Case, Geometry
from ..io.header import MAP_PROVENANCE, MASK_PROVENANCE

LayerData = tuple[Any, dict[str, Any], str]
"""napari's ``(data, kwargs, layer_type)`` tuple."""

MAP_KIND = MAP_PROVENANCE
MASK_KIND = MASK_PROVENANCE
"""Layer metadata ``kind`` of anomaly maps and masks (the same words as the files' header provenance)."""

_XYZ_FROM_ZYX = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=np.float64)
"""Voxel (x, y, z) -> (z, y, x) index swap."""

MODALITY_COLORMAPS = {"t1n": "gray", "t1c": "gray", "t2w": "gray", "t2f": "gray"}


def placement(geometry: Geometry) -> dict[str, tuple[float, float, float]]:
    """``scale`` (voxel spacing, z y x) and ``translate`` (world mm of voxel 0) of a canonical array.

    World axes follow the canonical axes: superior, posterior, left (RAS ``z``, ``-y``, ``-x``), so
    every file of a case, and crops saved with their own affine, line up.
    """
    origin = geometry.canonical_affine[:3, 3]
    translate = (float(origin[2]), -float(origin[1]) + 0.0, -float(origin[0]) + 0.0)  # + 0.0: no "-0.0"
    return {"scale": tuple(float(s) for s in geometry.spacing), "translate": translate}


def geometry_from_placement(shape: tuple[int, ...], scale: Any, translate: Any) -> Geometry:
    """A geometry for a canonical array that has none (e.g. made in napari), from its scale and translate.

    The inverse of :func:`placement` for an axis-aligned grid; the file is stored with axes
    (x, y, z) = (L, P, S), as BraTS files are.
    """
    sz, sy, sx = (float(s) for s in scale)
    tz, ty, tx = (float(t) for t in translate)
    affine = np.array(
        [[0.0, 0.0, -sx, -tx], [0.0, -sy, 0.0, -ty], [sz, 0.0, 0.0, tz], [0.0, 0.0, 0.0, 1.0]],
    )
    source_shape = (int(shape[2]), int(shape[1]), int(shape[0]))  # stored x, y, z: a transpose of canonical
    return Geometry.from_image(nib.Nifti1Image(np.empty(source_shape, dtype=np.uint8), affine @ _XYZ_FROM_ZYX))


def stored_geometry(metadata: dict[str, Any], shape: tuple[int, ...]) -> Geometry | None:
    """The geometry kept in a layer's metadata, if it fits an array of ``shape``."""
    geometry = metadata.get("geometry")
    if isinstance(geometry, Geometry) and tuple(geometry.shape) == tuple(shape):
        return geometry
    return None


def _common(geometry: Geometry, case_id: str, source: str) -> dict[str, Any]:
    return {"geometry": geometry, "case_id": case_id, "source": source}


def case_layers(case: Case) -> list[LayerData]:
    """One Image layer per modality (spacing as scale) and the segmentation as Labels."""
    where = placement(case.geometry)
    layers: list[LayerData] = []
    for modality, volume in case.images.items():
        meta = {**_common(case.geometry, case.case_id, str(case.files.get(modality, case.path))), "modality": modality,
                "brain_mask": case.brain_mask, "brain_mask_from": "file" if "brain_mask" in case.files else "images"}
        low, high = _robust_limits(volume)
        layers.append((volume, {"name": f"{case.case_id} {modality}", **where, "metadata": meta,
                                "colormap": MODALITY_COLORMAPS.get(modality, "gray"), "contrast_limits": (low, high),
                                "visible": modality == next(iter(case.images))}, "image"))
    if case.seg is not None:
        meta = {**_common(case.geometry, case.case_id, str(case.files.get("seg", case.path))), "kind": "segmentation"}
        layers.append((case.seg, {"name": f"{case.case_id} seg", **where, "metadata": meta, "opacity": 0.5}, "labels"))
    return layers


def _robust_limits(volume: np.ndarray) -> tuple[float, float]:
    """Contrast limits from the 0.5-99.5 percentiles of the nonzero voxels (MRI has no fixed range)."""
    values = volume[volume != 0]
    if values.size == 0:
        return 0.0, 1.0
    sample = values[:: max(1, values.size // 200_000)]
    low, high = (float(v) for v in np.percentile(sample, [0.5, 99.5]))
    return (low, high) if high > low else (low, low + 1.0)


def map_kwargs(name: str, metadata: dict[str, Any], scale: Any, translate: Any) -> dict[str, Any]:
    """Display settings of an anomaly map: inferno, contrast 0..1, additive over the MRI."""
    return {"name": name, "colormap": "inferno", "contrast_limits": (0.0, 1.0), "blending": "additive",
            "scale": tuple(scale), "translate": tuple(translate), "metadata": {**metadata, "kind": MAP_KIND}}


def mask_kwargs(name: str, metadata: dict[str, Any], scale: Any, translate: Any) -> dict[str, Any]:
    """Display settings of a thresholded anomaly mask."""
    return {"name": name, "opacity": 0.6, "scale": tuple(scale), "translate": tuple(translate),
            "metadata": {**metadata, "kind": MASK_KIND}}


def threshold_mask(anomaly_map: np.ndarray, threshold: float, out: np.ndarray | None = None) -> np.ndarray:
    """uint8 mask of the voxels with ``map >= threshold`` (the convention of the metrics and the CLI)."""
    if out is None:
        out = np.empty(anomaly_map.shape, dtype=np.uint8)
    np.greater_equal(anomaly_map, np.float32(threshold), out=out, casting="unsafe")
    return out
