"""Streaming pooled pixel AUROC, average precision, AUPRO and F1-max over a cohort, in bounded memory."""

from __future__ import annotations

import numpy as np

from .overlap import in_region
from .pro import DEFAULT_FPR_LIMIT, aupro_bound_from_counts, aupro_from_counts, region_weights
from .ranking import (
    DEFAULT_BINS,
    auroc_bound_from_counts,
    auroc_from_counts,
    average_precision_bound_from_counts,
    average_precision_from_counts,
    check_scores,
    exact_counts,
    f1max_from_counts,
    level_index,
    level_thresholds,
)

DEFAULT_EXACT_LIMIT = 1 << 20
"""Pooled voxel count up to which the exact (sorting) path is used."""


class PixelAccumulator:
    """Pool voxels of many volumes (or chunks) and score them as one set.

    Every update adds to a histogram of ``bins`` bins over [0, 1] (positives and negatives apart, and
    the AUPRO region weights). While the pooled voxel count stays ``<= exact_limit`` the voxels are
    also kept, and the results are exact (equal to scikit-learn, and to the MVTec AD AUPRO); beyond
    it they come from the histogram, and the ``*_bound`` methods say how far from exact they can be.
    The choice depends only on the total count, so AUROC, AP and F1-max are the same whatever the
    chunking. AUPRO regions are the connected components of each update's labels: pass whole
    volumes (``regions='3d'``) or whole images / stacks of slices (``regions='2d'``).

    Example:
        >>> acc = PixelAccumulator()
        >>> for scores, labels, brain in volumes:  # doctest: +SKIP
        ...     acc.update(scores, labels, mask=brain)
        >>> acc.auroc(), acc.average_precision(), acc.aupro(), acc.f1max()  # doctest: +SKIP
    """

    def __init__(self, bins: int = DEFAULT_BINS, exact_limit: int = DEFAULT_EXACT_LIMIT) -> None:
        """Create an empty accumulator.

        Args:
            bins: Histogram bins over [0, 1]; keep a power of two for exact bin edges.
            exact_limit: Largest pooled voxel count scored exactly (0: always use the histogram).
        """
        if bins < 2:
            raise ValueError(f"bins must be at least 2, got {bins}")
        self.bins = int(bins)
        self.exact_limit = int(exact_limit)
        levels = self.bins + 2  # the bins, plus exact 0 and exact 1 apart (see ranking.level_index)
        self._total = np.zeros(levels, dtype=np.int64)
        self._positive = np.zeros(levels, dtype=np.int64)
        self._weight = np.zeros(levels, dtype=np.float64)
        self.n_regions = 0
        """Ground-truth regions (connected components) pooled so far."""
        self._kept: list[tuple[np.ndarray, np.ndarray, np.ndarray]] | None = []

    @property
    def n_voxels(self) -> int:
        """Voxels pooled so far."""
        return int(self._total.sum())

    @property
    def n_positive(self) -> int:
        """Positive (tumour) voxels pooled so far."""
        return int(self._positive.sum())

    @property
    def is_exact(self) -> bool:
        """True while results are computed exactly (pooled count within ``exact_limit``)."""
        return self._kept is not None

    def update(self, scores: np.ndarray, labels: np.ndarray, mask: np.ndarray | None = None,
               source: str = "anomaly map", regions: str = "3d") -> None:
        """Add the voxels of one volume, image or chunk.

        Args:
            scores: Anomaly scores in [0, 1] (values within 1e-6 outside are clipped).
            labels: Ground truth of the same shape (nonzero = positive).
            mask: Optional bool mask of the same shape: only its voxels are added (e.g. the brain);
                AUPRO regions are the components of the positive voxels inside it.
            source: Name used in error messages (e.g. the map's file).
            regions: AUPRO regions: ``'3d'`` components over all axes, ``'2d'`` per slice along axis 0.

        Raises:
            InputError: NaN scores or scores outside [0, 1].
            ValueError: Shapes differ.
        """
        scores, labels = np.asarray(scores), np.asarray(labels)
        if mask is not None and np.shape(mask) != scores.shape:
            in_region(scores, labels, mask, ("scores", "labels"))  # raises, naming the three shapes
        in_region(scores, labels, None, ("scores", "labels"))  # shape check before labelling
        positive = labels if labels.dtype == bool else labels != 0
        if mask is not None:
            positive = positive & np.asarray(mask, dtype=bool)
        weights, n_regions = region_weights(positive, regions)  # one per positive voxel, C order
        if mask is not None:
            region = np.asarray(mask, dtype=bool)
            scores, positive = scores[region], positive[region]  # keeps C order: weights still line up
        check_scores(scores, source)
        positive = positive.ravel()
        index = level_index(scores, self.bins).ravel()
        levels = self._total.size
        self._total += np.bincount(index, minlength=levels)
        self._positive += np.bincount(index[positive], minlength=levels)
        self._weight += np.bincount(index[positive], weights=weights, minlength=levels)
        self.n_regions += n_regions
        if self._kept is not None:
            if self.n_voxels > self.exact_limit:
                self._kept = None
            else:
                voxel_weights = np.zeros(positive.size)
                voxel_weights[positive] = weights
                self._kept.append((np.array(scores, dtype=np.float64).ravel(), positive.copy(), voxel_weights))

    def merge(self, other: PixelAccumulator) -> None:
        """Add everything ``other`` pooled (same bins); exact while the joint count is within ``exact_limit``."""
        if other.bins != self.bins:
            raise ValueError(f"cannot merge accumulators with {other.bins} and {self.bins} bins")
        self._total += other._total
        self._positive += other._positive
        self._weight += other._weight
        self.n_regions += other.n_regions
        if self._kept is not None:
            if other._kept is None or self.n_voxels > self.exact_limit:
                self._kept = None
            else:
                self._kept.extend(other._kept)

    def counts(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Score levels (ascending) with the positive and negative voxel counts at each.

        Exact while :attr:`is_exact` (distinct scores), else the histogram (:func:`~.ranking.level_thresholds`).
        """
        if self._kept is not None:
            if not self._kept:
                return np.zeros(0), np.zeros(0, np.int64), np.zeros(0, np.int64)
            scores = np.concatenate([s for s, _, _ in self._kept])
            labels = np.concatenate([lab for _, lab, _ in self._kept])
            return exact_counts(scores, labels)
        return level_thresholds(self.bins), self._positive.copy(), self._total - self._positive

    def region_counts(self) -> tuple[np.ndarray, np.ndarray]:
        """Normal voxels and summed AUPRO region weights per level (the levels of :meth:`counts`)."""
        if self._kept is not None:
            if not self._kept:
                return np.zeros(0, np.int64), np.zeros(0)
            scores = np.concatenate([s for s, _, _ in self._kept])
            levels, inverse = np.unique(scores, return_inverse=True)
            inverse = inverse.ravel()
            labels = np.concatenate([lab for _, lab, _ in self._kept])
            weights = np.concatenate([w for _, _, w in self._kept])
            negative = np.bincount(inverse[~labels], minlength=levels.size)
            return negative, np.bincount(inverse, weights=weights, minlength=levels.size)
        return self._total - self._positive, self._weight.copy()

    def auroc(self) -> float:
        """Pooled pixel AUROC (NaN without positive or negative voxels)."""
        _, positive, negative = self.counts()
        return auroc_from_counts(positive, negative)

    def auroc_bound(self) -> float:
        """How far :meth:`auroc` can be from the exact value (0 while exact)."""
        if self.is_exact:
            return 0.0
        return auroc_bound_from_counts(self._positive, self._total - self._positive, self._tied())

    def average_precision(self) -> float:
        """Pooled pixel AP (scikit-learn's step-wise definition; NaN without positive voxels)."""
        _, positive, negative = self.counts()
        return average_precision_from_counts(positive, negative)

    def average_precision_bound(self) -> float:
        """How far :meth:`average_precision` can be from the exact value (0 while exact)."""
        if self.is_exact:
            return 0.0
        return average_precision_bound_from_counts(self._positive, self._total - self._positive, self._tied())

    def aupro(self, fpr_limit: float = DEFAULT_FPR_LIMIT) -> float:
        """Pooled AUPRO up to ``fpr_limit``, normalised (NaN without regions or normal voxels)."""
        negative, weight = self.region_counts()
        return aupro_from_counts(negative, weight, self.n_regions, fpr_limit)

    def aupro_bound(self, fpr_limit: float = DEFAULT_FPR_LIMIT) -> float:
        """How far :meth:`aupro` can be from the exact value (0 while exact)."""
        if self.is_exact:
            return 0.0
        return aupro_bound_from_counts(self._total - self._positive, self._weight, self.n_regions, fpr_limit,
                                       self._tied())

    def _tied(self) -> np.ndarray:
        """Histogram levels holding one score value: the exact-0 and exact-1 levels."""
        tied = np.zeros(self._total.size, dtype=bool)
        tied[[0, -1]] = True
        return tied

    def f1max(self) -> float:
        """Pooled pixel F1-max (NaN without positive voxels); from the histogram a lower bound on exact."""
        levels, positive, negative = self.counts()
        return f1max_from_counts(positive, negative, levels)[0]

    def f1max_threshold(self) -> float:
        """Threshold reaching :meth:`f1max` (voxels ``>=`` it are positive); the highest among ties."""
        levels, positive, negative = self.counts()
        return f1max_from_counts(positive, negative, levels)[1]
