"""AnoVL: state prompts, V-V visual tokens, 22-view image score, test-time adaptation (tiny-test backbone)."""

from __future__ import annotations

import math
import pickle

import pytest
import torch

from napari_clip_ad import build_method
from napari_clip_ad.errors import InputError, WeightsError
from napari_clip_ad.methods.anovl import AnoVL
from napari_clip_ad.methods.anovl_attention import encode_visual
from napari_clip_ad.methods.anovl_prompts import STATE_ABNORMAL, STATE_NORMAL, state_sentences, templates_for
from napari_clip_ad.methods.anovl_tta import StateAdapter, _affine, augment_views, pseudo_label_loss
from napari_clip_ad.methods.checkpoints import load_method_weights, save_method_weights

SIZE = 112  # AnoVL works at any size; 112 px gives an 8x8 grid on the patch-14 test backbone


@pytest.fixture(scope="module")
def method() -> AnoVL:
    return build_method("anovl", "tiny-test", image_size=SIZE, device="cpu")


@pytest.fixture(scope="module")
def method_tta() -> AnoVL:
    return build_method("anovl", "tiny-test", image_size=SIZE, device="cpu", tta=True)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def output(method: AnoVL, images: torch.Tensor):
    return method.predict(images)


def test_defaults_and_options(method: AnoVL, method_tta: AnoVL) -> None:
    assert method.default_backbone == "vit-b-16-plus-240" and method.quick_gelu is False
    assert method.default_sigma == 0 and method.map_max == 1.0 and method.layers == [3, 6, 9, 12]
    assert method.trainable_parts() == {} and method_tta.trainable_parts() == {}
    with pytest.raises(InputError, match="at least 4 tapped layers"):
        build_method("anovl", "tiny-test", image_size=SIZE, device="cpu", layers=[6, 12])
    with pytest.raises(InputError, match="tta_epochs"):
        build_method("anovl", "tiny-test", image_size=SIZE, device="cpu", tta=True, tta_lr=0)
    with pytest.raises(InputError, match="no option"):
        build_method("anovl", "tiny-test", image_size=SIZE, device="cpu", temperature=0.07)


def test_state_prompts_follow_the_official_lists() -> None:
    templates = templates_for("brain")
    assert len(templates) == 66 and len(set(templates)) == 66
    assert templates[0] == "a cropped industrial photo of the {}" and templates[12] == "an industrial photo of a {}"
    assert templates[34] == "an industrial image of a {}" and templates[65] == "a manufacturing image of a {} for anomaly detection"
    # Textures use the textural-photo and (second definition) surface-picture families.
    assert templates_for("carpet")[44] == "a cropped surface picture of the {}"
    normal = state_sentences("brain", STATE_NORMAL)
    assert len(normal) == 66 * 7 and normal[:2] == [
        "a cropped industrial photo of the normal brain", "a cropped industrial photo of the flawless brain"]
    assert "a dark industrial image of a brain with defect" in state_sentences("brain", STATE_ABNORMAL)


def test_text_features_are_normalised_means_of_unnormalised_embeddings(method: AnoVL) -> None:
    text, sentences = method.text_features()
    dim = method.clip.text_projection.shape[1]
    assert text.shape == (dim, 2) and sentences.shape == (2 * 462, dim)
    assert torch.allclose(text.norm(dim=0), torch.ones(2), atol=1e-6)
    assert torch.allclose(sentences.norm(dim=1), torch.ones(924), atol=1e-5)
    with torch.no_grad():
        raw = method.clip.encode_text(method.backbone.tokenizer(state_sentences("brain", STATE_ABNORMAL)))
    mean = raw.mean(0)
    assert torch.allclose(text[:, 1], mean / mean.norm(), atol=1e-6)
    assert method.text_features()[0] is text  # cached


