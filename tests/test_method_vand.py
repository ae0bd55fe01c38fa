"""VAND / APRIL-GAN: prompts, tapped tokens, maps/scores, official checkpoints (tiny-test backbone)."""

from __future__ import annotations

import collections

import pytest
import torch
import torch.nn.functional as F

from napari_clip_ad import build_method
from napari_clip_ad.errors import InputError, WeightsError
from napari_clip_ad.methods.checkpoints import load_method_weights, save_method_weights
from napari_clip_ad.methods.vand import VAND, LinearLayer
from napari_clip_ad.methods.vand_prompts import TEMPLATES, prompt_sentences

SIZE = 240


@pytest.fixture(scope="module")
def method() -> VAND:
    return build_method("vand", "tiny-test", device="cpu")


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def official_checkpoint(n_layers: int = 4, width: int = 64, embed_dim: int = 64, seed: int = 3) -> dict:
    """A random checkpoint as train.py saves it: ``{"trainable_linearlayer": LinearLayer.state_dict()}``."""
    gen = torch.Generator().manual_seed(seed)
    state = collections.OrderedDict()
    for i in range(n_layers):
        state[f"fc.{i}.weight"] = torch.randn(embed_dim, width, generator=gen) * 0.2
        state[f"fc.{i}.bias"] = torch.randn(embed_dim, generator=gen) * 0.2
    return {"trainable_linearlayer": state}


def test_defaults(method: VAND) -> None:
    assert method.default_backbone == "openai-vit-l-14-336" and method.default_layers == (6, 12, 18, 24)
    assert method.default_sigma == 0 and method.quick_gelu is False
    assert method.layers == [3, 6, 9, 12] and method.map_max == 4.0
    # Exact GELU (the official 240 px model is rebuilt from its JSON config without quick_gelu).
    assert all(type(b.mlp.gelu) is torch.nn.GELU for b in method.clip.visual.transformer.resblocks)
    # Positional embedding resized to the 17 x 17 grid of 240 px (patch 14), CLS row kept.
    assert method.clip.visual.positional_embedding.shape == (17 * 17 + 1, 64)


def test_layer_options() -> None:
    with pytest.raises(InputError, match="repeats"):
        build_method("vand", "tiny-test", device="cpu", layers=(3, 3))
    with pytest.raises(InputError, match="do not exist"):
        build_method("vand", "tiny-test", device="cpu", layers=(13,))
    with pytest.raises(InputError, match="no option"):
        build_method("vand", "tiny-test", device="cpu", sigma=2)
    # The official transformer collects tapped blocks in block order: fc[0] always goes to the first block.
    assert build_method("vand", "tiny-test", device="cpu", layers=(9, 2)).layers == [2, 9]


def test_prompts() -> None:
    normal, abnormal = prompt_sentences("brain")
    assert len(TEMPLATES) == 35 and len(normal) == 7 * 35 and len(abnormal) == 5 * 35
    assert normal[0] == "a bad photo of a brain." and normal[35] == "a bad photo of a flawless brain."
    assert normal[-1] == "this is one brain without damage in the scene."
    assert abnormal[0] == "a bad photo of a damaged brain."


def test_text_features(method: VAND) -> None:
    text = method.text_features()
    assert text.shape == (2, 64)
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(2))
    # Per state: mean of the normalised sentence features, normalised again.
    with torch.no_grad():
        sentences = prompt_sentences("brain")[1]
        encoded = method.clip.encode_text(method.backbone.tokenizer(sentences))
    mean = F.normalize(encoded, dim=-1).mean(0)
    torch.testing.assert_close(text[1], mean / mean.norm(), atol=1e-5, rtol=0)
    other = build_method("vand", method.backbone, device="cpu", object_name="lung")
    assert not torch.allclose(other.text_features(), text)


def test_tapped_tokens_are_raw_block_outputs(method: VAND, images: torch.Tensor) -> None:
    blocks = method.clip.visual.transformer.resblocks
    seen: dict[int, torch.Tensor] = {}
    hooks = [blocks[k - 1].register_forward_hook(lambda _m, _i, out, k=k: seen.__setitem__(k, out)) for k in method.layers]
    try:
        tapped = method.tap_tokens(images[:2])
    finally:
        for hook in hooks:
            hook.remove()
    assert tapped.tokens.shape == (2, 4, 17 * 17, 64)
    for i, k in enumerate(method.layers):
        out = seen[k] if method.clip.visual.transformer.batch_first else seen[k].transpose(0, 1)
        torch.testing.assert_close(tapped.tokens[:, i], out[:, 1:], atol=0, rtol=0)  # CLS dropped, no ln_post
    with torch.no_grad():
        torch.testing.assert_close(tapped.image_features, method.clip.encode_image(images[:2]), atol=1e-5, rtol=0)


