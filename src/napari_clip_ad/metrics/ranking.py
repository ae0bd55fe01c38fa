"""Threshold-free pixel metrics (AUROC, average precision, F1-max) computed from per-threshold counts.

Both the exact path (one level per distinct score, from sorting) and the histogram path (one level
per bin) reduce the data to counts of positive and negative voxels per score level; the curves are
computed from those counts. A voxel is predicted positive when its score is ``>= threshold``.

Histogram bins split ``[0, 1]`` into ``bins`` equal parts: bin ``b`` holds scores in
``[b/bins, (b+1)/bins)`` and the last bin also holds 1.0. With a power-of-two ``bins`` (65,536 by
default) ``floor(score * bins)`` is exact in float32 and float64, so "score in a bin >= b" is exactly
"score >= b/bins": the histogram's thresholds are the bin lower edges and its F1 values are exact F1
values at those thresholds (hence F1-max from the histogram is a lower bound on the exact F1-max).
AUROC treats scores in one bin as tied and integrates the ROC curve with trapezoids, as
:func:`sklearn.metrics.roc_auc_score` does for tied scores; average precision treats them as one
threshold, as :func:`sklearn.metrics.average_precision_score` does. The ``*_bound_from_counts``
functions give, from the same counts, how far the binned value can be from the exact one whatever
the order of the scores inside each bin (see ``docs/metrics.md``).
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError

DEFAULT_BINS = 65_536
"""Histogram bins over [0, 1] (a power of two keeps binning exact)."""

RANGE_TOLERANCE = 1e-6
"""Scores this far outside [0, 1] are clipped; further out they are refused."""


def check_scores(scores: np.ndarray, source: str = "anomaly map") -> None:
    """Refuse NaN/inf scores and scores outside [0, 1] by more than :data:`RANGE_TOLERANCE`.

    Args:
        scores: Score array (any shape).
        source: What the scores are (a file name), for the error message.

    Raises:
        InputError: One line naming ``source``, the bad values and what to do.
    """
    if scores.size == 0:
        return
    low, high = float(np.min(scores)), float(np.max(scores))  # NaN propagates into min/max
    if np.isnan(low) or np.isnan(high):
        bad = int(np.count_nonzero(np.isnan(scores)))
        raise InputError(f"{source}: {bad} NaN values; anomaly maps must hold finite values in [0, 1]")
    if low < -RANGE_TOLERANCE or high > 1.0 + RANGE_TOLERANCE:
        raise InputError(f"{source}: values span [{low:.6g}, {high:.6g}], outside [0, 1]; "
                         "normalise the map to [0, 1] (e.g. min-max scaling) before evaluating")


def bin_index(scores: np.ndarray, bins: int = DEFAULT_BINS) -> np.ndarray:
    """Histogram bin of each score (``floor(score * bins)``, clipped to ``[0, bins - 1]``).

    Scores must already be checked with :func:`check_scores`.
    """
    dtype = scores.dtype if scores.dtype in (np.float32, np.float64) else np.float32
    scaled = np.multiply(scores, dtype.type(bins), dtype=dtype)
    np.clip(scaled, 0, bins - 1, out=scaled)
    return scaled.astype(np.intp)


def bin_thresholds(bins: int = DEFAULT_BINS) -> np.ndarray:
    """The threshold of each bin: its lower edge ``b / bins``."""
    return np.arange(bins, dtype=np.float64) / bins


def level_index(scores: np.ndarray, bins: int = DEFAULT_BINS) -> np.ndarray:
    """Histogram level of each checked score: 0 for scores ``<= 0``, ``bins + 1`` for scores ``>= 1``,
    else ``1 + floor(score * bins)``.

    Exact 0 (background, skipped slices, zeroed outside the brain) and exact 1 (clamped maps) are
    common and would otherwise share a bin with nearby scores; kept apart, they stay exact ties.
    """
    # floor(clip(score * bins, 0, bins)) is bins for scores >= 1 and the bin below otherwise; + 1 except at 0.
    dtype = scores.dtype if scores.dtype in (np.float32, np.float64) else np.float32
    scaled = np.multiply(scores, dtype.type(bins), dtype=dtype)
    np.clip(scaled, 0, bins, out=scaled)
    index = scaled.astype(np.intp)
    index += scores > 0
    return index


def level_thresholds(bins: int = DEFAULT_BINS) -> np.ndarray:
    """The threshold selecting each level of :func:`level_index` and every level above it.

    0 for the zero level, the smallest positive double for the rest of bin 0, ``b / bins`` for bin
    ``b >= 1`` (scores of 1 excluded), 1 for the level of ones.
    """
    return np.concatenate([[0.0, np.nextafter(0.0, 1.0)], np.arange(1, bins, dtype=np.float64) / bins, [1.0]])


def exact_counts(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct score values (ascending) with the number of positive and negative voxels at each.

    Args:
        scores: Scores (flattened).
        labels: Bool labels of the same length.
    """
    levels, inverse = np.unique(np.asarray(scores, dtype=np.float64), return_inverse=True)
    inverse = inverse.ravel()
    total = np.bincount(inverse, minlength=levels.size)
    positive = np.bincount(inverse[labels], minlength=levels.size)
    return levels, positive, total - positive


