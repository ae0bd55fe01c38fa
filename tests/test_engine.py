"""The slice engine: alignment, skipping, batching, progress, cancel, preprocessing, smoothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from napari_clip_ad import build_method, run_volume
from napari_clip_ad.engine import default_batch_size, preprocess_slices, scale_slices
from napari_clip_ad.errors import Cancelled, InputError
from napari_clip_ad.io import load_case
from napari_clip_ad.methods import smooth_maps


@pytest.fixture(scope="module")
def vand():
    return build_method("vand", "tiny-test", device="cpu")


@pytest.fixture(scope="module")
def real_crop(shared_data):
    """12 axial slices of a real BraTS 2023 case around the tumour, plus 2 brainless slices."""
    case = load_case(shared_data / "brats2023" / "BraTS-GLI-00002-000", modalities=["t2w"])
    z = int(np.argmax(case.whole_tumour.sum(axis=(1, 2))))
    volume = case.images["t2w"][z - 6 : z + 6].copy()
    volume[:2] = 0.0  # no brain: must be skipped
    return volume


def test_map_is_aligned_in_unit_range_and_skips_empty_slices(vand, real_crop):
    result = run_volume(real_crop, vand, batch_size=4)
    assert result.anomaly_map.shape == real_crop.shape
    assert result.anomaly_map.dtype == np.float32
    assert 0.0 <= result.anomaly_map.min() and result.anomaly_map.max() <= 1.0
    assert result.anomaly_map.max() > 0.0
    assert not result.analysed[:2].any() and result.analysed[2:].all()
    assert np.all(result.anomaly_map[:2] == 0.0) and np.all(result.scores[:2] == 0.0)
    assert result.info["slices_analysed"] == 10
    assert "random weights" in result.info["backbone"]


def test_batch_size_does_not_change_the_map(vand, real_crop):
    one = run_volume(real_crop, vand, batch_size=1)
    many = run_volume(real_crop, vand, batch_size=7)
    np.testing.assert_allclose(one.anomaly_map, many.anomaly_map, atol=1e-5)
    np.testing.assert_allclose(one.scores, many.scores, atol=1e-5)
    default = run_volume(real_crop, vand)  # no batch size: the device's default (8 on the CPU)
    assert default.info["batch_size"] == default_batch_size(torch.device("cpu")) == 8
    np.testing.assert_allclose(default.anomaly_map, many.anomaly_map, atol=1e-5)


def test_progress_and_cancel(vand, real_crop):
    seen: list[tuple[int, int]] = []
    run_volume(real_crop, vand, batch_size=4, progress=lambda d, t: seen.append((d, t)))
    assert seen[0] == (0, 10) and seen[-1] == (10, 10)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    calls = []

    def cancel_after_first_batch() -> bool:
        calls.append(1)
        return len(calls) > 1

    with pytest.raises(Cancelled):
        run_volume(real_crop, vand, batch_size=4, cancel=cancel_after_first_batch)


def test_other_axes_and_composite_channels(vand, shared_data):
    case = load_case(shared_data / "brats2023" / "BraTS-GLI-00012-000", modalities=["t1c", "t2w", "t2f"])
    for name in ("t1c", "t2w", "t2f"):
        case.images[name] = case.images[name][:, 100:104].copy()  # 4 coronal slices
    case.brain_mask = case.brain_mask[:, 100:104].copy()
    case.seg = None
    result = run_volume(case, vand, modality="t1c+t2w+t2f", axis="coronal", batch_size=4)
    assert result.anomaly_map.shape == case.images["t2w"].shape
    with pytest.raises(InputError, match="unknown modality"):
        run_volume(case, vand, modality="flair")
    with pytest.raises(InputError, match="unknown slicing axis"):
        run_volume(case, vand, modality="t2w", axis="oblique")


def test_preprocessing_scales_each_slice_on_its_own():
    slices = torch.stack([torch.linspace(0, 10, 64 * 64).view(64, 64), torch.linspace(5, 500, 64 * 64).view(64, 64)])
    scaled = scale_slices(slices[:, None])
    assert torch.allclose(scaled.amin(dim=(1, 2, 3)), torch.zeros(2)) and torch.allclose(scaled.amax(dim=(1, 2, 3)), torch.ones(2))
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    images = preprocess_slices(slices, 32, mean, std)
    assert images.shape == (2, 3, 32, 32)
    # channel c of a constant-zero slice would be -mean/std; a scaled slice spans [-mean/std, (1-mean)/std]
    for c in range(3):
        assert images[:, c].min() >= -mean[c] / std[c] - 1e-5 and images[:, c].max() <= (1 - mean[c]) / std[c] + 1e-5


@pytest.mark.parametrize("sigma", [1.0, 4.0])
def test_smoothing_equals_scipy_gaussian_filter(sigma):
    rng = np.random.default_rng(0)
    maps = rng.random((3, 40, 37)).astype(np.float32)
    ours = smooth_maps(torch.from_numpy(maps), sigma).numpy()
    for m, o in zip(maps, ours):
        np.testing.assert_allclose(o, gaussian_filter(m.astype(np.float64), sigma=sigma), atol=1e-6)


def test_untrained_parts_are_seeded_so_runs_repeat(real_crop):
    first = run_volume(real_crop[4:7], build_method("vand", "tiny-test", device="cpu"))
    torch.manual_seed(1234)  # the global RNG must not matter
    second = run_volume(real_crop[4:7], build_method("vand", "tiny-test", device="cpu"))
    np.testing.assert_array_equal(first.anomaly_map, second.anomaly_map)
    other = run_volume(real_crop[4:7], build_method("vand", "tiny-test", device="cpu", init_seed=1))
    assert not np.array_equal(first.anomaly_map, other.anomaly_map)
