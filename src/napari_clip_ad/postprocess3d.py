"""3D post-processing of anomaly maps, beyond the study's slice-by-slice setup.

Arrays are canonical ``[z, y, x]`` volumes; ``spacing`` is the voxel size in mm in the same order
(``case.geometry.spacing``). Maps are anomaly scores in [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

FUSION_MODES = ("mean", "max")
COMPONENT_STRUCTURE = np.ones((3, 3, 3), dtype=bool)
"""26-connectivity for connected components."""


def fuse_views(maps: Sequence[np.ndarray], mode: str = "mean") -> np.ndarray:
    """Combine maps of one volume computed along different axes (axial, coronal, sagittal).

    Args:
        maps: Maps of one shape, each in [0, 1].
        mode: ``'mean'`` (default) or ``'max'`` voxel-wise.

    Returns:
        float32 map in [0, 1].

    Raises:
        ValueError: No map, shapes differ, or an unknown mode.
    """
    if mode not in FUSION_MODES:
        raise ValueError(f"fusion mode must be one of {FUSION_MODES}, got {mode!r}")
    if not maps:
        raise ValueError("no map to fuse")
    shapes = {np.shape(m) for m in maps}
    if len(shapes) != 1:
        raise ValueError(f"maps to fuse differ in shape: {sorted(shapes)}")
    stack = np.stack([np.asarray(m, dtype=np.float32) for m in maps])
    fused = stack.mean(axis=0) if mode == "mean" else stack.max(axis=0)
    return fused.astype(np.float32, copy=False)


def restrict_to_brain(anomaly_map: np.ndarray, brain_mask: np.ndarray) -> np.ndarray:
    """Set scores outside the brain mask to 0 (float32 copy)."""
    if np.shape(anomaly_map) != np.shape(brain_mask):
        raise ValueError(f"map {np.shape(anomaly_map)} and brain mask {np.shape(brain_mask)} differ in shape")
    return np.where(np.asarray(brain_mask, dtype=bool), anomaly_map, 0).astype(np.float32)


def smooth3d(anomaly_map: np.ndarray, sigma_mm: float, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> np.ndarray:
    """3D Gaussian smoothing with ``sigma_mm`` in millimetres (per-axis sigma = sigma_mm / spacing).

    Uses :func:`scipy.ndimage.gaussian_filter` (reflect borders), so [0, 1] maps stay in [0, 1].
    ``sigma_mm == 0`` returns a float32 copy.
    """
    if sigma_mm < 0:
        raise ValueError(f"sigma must be >= 0 mm, got {sigma_mm}")
    data = np.asarray(anomaly_map, dtype=np.float32)
    if len(spacing) != data.ndim or min(spacing) <= 0:
        raise ValueError(f"spacing {tuple(spacing)} does not fit a {data.ndim}D map")
    if sigma_mm == 0:
        return data.copy()
    sigma = [sigma_mm / float(s) for s in spacing]
    return np.clip(ndimage.gaussian_filter(data, sigma=sigma), 0.0, 1.0).astype(np.float32)


def remove_small_components(mask: np.ndarray, min_voxels: int | None = None, min_mm3: float | None = None,
                            spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> np.ndarray:
    """Drop 26-connected components smaller than a size (components of exactly that size stay).

    Args:
        mask: Binary mask (e.g. a thresholded map).
        min_voxels: Smallest component kept, in voxels.
        min_mm3: Smallest component kept, in mm^3 (voxel count x voxel volume); give one of the two.
        spacing: Voxel size in mm (for ``min_mm3``).

    Returns:
        bool mask.
    """
    if (min_voxels is None) == (min_mm3 is None):
        raise ValueError("give exactly one of min_voxels and min_mm3")
    mask = np.asarray(mask, dtype=bool)
    labels, n = ndimage.label(mask, structure=COMPONENT_STRUCTURE)
    if n == 0:
        return mask.copy()
    sizes = np.bincount(labels.ravel(), minlength=n + 1).astype(np.float64)
    if min_mm3 is not None:
        sizes *= float(np.prod(spacing))
        keep = sizes >= min_mm3
    else:
        keep = sizes >= min_voxels
    keep[0] = False
    return keep[labels]
