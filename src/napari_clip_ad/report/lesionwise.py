"""Lesion-wise Dice as defined for BraTS 2023 (BraTS-MET parameters by default).

Follows the challenge's reference code (``rachitsaluja/BraTS-2023-Metrics``,
``brats_metrics.get_lesion_wise_score`` and ``get_lesion_wise_results``):

1. Ground-truth lesions are the 26-connected components of the ground truth. Lesions whose dilated
   extents touch are merged: the ground truth is dilated ``dilation`` times with the 3x3x3
   structure of ``generate_binary_structure(3, 2)`` (18-neighbourhood, as the reference code uses),
   the dilated mask is labelled (26-connected), and every lesion voxel takes its dilated component's label.
2. Each merged lesion is dilated again (same structure); every 26-connected predicted component
   touching that dilated lesion is a match for it (a component may match several lesions). The
   lesion's Dice is that of the union of its matched components against the (undilated) lesion;
   a lesion without a match scores 0 (false negative).
3. Predicted components matching no lesion are false positives, each scoring 0.
4. Lesions with volume ``<=`` the threshold (mm^3; BraTS-MET: 2) are left out of the mean, but their
   matched components are not false positives.
5. Score = sum of lesion Dice / (kept lesions + false positives); 0/0 (nothing to score) gives 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

BRATS_MET_DILATION = 1
BRATS_MET_MIN_VOLUME_MM3 = 2.0
LABEL_STRUCTURE = np.ones((3, 3, 3), dtype=bool)
"""26-connectivity for connected components."""
DILATION_STRUCTURE = ndimage.generate_binary_structure(3, 2)
"""18-neighbourhood used by the BraTS 2023 reference code for dilation."""


@dataclass(frozen=True)
class LesionWiseResult:
    """Lesion-wise Dice of one volume and its parts.

    Attributes:
        dice: The lesion-wise Dice score.
        lesion_dice: Dice of each scored (kept) ground-truth lesion, in label order.
        lesion_volumes_mm3: Volume of each scored lesion.
        n_tp: Kept lesions with at least one matched predicted component.
        n_fn: Kept lesions without a match.
        n_fp: Predicted components matching no lesion (small lesions included).
        n_ignored: Lesions at or under the size threshold.
    """

    dice: float
    lesion_dice: tuple[float, ...]
    lesion_volumes_mm3: tuple[float, ...]
    n_tp: int
    n_fn: int
    n_fp: int
    n_ignored: int


def lesion_wise_dice(pred: np.ndarray, gt: np.ndarray, spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
                     dilation: int = BRATS_MET_DILATION, min_size_voxels: float | None = None,
                     min_volume_mm3: float = BRATS_MET_MIN_VOLUME_MM3) -> LesionWiseResult:
    """BraTS 2023 lesion-wise Dice of a binary prediction (see the module docstring for the rules).

    Args:
        pred: Binary prediction (3D; anything castable to bool).
        gt: Binary ground truth of the same shape.
        spacing: Voxel size in mm, used for lesion volumes.
        dilation: Dilation iterations (BraTS-MET 1, BraTS-GLI 3).
        min_size_voxels: If given, lesions with at most this many voxels are ignored (overrides
            ``min_volume_mm3``).
        min_volume_mm3: Lesions with volume at most this are ignored (BraTS-MET 2, BraTS-GLI 50).

    Raises:
        ValueError: Shapes differ, not 3D, or ``dilation < 1``.
    """
    pred = np.asarray(pred, dtype=bool)
    gt = np.asarray(gt, dtype=bool)
    if pred.shape != gt.shape or pred.ndim != 3:
        raise ValueError(f"expected two 3D masks of one shape, got {pred.shape} and {gt.shape}")
    if dilation < 1:
        raise ValueError(f"dilation must be at least 1, got {dilation}")
    voxel_mm3 = float(np.prod(spacing))
    lesions = _merged_lesions(gt, dilation)
    pred_labels, n_pred = ndimage.label(pred, structure=LABEL_STRUCTURE)
    pred_sizes = np.bincount(pred_labels.ravel(), minlength=n_pred + 1)
    matched_any = np.zeros(n_pred + 1, dtype=bool)
    dices: list[float] = []
    volumes: list[float] = []
    n_tp = n_fn = n_ignored = 0
    for index, box in enumerate(ndimage.find_objects(lesions), start=1):
        if box is None:
            continue
        box = _padded(box, dilation, gt.shape)
        lesion = lesions[box] == index
        reach = ndimage.binary_dilation(lesion, structure=DILATION_STRUCTURE, iterations=dilation)
        matched = np.unique(pred_labels[box][reach])
        matched = matched[matched != 0]
        matched_any[matched] = True
        n_voxels = int(np.count_nonzero(lesion))
        volume = n_voxels * voxel_mm3
        too_small = n_voxels <= min_size_voxels if min_size_voxels is not None else volume <= min_volume_mm3
        if too_small:
            n_ignored += 1
            continue
        overlap = int(np.count_nonzero(np.isin(pred_labels[box][lesion], matched)))
        dices.append(2.0 * overlap / (int(pred_sizes[matched].sum()) + n_voxels))
        volumes.append(volume)
        if matched.size:
            n_tp += 1
        else:
            n_fn += 1
    n_fp = int(np.count_nonzero(~matched_any[1:]))
    denominator = len(dices) + n_fp
    score = float(sum(dices)) / denominator if denominator else 1.0
    return LesionWiseResult(score, tuple(dices), tuple(volumes), n_tp, n_fn, n_fp, n_ignored)


def _merged_lesions(gt: np.ndarray, dilation: int) -> np.ndarray:
    """Label ground-truth voxels by the component of the dilated ground truth they fall in."""
    dilated = ndimage.binary_dilation(gt, structure=DILATION_STRUCTURE, iterations=dilation)
    dilated_labels, _ = ndimage.label(dilated, structure=LABEL_STRUCTURE)
    return np.where(gt, dilated_labels, 0)


def _padded(box: tuple[slice, ...], pad: int, shape: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(max(s.start - pad, 0), min(s.stop + pad, size)) for s, size in zip(box, shape))
