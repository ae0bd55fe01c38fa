"""Per-slice preprocessing as in the study: each slice scaled on its own, 3 channels, resized, CLIP-normalised."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

AXES: dict[str, int] = {"axial": 0, "coronal": 1, "sagittal": 2}
"""Slicing axis name -> canonical array axis (arrays are [z, y, x], see napari_clip_ad.io.nifti)."""


def axis_index(axis: str | int) -> int:
    """Canonical array axis of a slicing-axis name (or an index 0-2)."""
    from ..errors import InputError

    if isinstance(axis, int) and axis in (0, 1, 2):
        return axis
    if axis not in AXES:
        raise InputError(f"unknown slicing axis {axis!r}; use one of {', '.join(AXES)}")
    return AXES[axis]


def scale_slices(slices: torch.Tensor) -> torch.Tensor:
    """Min-max scale each (H, W) slice of a (N, C, H, W) tensor to [0, 1] on its own (per channel).

    A constant slice becomes all zeros. Where the span max - min overflows float32 (finite values near
    +-3.4e38), that batch is scaled in float64 and the [0, 1] result cast back, so no slice turns NaN.
    """
    flat = slices.flatten(2)
    low = flat.amin(dim=2, keepdim=True)
    span = flat.amax(dim=2, keepdim=True) - low
    if flat.dtype != torch.float64 and bool(torch.isinf(span).any()):
        return scale_slices(slices.double()).to(slices.dtype)
    scaled = (flat - low) / torch.where(span > 0, span, torch.ones_like(span))
    return scaled.view_as(slices)


def preprocess_slices(
    slices: torch.Tensor,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> torch.Tensor:
    """Turn raw MRI slices into CLIP input.

    Args:
        slices: (N, H, W) one modality (repeated to 3 channels) or (N, 3, H, W) three modalities.
        image_size: Square output size.
        mean: CLIP mean per channel.
        std: CLIP std per channel.

    Returns:
        (N, 3, image_size, image_size) float32 tensor on the input's device.
    """
    x = slices.float()
    if x.ndim == 3:
        x = x[:, None]
    x = scale_slices(x)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-2:] != (image_size, image_size):
        x = F.interpolate(x, size=(image_size, image_size), mode="bicubic", align_corners=False, antialias=True)
        x = x.clamp_(0.0, 1.0)
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean_t) / std_t


def slices_along(volume: np.ndarray, axis: int) -> np.ndarray:
    """A view of ``volume`` with the slicing axis first (axis 0 stays a view without copy)."""
    return np.moveaxis(volume, axis, 0)
