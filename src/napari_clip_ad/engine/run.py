"""Slice-by-slice inference over a 3D volume: batched, skipping brainless slices, on any device."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..case_options import parse_modality
from ..errors import Cancelled, InputError
from ..io import Case
from ..methods import AnomalyMethod, smooth_maps
from .preprocess import axis_index, preprocess_slices, slices_along

ProgressCallback = Callable[[int, int], None]
"""Called as ``progress(done_slices, total_slices)`` after every batch."""


@dataclass
class VolumeResult:
    """The 3D anomaly map of a volume and what produced it.

    Attributes:
        anomaly_map: float32 map in [0, 1], canonical [z, y, x], same shape as the input volume.
        scores: Image-level score per slice along the slicing axis (0 for skipped slices).
        analysed: bool per slice: False where the slice had no brain and the network did not run.
        info: Method description, axis, modality, batch size actually used, device.
    """

    anomaly_map: np.ndarray
    scores: np.ndarray
    analysed: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)


def _volume_and_brain(source: Case | np.ndarray, modalities: list[str], brain_mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(source, Case):
        channels = [source.image(m) for m in modalities]
        brain = source.brain_mask if brain_mask is None else brain_mask
    else:
        array = np.asarray(source)
        if array.ndim != 3:
            raise InputError(f"volume must be 3D [z, y, x], got shape {array.shape}")
        if array.size == 0:
            raise InputError(f"volume has shape {array.shape}: no voxels; give a non-empty [z, y, x] array")
        if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
            raise InputError(f"volume has dtype {array.dtype}; give real numbers (an integer or float array)")
        if not np.all(np.isfinite(array)):
            raise InputError("volume has NaN/inf voxels; fix or mask them first")
        channels = [array] * (1 if len(modalities) == 1 else 3)
        brain = array != 0 if brain_mask is None else brain_mask
    volume = channels[0] if len(channels) == 1 else np.stack(channels, axis=0)
    if brain.shape != channels[0].shape:
        raise InputError(f"brain mask shape {brain.shape} differs from the volume shape {channels[0].shape}")
    return volume, brain


def default_batch_size(device: torch.device) -> int:
    """Slices per forward pass when none is given: 16 on a GPU, 8 on the CPU.

    On the CPU larger batches are slower, not faster (memory-bound map post-processing; see
    docs/benchmarks.md, Inference); on a GPU the engine halves the batch on out-of-memory anyway.
    """
    return 8 if device.type == "cpu" else 16


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def _predict_batch(method: AnomalyMethod, raw: torch.Tensor, out_hw: tuple[int, int], sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    images = preprocess_slices(raw, method.image_size, method.backbone.mean, method.backbone.std)
    with _autocast(images.device):
        output = method.predict(images)
    maps = output.unit_maps().float()
    maps = smooth_maps(maps, sigma)
    if tuple(maps.shape[-2:]) != out_hw:
        maps = F.interpolate(maps[:, None], size=out_hw, mode="bilinear", align_corners=False)[:, 0]
    return maps.clamp_(0.0, 1.0), output.scores.float()


def run_volume(
    source: Case | np.ndarray,
    method: AnomalyMethod,
    modality: str | Sequence[str] = "t2w",
    axis: str | int = "axial",
    batch_size: int | None = None,
    sigma: float | None = None,
    brain_mask: np.ndarray | None = None,
    progress: ProgressCallback | None = None,
    cancel: Callable[[], bool] | None = None,
) -> VolumeResult:
    """Run a method over every slice of a volume and stack the maps back into 3D.

    Args:
        source: A loaded case, or a canonical [z, y, x] array (then ``modality`` only names it).
        method: A built method (its device is used; autocast bf16/fp16 on CUDA, fp32 on CPU).
        modality: One modality, or three joined by '+' used as the three input channels.
        axis: 'axial' (the study), 'coronal' or 'sagittal'.
        batch_size: Slices per forward pass (None: :func:`default_batch_size`); halved and retried on CUDA
            out-of-memory.
        sigma: Gaussian smoothing of each slice map; None uses the method's official sigma.
        brain_mask: Overrides the case's brain mask (slices without brain are skipped: map 0).
        progress: Called after every batch with (done, total) slices.
        cancel: Checked between batches; when it returns True, :class:`Cancelled` is raised.

    Returns:
        The [0, 1] float32 map aligned with the input volume, per-slice scores and provenance.
    """
    if not isinstance(method, AnomalyMethod):
        raise InputError(f"method: give a built method (napari_clip_ad.methods.build_method({method!r}, ...)), "
                         f"not a {type(method).__name__}")
    if batch_size is not None and (not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool)):
        raise InputError(f"batch_size: give a whole number >= 1, got {batch_size!r}")
    if sigma is not None and not (isinstance(sigma, (int, float, np.number)) and np.isfinite(sigma) and sigma >= 0):
        raise InputError(f"sigma: give a finite number >= 0 (0 = no smoothing), got {sigma!r}")
    modalities = parse_modality(modality)
    ax = axis_index(axis)
    volume, brain = _volume_and_brain(source, modalities, brain_mask)
    if batch_size is None:
        batch_size = default_batch_size(method.device)
    if batch_size < 1:
        raise InputError(f"batch size must be at least 1, got {batch_size}")
    sigma = method.default_sigma if sigma is None else float(sigma)
    # (N, H, W) for one modality, (N, 3, H, W) for three; axis 0 (axial) stays a view without copy.
    stack = np.moveaxis(volume, ax + 1, 0) if volume.ndim == 4 else slices_along(volume, ax)
    brain_slices = slices_along(brain, ax)
    n_slices = brain_slices.shape[0]
    analysed = brain_slices.reshape(n_slices, -1).any(axis=1)
    todo = np.flatnonzero(analysed)
    out_hw = tuple(brain_slices.shape[1:])
    maps = np.zeros((n_slices, *out_hw), dtype=np.float32)
    scores = np.zeros(n_slices, dtype=np.float32)
    device = method.device
    done, start, size = 0, 0, int(batch_size)
    if progress:
        progress(0, len(todo))
    while start < len(todo):
        if cancel is not None and cancel():
            raise Cancelled("cancelled")
        index = todo[start : start + size]
        raw = torch.from_numpy(np.ascontiguousarray(stack[index], dtype=np.float32)).to(device, non_blocking=True)
        try:
            batch_maps, batch_scores = _predict_batch(method, raw, out_hw, sigma)
        except torch.cuda.OutOfMemoryError:
            if size == 1:
                raise
            size = max(1, size // 2)
            torch.cuda.empty_cache()
            continue
        maps[index] = batch_maps.cpu().numpy()
        scores[index] = batch_scores.cpu().numpy()
        start += len(index)
        done += len(index)
        if progress:
            progress(done, len(todo))
    anomaly_map = np.ascontiguousarray(np.moveaxis(maps, 0, ax))
    info = {
        **method.describe(),
        "modality": "+".join(modalities),
        "axis": axis if isinstance(axis, str) else ["axial", "coronal", "sagittal"][ax],
        "sigma": sigma,
        "batch_size": size,
        "device": str(device),
        "slices_analysed": int(len(todo)),
        "slices_total": int(n_slices),
    }
    return VolumeResult(anomaly_map, scores, analysed, info)
