"""Slice-level (2D image) detection: does a slice hold a lesion at all? AUROC and AP over slices.

A slice is positive when its ground truth has any lesion voxel. Its score is the method's image
score for that slice (``<case_id>_scores.json`` written by ``infer``), or the maximum of the anomaly
map over the slice when no image score is available or when asked. Only slices holding brain are
scored (the engine runs the method on those only). Scores of all slices of all volumes are pooled
(one float and one bool per slice: small, whatever the cohort).
"""

from __future__ import annotations

import numpy as np

from .ranking import ranking_scores

SLICE_SCORE_SOURCES = ("image", "max")
"""``image``: the method's per-slice image score (falls back to the map maximum); ``max``: the map maximum."""


def slice_labels(gt: np.ndarray, region: np.ndarray | None = None) -> np.ndarray:
    """True for each slice along axis 0 with any lesion voxel (inside ``region`` when given)."""
    gt = np.asarray(gt, dtype=bool)
    if region is not None:
        gt = gt & np.asarray(region, dtype=bool)
    return gt.reshape(gt.shape[0], -1).any(axis=1)


def map_max_scores(anomaly_map: np.ndarray, region: np.ndarray | None = None) -> np.ndarray:
    """Maximum of the map over each slice along axis 0 (inside ``region`` when given; 0 where it is empty)."""
    values = np.asarray(anomaly_map, dtype=np.float64)
    if region is not None:
        values = np.where(np.asarray(region, dtype=bool), values, -np.inf)
    highest = values.reshape(values.shape[0], -1).max(axis=1, initial=-np.inf)
    return np.where(np.isfinite(highest), highest, 0.0)


def brain_slices(brain: np.ndarray) -> np.ndarray:
    """True for each slice along axis 0 holding any brain voxel."""
    brain = np.asarray(brain, dtype=bool)
    return brain.reshape(brain.shape[0], -1).any(axis=1)


class SliceDetection:
    """Pool per-slice (or per-image) scores and labels; exact AUROC and AP (equal to scikit-learn)."""

    def __init__(self) -> None:
        """Start empty."""
        self._scores: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []

    def update(self, scores: np.ndarray, labels: np.ndarray) -> None:
        """Add slices: one score and one label (True = lesion) each."""
        scores = np.asarray(scores, dtype=np.float64).ravel()
        labels = np.asarray(labels, dtype=bool).ravel()
        if scores.shape != labels.shape:
            raise ValueError(f"{scores.size} slice scores but {labels.size} slice labels")
        self._scores.append(scores)
        self._labels.append(labels)

    def merge(self, other: SliceDetection) -> None:
        """Add every slice of ``other``."""
        self._scores.extend(other._scores)
        self._labels.extend(other._labels)

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """All pooled ``(scores, labels)``."""
        if not self._scores:
            return np.zeros(0), np.zeros(0, dtype=bool)
        return np.concatenate(self._scores), np.concatenate(self._labels)

    @property
    def n_slices(self) -> int:
        """Slices pooled."""
        return int(sum(s.size for s in self._scores))

    @property
    def n_positive(self) -> int:
        """Slices with lesion."""
        return int(sum(np.count_nonzero(lab) for lab in self._labels))

    def auroc_ap(self) -> tuple[float, float]:
        """Slice-level AUROC and AP (NaN where undefined: no positive, or for AUROC no negative slice)."""
        scores, labels = self.arrays()
        return ranking_scores(scores, labels, "slice scores")
