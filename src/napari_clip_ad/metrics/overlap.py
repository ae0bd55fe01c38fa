"""Per-volume overlap metrics (Dice, sensitivity, specificity, PPV) with fixed empty-mask conventions.

Every metric is a ratio of confusion counts. When a denominator is zero the ratio is undefined and
one rule decides it everywhere (see ``docs/metrics.md``): the score is **1 when prediction and ground
truth agree** on the voxels considered, else **0**. That gives

* Dice: both masks empty -> 1 (the BraTS rule);
* sensitivity with an empty ground truth: 1 if the prediction is empty, else 0;
* PPV with an empty prediction: 1 if the ground truth is empty, else 0;
* specificity when every voxel is tumour: 1 if every voxel is predicted, else 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Confusion:
    """Voxel counts of a binary prediction against a binary ground truth."""

    tp: int
    fp: int
    fn: int
    tn: int

    @property
    def agree(self) -> bool:
        """True when prediction and ground truth are identical."""
        return self.fp == 0 and self.fn == 0


def in_region(first: np.ndarray, second: np.ndarray, region: np.ndarray | None,
              names: tuple[str, str]) -> tuple[np.ndarray, np.ndarray]:
    """Both arrays cut to the voxels of ``region`` (unchanged without one), after checking the three shapes agree.

    Raises:
        ValueError: Shapes differ (the message names the arrays by ``names``).
    """
    if first.shape != second.shape or (region is not None and np.shape(region) != first.shape):
        raise ValueError(f"shapes differ: {names[0]} {first.shape}, {names[1]} {second.shape}"
                         + ("" if region is None else f", region {np.shape(region)}"))
    if region is None:
        return first, second
    region = np.asarray(region, dtype=bool)
    return first[region], second[region]


def confusion(pred: np.ndarray, gt: np.ndarray, region: np.ndarray | None = None) -> Confusion:
    """Count true/false positives/negatives.

    Args:
        pred: Binary prediction (anything castable to bool).
        gt: Binary ground truth of the same shape.
        region: Optional bool mask; only its voxels are counted.

    Raises:
        ValueError: Shapes differ.
    """
    pred, gt = in_region(np.asarray(pred, dtype=bool), np.asarray(gt, dtype=bool), region, ("prediction", "ground truth"))
    tp = int(np.count_nonzero(pred & gt))
    n_pred = int(np.count_nonzero(pred))
    n_gt = int(np.count_nonzero(gt))
    return Confusion(tp=tp, fp=n_pred - tp, fn=n_gt - tp, tn=int(gt.size) - n_pred - n_gt + tp)


def _ratio(numerator: int, denominator: int, agree: bool) -> float:
    if denominator == 0:
        return 1.0 if agree else 0.0
    return numerator / denominator


def dice_from(c: Confusion) -> float:
    """Dice = 2TP / (2TP + FP + FN); 1 when both masks are empty."""
    return _ratio(2 * c.tp, 2 * c.tp + c.fp + c.fn, c.agree)


def sensitivity_from(c: Confusion) -> float:
    """Sensitivity (recall) = TP / (TP + FN); with no tumour: 1 if nothing predicted, else 0."""
    return _ratio(c.tp, c.tp + c.fn, c.agree)


def specificity_from(c: Confusion) -> float:
    """Specificity = TN / (TN + FP); with no healthy voxel: 1 if all are predicted, else 0."""
    return _ratio(c.tn, c.tn + c.fp, c.agree)


def ppv_from(c: Confusion) -> float:
    """PPV (precision) = TP / (TP + FP); with nothing predicted: 1 if no tumour, else 0."""
    return _ratio(c.tp, c.tp + c.fp, c.agree)


def dice(pred: np.ndarray, gt: np.ndarray, region: np.ndarray | None = None) -> float:
    """Dice of two binary masks (1 when both are empty)."""
    return dice_from(confusion(pred, gt, region))


def sensitivity(pred: np.ndarray, gt: np.ndarray, region: np.ndarray | None = None) -> float:
    """Sensitivity of a binary prediction (see module conventions for empty masks)."""
    return sensitivity_from(confusion(pred, gt, region))


def specificity(pred: np.ndarray, gt: np.ndarray, region: np.ndarray | None = None) -> float:
    """Specificity of a binary prediction (see module conventions for empty masks)."""
    return specificity_from(confusion(pred, gt, region))


def ppv(pred: np.ndarray, gt: np.ndarray, region: np.ndarray | None = None) -> float:
    """Positive predictive value of a binary prediction (see module conventions for empty masks)."""
    return ppv_from(confusion(pred, gt, region))


def volume_metrics(pred: np.ndarray, gt: np.ndarray, region: np.ndarray | None = None) -> dict[str, float | int]:
    """Dice, sensitivity, specificity, PPV and voxel counts of one volume.

    Returns:
        ``dice, sensitivity, specificity, ppv, tumour_voxels, predicted_voxels`` (counts within ``region``).
    """
    c = confusion(pred, gt, region)
    return {
        "dice": dice_from(c),
        "sensitivity": sensitivity_from(c),
        "specificity": specificity_from(c),
        "ppv": ppv_from(c),
        "tumour_voxels": c.tp + c.fn,
        "predicted_voxels": c.tp + c.fp,
    }
