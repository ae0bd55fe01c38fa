"""napari writer: an Image or Labels layer to NIfTI, aligned with the file it came from.

Layers read by this plugin (and the widgets' results) keep the source geometry in their metadata;
they are written with the source affine, header and axis order through
:func:`napari_clip_ad.io.save_volume`. Other layers get an axis-aligned affine from their
``scale`` and ``translate``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ..io import save_volume
from .layers import geometry_from_placement, stored_geometry


def _output_path(path: str) -> Path:
    out = Path(path)
    if not out.name.lower().endswith((".nii", ".nii.gz")):
        out = out.with_name(out.name + ".nii.gz")
    return out


def write_layer(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """Write one layer's 3D data as NIfTI; returns the path written."""
    array = np.asarray(data)
    if array.ndim != 3:
        raise InputError(f"{path}: only 3D layers can be written as a NIfTI volume (this one has shape {array.shape})")
    geometry = stored_geometry(meta.get("metadata") or {}, array.shape)
    if geometry is None:
        ndim = array.ndim
        geometry = geometry_from_placement(array.shape, meta.get("scale") or (1.0,) * ndim, meta.get("translate") or (0.0,) * ndim)
    return [str(save_volume(array, geometry, _output_path(path)))]


def write_image(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """Image layer -> NIfTI (float maps stay float32)."""
    array = np.asarray(data)
    if array.dtype == np.float64:
        array = array.astype(np.float32)
    return write_layer(path, array, meta)


def write_labels(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """Labels layer -> NIfTI (integer labels, dtype kept)."""
    return write_layer(path, data, meta)
