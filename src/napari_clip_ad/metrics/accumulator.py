"""Streaming pooled pixel AUROC / F1-max over a cohort, in bounded memory."""

from __future__ import annotations

import numpy as np

from .overlap import in_region
from .ranking import (
    DEFAULT_BINS,
    auroc_from_counts,
    bin_index,
    bin_thresholds,
    check_scores,
    exact_counts,
    f1max_from_counts,
)

DEFAULT_EXACT_LIMIT = 1 << 20
"""Pooled voxel count up to which the exact (sorting) path is used."""


class PixelAccumulator:
    """Pool voxels of many volumes (or chunks) and score them as one set.

    Every update adds to a histogram of ``bins`` bins over [0, 1] (positives and negatives apart).
    While the pooled voxel count stays ``<= exact_limit`` the voxels are also kept, and the results
    are exact (equal to scikit-learn); beyond it they come from the histogram. The choice depends only
    on the total count, so results are the same whatever the chunking.

    Example:
        >>> acc = PixelAccumulator()
        >>> for scores, labels, brain in volumes:  # doctest: +SKIP
        ...     acc.update(scores, labels, mask=brain)
        >>> acc.auroc(), acc.f1max(), acc.f1max_threshold()  # doctest: +SKIP
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
        self._total = np.zeros(self.bins, dtype=np.int64)
        self._positive = np.zeros(self.bins, dtype=np.int64)
        self._kept: list[tuple[np.ndarray, np.ndarray]] | None = []

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
               source: str = "anomaly map") -> None:
        """Add the voxels of one volume or chunk.

        Args:
            scores: Anomaly scores in [0, 1] (values within 1e-6 outside are clipped).
            labels: Ground truth of the same shape (nonzero = positive).
            mask: Optional bool mask of the same shape: only its voxels are added (e.g. the brain).
            source: Name used in error messages (e.g. the map's file).

        Raises:
            InputError: NaN scores or scores outside [0, 1].
            ValueError: Shapes differ.
        """
        scores, labels = in_region(np.asarray(scores), np.asarray(labels), mask, ("scores", "labels"))
        check_scores(scores, source)
        labels = labels.ravel() if labels.dtype == bool else (labels != 0).ravel()
        index = bin_index(scores, self.bins).ravel()
        self._total += np.bincount(index, minlength=self.bins)
        self._positive += np.bincount(index[labels], minlength=self.bins)
        if self._kept is not None:
            if self.n_voxels > self.exact_limit:
                self._kept = None
            else:
                self._kept.append((np.array(scores, dtype=np.float64).ravel(), labels.copy()))

    def counts(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Score levels (ascending) with the positive and negative voxel counts at each.

        Exact while :attr:`is_exact` (distinct scores), else the histogram (bin lower edges).
        """
        if self._kept is not None:
            if not self._kept:
                return np.zeros(0), np.zeros(0, np.int64), np.zeros(0, np.int64)
            scores = np.concatenate([s for s, _ in self._kept])
            labels = np.concatenate([lab for _, lab in self._kept])
            return exact_counts(scores, labels)
        return bin_thresholds(self.bins), self._positive.copy(), self._total - self._positive

    def auroc(self) -> float:
        """Pooled pixel AUROC (NaN without positive or negative voxels)."""
        _, positive, negative = self.counts()
        return auroc_from_counts(positive, negative)

    def f1max(self) -> float:
        """Pooled pixel F1-max (NaN without positive voxels); from the histogram a lower bound on exact."""
        levels, positive, negative = self.counts()
        return f1max_from_counts(positive, negative, levels)[0]

    def f1max_threshold(self) -> float:
        """Threshold reaching :meth:`f1max` (voxels ``>=`` it are positive); the highest among ties."""
        levels, positive, negative = self.counts()
        return f1max_from_counts(positive, negative, levels)[1]
