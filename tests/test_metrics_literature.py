"""Literature metrics: pixel AP vs scikit-learn, AUPRO vs the MVTec AD reference, binned bounds, slice detection."""

from __future__ import annotations

from bisect import bisect

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score

from napari_clip_ad.errors import InputError
from napari_clip_ad.io import load_case
from napari_clip_ad.metrics import (
    PixelAccumulator,
    SliceDetection,
    average_precision,
    map_max_scores,
    map_metrics,
    ranking_scores,
    region_weights,
    slice_labels,
)


def reference_aupro(maps: list[np.ndarray], gts: list[np.ndarray], limit: float = 0.3, regions: str = "3d") -> float:
    """The MVTec AD ``compute_pro`` + ``trapezoid`` (as anomalib's test reference has them) at every threshold.

    One threshold per normal pixel (``num_thresholds`` = number of normal pixels); overlap of a region
    is the fraction of its pixels scoring strictly above the threshold; straightforward loops.
    """
    components, normal = [], []
    for score_map, gt in zip(maps, gts):
        pieces = [(score_map, gt)] if regions == "3d" else list(zip(score_map, gt))
        for scores, truth in pieces:
            labelled, n = ndimage.label(truth, structure=np.ones((3,) * truth.ndim, int))
            normal.append(scores[labelled == 0])
            components += [np.sort(scores[labelled == k + 1]) for k in range(n)]
    normal = np.sort(np.concatenate(normal))
    fprs, pros = [1.0], [1.0]
    for position, threshold in enumerate(normal):
        fprs.append(1.0 - (position + 1) / normal.size)
        pros.append(float(np.mean([np.mean(c > threshold) for c in components])))
    x, y = np.array(fprs[::-1]), np.array(pros[::-1])
    correction = 0.0
    if limit not in x:
        i = bisect(x, limit)
        y_limit = y[i - 1] + (y[i] - y[i - 1]) * (limit - x[i - 1]) / (x[i] - x[i - 1])
        correction = 0.5 * (y_limit + y[i - 1]) * (limit - x[i - 1])
    keep = x <= limit
    x, y = x[keep], y[keep]
    return (float(np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1]))) + correction) / limit


def random_images(seed: int, n: int = 3, decimals: int | None = None, shape=(24, 24)):
    """Small maps with a few ground-truth blobs of different sizes (several regions per image)."""
    rng = np.random.default_rng(seed)
    maps, gts = [], []
    for _ in range(n):
        gt = np.zeros(shape, bool)
        gt[3:8, 4:9] = True
        gt[12:14, 12:18] = rng.random() > 0.3
        gt[rng.integers(0, shape[0]), rng.integers(0, shape[1])] = True
        scores = np.clip(0.35 * gt + 0.65 * rng.random(shape), 0, 1)
        maps.append(np.round(scores, decimals) if decimals is not None else scores)
        gts.append(gt)
    return maps, gts


@pytest.fixture(scope="module")
def real_crop(shared_data):
    """A 6 x 50 x 50 crop at the top of a real case's whole tumour (17 % lesion) with a noisy smooth map."""
    case = load_case(shared_data / "brats2023" / "BraTS-GLI-00002-000", modalities=["t2w"])
    top = case.whole_tumour[112:118]
    _, y, x = (int(np.median(a)) for a in np.nonzero(top))
    tumour = top[:, y - 25:y + 25, x - 25:x + 25]
    assert 0.05 < tumour.mean() < 0.5
    rng = np.random.default_rng(3)
    scores = ndimage.gaussian_filter(0.6 * tumour + 0.5 * rng.random(tumour.shape), 1.0)
    return np.clip(scores, 0, 1), tumour


# --- pixel AP ------------------------------------------------------------------------------------

