"""Metrics: hand-worked overlap values, scikit-learn equality, chunking invariance, slice profiles."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage, stats
from sklearn.metrics import precision_recall_curve, roc_auc_score

from napari_clip_ad.errors import InputError
from napari_clip_ad.io import load_case
from napari_clip_ad.metrics import (
    PixelAccumulator,
    auroc,
    bin_index,
    confusion,
    dice,
    distance_profile,
    f1max,
    ppv,
    sensitivity,
    size_dice_spearman,
    slice_dice,
    slice_positions,
    specificity,
    volume_metrics,
)


def sklearn_f1max(labels: np.ndarray, scores: np.ndarray) -> float:
    precision, recall, _ = precision_recall_curve(labels.ravel(), scores.ravel())
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))
    return float(f1.max())


def realistic_map(tumour: np.ndarray, brain: np.ndarray, seed: int = 0) -> np.ndarray:
    """A smoothed, noisy version of the tumour mask, in [0, 1] (float32)."""
    rng = np.random.default_rng(seed)
    noisy = 0.7 * tumour + 0.35 * rng.random(tumour.shape) * brain
    smooth = ndimage.gaussian_filter(noisy.astype(np.float32), sigma=1.5)
    return np.clip(smooth, 0.0, 1.0).astype(np.float32)


@pytest.fixture(scope="module")
def real_crop(shared_data):
    """Whole tumour, brain mask and a synthetic map on a crop of a real BraTS 2023 case (~0.5 M voxels)."""
    case = load_case(shared_data / "brats2023" / "BraTS-GLI-00002-000", modalities=["t2w"])
    z, y, x = (int(np.median(a)) for a in np.nonzero(case.whole_tumour))
    crop = (slice(max(z - 30, 0), z + 30), slice(max(y - 45, 0), y + 45), slice(max(x - 45, 0), x + 45))
    tumour, brain = case.whole_tumour[crop], case.brain_mask[crop]
    assert tumour.any() and (~tumour).any()
    return tumour, brain, realistic_map(tumour, brain)


# --- overlap metrics ---------------------------------------------------------------------------

def test_overlap_hand_worked():
    pred = np.array([1, 1, 1, 0, 0, 0, 0, 0], dtype=bool)
    gt = np.array([1, 0, 0, 1, 0, 0, 0, 0], dtype=bool)  # TP 1, FP 2, FN 1, TN 4
    assert confusion(pred, gt) == confusion(pred.astype(int), gt.astype(float))
    c = confusion(pred, gt)
    assert (c.tp, c.fp, c.fn, c.tn) == (1, 2, 1, 4)
    assert dice(pred, gt) == pytest.approx(2 / 5)
    assert sensitivity(pred, gt) == pytest.approx(1 / 2)
    assert specificity(pred, gt) == pytest.approx(4 / 6)
    assert ppv(pred, gt) == pytest.approx(1 / 3)
    region = np.array([1, 1, 0, 1, 1, 1, 1, 1], dtype=bool)  # drops one FP
    assert volume_metrics(pred, gt, region) == pytest.approx(
        {"dice": 2 / 4, "sensitivity": 1 / 2, "specificity": 4 / 5, "ppv": 1 / 2, "tumour_voxels": 2, "predicted_voxels": 2})


@pytest.mark.parametrize(
    ("pred", "gt", "expected"),
    [
        ([0, 0, 0], [0, 0, 0], (1.0, 1.0, 1.0, 1.0)),  # BraTS rule: both empty -> perfect
        ([1, 0, 0], [0, 0, 0], (0.0, 0.0, 2 / 3, 0.0)),  # false alarm on a healthy volume
        ([0, 0, 0], [1, 0, 0], (0.0, 0.0, 1.0, 0.0)),  # missed tumour, nothing predicted
        ([1, 1, 1], [1, 1, 1], (1.0, 1.0, 1.0, 1.0)),  # all tumour, all predicted
        ([1, 0, 1], [1, 1, 1], (0.8, 2 / 3, 0.0, 1.0)),  # all tumour, one voxel missed: no negative
    ],
)
def test_empty_mask_conventions(pred, gt, expected):
    pred, gt = np.array(pred, dtype=bool), np.array(gt, dtype=bool)
    got = (dice(pred, gt), sensitivity(pred, gt), specificity(pred, gt), ppv(pred, gt))
    assert got == pytest.approx(expected)


def test_overlap_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shapes differ"):
        dice(np.zeros(3, bool), np.zeros(4, bool))


# --- ranking metrics -----------------------------------------------------------------------------

@pytest.mark.parametrize("decimals", [None, 2])  # continuous scores, and heavy ties
def test_exact_auroc_f1max_equal_sklearn_on_random_data(decimals):
    rng = np.random.default_rng(1)
    labels = rng.random(50_000) < 0.03
    scores = np.clip(rng.normal(0.3 + 0.25 * labels, 0.15), 0, 1)
    if decimals is not None:
        scores = np.round(scores, decimals)
    assert auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    best, threshold = f1max(scores, labels)
    assert best == pytest.approx(sklearn_f1max(labels, scores), abs=1e-12)
    assert dice(scores >= threshold, labels) == pytest.approx(best, abs=1e-12)  # F1 == Dice at its threshold


def test_accumulator_equals_sklearn_on_real_crop(real_crop):
    tumour, brain, scores = real_crop
    reference_auroc = roc_auc_score(tumour.ravel(), scores.ravel())
    reference_f1 = sklearn_f1max(tumour, scores)
    exact, histogram = PixelAccumulator(), PixelAccumulator(exact_limit=0)
    for acc in (exact, histogram):
        acc.update(scores, tumour)
    assert exact.is_exact and not histogram.is_exact
    assert exact.auroc() == pytest.approx(reference_auroc, abs=1e-12)
    assert exact.f1max() == pytest.approx(reference_f1, abs=1e-12)
    assert histogram.auroc() == pytest.approx(reference_auroc, abs=1e-4)
    assert histogram.f1max() == pytest.approx(reference_f1, abs=1e-4)
    assert histogram.f1max() <= exact.f1max() + 1e-12  # the histogram gives a lower bound
    for acc in (exact, histogram):  # thresholding at the reported threshold reproduces F1-max
        assert dice(scores >= acc.f1max_threshold(), tumour) == pytest.approx(acc.f1max(), abs=1e-12)


def test_brain_region_equals_sklearn_on_brain_voxels(real_crop):
    tumour, brain, scores = real_crop
    acc = PixelAccumulator(exact_limit=0)
    acc.update(scores, tumour, mask=brain)
    assert acc.n_voxels == brain.sum()
    assert acc.auroc() == pytest.approx(roc_auc_score(tumour[brain], scores[brain]), abs=1e-4)
    assert acc.f1max() == pytest.approx(sklearn_f1max(tumour[brain], scores[brain]), abs=1e-4)


@pytest.mark.parametrize("exact_limit", [0, 10**7, 200_000])  # histogram, exact, exact then dropped
def test_results_do_not_depend_on_chunking(real_crop, exact_limit):
    tumour, brain, scores = real_crop
    whole = PixelAccumulator(exact_limit=exact_limit)
    whole.update(scores, tumour, mask=brain)
    chunked = PixelAccumulator(exact_limit=exact_limit)
    cuts = [0, 1, 7, 20, 21, scores.shape[0]]  # uneven slabs along axis 0, one of a single slice
    for start, stop in zip(cuts[:-1], cuts[1:], strict=True):
        chunked.update(scores[start:stop], tumour[start:stop], mask=brain[start:stop])
    assert whole.is_exact == (exact_limit >= brain.sum())
    assert chunked.is_exact == whole.is_exact
    assert (chunked.auroc(), chunked.f1max(), chunked.f1max_threshold()) == (
        whole.auroc(), whole.f1max(), whole.f1max_threshold())


def test_bins_edges_and_threshold_semantics():
    scores = np.array([0.0, 0.5, 1.0 - 2**-20, 1.0], dtype=np.float32)
    assert bin_index(scores).tolist() == [0, 32768, 65535, 65535]
    assert bin_index(scores.astype(np.float64)).tolist() == [0, 32768, 65535, 65535]
    labels = np.array([0, 1, 1, 1], dtype=bool)
    acc = PixelAccumulator(exact_limit=0)
    acc.update(scores, labels)
    assert acc.f1max() == 1.0 and acc.f1max_threshold() == 0.5  # positive at >= the bin's lower edge
    assert acc.auroc() == 1.0


def test_scores_outside_unit_interval_or_nan_are_refused():
    acc = PixelAccumulator()
    labels = np.array([0, 1])
    acc.update(np.array([-5e-7, 1 + 5e-7]), labels)  # within tolerance: clipped
    assert acc.n_voxels == 2
    with pytest.raises(InputError, match=r"my_map\.nii\.gz: values span .* outside \[0, 1\]"):
        acc.update(np.array([0.2, 1.01]), labels, source="my_map.nii.gz")
    with pytest.raises(InputError, match="1 NaN values"):
        acc.update(np.array([np.nan, 0.5]), labels)
    with pytest.raises(InputError, match="outside"):
        auroc(np.array([-0.1, 0.5]), labels)
    assert acc.n_voxels == 2  # refused updates add nothing


def test_undefined_pooled_metrics_are_nan():
    acc = PixelAccumulator()
    acc.update(np.array([0.1, 0.9]), np.array([0, 0]))
    assert np.isnan(acc.auroc()) and np.isnan(acc.f1max()) and np.isnan(acc.f1max_threshold())


# --- slice-wise metrics --------------------------------------------------------------------------

def test_slice_dice_matches_per_slice_loop(real_crop):
    tumour, brain, scores = real_crop
    pred = scores >= 0.4
    result = slice_dice(pred, tumour)
    expected_index = [k for k in range(pred.shape[0]) if pred[k].any() or tumour[k].any()]
    assert result.index.tolist() == expected_index
    np.testing.assert_allclose(result.dice, [dice(pred[k], tumour[k]) for k in expected_index])
    assert result.lesion_voxels.tolist() == [int(tumour[k].sum()) for k in expected_index]
    lesion = result.lesion_slices()
    assert lesion.index.tolist() == [k for k in expected_index if tumour[k].any()]


def test_slice_dice_skips_slices_empty_in_both():
    gt = np.zeros((4, 3, 3), bool)
    pred = np.zeros_like(gt)
    gt[1, 0, 0] = True
    pred[1, 0, 0] = pred[3, 1, 1] = True
    result = slice_dice(pred, gt)
    assert result.index.tolist() == [1, 3]
    assert result.dice.tolist() == [1.0, 0.0]
    assert result.lesion_slices().index.tolist() == [1]


def test_slice_positions_run_from_inferior_to_superior():
    brain = np.zeros((40, 4, 4), bool)
    brain[10:31, 1:3, 1:3] = True  # brain occupies slices 10..30
    positions = slice_positions(brain)
    assert positions[10] == -1.0 and positions[20] == 0.0 and positions[30] == 1.0
    assert positions[0] < -1.0 and positions[39] > 1.0
    with pytest.raises(InputError, match="brain mask is empty"):
        slice_positions(np.zeros((3, 2, 2), bool))


def test_distance_profile_matches_direct_binning():
    rng = np.random.default_rng(3)
    distances = np.concatenate([rng.uniform(-1, 1, 300), [-1.0, 1.0, 1.3, -1.2]])
    dices = rng.random(distances.size)
    profile = distance_profile(distances, dices, bins=8)
    width = 2.0 / 8
    for b in range(8):
        low = -1.0 + b * width
        inside = [(low <= min(max(d, -1), 1) < low + width) or (b == 7 and d >= 1.0) for d in distances]
        inside = np.array(inside)
        assert profile.n_slices[b] == inside.sum()
        assert profile.mean_dice[b] == pytest.approx(dices[inside].mean())
    assert profile.n_slices.sum() == distances.size
    assert profile.centres[0] == pytest.approx(-1 + width / 2)
    empty = distance_profile(np.array([0.9]), np.array([0.5]), bins=4)
    assert np.isnan(empty.mean_dice[0]) and empty.n_slices.tolist() == [0, 0, 0, 1]


def test_size_dice_spearman_equals_pearson_of_ranks():
    rng = np.random.default_rng(4)
    sizes = rng.integers(1, 500, 60)
    dices = np.clip(sizes / 500 + rng.normal(0, 0.2, 60), 0, 1)
    rho, p = size_dice_spearman(sizes, dices)
    direct = np.corrcoef(stats.rankdata(sizes), stats.rankdata(dices))[0, 1]
    assert rho == pytest.approx(direct, abs=1e-12)
    assert 0.0 <= p < 0.05
    assert all(np.isnan(size_dice_spearman([1, 2], [0.1, 0.2])))
    assert all(np.isnan(size_dice_spearman([3, 3, 3], [0.1, 0.2, 0.3])))
