"""Every metric of one anomaly map against its ground truth, as one dict (for the GUI and scripts)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .accumulator import PixelAccumulator
from .detection import SliceDetection, brain_slices, map_max_scores, slice_labels
from .overlap import volume_metrics


def map_metrics(anomaly_map: np.ndarray, gt: np.ndarray, brain: np.ndarray | None = None, region: str = "all",
                slice_scores: np.ndarray | None = None, threshold: float | None = None,
                regions: str = "3d") -> dict[str, Any]:
    """Threshold-free and thresholded metrics of one ``[z, y, x]`` map (same definitions as ``evaluate``).

    Args:
        anomaly_map: Map in [0, 1].
        gt: Ground truth of the same shape (nonzero = lesion).
        brain: Brain mask (default: every voxel). Slice detection scores the slices holding brain.
        region: ``'all'`` scores every voxel, ``'brain'`` only the brain mask's.
        slice_scores: The method's image score per slice along axis 0 (e.g. ``VolumeResult.scores``);
            None uses the map maximum of each slice.
        threshold: Threshold for Dice, sensitivity, specificity, PPV; None uses the map's own F1-max threshold.
        regions: AUPRO regions, ``'3d'`` (26-connected components) or ``'2d'`` (per slice).

    Returns:
        ``auroc, pixel_ap, aupro, f1max, f1max_threshold, dice_f1max, slice_auroc, slice_ap,
        slice_score, threshold, dice, sensitivity, specificity, ppv, tumour_voxels, predicted_voxels``
        and the ``*_bound`` of the binned values (0 when exact). NaN where undefined.
    """
    anomaly_map = np.asarray(anomaly_map)
    gt = np.asarray(gt) != 0
    brain = np.ones(gt.shape, dtype=bool) if brain is None else np.asarray(brain, dtype=bool)
    if region not in ("all", "brain"):
        raise ValueError(f"region must be 'all' or 'brain', got {region!r}")
    scored = brain if region == "brain" else None
    pixels = PixelAccumulator()
    pixels.update(anomaly_map, gt, scored, regions=regions)
    f1max, f1_threshold = pixels.f1max(), pixels.f1max_threshold()
    used = f1_threshold if threshold is None else float(threshold)
    keep = brain_slices(brain)
    if slice_scores is None:
        per_slice, source = map_max_scores(anomaly_map, scored), "map max"
    else:
        per_slice, source = np.asarray(slice_scores, dtype=np.float64), "image score"
        if per_slice.shape != (gt.shape[0],):
            raise ValueError(f"{per_slice.size} slice scores for {gt.shape[0]} slices")
    slices = SliceDetection()
    slices.update(per_slice[keep], slice_labels(gt, scored)[keep])
    slice_auroc, slice_ap = slices.auroc_ap()
    result: dict[str, Any] = {
        "auroc": pixels.auroc(), "pixel_ap": pixels.average_precision(), "aupro": pixels.aupro(),
        "f1max": f1max, "f1max_threshold": f1_threshold,
        # Dice over all scored voxels at the F1-max threshold is F1 there, i.e. F1-max itself.
        "dice_f1max": f1max,
        "auroc_bound": pixels.auroc_bound(), "pixel_ap_bound": pixels.average_precision_bound(),
        "aupro_bound": pixels.aupro_bound(), "aupro_regions": regions,
        "slice_auroc": slice_auroc, "slice_ap": slice_ap, "slice_score": source,
        "threshold": used,
    }
    if math.isnan(used):
        result.update(dice=math.nan, sensitivity=math.nan, specificity=math.nan, ppv=math.nan)
    else:
        result.update(volume_metrics(anomaly_map >= used, gt, scored))
    return result
