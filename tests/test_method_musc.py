"""MuSc on tiny random CLIP (OpenAI file format) and DINOv2: the run, the pool, refusals, LNAMD/RsCIN rules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from napari_clip_ad.backbones.dinov2 import tiny_dinov2_state
from napari_clip_ad.errors import InputError
from napari_clip_ad.methods import build_method
from napari_clip_ad.methods.musc import lnamd, rscin


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory):
    """A small CLIP saved as an OpenAI-format state dict (native 224 px, patch 14, width 128)."""
    from open_clip.model import CLIP

    torch.manual_seed(0)
    vision = {"image_size": 224, "layers": 4, "width": 128, "head_width": 64, "patch_size": 14}
    text = {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 2}
    path = tmp_path_factory.mktemp("clip") / "clip.pt"
    torch.save(CLIP(embed_dim=64, vision_cfg=vision, text_cfg=text).state_dict(), path)
    return path


def _images(n, size=240, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_pool_run_equals_the_run_on_images_plus_pool_and_clears_bitwise(clip_file):
    method = build_method("musc", backbone=str(clip_file), image_size=240, device="cpu", layers=[2, 4])
    x, pool = _images(3, seed=1), _images(4, seed=2)
    alone = method.predict(torch.cat([x, pool]))
    method.set_references(pool)
    assert method.n_references == 4
    with_pool = method.predict(x)
    torch.testing.assert_close(with_pool.maps, alone.maps[:3], atol=1e-6, rtol=0)
    torch.testing.assert_close(with_pool.scores, alone.scores[:3], atol=1e-6, rtol=0)
    method.set_references(None)
    again = method.predict(torch.cat([x, pool]))
    assert torch.equal(again.maps, alone.maps) and torch.equal(again.scores, alone.scores)
    assert alone.maps.shape == (7, 240, 240) and method.default_sigma == 0.0


def test_fewer_than_six_images_are_refused_with_one_line(clip_file):
    method = build_method("musc", backbone=str(clip_file), image_size=240, device="cpu", layers=[4])
    with pytest.raises(InputError, match="at least 6") as info:
        method.predict(_images(5))
    assert "\n" not in str(info.value)


def test_clip_at_another_size_runs_exact_gelu_and_bicubic_positions(clip_file):
    """The official factory rebuilds the model from its JSON config at 240 px: exact GELU, no antialias."""
    from open_clip.transformer import QuickGELU

    method = build_method("musc", backbone=str(clip_file), image_size=240, device="cpu", layers=[4])
    acts = [m.mlp.gelu for m in method.clip.visual.transformer.resblocks]
    assert not any(isinstance(a, QuickGELU) for a in acts) and method.grid == 17
    native = build_method("musc", backbone=str(clip_file), image_size=224, device="cpu", layers=[4])
    assert all(isinstance(m.mlp.gelu, QuickGELU) for m in native.clip.visual.transformer.resblocks)


def test_dinov2_backbone_runs_with_scaled_default_blocks(tmp_path):
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(tiny_dinov2_state(seed=5, depth=4, width=64, grid=8), path)
    method = build_method("musc", backbone=str(path), image_size=112, device="cpu")
    assert method.layers == [1, 2, 3, 4]  # (6, 12, 18, 24) of 24 blocks scaled to 4
    out = method.predict(_images(6, size=112, seed=3))
    assert out.maps.shape == (6, 112, 112) and torch.isfinite(out.scores).all()


def test_lnamd_is_a_padded_mean_after_a_whole_map_layer_norm():
    tokens = torch.randn(2, 1, 25, 8, generator=torch.Generator().manual_seed(0))
    out = lnamd(tokens, 3)
    x = tokens[:, 0].reshape(2, 5, 5, 8).permute(0, 3, 1, 2)
    x = (x - x.mean(dim=(1, 2, 3), keepdim=True)) / torch.sqrt(x.var(dim=(1, 2, 3), unbiased=False, keepdim=True) + 1e-5)
    corner = x[:, :, :2, :2].sum(dim=(2, 3)) / 9  # the zero padding counts in the 3 x 3 mean
    torch.testing.assert_close(out[:, 0, 0], F.normalize(corner, dim=-1), atol=1e-5, rtol=1e-5)


def test_rscin_keeps_the_k_most_similar_neighbours():
    cls = torch.eye(6)
    cls[1] = cls[0]  # images 0 and 1 look alike
    scores = torch.tensor([1.0, 0.0, 0.5, 0.2, 0.7, 0.3])
    out = rscin(scores, cls, k_list=(2,))
    # k=2: each row keeps its two largest similarities; rows 0 and 1 average each other's normalised scores
    assert out[0].item() == pytest.approx(0.5) and out[1].item() == pytest.approx(0.5)
