"""Voxel values the engine can use: real numbers that stay finite as float32 (the engine's type)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import InputError

FLOAT32_MAX = float(np.finfo(np.float32).max)


def check_intensity_dtype(dtype: np.dtype, where: str | Path) -> None:
    """Refuse dtypes that are not real intensities (bool, complex, object, strings, records...)."""
    dtype = np.dtype(dtype)
    if dtype.kind in "iuf":
        return
    if dtype.kind == "c":
        hint = "give the magnitude (numpy.abs) as a real-valued array"
    elif dtype.kind == "b":
        hint = "a boolean array is a mask, not an image; give the image intensities (a mask goes to brain_mask)"
    else:
        hint = "give integer or floating-point intensities"
    raise InputError(f"{where}: voxel type {dtype} (dtype {dtype}) cannot be used as image intensities; {hint}")


def intensity_float32(data: np.ndarray, where: str | Path, out: np.ndarray | None = None) -> np.ndarray:
    """``data`` as float32 (into ``out`` when given), refused if any voxel is not finite *after* the cast.

    float64 values beyond +-3.4e38 become inf in float32: checking before the cast would let them through
    as NaN maps, so the check is made on what the engine actually uses.

    Args:
        data: Real-valued voxels (see :func:`check_intensity_dtype`).
        where: The file or array name for the message.
        out: Optional float32 array of ``data``'s shape to write into.
    """
    check_intensity_dtype(data.dtype, where)
    if out is None:
        out = np.empty(data.shape, dtype=np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        np.copyto(out, data, casting="unsafe")
    if data.dtype.kind == "f" and not np.isfinite(out).all():
        bad = ~np.isfinite(out)
        n_bad = int(np.count_nonzero(bad))
        n_source = int(np.count_nonzero(~np.isfinite(data[bad])))
        if n_source == n_bad:
            raise InputError(f"{where}: {n_bad} NaN/inf voxels; fix or mask them before use (e.g. numpy.nan_to_num)")
        also = f" and {n_source} NaN/inf voxels" if n_source else ""
        raise InputError(f"{where}: {n_bad - n_source} voxels beyond the float32 range (|value| > {FLOAT32_MAX:.3g}){also}; "
                         "the engine computes in float32, so rescale the image (e.g. to 0-1000) and save it again")
    return out


def mask_array(mask: np.ndarray, where: str | Path) -> np.ndarray:
    """A mask as bool (nonzero = inside); refuses non-numeric dtypes and NaN/inf values."""
    mask = np.asarray(mask)
    if mask.dtype == bool:
        return mask
    if mask.dtype.kind not in "iuf":
        raise InputError(f"{where}: dtype {mask.dtype} is not a mask; give a boolean (or 0/1) array")
    if mask.dtype.kind == "f" and not np.isfinite(mask).all():
        raise InputError(f"{where}: NaN/inf values; give a boolean (or 0/1) array")
    return mask != 0
