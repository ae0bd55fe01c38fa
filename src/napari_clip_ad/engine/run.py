"""Slice-by-slice inference over a 3D volume: batched, skipping brainless slices, on any device."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..case_options import parse_modality
from ..errors import Cancelled, InputError
from ..io import Case
from ..io.voxels import intensity_float32, mask_array
from ..methods import AnomalyMethod, smooth_maps
from ..methods.postprocess import check_sigma
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
        where = f"{source.path}: case {source.case_id}"
    else:
        array, where = np.asarray(source), "volume"
        if array.ndim != 3 or array.size == 0:
            raise InputError(f"volume must be a non-empty 3D [z, y, x] array, got shape {array.shape}"
                             + (" (no voxels)" if array.size == 0 else ""))
        # Finite after the cast the engine uses (float64 1e300 is inf in float32).
        channels = [intensity_float32(array, "volume")] * (1 if len(modalities) == 1 else 3)
        brain = array != 0 if brain_mask is None else brain_mask
    brain = mask_array(brain, "brain mask")
    volume = channels[0] if len(channels) == 1 else np.stack(channels, axis=0)
    if brain.shape != channels[0].shape:
        raise InputError(f"brain mask shape {brain.shape} differs from the volume shape {channels[0].shape}")
    if not brain.any():  # the rule evaluate applies too: an empty brain is an error, never an all-zero map
        raise InputError(f"{where}: brain mask is empty (all-zero image or mask), so no slice can be analysed; "
                         "check the case files or the mask")
    return volume, brain


def default_batch_size(device: torch.device) -> int:
    """Slices per forward pass when none is given: 16 on a GPU, 8 on the CPU.

    On the CPU larger batches are slower, not faster (memory-bound map post-processing; see
    docs/benchmarks.md, Inference); on a GPU the engine halves the batch on out-of-memory anyway.
    """
    return 8 if device.type == "cpu" else 16


MAX_AUTO_BATCH = 256
"""Upper bound of the CUDA ``auto`` batch (a whole BraTS volume is 155 slices)."""
AUTO_BATCH_MEMORY_SHARE = 0.7
"""Share of the free GPU memory the ``auto`` batch may plan to use (the rest is headroom)."""


def _predict_batch(
    method: AnomalyMethod, raw: torch.Tensor, out_hw: tuple[int, int], sigma: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    images = preprocess_slices(raw, method.image_size, method.backbone.mean, method.backbone.std)
    # The method runs its frozen backbone in its precision (bf16/fp16 autocast where chosen) and its
    # head in fp32; the engine's own work (smoothing, resize) is fp32 with autocast off.
    # Per-image scores: set-level scores (method.set_scores) are combined over the whole volume.
    output = method.predict(images, over_set=False)
    peaks = output.maps.float().flatten(1).amax(dim=1)
    maps = output.unit_maps().float()
    if getattr(method, "smooth_after_resize", False):
        # Official order of e.g. AnomalyDINO (dists2map): resize to the original image, then smooth.
        if tuple(maps.shape[-2:]) != out_hw:
            maps = F.interpolate(maps[:, None], size=out_hw, mode="bilinear", align_corners=False)[:, 0]
        return smooth_maps(maps, sigma).clamp_(0.0, 1.0), output.scores.float(), peaks
    maps = smooth_maps(maps, sigma)
    if tuple(maps.shape[-2:]) != out_hw:
        maps = F.interpolate(maps[:, None], size=out_hw, mode="bilinear", align_corners=False)[:, 0]
    return maps.clamp_(0.0, 1.0), output.scores.float(), peaks


def _set_normalised_volume(method: AnomalyMethod, stack: np.ndarray, todo: np.ndarray, out_hw: tuple[int, int], sigma: float,
                           batch_size: int, maps: np.ndarray, scores: np.ndarray, progress: ProgressCallback | None,
                           cancel: Callable[[], bool] | None) -> None:
    """Maps of a method whose official fusion normalises over the evaluated set (MVFA-AD few-shot).

    Pass 1 collects every analysed slice's components at image size; the fusion runs once over the whole
    volume; pass 2 smooths and resizes like :func:`_predict_batch`. Fills ``maps`` and ``scores`` in place.
    """
    device, parts = method.device, []
    was_training = method.training
    method.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(todo), batch_size):
                if cancel is not None and cancel():
                    raise Cancelled("cancelled")
                raw = torch.from_numpy(np.ascontiguousarray(stack[todo[start:start + batch_size]], dtype=np.float32)).to(device)
                images = preprocess_slices(raw, method.image_size, method.backbone.mean, method.backbone.std)
                parts.append([c.float().cpu() for c in method.set_components(images)])
                if progress:
                    progress(min(start + batch_size, len(todo)), len(todo))
            fused, fused_scores = method.fuse_set_components([torch.cat(c) for c in zip(*parts)])
            for start in range(0, len(todo), batch_size):
                batch = (fused[start:start + batch_size] / method.map_max).clamp(0.0, 1.0)
                batch = smooth_maps(batch, sigma)
                if tuple(batch.shape[-2:]) != out_hw:
                    batch = F.interpolate(batch[:, None], size=out_hw, mode="bilinear", align_corners=False)[:, 0]
                maps[todo[start:start + batch_size]] = batch.clamp_(0.0, 1.0).numpy()
    finally:
        method.train(was_training)
    scores[todo] = fused_scores.numpy()


def _auto_batch_size(method: AnomalyMethod, stack: torch.Tensor, out_hw: tuple[int, int], sigma: float) -> int:
    """Largest CUDA batch that should fit: peak memory of a 2-slice batch, scaled to the free memory.

    A first 1-slice call warms up (text features, kernels); the 2-slice peak per slice (an over-
    estimate: it includes fixed costs) sets the batch. Out-of-memory still halves it later.
    """
    device = method.device
    probe = stack[: min(2, stack.shape[0])]
    _predict_batch(method, probe[:1], out_hw, sigma)
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    _predict_batch(method, probe, out_hw, sigma)
    torch.cuda.synchronize(device)
    per_slice = max(1, (torch.cuda.max_memory_allocated(device) - base) // probe.shape[0])
    free, _ = torch.cuda.mem_get_info(device)
    cached_free = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(max(1, min(MAX_AUTO_BATCH, stack.shape[0], (AUTO_BATCH_MEMORY_SHARE * (free + cached_free)) // per_slice)))


def run_volume(
    source: Case | np.ndarray,
    method: AnomalyMethod,
    modality: str | Sequence[str] = "t2w",
    axis: str | int = "axial",
    batch_size: int | str | None = None,
    sigma: float | None = None,
    brain_mask: np.ndarray | None = None,
    progress: ProgressCallback | None = None,
    cancel: Callable[[], bool] | None = None,
    precision: str | None = None,
) -> VolumeResult:
    """Run a method over every slice of a volume and stack the maps back into 3D.

    Args:
        source: A loaded case, or a canonical [z, y, x] array (then ``modality`` only names it).
        method: A built method (its device and precision are used: see ``precision``).
        modality: One modality, or three joined by '+' used as the three input channels.
        axis: 'axial' (the study), 'coronal' or 'sagittal'.
        batch_size: Slices per forward pass; 'auto' (None on CUDA): the largest that fits the free GPU
            memory (a 2-slice memory probe), :func:`default_batch_size` on the CPU. Halved and retried
            on CUDA out-of-memory.
        sigma: Gaussian smoothing of each slice map; None uses the method's official sigma.
        brain_mask: Overrides the case's brain mask (slices without brain are skipped: map 0).
        progress: Called after every batch with (done, total) slices.
        cancel: Checked between batches; when it returns True, :class:`Cancelled` is raised.
        precision: 'auto', 'fp32' or 'bf16' for the frozen backbone (casts the method's weights once;
            see :mod:`napari_clip_ad.methods.precision`); None keeps the method's. Recorded in ``info``.

    Returns:
        The [0, 1] float32 map aligned with the input volume, per-slice scores and provenance.
    """
    if not isinstance(method, AnomalyMethod):
        raise InputError(f"method: give a built method (napari_clip_ad.methods.build_method({method!r}, ...)), "
                         f"not a {type(method).__name__}")
    if batch_size is not None and batch_size != "auto" and (not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool)):
        raise InputError(f"batch size (batch_size): give a whole number >= 1 or 'auto', got {batch_size!r}")
    if sigma is not None and not (isinstance(sigma, (int, float, np.number)) and np.isfinite(sigma) and sigma >= 0):
        raise InputError(f"sigma: give a finite number >= 0 (0 = no smoothing), got {sigma!r}")
    modalities = parse_modality(modality)
    ax = axis_index(axis)
    volume, brain = _volume_and_brain(source, modalities, brain_mask)
    device = method.device
    auto_batch = batch_size == "auto" or (batch_size is None and device.type == "cuda")
    if batch_size is None or batch_size == "auto":
        batch_size = default_batch_size(device)
    if isinstance(batch_size, str) or batch_size < 1:
        raise InputError(f"batch size must be at least 1 or 'auto', got {batch_size!r}")
    if precision is not None and not method.volume_level:  # model-free methods have no backbone to cast
        method.set_precision(precision)
    sigma = method.default_sigma if sigma is None else float(sigma)
    check_sigma(sigma)
    # (N, H, W) for one modality, (N, 3, H, W) for three; axis 0 (axial) stays a view without copy.
    stack = np.moveaxis(volume, ax + 1, 0) if volume.ndim == 4 else slices_along(volume, ax)
    brain_slices = slices_along(brain, ax)
    n_slices = brain_slices.shape[0]
    analysed = brain_slices.reshape(n_slices, -1).any(axis=1)
    todo = np.flatnonzero(analysed)
    if method.volume_level:  # whole-volume methods (intensity baseline): one call, per-slice score = map maximum
        anomaly_map = method.volume_map(volume, brain.astype(bool), ax, sigma) if len(todo) else np.zeros(brain.shape, np.float32)
        scores = slices_along(anomaly_map, ax).reshape(n_slices, -1).max(axis=1).astype(np.float32)
        if progress:
            progress(len(todo), len(todo))
        info = {**method.describe(), "modality": "+".join(modalities), "sigma": sigma, "device": "cpu",
                "axis": axis if isinstance(axis, str) else ["axial", "coronal", "sagittal"][ax],
                "batch_size": None, "slices_analysed": int(len(todo)), "slices_total": int(n_slices)}
        return VolumeResult(np.ascontiguousarray(anomaly_map, dtype=np.float32), scores, analysed, info)
    out_hw = tuple(brain_slices.shape[1:])
    maps = np.zeros((n_slices, *out_hw), dtype=np.float32)
    scores = np.zeros(n_slices, dtype=np.float32)
    if method.set_normalised and len(todo):  # official maps normalised over the evaluated set: the whole volume
        _set_normalised_volume(method, stack, todo, out_hw, sigma, int(batch_size), maps, scores, progress, cancel)
        info = {**method.describe(), "modality": "+".join(modalities), "sigma": sigma, "batch_size": int(batch_size),
                "axis": axis if isinstance(axis, str) else ["axial", "coronal", "sagittal"][ax], "device": str(device),
                "precision": method.precision, "slices_analysed": int(len(todo)), "slices_total": int(n_slices)}
        return VolumeResult(np.ascontiguousarray(np.moveaxis(maps, 0, ax)), scores, analysed, info)
    peaks = np.zeros(n_slices, dtype=np.float32)
    on_gpu = device.type == "cuda"
    if on_gpu and len(todo):
        # One pinned upload of the analysed slices and one download of their maps per volume: no
        # host round trip per batch (the maps stay on the device until the end).
        host = torch.from_numpy(np.ascontiguousarray(stack[todo], dtype=np.float32)).pin_memory()
        source_slices = host.to(device, non_blocking=True)
        device_maps = torch.empty((len(todo), *out_hw), dtype=torch.float32, device=device)
        device_scores = torch.empty(len(todo), dtype=torch.float32, device=device)
        device_peaks = torch.empty(len(todo), dtype=torch.float32, device=device)
    done, start, size = 0, 0, int(batch_size)
    was_training = method.training
    method.eval()  # once per volume (predict no longer switches ~400 modules every batch)
    try:
        if auto_batch and on_gpu and len(todo):
            try:
                size = _auto_batch_size(method, source_slices, out_hw, sigma)
            except torch.cuda.OutOfMemoryError:  # not even 2 slices fit: one at a time
                size = 1
                torch.cuda.empty_cache()
        if progress:
            progress(0, len(todo))
        while start < len(todo):
            if cancel is not None and cancel():
                raise Cancelled("cancelled")
            stop = min(start + size, len(todo))
            if on_gpu:
                raw = source_slices[start:stop]
            else:
                raw = torch.from_numpy(np.ascontiguousarray(stack[todo[start:stop]], dtype=np.float32)).to(device)
            try:
                batch_maps, batch_scores, batch_peaks = _predict_batch(method, raw, out_hw, sigma)
            except torch.cuda.OutOfMemoryError:
                if size == 1:
                    raise
                size = max(1, size // 2)
                torch.cuda.empty_cache()
                continue
            if on_gpu:
                device_maps[start:stop] = batch_maps
                device_scores[start:stop] = batch_scores
                device_peaks[start:stop] = batch_peaks
            else:
                maps[todo[start:stop]] = batch_maps.cpu().numpy()
                scores[todo[start:stop]] = batch_scores.cpu().numpy()
                peaks[todo[start:stop]] = batch_peaks.cpu().numpy()
            done += stop - start
            start = stop
            if progress:
                progress(done, len(todo))
    finally:
        method.train(was_training)
    if on_gpu and len(todo):
        maps[todo] = device_maps.cpu().numpy()
        scores[todo] = device_scores.cpu().numpy()
        peaks[todo] = device_peaks.cpu().numpy()
    if len(todo):
        scores[todo] = method.set_scores(torch.from_numpy(scores[todo]), torch.from_numpy(peaks[todo])).numpy()
    anomaly_map = np.ascontiguousarray(np.moveaxis(maps, 0, ax))
    info = {
        **method.describe(),
        "modality": "+".join(modalities),
        "axis": axis if isinstance(axis, str) else ["axial", "coronal", "sagittal"][ax],
        "sigma": sigma,
        "batch_size": size,
        "device": str(device),
        "precision": method.precision,
        "slices_analysed": int(len(todo)),
        "slices_total": int(n_slices),
    }
    return VolumeResult(anomaly_map, scores, analysed, info)
