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
from ..io.header import MAP_PROVENANCE, MASK_PROVENANCE, provenance_text
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
    return [str(save_volume(array, geometry, _output_path(path), layer_provenance(meta.get("metadata") or {})))]


def layer_provenance(metadata: dict[str, Any]) -> str | None:
    """The header provenance of an anomaly map or mask layer (so the reader recognises the file); None otherwise."""
    kind = metadata.get("kind")
    if kind not in (MAP_PROVENANCE, MASK_PROVENANCE):
        return None
    threshold = metadata.get("threshold")
    return provenance_text(str(kind), thr=None if threshold is None else repr(float(threshold)),
                           minc=metadata.get("min_component"), case=metadata.get("case_id"),
                           method=metadata.get("method"))


def write_image(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """Image layer -> NIfTI (float maps stay float32)."""
    array = np.asarray(data)
    if array.dtype == np.float64:
        array = array.astype(np.float32)
    return write_layer(path, array, meta)


def write_labels(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """Labels layer -> NIfTI (integer labels, dtype kept)."""
    return write_layer(path, data, meta)


def _file_name(name: str) -> str:
    """A layer name as a file name: path separators and control characters replaced."""
    cleaned = "".join("_" if c in '/\\:*?"<>|' or ord(c) < 32 else c for c in name).strip().strip(".")
    return cleaned or "layer"


def write_layers(path: str, layer_data: list[tuple[Any, dict[str, Any], str]]) -> list[str]:
    """Several layers at once: each as ``<layer name>.nii.gz`` in the folder ``path`` (made when missing).

    Every layer is checked before anything is written, so a 2D or 4D layer in the selection writes
    nothing and says which one; names that would collide get ``-2``, ``-3``... appended.
    """
    folder = Path(path)
    if folder.name.lower().endswith((".nii", ".nii.gz")):
        folder = folder.with_name(folder.name[: -len(".nii.gz")] if folder.name.lower().endswith(".nii.gz")
                                  else folder.name[: -len(".nii")])
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder}: exists and is not a folder; saving several layers needs a folder name")
    for data, meta, layer_type in layer_data:
        shape = np.shape(data)
        if layer_type not in ("image", "labels") or len(shape) != 3:
            raise InputError(f"layer {meta.get('name')!r} ({layer_type}, shape {shape}) cannot be written as a 3D NIfTI "
                             "volume; select only 3D image and labels layers")
    folder.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    used: set[str] = set()
    for data, meta, layer_type in layer_data:
        stem = _file_name(str(meta.get("name") or "layer"))
        name, n = stem, 1
        while name.lower() in used:
            n += 1
            name = f"{stem}-{n}"
        used.add(name.lower())
        target = str(folder / f"{name}.nii.gz")
        written += (write_image if layer_type == "image" else write_labels)(target, data, meta)
    return written
