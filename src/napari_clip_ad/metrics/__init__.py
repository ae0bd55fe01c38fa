"""Segmentation and anomaly-detection metrics for 3D volumes and cohorts.

Conventions (empty masks, thresholds, regions) are in ``docs/metrics.md``.
"""

from .accumulator import DEFAULT_EXACT_LIMIT, PixelAccumulator
from .detection import SLICE_SCORE_SOURCES, SliceDetection, brain_slices, map_max_scores, slice_labels
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
from .pro import DEFAULT_FPR_LIMIT, aupro_from_counts, pro_curve_from_counts, region_weights
from .ranking import (
    DEFAULT_BINS,
    RANGE_TOLERANCE,
    auroc,
    average_precision,
    bin_index,
    bin_thresholds,
    check_scores,
    f1max,
    ranking_scores,
)
from .spatial import DistanceProfile, SliceDice, distance_profile, size_dice_spearman, slice_dice, slice_positions
from .summary import map_metrics

__all__ = [
    "DEFAULT_BINS", "DEFAULT_EXACT_LIMIT", "DEFAULT_FPR_LIMIT", "RANGE_TOLERANCE", "SLICE_SCORE_SOURCES", "Confusion",
    "DistanceProfile", "PixelAccumulator", "SliceDetection", "SliceDice", "aupro_from_counts", "auroc",
    "average_precision", "bin_index", "bin_thresholds", "brain_slices", "check_scores", "confusion", "dice",
    "dice_from", "distance_profile", "f1max", "map_max_scores", "map_metrics", "ppv", "ppv_from",
    "pro_curve_from_counts", "ranking_scores", "region_weights", "sensitivity", "sensitivity_from",
    "size_dice_spearman", "slice_dice", "slice_labels", "slice_positions", "specificity", "specificity_from",
    "volume_metrics",
]
