"""Slice-wise (2D) Dice along the axial axis, its profile over brain height, and size correlations.

Arrays are canonical ``[z, y, x]`` (see :mod:`napari_clip_ad.io.nifti`): axis 0 runs inferior to
superior, so ``volume[k]`` is axial slice ``k``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from scipy import stats

from ..errors import InputError


@dataclass(frozen=True)
class SliceDice:
    """2D Dice of the axial slices holding lesion in the ground truth or in the prediction.

    Slices empty in both are left out (their Dice would be 1 by the BraTS rule and would swamp the
    distribution), as in the study's per-subject 2D Dice boxplots (Fig. 2).

    Attributes:
        index: Slice indices along axis 0 (ascending).
        dice: 2D Dice of each of those slices.
        lesion_voxels: Ground-truth lesion voxels in each slice (0 for prediction-only slices).
        predicted_voxels: Predicted voxels in each slice.
    """

    index: np.ndarray
    dice: np.ndarray
    lesion_voxels: np.ndarray
    predicted_voxels: np.ndarray

    def lesion_slices(self) -> SliceDice:
        """Only the slices with lesion in the ground truth."""
        keep = self.lesion_voxels > 0
        return SliceDice(self.index[keep], self.dice[keep], self.lesion_voxels[keep], self.predicted_voxels[keep])


def slice_dice(pred: np.ndarray, gt: np.ndarray, region: np.ndarray | None = None) -> SliceDice:
    """Per-slice 2D Dice along axis 0, for slices with lesion in the ground truth or the prediction.

    Args:
        pred: Binary prediction, ``[z, y, x]``.
        gt: Binary ground truth of the same shape.
        region: Optional bool mask; voxels outside it are ignored.
    """
    pred = np.asarray(pred, dtype=bool)
    gt = np.asarray(gt, dtype=bool)
    if pred.shape != gt.shape or pred.ndim != 3:
        raise ValueError(f"expected two 3D masks of one shape, got {pred.shape} and {gt.shape}")
    if region is not None:
        region = np.asarray(region, dtype=bool)
        pred, gt = pred & region, gt & region
    tp = np.count_nonzero(pred & gt, axis=(1, 2))
    n_pred = np.count_nonzero(pred, axis=(1, 2))
    n_gt = np.count_nonzero(gt, axis=(1, 2))
    index = np.flatnonzero((n_pred + n_gt) > 0)
    dice = 2.0 * tp[index] / (n_pred[index] + n_gt[index])
    return SliceDice(index, dice, n_gt[index].astype(np.int64), n_pred[index].astype(np.int64))


def slice_positions(brain_mask: np.ndarray) -> np.ndarray:
    """Normalised position of every axial slice relative to the brain: -1 inferior, 0 centre, 1 superior.

    The brain's extent is the first and last slice holding brain voxels; its centre is their midpoint.
    Slices outside the brain get values beyond [-1, 1].

    Raises:
        InputError: The brain mask is empty.
    """
    brain = np.asarray(brain_mask, dtype=bool)
    occupied = np.flatnonzero(brain.reshape(brain.shape[0], -1).any(axis=1))
    if occupied.size == 0:
        raise InputError("brain mask is empty: cannot place slices relative to the brain centre")
    low, high = occupied[0], occupied[-1]
    half_extent = max((high - low) / 2.0, 0.5)
    return (np.arange(brain.shape[0]) - (low + high) / 2.0) / half_extent


@dataclass(frozen=True)
class DistanceProfile:
    """Mean 2D Dice per bin of normalised distance from the brain centre (the study's Fig. 3).

    Attributes:
        edges: Bin edges over [-1, 1] (``len(mean_dice) + 1`` values).
        mean_dice: Mean 2D Dice of the lesion slices in each bin (NaN where a bin has none).
        n_slices: Number of lesion slices in each bin.
    """

    edges: np.ndarray
    mean_dice: np.ndarray
    n_slices: np.ndarray

    @property
    def centres(self) -> np.ndarray:
        """Bin centres."""
        return (self.edges[:-1] + self.edges[1:]) / 2.0


def distance_profile(distances: np.ndarray, dices: np.ndarray, bins: int = 10) -> DistanceProfile:
    """Bin slice Dice values by normalised distance (values beyond [-1, 1] go to the end bins).

    Args:
        distances: Normalised distance of each lesion slice (from :func:`slice_positions`), pooled
            over any number of volumes.
        dices: 2D Dice of the same slices.
        bins: Number of equal bins over [-1, 1]; 1.0 falls in the last bin.
    """
    distances = np.asarray(distances, dtype=np.float64).ravel()
    dices = np.asarray(dices, dtype=np.float64).ravel()
    if distances.shape != dices.shape:
        raise ValueError(f"{distances.size} distances but {dices.size} Dice values")
    edges = np.linspace(-1.0, 1.0, bins + 1)
    which = np.clip(np.floor((np.clip(distances, -1.0, 1.0) + 1.0) / 2.0 * bins).astype(np.intp), 0, bins - 1)
    n_slices = np.bincount(which, minlength=bins)
    sums = np.bincount(which, weights=dices, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n_slices > 0, sums / np.maximum(n_slices, 1), np.nan)
    return DistanceProfile(edges, mean, n_slices)


def size_dice_spearman(sizes: np.ndarray, dices: np.ndarray) -> tuple[float, float]:
    """Spearman rank correlation of lesion size with Dice (:func:`scipy.stats.spearmanr`).

    Returns:
        ``(rho, p_value)``; NaN for both with fewer than 3 pairs or a constant input.
    """
    sizes = np.asarray(sizes, dtype=np.float64).ravel()
    dices = np.asarray(dices, dtype=np.float64).ravel()
    if sizes.shape != dices.shape:
        raise ValueError(f"{sizes.size} sizes but {dices.size} Dice values")
    if sizes.size < 3 or np.ptp(sizes) == 0 or np.ptp(dices) == 0:
        return float("nan"), float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = stats.spearmanr(sizes, dices)
    return float(result.statistic), float(result.pvalue)
