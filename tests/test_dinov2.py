"""DINOv2 backbones: official torch-hub layout from shapes, timm layout, sizes, offline errors, refusals."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from napari_clip_ad.backbones import BACKBONES, load_backbone
from napari_clip_ad.backbones.dinov2 import (
    dinov2_features,
    official_patch_pos_embed,
    set_dinov2_image_size,
    tiny_dinov2_state,
)
from napari_clip_ad.errors import InputError, WeightsError
from napari_clip_ad.methods import build_method


@pytest.fixture(scope="module")
def hub_file(tmp_path_factory):
    """A tiny random DINOv2 saved exactly as Meta's torch-hub files are: a plain state dict pickle."""
    path = tmp_path_factory.mktemp("dino") / "dinov2_vits14_pretrain.pth"
    torch.save(tiny_dinov2_state(seed=1, depth=3, width=128, grid=16), path)
    return path


def test_registry_has_every_dinov2_name():
    for size in "sblg":
        for reg in ("", "-reg"):
            assert BACKBONES[f"dinov2-vit{size}14{reg}"].family == "dinov2"
    assert BACKBONES["tiny-dinov2"].random_weights


def test_official_file_loads_with_architecture_from_shapes(hub_file):
    backbone = load_backbone(str(hub_file))
    assert backbone.info["family"] == "dinov2" and backbone.info["layout"] == "official torch-hub"
    assert backbone.arch == "DINOv2 ViT(width=128,depth=3,patch=14)"
    assert backbone.model.blocks[0].attn.num_heads == 2  # width // 64
    assert backbone.mean == (0.485, 0.456, 0.406) and not any(p.requires_grad for p in backbone.model.parameters())


@pytest.mark.parametrize("registers", [0, 4])
def test_timm_layout_of_the_same_weights_gives_the_same_features(tmp_path, registers):
    """timm's converted checkpoints (HF cache) and Meta's files are two layouts of one model."""
    from safetensors.torch import save_file

    from napari_clip_ad.backbones.dinov2 import _to_timm_layout

    state = tiny_dinov2_state(seed=2, registers=registers, depth=2, width=64, grid=8)
    torch.save(state, tmp_path / "hub.pth")
    save_file({k: v.contiguous() for k, v in _to_timm_layout(state)[0].items()}, str(tmp_path / "timm.safetensors"))
    a, b = load_backbone(str(tmp_path / "hub.pth")), load_backbone(str(tmp_path / "timm.safetensors"))
    x = torch.randn(2, 3, 154, 154)
    for bb in (a, b):
        set_dinov2_image_size(bb.model, bb.info, 154)
    with torch.no_grad():
        fa, ca = dinov2_features(a.model, x, [1, 2], need_cls=True)
        fb, cb = dinov2_features(b.model, x, [1, 2], need_cls=True)
    for u, v in zip(fa + [ca], fb + [cb]):
        torch.testing.assert_close(u, v, atol=1e-5, rtol=1e-5)
    assert fa[0].shape == (2, 121, 64)  # 11 x 11 patches, CLS and registers dropped


def test_positional_embedding_follows_the_official_offset_quirk(hub_file):
    """Plain models: scale_factor (g + 0.1) / M, no antialias; -reg models: output size with antialias."""
    backbone = load_backbone(str(hub_file))
    native = backbone.model.native_pos_embed.clone()
    assert set_dinov2_image_size(backbone.model, backbone.info, 224) == 16
    assert torch.equal(backbone.model.pos_embed, native)  # native grid: unchanged, as the official code
    set_dinov2_image_size(backbone.model, backbone.info, 448)
    rows = native[:, 1:].reshape(1, 16, 16, -1).permute(0, 3, 1, 2)
    quirk = F.interpolate(rows, scale_factor=(32.1 / 16, 32.1 / 16), mode="bicubic", antialias=False)
    by_size = F.interpolate(rows, size=(32, 32), mode="bicubic", antialias=False)
    got = backbone.model.pos_embed[:, 1:].reshape(1, 32, 32, -1).permute(0, 3, 1, 2)
    assert torch.equal(got, quirk) and not torch.allclose(got, by_size)
    with_aa = official_patch_pos_embed(native[:, 1:], 32, antialias=True, offset=0.0)
    assert torch.equal(with_aa.reshape(1, 32, 32, -1).permute(0, 3, 1, 2), F.interpolate(rows, size=(32, 32), mode="bicubic", antialias=True))


def test_sizes_that_are_not_multiples_of_14_are_refused_with_one_line(hub_file):
    with pytest.raises(InputError, match="multiple of the DINOv2 patch size 14") as info:
        build_method("anomalydino", backbone=str(hub_file), image_size=240, device="cpu")
    assert "\n" not in str(info.value)


def test_any_block_can_be_tapped(hub_file):
    method = build_method("anomalydino", backbone=str(hub_file), image_size=224, device="cpu", layers=[2])
    assert method.layers == [2]
    with pytest.raises(InputError, match="blocks 1..3"):
        build_method("anomalydino", backbone=str(hub_file), image_size=224, device="cpu", layers=[4])


def test_missing_named_weights_offline_fail_with_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(WeightsError) as info:
        load_backbone("dinov2-vitb14-reg")
    message = str(info.value)
    assert "\n" not in message and "offline" in message and "timm/vit_base_patch14_reg4_dinov2.lvd142m" in message


def test_torch_hub_cache_file_is_used_for_the_registry_name(monkeypatch, tmp_path):
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(tiny_dinov2_state(seed=3, depth=2, width=64, grid=8), tmp_path / "hub" / "checkpoints" / "dinov2_vits14_pretrain.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    backbone = load_backbone("dinov2-vits14")
    assert backbone.info["depth"] == 2 and backbone.source.endswith("dinov2_vits14_pretrain.pth") and not backbone.random_weights


def test_text_prompted_methods_refuse_dinov2_with_one_line(hub_file):
    with pytest.raises(InputError, match="needs a CLIP backbone with a text tower") as info:
        build_method("vand", backbone=str(hub_file), device="cpu")
    assert "\n" not in str(info.value)


def test_pickles_that_would_run_code_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save({"model": Evil()}, path)
    with pytest.raises(WeightsError, match="refused"):
        load_backbone(str(path))


def test_tiny_random_backbone_is_seeded_and_labelled():
    a, b = load_backbone("tiny-dinov2"), load_backbone("tiny-dinov2")
    assert a.label == "tiny-dinov2 (random weights)" and a.info["native_grid"] == 16
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))
    assert math.isclose(len(a.model.blocks), 12)