def auroc_from_counts(positive: np.ndarray, negative: np.ndarray) -> float:
    """Area under the ROC curve from per-level counts (levels ascending; ties share a level).

    Returns:
        The AUROC, or NaN when there is no positive or no negative voxel.
    """
    pos = np.asarray(positive, dtype=np.float64)[::-1]
    neg = np.asarray(negative, dtype=np.float64)[::-1]
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    tp_above = np.cumsum(pos) - pos  # positives strictly above each level
    # Trapezoid rule: each negative at a level counts the positives above it plus half of the tied ones.
    return float(np.sum(neg * (tp_above + 0.5 * pos)) / (n_pos * n_neg))


def _untied(counts: np.ndarray, tied: np.ndarray | None) -> np.ndarray:
    """``counts`` as float64 with the levels known to hold one score value (exact ties) set to 0."""
    counts = np.array(counts, dtype=np.float64)
    if tied is not None:
        counts[np.asarray(tied, dtype=bool)] = 0.0
    return counts


def auroc_bound_from_counts(positive: np.ndarray, negative: np.ndarray, tied: np.ndarray | None = None) -> float:
    """Largest possible ``|binned AUROC - exact AUROC|``: half the positive-negative pairs sharing a level.

    A pair in one bin counts 1/2 in the binned AUROC and 0 or 1 in the exact one. Levels flagged in
    ``tied`` hold a single score value (exact ties, scored alike both ways) and add nothing.
    """
    pos = np.asarray(positive, dtype=np.float64)
    n_pos, n_neg = pos.sum(), float(np.sum(negative))
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    return float(0.5 * np.sum(pos * _untied(negative, tied)) / (n_pos * n_neg))


def average_precision_from_counts(positive: np.ndarray, negative: np.ndarray) -> float:
    """Average precision from per-level counts (levels ascending), as scikit-learn defines it.

    ``AP = sum_n (R_n - R_{n-1}) P_n`` over the distinct thresholds taken from the highest down
    (step-wise, no interpolation): each level adds its share of the positives times the precision of
    predicting every voxel at or above it.

    Returns:
        The AP, or NaN when there is no positive voxel.
    """
    pos = np.asarray(positive, dtype=np.float64)[::-1]
    neg = np.asarray(negative, dtype=np.float64)[::-1]
    n_pos = pos.sum()
    if n_pos == 0:
        return float("nan")
    tp = np.cumsum(pos)
    predicted = tp + np.cumsum(neg)
    hit = pos > 0  # levels without a positive add no recall (and may have predicted == 0 only if pos == 0)
    return float(np.sum(pos[hit] * tp[hit] / predicted[hit]) / n_pos)