@pytest.mark.parametrize("decimals", [None, 2, 1])
def test_pixel_ap_equals_sklearn(decimals):
    maps, gts = random_images(1, decimals=decimals)
    acc = PixelAccumulator()
    for m, g in zip(maps, gts):
        acc.update(m, g)
    scores, labels = np.concatenate([m.ravel() for m in maps]), np.concatenate([g.ravel() for g in gts])
    assert acc.is_exact
    assert acc.average_precision() == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    assert average_precision(scores, labels) == pytest.approx(average_precision_score(labels, scores), abs=1e-12)


def test_pixel_ap_on_real_crop_with_brain_region(real_crop):
    scores, tumour = real_crop
    region = np.zeros(tumour.shape, bool)
    region[:, 5:35, 5:35] = True
    acc = PixelAccumulator()
    acc.update(scores, tumour, mask=region)
    assert acc.average_precision() == pytest.approx(average_precision_score(tumour[region], scores[region]), abs=1e-12)
    assert acc.auroc() == pytest.approx(roc_auc_score(tumour[region], scores[region]), abs=1e-12)


# --- AUPRO ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed, decimals", [(0, None), (1, None), (2, 2), (3, 1)])
def test_aupro_equals_mvtec_reference_on_images(seed, decimals):
    maps, gts = random_images(seed, decimals=decimals)
    acc = PixelAccumulator()
    for m, g in zip(maps, gts):
        acc.update(m, g, regions="2d")
    assert acc.n_regions >= 3
    assert acc.aupro() == pytest.approx(reference_aupro(maps, gts), abs=1e-6)


def test_aupro_3d_and_2d_regions_on_real_crop(real_crop):
    scores, tumour = real_crop
    for regions in ("3d", "2d"):
        acc = PixelAccumulator()
        acc.update(scores, tumour, regions=regions)
        assert acc.aupro() == pytest.approx(reference_aupro([scores], [tumour], regions=regions), abs=1e-6)
    _, n3 = region_weights(tumour, "3d")
    _, n2 = region_weights(tumour, "2d")
    assert n2 > n3  # a 3D lesion crosses several slices: one region in 3D, several in 2D


def test_aupro_other_fpr_limit_and_perfect_map():
    maps, gts = random_images(4)
    acc = PixelAccumulator()
    for m, g in zip(maps, gts):
        acc.update(m, g, regions="2d")
    assert acc.aupro(0.5) == pytest.approx(reference_aupro(maps, gts, limit=0.5), abs=1e-6)
    perfect = PixelAccumulator()
    perfect.update(gts[0].astype(float), gts[0])
    assert perfect.aupro() == pytest.approx(1.0)
    empty = PixelAccumulator()
    empty.update(maps[0], np.zeros_like(gts[0]))
    assert np.isnan(empty.aupro()) and np.isnan(empty.average_precision())


def test_region_weights_sum_to_one_per_region():
    gt = np.zeros((4, 10, 10), bool)
    gt[0, 1:3, 1:3] = gt[1, 2:4, 2:4] = gt[3, 7:9, 7:9] = True  # slices 0 and 1 touch in 3D
    weights, n = region_weights(gt, "3d")
    assert n == 2 and weights.sum() == pytest.approx(2.0)
    weights, n = region_weights(gt, "2d")
    assert n == 3 and weights.sum() == pytest.approx(3.0)


# --- binned path: bounds -------------------------------------------------------------------------

@pytest.mark.parametrize("bins", [16, 256, 65_536])
def test_binned_values_within_their_bounds(real_crop, bins):
    scores, tumour = real_crop
    exact, binned = PixelAccumulator(), PixelAccumulator(bins=bins, exact_limit=0)
    for acc in (exact, binned):
        acc.update(scores, tumour)
    assert exact.is_exact and not binned.is_exact
    assert exact.auroc_bound() == exact.average_precision_bound() == exact.aupro_bound() == 0.0
    for value, bound in (("auroc", "auroc_bound"), ("average_precision", "average_precision_bound"),
                         ("aupro", "aupro_bound")):
        error = abs(getattr(binned, value)() - getattr(exact, value)())
        assert error <= getattr(binned, bound)() + 1e-12, (value, bins)
    if bins == 65_536:  # the default histogram is fine enough for the bound to be small
        assert binned.average_precision_bound() < 1e-2 and binned.aupro_bound() < 1e-2


