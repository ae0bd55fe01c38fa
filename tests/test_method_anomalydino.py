"""AnomalyDINO on a tiny random DINOv2 (official layout): few-shot, batched zero-shot, masking, engine order."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_clip_ad.backbones.dinov2 import tiny_dinov2_state
from napari_clip_ad.errors import InputError
from napari_clip_ad.methods import build_method, smooth_maps
from napari_clip_ad.methods.anomalydino import background_mask, mean_top1p


@pytest.fixture(scope="module")
def hub_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("dino") / "dinov2_vits14_pretrain.pth"
    torch.save(tiny_dinov2_state(seed=4, depth=2, width=64, grid=16), path)
    return path


@pytest.fixture(scope="module")
def method(hub_file):
    return build_method("anomalydino", backbone=str(hub_file), image_size=224, device="cpu")


def _images(n, seed=0):
    return torch.randn(n, 3, 224, 224, generator=torch.Generator().manual_seed(seed))


def test_few_shot_is_independent_per_image_and_references_clear_bitwise(method):
    refs, x = _images(2, 1), _images(9, 2)
    zero_before = method.predict(x)
    method.set_references(refs)
    assert method.n_references == 2 and method.describe()["n_references"] == 2
    batched = method.predict(x[:3])
    alone = method.predict(x[1:2])
    torch.testing.assert_close(alone.maps[0], batched.maps[1], atol=1e-6, rtol=0)
    torch.testing.assert_close(alone.scores[0], batched.scores[1], atol=1e-6, rtol=0)
    method.set_references(None)
    zero_after = method.predict(x)
    assert method.n_references == 0
    assert torch.equal(zero_before.maps, zero_after.maps) and torch.equal(zero_before.scores, zero_after.scores)


def test_a_reference_identical_to_the_image_gives_zero_distance(method):
    x = _images(1, 3)
    method.set_references(torch.cat([x, _images(1, 4)]))
    try:
        out = method.predict(x)
    finally:
        method.set_references(None)
    assert out.maps.abs().max() < 1e-5 and out.scores.abs().max() < 1e-5
    assert out.maps.shape == (1, 224, 224)  # input resolution, before the Gaussian


def test_zero_shot_scores_each_image_against_the_others(method):
    x = _images(9, 5)
    x[4] = x[3] + 0.01 * _images(1, 6)[0]  # a near duplicate: its patches find themselves in the other image
    out = method.predict(x)
    assert out.maps.shape == (9, 224, 224)
    assert out.scores[3] < out.scores[0] and out.scores[4] < out.scores[0]
    with pytest.raises(InputError, match="too few"):
        method.predict(x[:3])


def test_mean_top1p_is_the_official_image_score():
    d = torch.arange(1000, dtype=torch.float32)[None]
    assert mean_top1p(d).item() == pytest.approx(np.mean(np.arange(990, 1000)))
    assert mean_top1p(torch.tensor([[0.1, 0.7, 0.2]])).item() == pytest.approx(0.7)  # int(0.03) == 0: the max


def test_background_mask_follows_pca_threshold_and_the_1d_morphology_quirk():
    grid = 10
    strength = torch.full((grid, grid), -20.0)
    strength[2:8, 2:8] = 60.0  # the object: the centre crop keeps it, so no flip to -pc1
    strength[0, 0] = 60.0  # an isolated foreground patch in the corner
    direction = torch.zeros(16)
    direction[0] = 1.0
    features = strength.reshape(-1, 1) * direction + 0.01 * torch.randn(grid * grid, 16, generator=torch.Generator().manual_seed(0))
    mask = background_mask(features, grid).view(grid, grid)
    assert mask[2:8, 2:8].all() and not mask[9, 9]
    # dilation + closing act along the flattened (n_patches, 1) column: patch 0 spreads to patch 1 (next in
    # raster order) but not to patch 10 (the one below it), unlike a 2-D dilation
    assert mask[0, 1] and not mask[1, 0]
    # the object grows to its sequence neighbours (2, 1) and (2, 8), not to the patch above it (1, 2)
    assert mask[2, 1] and mask[2, 8] and not mask[1, 2]
    # the sign of the principal component is fixed as sklearn fixes it: negated features, same mask
    assert torch.equal(background_mask(-features, grid).view(grid, grid), mask)


def test_chunked_nearest_neighbours_equal_the_unchunked_ones(hub_file):
    refs, x = _images(3, 6), _images(2, 7)
    results = []
    for max_elements in (1 << 26, 1000):
        m = build_method("anomalydino", backbone=str(hub_file), image_size=224, device="cpu", max_elements=max_elements)
        m.set_references(refs)
        results.append(m.predict(x))
    torch.testing.assert_close(results[0].maps, results[1].maps, atol=1e-6, rtol=0)


def test_rotation_adds_eight_orientations_to_the_bank(hub_file):
    m = build_method("anomalydino", backbone=str(hub_file), image_size=224, device="cpu", rotation=True)
    m.set_references(_images(1, 8))
    assert m._bank.shape[0] == 8 * 256


def test_engine_resizes_to_the_slice_grid_then_smooths(hub_file):
    """The official dists2map order: resize to the original image, then gaussian_filter(sigma=4)."""
    from napari_clip_ad.engine import run_volume
    from napari_clip_ad.engine.preprocess import preprocess_slices

    m = build_method("anomalydino", backbone=str(hub_file), image_size=224, device="cpu")
    volume = np.random.default_rng(0).random((3, 60, 60)).astype(np.float32)
    refs = preprocess_slices(torch.from_numpy(np.random.default_rng(1).random((2, 60, 60)).astype(np.float32)), 224, m.backbone.mean, m.backbone.std)
    m.set_references(refs)
    result = run_volume(volume, m, modality="t2f", batch_size=2)
    images = preprocess_slices(torch.from_numpy(volume), 224, m.backbone.mean, m.backbone.std)
    raw = m.predict(images).unit_maps()
    expected = smooth_maps(F.interpolate(raw[:, None], size=(60, 60), mode="bilinear", align_corners=False)[:, 0], 4.0)
    np.testing.assert_allclose(result.anomaly_map, expected.clamp(0, 1).numpy(), atol=1e-5)
    assert result.info["sigma"] == 4.0 and m.default_sigma == 4.0


def test_clip_backbones_are_refused_with_one_line():
    with pytest.raises(InputError, match="needs a DINOv2 backbone") as info:
        build_method("anomalydino", backbone="tiny-test", image_size=224, device="cpu")
    assert "\n" not in str(info.value)
