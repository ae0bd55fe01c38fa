"""Segmentation and anomaly-detection metrics for 3D volumes and cohorts.

Conventions (empty masks, thresholds, regions) are in ``docs/metrics.md``.
"""

from .accumulator import DEFAULT_EXACT_LIMIT, PixelAccumulator
from .overlap import (
    Confusion,
    confusion,
    dice,
    dice_from,
    ppv,
    ppv_from,
    sensitivity,
    sensitivity_from,
    specificity,
    specificity_from,
    volume_metrics,
)
from .ranking import DEFAULT_BINS, RANGE_TOLERANCE, auroc, bin_index, bin_thresholds, check_scores, f1max
from .spatial import DistanceProfile, SliceDice, distance_profile, size_dice_spearman, slice_dice, slice_positions

__all__ = [
    "DEFAULT_BINS", "DEFAULT_EXACT_LIMIT", "RANGE_TOLERANCE", "Confusion", "DistanceProfile", "PixelAccumulator",
    "SliceDice", "auroc", "bin_index", "bin_thresholds", "check_scores", "confusion", "dice", "dice_from",
    "distance_profile", "f1max", "ppv", "ppv_from", "sensitivity", "sensitivity_from", "size_dice_spearman",
    "slice_dice", "slice_positions", "specificity", "specificity_from", "volume_metrics",
]