def test_bounds_are_attained_when_a_bin_mixes_classes():
    # One bin holds a positive above a negative in exact order: the binned AUROC loses exactly the bound.
    scores = np.array([0.51, 0.50, 0.9, 0.1])
    labels = np.array([1, 0, 1, 0], bool)
    binned = PixelAccumulator(bins=2, exact_limit=0)
    binned.update(scores, labels)
    assert abs(binned.auroc() - roc_auc_score(labels, scores)) == pytest.approx(binned.auroc_bound())


def test_merge_equals_one_accumulator(real_crop):
    scores, tumour = real_crop
    whole, parts = PixelAccumulator(exact_limit=0), PixelAccumulator(exact_limit=0)
    whole.update(scores[:3], tumour[:3], regions="2d")
    whole.update(scores[3:], tumour[3:], regions="2d")
    for chunk in (slice(0, 3), slice(3, None)):
        part = PixelAccumulator(exact_limit=0)
        part.update(scores[chunk], tumour[chunk], regions="2d")
        parts.merge(part)
    for name in ("auroc", "average_precision", "aupro", "f1max"):
        assert getattr(parts, name)() == getattr(whole, name)()


# --- slice detection -----------------------------------------------------------------------------

def test_slice_detection_equals_sklearn_and_handles_undefined():
    rng = np.random.default_rng(5)
    scores, labels = rng.normal(size=50), rng.random(50) > 0.6
    detection = SliceDetection()
    detection.update(scores[:20], labels[:20])
    detection.update(scores[20:], labels[20:])
    auroc, ap = detection.auroc_ap()
    assert auroc == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert ap == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    assert detection.n_slices == 50 and detection.n_positive == int(labels.sum())
    assert all(np.isnan(v) for v in ranking_scores(scores, np.zeros(50)))
    with pytest.raises(InputError, match="NaN"):
        ranking_scores(np.array([0.1, np.nan]), np.array([0, 1]))


def test_slice_labels_and_map_max_follow_the_region():
    gt = np.zeros((3, 4, 4), bool)
    gt[1, 0, 0] = True
    scores = np.zeros((3, 4, 4))
    scores[:, 0, 0] = [0.2, 0.7, 0.9]
    scores[2, 3, 3] = 0.95
    region = np.ones_like(gt)
    region[:, 3, 3] = False
    assert slice_labels(gt).tolist() == [False, True, False]
    assert map_max_scores(scores).tolist() == [0.2, 0.7, 0.95]
    assert map_max_scores(scores, region).tolist() == [0.2, 0.7, 0.9]


def test_map_metrics_one_volume(real_crop):
    scores, tumour = real_crop
    result = map_metrics(scores, tumour)
    labels = tumour.reshape(tumour.shape[0], -1).any(axis=1)
    assert result["pixel_ap"] == pytest.approx(average_precision_score(tumour.ravel(), scores.ravel()), abs=1e-12)
    assert result["auroc"] == pytest.approx(roc_auc_score(tumour.ravel(), scores.ravel()), abs=1e-12)
    assert result["aupro"] == pytest.approx(reference_aupro([scores], [tumour]), abs=1e-6)
    assert result["dice"] == pytest.approx(result["f1max"]) == pytest.approx(result["dice_f1max"])
    assert result["slice_score"] == "map max"
    image_scores = np.linspace(0, 1, tumour.shape[0])
    with_scores = map_metrics(scores, tumour, slice_scores=image_scores, threshold=0.5)
    assert with_scores["slice_score"] == "image score" and with_scores["threshold"] == 0.5
    if labels.all():
        assert np.isnan(with_scores["slice_auroc"])
