"""3D post-processing: view fusion, brain restriction, Gaussian smoothing in mm, small-component removal."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from napari_clip_ad.io import find_cases, load_case
from napari_clip_ad.postprocess3d import fuse_views, remove_small_components, restrict_to_brain, smooth3d


def maps(seed: int = 0, shape=(6, 7, 8)) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.random(shape, dtype=np.float32) for _ in range(3)]


def test_fuse_views_mean_and_max():
    views = maps()
    np.testing.assert_allclose(fuse_views(views), (views[0] + views[1] + views[2]) / 3, rtol=1e-6)
    np.testing.assert_array_equal(fuse_views(views, mode="max"), np.maximum(np.maximum(views[0], views[1]), views[2]))
    assert fuse_views(views).dtype == np.float32
    with pytest.raises(ValueError, match="mode"):
        fuse_views(views, mode="median")
    with pytest.raises(ValueError, match="shape"):
        fuse_views([views[0], views[1][:, :, :4]])
    with pytest.raises(ValueError, match="no map"):
        fuse_views([])


def test_restrict_to_brain():
    scores = maps()[0]
    brain = scores > 0.3
    restricted = restrict_to_brain(scores, brain)
    np.testing.assert_array_equal(restricted[brain], scores[brain])
    assert not restricted[~brain].any()
    with pytest.raises(ValueError, match="shape"):
        restrict_to_brain(scores, brain[:-1])


def test_smooth3d_sigma_is_in_millimetres():
    scores = maps()[0]
    smoothed = smooth3d(scores, 2.0, spacing=(2.0, 1.0, 0.5))
    np.testing.assert_allclose(smoothed, ndimage.gaussian_filter(scores, sigma=(1.0, 2.0, 4.0)), atol=1e-6)
    assert 0.0 <= smoothed.min() and smoothed.max() <= 1.0
    np.testing.assert_array_equal(smooth3d(scores, 0.0), scores)
    with pytest.raises(ValueError):
        smooth3d(scores, -1.0)


def test_remove_small_components_26_connected():
    mask = np.zeros((8, 8, 8), bool)
    mask[1:3, 1:3, 1:3] = True          # 8 voxels
    mask[5, 5, 5] = mask[6, 6, 6] = True  # 2 voxels touching by a corner: one 26-connected component
    mask[0, 7, 7] = True                 # 1 voxel
    kept = remove_small_components(mask, min_voxels=2)
    expected = mask.copy()
    expected[0, 7, 7] = False
    np.testing.assert_array_equal(kept, expected)
    only_big = np.zeros_like(mask)
    only_big[1:3, 1:3, 1:3] = True
    np.testing.assert_array_equal(remove_small_components(mask, min_voxels=3), only_big)
    # 8 voxels of 0.5 mm^3 = 4 mm^3; 2 voxels = 1 mm^3.
    np.testing.assert_array_equal(remove_small_components(mask, min_mm3=2.0, spacing=(1.0, 1.0, 0.5)), only_big)
    assert not remove_small_components(np.zeros_like(mask), min_voxels=1).any()
    with pytest.raises(ValueError, match="exactly one"):
        remove_small_components(mask)


def test_real_case_pipeline_matches_direct_computation(shared_data):
    """On a real case: fuse, restrict, smooth, threshold, clean = the same steps done by hand."""
    case = load_case(find_cases(shared_data / "brats2023")[0], modalities=["t2w"])
    crop = (slice(60, 100), slice(80, 140), slice(80, 140))
    tumour, brain = case.whole_tumour[crop], case.brain_mask[crop]
    rng = np.random.default_rng(1)
    views = [np.clip(tumour * 0.7 + 0.4 * rng.random(tumour.shape), 0, 1).astype(np.float32) for _ in range(3)]
    fused = restrict_to_brain(fuse_views(views), brain)
    smoothed = smooth3d(fused, 1.5, spacing=case.geometry.spacing)
    mask = remove_small_components(smoothed >= 0.5, min_voxels=20)
    direct = ndimage.gaussian_filter(np.where(brain, np.mean(views, axis=0), 0).astype(np.float32),
                                     sigma=[1.5 / s for s in case.geometry.spacing]) >= 0.5
    labels, n = ndimage.label(direct, np.ones((3, 3, 3)))
    sizes = ndimage.sum(direct, labels, range(1, n + 1))
    np.testing.assert_array_equal(mask, np.isin(labels, 1 + np.flatnonzero(sizes >= 20)))
    assert mask.any()
