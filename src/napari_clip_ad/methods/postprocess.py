"""Post-processing of anomaly maps: the official Gaussian smoothing, on any device."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import InputError


def check_sigma(sigma: float) -> None:
    """Refuse a smoothing sigma that is negative, NaN or infinite (0 means no smoothing)."""
    try:
        value = float(sigma)
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise InputError(f"sigma {sigma}: give a Gaussian sigma in pixels >= 0 (0 = no smoothing; --sigma on the command line)")


def gaussian_kernel1d(sigma: float, truncate: float = 4.0, device: torch.device | None = None) -> torch.Tensor:
    """The 1D kernel of ``scipy.ndimage.gaussian_filter`` (radius ``int(truncate * sigma + 0.5)``)."""
    radius = int(truncate * float(sigma) + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64, device=device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def _pad_symmetric(x: torch.Tensor, pad: int, dim: int) -> torch.Tensor:
    # scipy's mode="reflect" is numpy's "symmetric": the edge sample is repeated (d c b a | a b c d).
    size = x.shape[dim]
    if pad > size:
        idx = torch.arange(-pad, size + pad, device=x.device)
        period = 2 * size
        idx = idx % period
        idx = torch.where(idx >= size, period - 1 - idx, idx)
        return x.index_select(dim, idx)
    left = x.narrow(dim, 0, pad).flip(dim)
    right = x.narrow(dim, size - pad, pad).flip(dim)
    return torch.cat([left, x, right], dim=dim)


def smooth_maps(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian-filter each (H, W) map like ``scipy.ndimage.gaussian_filter(map, sigma)`` (mode reflect).

    Args:
        maps: (B, H, W) or (H, W) tensor.
        sigma: Standard deviation in pixels; 0 returns the maps unchanged (negative, NaN, inf: InputError).
    """
    check_sigma(sigma)
    if sigma == 0:
        return maps
    squeeze = maps.ndim == 2
    x = maps[None] if squeeze else maps
    dtype = x.dtype
    # fp32 in, fp32 arithmetic: agrees with scipy's float64 filter to ~3e-7 on [0, 1] maps (the kernel
    # sums to 1), several times faster than float64; float64 input keeps float64.
    work = torch.float64 if dtype == torch.float64 else torch.float32
    x = x.to(work)[:, None]
    kernel = gaussian_kernel1d(sigma, device=x.device).to(work)
    radius = (kernel.numel() - 1) // 2
    x = F.conv2d(_pad_symmetric(x, radius, 2), kernel.view(1, 1, -1, 1))
    x = F.conv2d(_pad_symmetric(x, radius, 3), kernel.view(1, 1, 1, -1))
    out = x[:, 0].to(dtype)
    return out[0] if squeeze else out
