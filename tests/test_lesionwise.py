"""Lesion-wise Dice (BraTS 2023 definition): hand-worked cases and a full-volume reference on random masks."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from napari_clip_ad.report import lesion_wise_dice

SHAPE = (12, 12, 16)


def blank() -> np.ndarray:
    return np.zeros(SHAPE, dtype=bool)


def cube(mask: np.ndarray, z: int, y: int, x: int, size: int = 2) -> np.ndarray:
    mask[z:z + size, y:y + size, x:x + size] = True
    return mask


def test_lesions_within_dilation_reach_merge():
    # Two 2x2x2 lesions with a one-voxel gap: their 1-voxel dilations touch, so they are one lesion.
    gt = cube(cube(blank(), 4, 4, 2), 4, 4, 5)
    pred = cube(blank(), 4, 4, 2)
    result = lesion_wise_dice(pred, gt)
    assert result.lesion_dice == pytest.approx((2 * 8 / (8 + 16),))
    assert (result.n_tp, result.n_fn, result.n_fp) == (1, 0, 0)
    assert result.dice == pytest.approx(2 / 3)


def test_lesions_beyond_dilation_reach_stay_apart():
    # Gap of three voxels: dilated lesions do not touch; the missed one scores 0.
    gt = cube(cube(blank(), 4, 4, 2), 4, 4, 7)
    pred = cube(blank(), 4, 4, 2)
    result = lesion_wise_dice(pred, gt)
    assert result.lesion_dice == (1.0, 0.0)
    assert (result.n_tp, result.n_fn, result.n_fp) == (1, 1, 0)
    assert result.dice == 0.5


def test_prediction_touching_only_the_dilated_lesion_is_a_match_not_a_false_positive():
    gt = cube(blank(), 4, 4, 4)
    pred = cube(blank(), 4, 4, 7)  # lesion x=4..5, its 1-voxel dilation reaches x=6: x=7..8 is out of reach
    pred_near = cube(blank(), 4, 4, 6)  # starts on the dilation rim (x=6), no overlap with the lesion
    far = lesion_wise_dice(pred, gt)
    near = lesion_wise_dice(pred_near, gt)
    assert (far.n_tp, far.n_fn, far.n_fp, far.dice) == (0, 1, 1, 0.0)
    assert (near.n_tp, near.n_fn, near.n_fp, near.dice) == (1, 0, 0, 0.0)


def test_empty_ground_truth():
    assert lesion_wise_dice(blank(), blank()).dice == 1.0
    result = lesion_wise_dice(cube(blank(), 3, 3, 3), blank())
    assert (result.dice, result.n_fp, result.lesion_dice) == (0.0, 1, ())


def test_false_positive_adds_a_zero():
    gt = cube(blank(), 2, 2, 2, size=3)
    pred = cube(cube(blank(), 2, 2, 2, size=3), 8, 8, 12)
    result = lesion_wise_dice(pred, gt)
    assert (result.n_tp, result.n_fn, result.n_fp) == (1, 0, 1)
    assert result.dice == 0.5


def test_small_lesions_are_ignored_but_do_not_make_false_positives():
    big = cube(blank(), 2, 2, 2, size=3)
    gt = big.copy()
    gt[9, 9, 12:14] = True  # 2 voxels = 2 mm^3: at the BraTS-MET threshold, ignored
    missed = lesion_wise_dice(big, gt)
    assert (missed.dice, missed.n_ignored, missed.n_fn) == (1.0, 1, 0)
    hit = big.copy()
    hit[9, 9, 12] = True
    assert (lesion_wise_dice(hit, gt).dice, lesion_wise_dice(hit, gt).n_fp) == (1.0, 0)
    gt[9, 9, 14] = True  # 3 voxels: scored, and missed
    assert lesion_wise_dice(big, gt).dice == 0.5
    # The threshold is a volume: at 0.5 mm spacing a 3x3x3 lesion is 3.375 mm^3, a 3-voxel one 0.375 mm^3.
    assert lesion_wise_dice(big, gt, spacing=(0.5, 0.5, 0.5)).dice == 1.0
    assert lesion_wise_dice(big, gt, min_size_voxels=27).dice == 1.0  # nothing left to score


def test_only_small_lesions_and_nothing_predicted_scores_one():
    gt = blank()
    gt[5, 5, 5] = True
    assert lesion_wise_dice(blank(), gt).dice == 1.0


def test_bad_arguments():
    with pytest.raises(ValueError, match="shape"):
        lesion_wise_dice(blank(), np.zeros((3, 3, 3), bool))
    with pytest.raises(ValueError, match="dilation"):
        lesion_wise_dice(blank(), blank(), dilation=0)


def reference_lesion_wise_dice(pred: np.ndarray, gt: np.ndarray, dilation: int, threshold: float) -> float:
    """The BraTS 2023 reference algorithm on full volumes, step by step (scipy in place of cc3d)."""
    full = np.ones((3, 3, 3), bool)
    struct = ndimage.generate_binary_structure(3, 2)
    gt_cc, _ = ndimage.label(gt, full)
    pred_cc, _ = ndimage.label(pred, full)
    dilated_cc, n_dilated = ndimage.label(ndimage.binary_dilation(gt, struct, iterations=dilation), full)
    combined = np.zeros_like(gt_cc)
    for comp in range(1, n_dilated + 1):
        combined[(dilated_cc == comp) & (gt_cc > 0)] = comp
    tp_components, scored = [], []
    for comp in range(1, combined.max() + 1):
        lesion = combined == comp
        reach = ndimage.binary_dilation(lesion, struct, iterations=dilation)
        hits = [c for c in np.unique(pred_cc[reach]) if c != 0]
        tp_components += hits
        matched = np.isin(pred_cc, hits) & (pred_cc > 0)
        dice = 2.0 * np.sum(matched & lesion) / (matched.sum() + lesion.sum())
        if lesion.sum() > threshold:
            scored.append(dice)
    fp = np.setdiff1d(np.unique(pred_cc[pred_cc > 0]), tp_components)
    total = len(scored) + fp.size
    return float(sum(scored) / total) if total else 1.0


@pytest.mark.parametrize("seed", range(6))
def test_matches_the_reference_algorithm_on_random_masks(seed):
    rng = np.random.default_rng(seed)
    gt = ndimage.binary_opening(rng.random((20, 22, 24)) < 0.25) | (rng.random((20, 22, 24)) < 0.004)
    pred = ndimage.binary_dilation(np.roll(gt, 1, axis=seed % 3)) & (rng.random(gt.shape) < 0.7)
    pred |= rng.random(gt.shape) < 0.003
    for dilation, threshold in ((1, 2.0), (3, 50.0)):
        expected = reference_lesion_wise_dice(pred, gt, dilation, threshold)
        assert lesion_wise_dice(pred, gt, dilation=dilation, min_volume_mm3=threshold).dice == pytest.approx(expected, abs=1e-12)


def test_real_metastasis_segmentation(shared_data):
    """BraTS-MET whole tumour against itself is 1; against itself minus its largest lesion drops by that lesion."""
    import nibabel as nib

    seg = np.asarray(nib.load(shared_data / "brats2023-met-seg" / "BraTS-MET-00001-000-seg.nii.gz").dataobj)
    gt = seg > 0
    assert lesion_wise_dice(gt, gt).dice == 1.0
    result = lesion_wise_dice(gt, gt)
    labels, _ = ndimage.label(gt, np.ones((3, 3, 3), bool))
    largest = np.argmax(np.bincount(labels.ravel())[1:]) + 1
    partial = lesion_wise_dice(gt & (labels != largest), gt)
    assert partial.n_fn >= 1 and partial.dice < 1.0
    assert partial.dice == pytest.approx(reference_lesion_wise_dice(gt & (labels != largest), gt, 1, 2.0))
    assert result.n_tp == len(result.lesion_dice)