def test_maps_and_scores_follow_the_official_formula(method: VAND, images: torch.Tensor) -> None:
    out = method.predict(images[:2])
    assert out.maps.shape == (2, SIZE, SIZE) and out.scores.shape == (2,) and out.map_max == 4.0
    unit = out.unit_maps()
    assert unit.min() >= 0 and unit.max() <= 1
    tapped = method.tap_tokens(images[:2])
    text = method.text_features()
    expected = torch.zeros(2, SIZE, SIZE)
    with torch.no_grad():
        for i, fc in enumerate(method.linear.fc):
            token = F.normalize(fc(tapped.tokens[:, i]), dim=-1)
            logits = (100.0 * token @ text.t()).permute(0, 2, 1).reshape(2, 2, 17, 17)
            logits = F.interpolate(logits, size=SIZE, mode="bilinear", align_corners=True)
            expected += logits.softmax(dim=1)[:, 1]
        scores = (100.0 * F.normalize(method.clip.encode_image(images[:2]), dim=-1) @ text.t()).softmax(-1)[:, 1]
    torch.testing.assert_close(out.maps, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.scores, scores, atol=1e-5, rtol=0)
    # align_corners=True: the corner pixel is exactly the corner patch's probability.
    corner = sum(
        (100.0 * F.normalize(fc(tapped.tokens[:, i, -1]), dim=-1) @ text.t()).softmax(-1)[:, 1]
        for i, fc in enumerate(method.linear.fc)
    )
    torch.testing.assert_close(out.maps[:, -1, -1], corner.detach(), atol=1e-5, rtol=0)


def test_batch_composition_invariance(method: VAND, images: torch.Tensor) -> None:
    alone = method.predict(images[1:2])
    batch = method.predict(images)
    torch.testing.assert_close(batch.maps[1:2], alone.maps, atol=1e-5, rtol=0)
    torch.testing.assert_close(batch.scores[1:2], alone.scores, atol=1e-5, rtol=0)


def test_grad_only_in_forward(images: torch.Tensor) -> None:
    fresh = build_method("vand", "tiny-test", device="cpu")
    assert not fresh.predict(images[:1]).maps.requires_grad
    out = fresh(images[:1])
    (out.maps.mean() + out.scores.sum()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in fresh.linear.parameters())
    assert all(p.grad is None for p in fresh.clip.parameters())
    # Cached tokens give the same result as the full forward.
    torch.testing.assert_close(fresh.head(*fresh.tap_tokens(images[:1])).maps, out.maps)


def test_vit_l_geometry() -> None:
    state = LinearLayer(1024, 768, 4).state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        **{f"fc.{i}.weight": (768, 1024) for i in range(4)}, **{f"fc.{i}.bias": (768,) for i in range(4)}
    }


def test_official_checkpoint_loads_and_changes_maps(method: VAND, images: torch.Tensor, tmp_path) -> None:
    before = method.predict(images[:1]).maps
    path = tmp_path / "mvtec_pretrained.pth"
    torch.save(official_checkpoint(), path)
    loaded = build_method("vand", "tiny-test", device="cpu", weights=path)
    torch.testing.assert_close(loaded.linear.fc[2].bias, official_checkpoint()["trainable_linearlayer"]["fc.2.bias"])
    assert not torch.allclose(loaded.predict(images[:1]).maps, before)


@pytest.mark.parametrize(
    "obj, message",
    [
        (official_checkpoint(width=1024, embed_dim=768), "another backbone"),
        ({"prompt_learner": {"ctx_pos": torch.zeros(1, 1, 12, 64)}}, "not a VAND checkpoint"),
        ({"trainable_linearlayer": {"fc.0.weight": torch.zeros(64, 64), "ln.weight": torch.zeros(64)}}, "not the official"),
    ],
)
def test_mismatched_checkpoints_refused(tmp_path, obj: dict, message: str) -> None:
    path = tmp_path / "other.pth"
    torch.save(obj, path)
    with pytest.raises(WeightsError, match=message):
        build_method("vand", "tiny-test", device="cpu", weights=path)


def test_checkpoint_fixes_layers_unless_named(tmp_path, images: torch.Tensor) -> None:
    """A 3-head checkpoint taps n_blocks // 3 x (1, 2, 3) (official rule); naming other blocks is refused."""
    path = tmp_path / "three.pth"
    torch.save(official_checkpoint(n_layers=3), path)
    loaded = build_method("vand", "tiny-test", device="cpu", weights=path)
    step = len(loaded.clip.visual.transformer.resblocks) // 3
    assert loaded.layers == [step, 2 * step, 3 * step] and "checkpoint" in loaded.describe()["layers_from"]
    assert loaded.predict(images[:1]).maps.shape[0] == 1
    with pytest.raises(WeightsError, match="3 linear layers but the method taps 4 blocks"):
        build_method("vand", "tiny-test", device="cpu", weights=path, layers=[1, 2, 3, 4])


class NotATensor:
    """Pickled as a class instance: weights_only loading must refuse it."""


def test_unsafe_pickle_refused(tmp_path) -> None:
    path = tmp_path / "unsafe.pth"
    torch.save({"trainable_linearlayer": NotATensor()}, path)
    with pytest.raises(WeightsError, match="refused"):
        build_method("vand", "tiny-test", device="cpu", weights=path)


def test_safetensors_round_trip(images: torch.Tensor, tmp_path) -> None:
    torch.manual_seed(7)
    trained = build_method("vand", "tiny-test", device="cpu")
    with torch.no_grad():
        for p in trained.linear.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    path = save_method_weights(trained, tmp_path / "vand.safetensors")
    other = build_method("vand", "tiny-test", device="cpu")
    load_method_weights(other, path)
    torch.testing.assert_close(other.predict(images[:1]).maps, trained.predict(images[:1]).maps)
    with pytest.raises(WeightsError, match="does not fit"):
        load_method_weights(build_method("vand", "tiny-test", device="cpu", layers=(3, 6, 9)), path)
