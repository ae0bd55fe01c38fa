"""Backbone registry and loading: names, offline failures, local checkpoint formats, safety, resizing."""

from __future__ import annotations

import pytest
import torch
from open_clip.model import resize_pos_embed

from napari_clip_ad.backbones import BACKBONES, load_backbone, resize_positional_embedding
from napari_clip_ad.errors import WeightsError


@pytest.fixture(scope="module")
def tiny():
    return load_backbone("tiny-test")


def test_registry_names_the_study_backbones():
    for name in ("openai-vit-l-14-336", "vit-b-16-plus-240", "pmc-vit-l-14", "biomedclip", "tiny-test"):
        assert name in BACKBONES
    assert BACKBONES["openai-vit-l-14-336"].quick_gelu and BACKBONES["tiny-test"].random_weights


def test_tiny_backbone_is_frozen_seeded_and_labelled(tiny):
    again = load_backbone("tiny-test")
    assert tiny.label == "tiny-test (random weights)" and tiny.random_weights
    assert not any(p.requires_grad for p in tiny.model.parameters())
    for (name, a), (_, b) in zip(tiny.model.state_dict().items(), again.model.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("name", ["openai-vit-l-14-336", "vit-b-16-plus-240", "pmc-vit-l-14", "ViT-B-16:laion2b_s34b_b88k"])
def test_missing_weights_offline_fail_with_one_line_naming_what_to_download(name, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(WeightsError) as info:
        load_backbone(name)
    message = str(info.value)
    assert "\n" not in message and "offline" in message and ("download" in message)


def test_unknown_names_get_a_suggestion():
    with pytest.raises(WeightsError, match="Did you mean 'openai-vit-l-14-336'"):
        load_backbone("openai-vit-l-14")
    with pytest.raises(WeightsError, match="no pretrained tag"):
        load_backbone("ViT-B-16:no-such-tag")


def _encode(model, seed=0):
    torch.manual_seed(seed)
    image = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        return model.encode_image(image)


@pytest.fixture(scope="module")
def small_clip():
    """A small CLIP with the standard head width 64 (the OpenAI format cannot record head counts)."""
    from open_clip.model import CLIP

    torch.manual_seed(0)
    vision = {"image_size": 224, "layers": 2, "width": 128, "head_width": 64, "patch_size": 14}
    text = {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 2}
    return CLIP(embed_dim=64, vision_cfg=vision, text_cfg=text).eval()


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_local_openai_format_state_dict_infers_the_architecture(small_clip, tmp_path, suffix):
    state = {k: v.clone() for k, v in small_clip.state_dict().items()}
    path = tmp_path / f"clip{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    loaded = load_backbone(str(path), quick_gelu=False)
    assert loaded.arch == "ViT(width=128,layers=2,patch=14)"
    torch.testing.assert_close(_encode(loaded.model), _encode(small_clip), atol=1e-5, rtol=1e-5)


class _Payload:
    def __reduce__(self):
        return (print, ("code ran",))


def test_unsafe_pickles_and_torchscript_are_refused(tmp_path):
    malicious = tmp_path / "evil.pt"
    torch.save({"visual.proj": _Payload()}, malicious)
    with pytest.raises(WeightsError, match="refused"):
        load_backbone(str(malicious))
    scripted = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(scripted))
    with pytest.raises(WeightsError, match="TorchScript"):
        load_backbone(str(scripted))
    with pytest.raises(WeightsError, match="not a CLIP ViT checkpoint"):
        load_backbone(str(scripted), trusted=True)
    text = tmp_path / "notes.pth"
    text.write_text("hello")
    with pytest.raises(WeightsError, match="notes.pth"):
        load_backbone(str(text))


def test_positional_embedding_resize_matches_open_clip(tiny):
    model = load_backbone("tiny-test").model
    state = {"visual.positional_embedding": model.visual.positional_embedding.detach().clone()}
    resize_positional_embedding(model.visual, 240, mode="bicubic", antialias=True)
    assert model.visual.positional_embedding.shape == (1 + 17 * 17, 64)

    class Target:
        class visual:
            grid_size = (17, 17)

    resize_pos_embed(state, Target, interpolation="bicubic", antialias=True)
    torch.testing.assert_close(model.visual.positional_embedding.detach(), state["visual.positional_embedding"])
    with pytest.raises(WeightsError, match="smaller than the backbone's patch size"):
        resize_positional_embedding(model.visual, 8)
