"""WinCLIP (anomalib's zero-shot definition) on the tiny random-weights backbone and a real crop."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from napari_clip_ad import build_method, run_volume
from napari_clip_ad.errors import InputError, WeightsError
from napari_clip_ad.io import load_case
from napari_clip_ad.methods.winclip import (
    harmonic_aggregation,
    window_coverage,
    window_indices,
)
from napari_clip_ad.methods.winclip_prompts import TEMPLATES, compositional_prompts


@pytest.fixture(scope="module")
def winclip():
    return build_method("winclip", "tiny-test", device="cpu")


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(3, 3, 240, 240, generator=generator)


def test_compositional_prompt_ensemble_as_anomalib():
    normal, anomalous = compositional_prompts("bottle")
    assert len(normal) == 7 * 21 and len(anomalous) == 4 * 21
    # anomalib's create_prompt_ensemble docstring examples (state-major order).
    assert normal[:2] == ["a cropped photo of the bottle.", "a close-up photo of a bottle."]
    assert anomalous[:2] == ["a cropped photo of the damaged bottle.", "a close-up photo of a damaged bottle."]
    assert normal[21] == "a cropped photo of the flawless bottle."
    assert anomalous[-1] == "a photo of a bottle with damage for anomaly detection."
    # Quirk kept from anomalib: one template is listed twice.
    assert TEMPLATES.count("a jpeg corrupted photo of the {}.") == 2


def test_window_indices_match_anomalib_make_masks_examples():
    # anomalib's make_masks((3, 3), 2) and make_masks((4, 4), 2), one row per window here.
    assert window_indices(3, 2).tolist() == [[0, 1, 3, 4], [1, 2, 4, 5], [3, 4, 6, 7], [4, 5, 7, 8]]
    assert window_indices(4, 2).T.tolist() == [
        [0, 1, 2, 4, 5, 6, 8, 9, 10],
        [1, 2, 3, 5, 6, 7, 9, 10, 11],
        [4, 5, 6, 8, 9, 10, 12, 13, 14],
        [5, 6, 7, 9, 10, 11, 13, 14, 15],
    ]


@pytest.mark.parametrize(
    ("grid", "scale", "n_windows"),
    [(17, 2, 256), (17, 3, 225), (15, 2, 196), (15, 3, 169)],  # tiny-test / ViT-B-16(-plus) at 240 px
)
def test_window_masks_count_and_coverage(grid, scale, n_windows):
    windows = window_indices(grid, scale)
    assert windows.shape == (n_windows, scale * scale)
    coverage = window_coverage(windows, grid * grid)
    per_patch = coverage.sum(dim=0).reshape(grid, grid)
    assert per_patch[0, 0] == 1 and per_patch[grid // 2, grid // 2] == scale * scale
    assert bool((per_patch >= 1).all())


def test_window_scale_larger_than_grid_is_refused():
    with pytest.raises(InputError, match="does not fit"):
        window_indices(15, 16)


def test_harmonic_aggregation_matches_anomalib_example_and_definition():
    coverage = window_coverage(window_indices(3, 2), 9)
    got = harmonic_aggregation(torch.tensor([[1.0, 0.75, 0.5, 0.25]]), coverage, 3)
    expected = torch.tensor([[[1.0, 0.8571, 0.75], [0.6667, 0.48, 0.375], [0.5, 0.3333, 0.25]]])
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    # Literal definition on random scores: per patch, harmonic mean over the windows covering it.
    windows = window_indices(17, 3)
    scores = torch.rand(2, len(windows), generator=torch.Generator().manual_seed(1)) * 0.9 + 0.05
    got = harmonic_aggregation(scores, window_coverage(windows, 17 * 17), 17)
    for patch in (0, 18, 144, 288):
        covering = (windows == patch).any(dim=1)
        reference = covering.sum() / (1.0 / scores[:, covering]).sum(dim=1)
        torch.testing.assert_close(got.reshape(2, -1)[:, patch], reference)


def test_method_windows_and_grid_for_tiny_backbone(winclip):
    assert winclip.grid == 17 and winclip.scales == (2, 3)
    assert winclip.windows(0).shape == (256, 5) and winclip.windows(1).shape == (225, 10)
    assert bool((winclip.windows(1)[:, 0] == 0).all())  # CLS token leads every window
    assert winclip.trainable_parts() == {} and winclip.default_sigma == 0.0


def test_text_features_are_normalised_and_cached(winclip):
    text = winclip.text_features
    assert text.shape == (2, 64) and text.dtype == torch.float32
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(2))
    assert not torch.allclose(text[0], text[1])
    assert winclip._text_cache is not None
    assert torch.equal(winclip.text_features, text)


def test_maps_are_probabilities_with_input_shape(winclip, images):
    output = winclip.predict(images)
    assert output.maps.shape == (3, 240, 240) and output.scores.shape == (3,)
    assert output.map_max == 1.0 and not output.maps.requires_grad
    assert float(output.maps.min()) > 0.0 and float(output.maps.max()) < 1.0
    unit = output.unit_maps()
    assert float(unit.min()) >= 0.0 and float(unit.max()) <= 1.0
    assert bool(((output.scores > 0) & (output.scores < 1)).all())
    assert float(output.maps.std()) > 0  # windows see different tokens: the map is not flat


def test_image_embedding_is_open_clips_and_windows_differ(winclip, images):
    with torch.no_grad():
        image_embeddings, window_embeddings = winclip.encode(images[:2])
        reference = winclip.clip.encode_image(images[:2])
    torch.testing.assert_close(image_embeddings, reference, atol=1e-5, rtol=1e-5)
    assert [w.shape for w in window_embeddings] == [(2, 256, 64), (2, 225, 64)]
    assert float(window_embeddings[0][0].std(dim=0).mean()) > 1e-3


def test_result_does_not_depend_on_batch_composition(winclip, images):
    alone = winclip.predict(images[1:2])
    together = winclip.predict(images)
    torch.testing.assert_close(alone.maps[0], together.maps[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(alone.scores[0], together.scores[1], atol=1e-5, rtol=0)


def test_object_name_changes_the_prompts():
    liver = build_method("winclip", "tiny-test", device="cpu", object_name="liver", scales=(3,))
    brain = build_method("winclip", "tiny-test", device="cpu", scales=[3])
    assert brain.scales == (3,) and len([b for b in dict(brain.named_buffers()) if b.startswith("_windows")]) == 1
    assert not torch.allclose(liver.text_features, brain.text_features)


@pytest.mark.parametrize(
    ("options", "message"),
    [({"k_shot": 1}, "few-shot"), ({"scales": (2, 18)}, "does not fit"), ({"scales": ("2",)}, "integers"), ({"object_name": " "}, "object_name")],
)
def test_bad_options_are_refused(options, message):
    with pytest.raises(InputError, match=message):
        build_method("winclip", "tiny-test", device="cpu", **options)


def test_weights_are_refused_for_training_free_method(tmp_path: Path):
    path = tmp_path / "winclip.pt"
    torch.save({"state_dict": {"model._text_embeddings": torch.zeros(2, 640)}}, path)
    with pytest.raises(WeightsError, match="training-free"):
        build_method("winclip", "tiny-test", device="cpu", weights=path)


def test_run_volume_on_a_real_crop(winclip, shared_data):
    case = load_case(shared_data / "brats2023" / "BraTS-GLI-00002-000", modalities=["t2w"])
    crop = np.ascontiguousarray(case.images["t2w"][70:73, 30:210, 30:210])
    result = run_volume(crop, winclip, batch_size=2)
    assert result.anomaly_map.shape == crop.shape and result.anomaly_map.dtype == np.float32
    assert np.isfinite(result.anomaly_map).all()
    assert result.anomaly_map.min() >= 0.0 and result.anomaly_map.max() <= 1.0
    assert result.analysed.all() and ((result.scores > 0) & (result.scores < 1)).all()
    assert result.info["method"] == "winclip" and result.info["sigma"] == 0.0
    assert result.info["options"]["scales"] == (2, 3)