def test_original_path_is_plain_clip(method: AnoVL, images: torch.Tensor) -> None:
    with torch.no_grad():
        ours = encode_visual(method.clip.visual, images)
        plain = method.clip.encode_image(images)
    assert torch.allclose(ours.image_features, plain, atol=1e-5)
    assert ours.patch_tokens.shape == (2, (SIZE // 14) ** 2, plain.shape[1])


def test_maps_scores_shapes_and_range(output, images: torch.Tensor) -> None:
    assert output.maps.shape == (2, SIZE, SIZE) and output.scores.shape == (2,)
    unit = output.unit_maps()
    assert float(unit.min()) >= 0.0 and float(unit.max()) <= 1.0
    assert torch.all((output.scores > 0) & (output.scores < 1))
    assert not output.maps.requires_grad


def test_map_is_the_final_vv_state_whatever_the_layers(method: AnoVL, images: torch.Tensor, output) -> None:
    # Official quirk: in-place updates make every tapped V-V entry the state after the last block.
    other = build_method("anovl", "tiny-test", image_size=SIZE, device="cpu", layers=[1, 2, 3, 4])
    assert torch.allclose(other.predict(images[:1]).maps[0], output.maps[0], atol=1e-6)


def test_batch_composition_does_not_change_results(method: AnoVL, method_tta: AnoVL, images: torch.Tensor, output) -> None:
    alone = method.predict(images[1:2])
    assert torch.allclose(alone.maps[0], output.maps[1], atol=1e-5)
    assert torch.allclose(alone.scores[0], output.scores[1], atol=1e-5)
    batch = method_tta.predict(images[:2])
    single = method_tta.predict(images[1:2])
    assert torch.allclose(single.maps[0], batch.maps[1], atol=1e-5)


def test_tta_changes_maps_only_and_is_seeded(method_tta: AnoVL, images: torch.Tensor, output) -> None:
    first = method_tta.predict(images[:1])
    again = method_tta.predict(images[:1])
    assert torch.equal(first.maps, again.maps)
    assert (first.maps[0] - output.maps[0]).abs().max() > 1e-4
    assert torch.allclose(first.scores[0], output.scores[0], atol=1e-6)
    assert method_tta.adapter.linear.weight.grad is not None  # fitted even under predict's no_grad
    reseeded = build_method("anovl", "tiny-test", image_size=SIZE, device="cpu", tta=True, seed=7)
    assert (reseeded.predict(images[:1]).maps - first.maps).abs().max() > 1e-6


def test_augment_views_are_the_official_22_in_seeded_order() -> None:
    image = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    views = augment_views(image, torch.Generator().manual_seed(111))
    assert views.shape == (22, 3, 32, 32)
    for expected in (image, image.flip(-1), *(torch.rot90(image, k, dims=(-2, -1)) for k in (1, 2, 3))):
        assert ((views - expected).flatten(1).abs().amax(1) == 0).sum() == 1
    reordered = augment_views(image, torch.Generator().manual_seed(5))
    assert not torch.equal(views, reordered)
    assert torch.allclose(views.sum(0), reordered.sum(0), atol=1e-5)
    # The affine-grid convention (align_corners=True) makes a quarter-turn grid a pixel permutation.
    t = torch.tensor(math.pi / 2)
    quarter = torch.stack([torch.stack([t.cos(), -t.sin(), torch.tensor(0.0)]), torch.stack([t.sin(), t.cos(), torch.tensor(0.0)])])
    assert torch.allclose(_affine(image, quarter), torch.rot90(image, 1, dims=(-2, -1)), atol=1e-4)


def test_adapter_geometry_and_pseudo_label_loss() -> None:
    adapter = StateAdapter(768, 2 * 462)  # ViT-L-sized embedding
    assert adapter.linear.weight.shape == (924, 768) and adapter.linear.bias.shape == (924,)
    adapter.reset(torch.Generator().manual_seed(0))
    assert float(adapter.linear.weight.detach().abs().max()) <= 1 / math.sqrt(768)
    even = torch.full((2, 3, 3, 2), 0.5)
    assert math.isclose(float(pseudo_label_loss(even)), 2 * math.log(2), rel_tol=1e-6)
    sure = torch.tensor([0.99, 0.01]).repeat(2, 3, 3, 1)  # noisy copy called normal: hard loss grows
    assert float(pseudo_label_loss(sure)) > float(pseudo_label_loss(even))


def test_weights_are_refused_or_round_trip(method: AnoVL, images: torch.Tensor, output, tmp_path) -> None:
    official_like = tmp_path / "anovl.pth"
    torch.save({"adapter": {"ad.weight": torch.randn(924, 64), "ad.bias": torch.randn(924)}}, official_like)
    with pytest.raises(WeightsError, match="no released checkpoint"):
        load_method_weights(method, official_like)
    ours = save_method_weights(method, tmp_path / "anovl.safetensors")
    load_method_weights(method, ours)
    assert torch.allclose(method.predict(images[:1]).maps[0], output.maps[0], atol=1e-6)
    unsafe = tmp_path / "unsafe.pth"
    with open(unsafe, "wb") as handle:
        pickle.dump(InputError("not a checkpoint"), handle)
    with pytest.raises(WeightsError, match="refused|not a readable"):
        load_method_weights(method, unsafe)


def test_runs_in_float32_under_autocast(method: AnoVL, images: torch.Tensor, output) -> None:
    # The official test runs in float32; the engine's autocast must not lower the precision.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = method.predict(images[:1])
    assert low.maps.dtype == torch.float32
    assert torch.allclose(low.maps[0], output.maps[0], atol=1e-6) and torch.allclose(low.scores[0], output.scores[0], atol=1e-6)