def average_precision_bound_from_counts(positive: np.ndarray, negative: np.ndarray,
                                        tied: np.ndarray | None = None) -> float:
    """Largest possible ``|binned AP - exact AP|`` whatever the order of scores inside each level.

    Inside a level with ``p`` positives and ``n`` negatives below ``TP`` positives and ``FP`` negatives,
    every positive's exact precision lies in ``[(TP+1)/(TP+1+FP+n), (TP+p)/(TP+FP+p)]`` and so does the
    binned one ``(TP+p)/(TP+FP+p+n)``; each positive weighs ``1/P``. Levels flagged in ``tied`` hold
    one score value and add nothing.
    """
    pos = np.asarray(positive, dtype=np.float64)[::-1]
    neg = np.asarray(negative, dtype=np.float64)[::-1]
    n_pos = pos.sum()
    if n_pos == 0:
        return float("nan")
    tp_above = np.cumsum(pos) - pos
    fp_above = np.cumsum(neg) - neg
    hit = pos > 0
    p, n, tp, fp = pos[hit], neg[hit], tp_above[hit], fp_above[hit]
    high = (tp + p) / (tp + fp + p)
    low = (tp + 1) / (tp + 1 + fp + n)
    spread = p * (high - low)
    if tied is not None:
        spread[np.asarray(tied, dtype=bool)[::-1][hit]] = 0.0
    return float(np.sum(spread) / n_pos)


def f1_curve(positive: np.ndarray, negative: np.ndarray) -> np.ndarray:
    """F1 when thresholding at each level (levels ascending; predicted positive at ``>= level``).

    Returns:
        F1 per level (0 where nothing is predicted), or all NaN when there is no positive voxel.
    """
    tp = np.cumsum(np.asarray(positive, dtype=np.float64)[::-1])[::-1]
    predicted = np.cumsum((np.asarray(positive, dtype=np.float64) + negative)[::-1])[::-1]
    n_pos = tp[0] if tp.size else 0.0
    if n_pos == 0:
        return np.full(tp.shape, np.nan)
    return 2.0 * tp / (predicted + n_pos)


def f1max_from_counts(positive: np.ndarray, negative: np.ndarray, levels: np.ndarray) -> tuple[float, float]:
    """Best F1 over all levels and its threshold (the highest threshold among equal bests).

    Returns:
        ``(f1max, threshold)``; ``(nan, nan)`` when there is no positive voxel.
    """
    f1 = f1_curve(positive, negative)
    if f1.size == 0 or np.isnan(f1[0]):
        return float("nan"), float("nan")
    best = int(f1.size - 1 - np.argmax(f1[::-1]))
    return float(f1[best]), float(levels[best])


def _flat(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores)
    labels = np.asarray(labels)
    if scores.shape != labels.shape:
        raise ValueError(f"shapes differ: scores {scores.shape}, labels {labels.shape}")
    check_scores(scores, "scores")
    return scores.ravel(), (labels != 0).ravel()


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Exact pixel AUROC (by sorting; equals :func:`sklearn.metrics.roc_auc_score`).

    Args:
        scores: Scores in [0, 1].
        labels: Ground truth of the same shape (nonzero = positive).
    """
    levels, positive, negative = exact_counts(*_flat(scores, labels))
    return auroc_from_counts(positive, negative)


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Exact pixel average precision (equals :func:`sklearn.metrics.average_precision_score`).

    Args:
        scores: Scores in [0, 1].
        labels: Ground truth of the same shape (nonzero = positive).
    """
    levels, positive, negative = exact_counts(*_flat(scores, labels))
    return average_precision_from_counts(positive, negative)


def ranking_scores(scores: np.ndarray, labels: np.ndarray, source: str = "scores") -> tuple[float, float]:
    """Exact AUROC and AP of any finite scores (not limited to [0, 1]; e.g. per-slice image scores).

    Raises:
        InputError: NaN or infinite scores.
        ValueError: Lengths differ.
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel() != 0
    if scores.shape != labels.shape:
        raise ValueError(f"{scores.size} scores but {labels.size} labels")
    if not np.all(np.isfinite(scores)):
        raise InputError(f"{source}: {int(np.count_nonzero(~np.isfinite(scores)))} NaN or infinite values; "
                         "scores must be finite")
    if scores.size == 0:
        return float("nan"), float("nan")
    _, positive, negative = exact_counts(scores, labels)
    return auroc_from_counts(positive, negative), average_precision_from_counts(positive, negative)


def f1max(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Exact F1-max over all thresholds and the threshold reaching it (positive at ``>=``).

    Equals the maximum of ``2PR/(P+R)`` over :func:`sklearn.metrics.precision_recall_curve`.
    """
    levels, positive, negative = exact_counts(*_flat(scores, labels))
    return f1max_from_counts(positive, negative, levels)
