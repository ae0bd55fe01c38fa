"""AUPRO: area under the per-region-overlap curve up to a false-positive rate, as MVTec AD defines it.

Definition (the MVTec AD evaluation code's ``compute_pro`` / ``trapezoid``, also the reference of
anomalib's AUPRO tests ``tests/unit/metrics/aupro/aupro_reference.py``), taken at **every** threshold:

* ground-truth regions are the connected components of the positive voxels (full connectivity:
  8-connected in 2D, 26-connected in 3D); ``regions='2d'`` labels each slice along axis 0 on its own;
* the thresholds are the scores of the normal (label 0) voxels; at the normal voxel of rank ``j``
  (0 = highest score) the curve has the point ``(j / N, PRO)`` where ``PRO`` is the mean over all
  regions of the fraction of the region's voxels scoring **strictly above** that voxel's score;
  the curve ends at ``(1, 1)`` and points are joined by straight lines;
* the area up to FPR 0.3 (the value at 0.3 linearly interpolated) is divided by 0.3.

Reduced to counts: per score level, the number of normal voxels ``n_l`` and the sum over the level's
region voxels of ``1 / |region|`` (``w_l``). The per-region fractions then add up to one curve, so the
metric streams: a histogram of both over fixed bins needs memory independent of the data size.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

DEFAULT_FPR_LIMIT = 0.3
"""Integration limit of AUPRO (MVTec AD, anomalib, BMAD)."""

REGION_MODES = ("3d", "2d")


def region_weights(labels: np.ndarray, regions: str = "3d") -> tuple[np.ndarray, int]:
    """Weight ``1 / |region|`` of every positive voxel, in C order, and the number of regions.

    Args:
        labels: Bool ground truth (any dimension; ``'2d'`` needs at least 2 dimensions).
        regions: ``'3d'``: components over all axes (full connectivity); ``'2d'``: components of each
            slice along axis 0 (8-connected), as 2D benchmarks count them.

    Returns:
        ``(weights, n_regions)``: ``weights[i]`` belongs to the ``i``-th positive voxel of
        ``labels[labels]`` (float64, one value per positive voxel only).
    """
    if regions not in REGION_MODES:
        raise ValueError(f"regions must be one of {REGION_MODES}, got {regions!r}")
    labels = np.asarray(labels, dtype=bool)
    if regions == "2d" and labels.ndim > 2:
        structure = np.zeros((3,) * labels.ndim, dtype=bool)
        structure[(1,) * (labels.ndim - 2)] = True  # no connection along the leading axes
    else:
        structure = np.ones((3,) * labels.ndim, dtype=bool)
    box = _bounding_box(labels)  # label only around the lesions: same components, same C order, far cheaper
    cropped = labels[box]
    components, n_regions = ndimage.label(cropped, structure=structure)
    which = components[cropped]
    sizes = np.bincount(which, minlength=n_regions + 1).astype(np.float64)
    sizes[0] = 1.0
    return 1.0 / sizes[which], int(n_regions)


def _bounding_box(labels: np.ndarray) -> tuple[slice, ...]:
    """Slices of the smallest box holding every True voxel (empty slices when there is none)."""
    box = []
    for axis in range(labels.ndim):
        hit = np.flatnonzero(labels.any(axis=tuple(a for a in range(labels.ndim) if a != axis)))
        box.append(slice(int(hit[0]), int(hit[-1]) + 1) if hit.size else slice(0, 0))
    return tuple(box)


def pro_curve_from_counts(negative: np.ndarray, weight: np.ndarray, n_regions: int) -> tuple[np.ndarray, np.ndarray]:
    """The PRO curve ``(fpr, pro)``, FPR ascending, from per-level counts (levels ascending).

    Args:
        negative: Normal voxels per level.
        weight: Sum of ``1 / |region|`` of the region voxels per level.
        n_regions: Number of ground-truth regions.
    """
    neg = np.asarray(negative, dtype=np.float64)[::-1]
    w = np.asarray(weight, dtype=np.float64)[::-1]
    n_neg = neg.sum()
    above = (np.cumsum(w) - w) / n_regions  # PRO when thresholding strictly above the level
    rank = np.cumsum(neg) - neg  # normal voxels above the level
    keep = neg > 0
    first, last, pro = rank[keep] / n_neg, (rank[keep] + neg[keep] - 1) / n_neg, above[keep]
    fpr = np.append(np.stack([first, last], axis=1).ravel(), 1.0)
    return fpr, np.append(np.repeat(pro, 2), 1.0)


def area_up_to(fpr: np.ndarray, pro: np.ndarray, limit: float) -> float:
    """Trapezoid area under ``pro(fpr)`` on ``[0, limit]`` (the value at ``limit`` linearly interpolated)."""
    inside = fpr <= limit
    x, y = fpr[inside], pro[inside]
    area = float(np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])))
    if x[-1] < limit:
        i = int(np.count_nonzero(inside))  # first point beyond the limit (the curve ends at fpr 1)
        y_limit = pro[i - 1] + (pro[i] - pro[i - 1]) * (limit - fpr[i - 1]) / (fpr[i] - fpr[i - 1])
        area += 0.5 * (y_limit + pro[i - 1]) * (limit - fpr[i - 1])
    return area


def aupro_from_counts(negative: np.ndarray, weight: np.ndarray, n_regions: int,
                      fpr_limit: float = DEFAULT_FPR_LIMIT) -> float:
    """Normalised AUPRO (area up to ``fpr_limit`` divided by it); NaN without a region or a normal voxel."""
    if n_regions == 0 or float(np.sum(negative)) == 0:
        return float("nan")
    if not 0 < fpr_limit <= 1:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    fpr, pro = pro_curve_from_counts(negative, weight, n_regions)
    return float(area_up_to(fpr, pro, fpr_limit) / fpr_limit)


def aupro_bound_from_counts(negative: np.ndarray, weight: np.ndarray, n_regions: int,
                            fpr_limit: float = DEFAULT_FPR_LIMIT, tied: np.ndarray | None = None) -> float:
    """Largest possible ``|binned AUPRO - exact AUPRO|`` whatever the order of scores inside each level.

    At a normal voxel of a level the exact PRO lies between the binned one and it plus the level's
    ``w_l / K``; both curves are linear between consecutive normal voxels, so the areas differ by at
    most ``sum_l n_l w_l / (N K)`` over the levels that start below the FPR limit (then / limit).
    Levels flagged in ``tied`` hold one score value and add nothing.
    """
    if n_regions == 0 or float(np.sum(negative)) == 0:
        return float("nan")
    neg = np.asarray(negative, dtype=np.float64)[::-1]
    w = np.asarray(weight, dtype=np.float64)[::-1]
    n_neg = neg.sum()
    start = (np.cumsum(neg) - neg) / n_neg
    inside = start < fpr_limit
    if tied is not None:
        inside &= ~np.asarray(tied, dtype=bool)[::-1]
    return float(np.sum(neg[inside] * w[inside]) / (n_neg * n_regions) / fpr_limit)
