"""Speed paths keep results: bf16 precision, AdaCLIP's torch HSF, AnoVL's batched views, fp32 smoothing."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_clip_ad import build_method, run_volume
from napari_clip_ad.errors import InputError
from napari_clip_ad.methods import anovl as anovl_module
from napari_clip_ad.methods import precision as precision_module
from napari_clip_ad.methods.adaclip_hsf import cluster_labels, hybrid_semantic_fusion
from napari_clip_ad.methods.adaclip_kmeans import kmeans_labels
from napari_clip_ad.methods.anovl_attention import dual_attention, encode_visual
from napari_clip_ad.methods.anovl_tta import augment_views, state_probabilities

SIZE = 240
BF16_MAP_BOUND = 0.05
"""Documented bound (docs/benchmarks.md, Precision): max |bf16 - fp32| of a [0, 1] map, tiny backbone."""
BF16_SCORE_BOUND = {"adaclip": 0.05}
"""Max |bf16 - fp32| image score: 0.02, AdaCLIP 0.05 (its HSF k-means is discontinuous in the tokens)."""


@pytest.fixture(scope="module")
def real_crop(shared_data):
    """Two axial t2w slices through the tumour of a real BraTS 2023 case."""
    from napari_clip_ad.io import load_case

    case = load_case(shared_data / "brats2023" / "BraTS-GLI-00002-000", modalities=["t2w"])
    z = int(np.argmax(case.whole_tumour.sum(axis=(1, 2))))
    return case.images["t2w"][z - 1 : z + 1].copy()


def images(batch: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


# --- precision -------------------------------------------------------------------------------
def test_precision_rules_and_provenance():
    method = build_method("vand", "tiny-test", device="cpu", precision="auto")
    assert method.precision == "fp32"  # width 64: auto never picks bf16 for the tiny backbone
    assert method.describe()["precision"] == "fp32"
    wide = SimpleNamespace(transformer=SimpleNamespace(width=1024))
    cpu = torch.device("cpu")
    expected = "bf16" if precision_module.cpu_bf16_supported() else "fp32"
    assert precision_module.resolve_precision("auto", cpu, wide) == expected
    assert precision_module.resolve_precision(None, cpu, wide) == "fp32"
    assert precision_module.resolve_precision("fp32", cpu, wide) == "fp32"
    with pytest.raises(InputError, match="precision 'fp8'"):
        build_method("vand", "tiny-test", device="cpu", precision="fp8")


@pytest.mark.parametrize("name", ["vand", "anomalyclip", "winclip", "adaclip", "anovl"])
def test_bf16_close_to_fp32_with_bf16_weights_and_fp32_heads(name, real_crop):
    volume = real_crop
    reference = run_volume(volume, build_method(name, "tiny-test", device="cpu"), batch_size=2)
    method = build_method(name, "tiny-test", device="cpu", precision="bf16")
    visual_dtypes = {p.dtype for p in method.clip.visual.parameters()}
    assert visual_dtypes == {torch.bfloat16}  # cast once at build, not per batch
    assert {p.dtype for n, p in method.clip.named_parameters() if not n.startswith("visual.")} == {torch.float32}
    assert all(p.dtype == torch.float32 for part in method.trainable_parts().values() for p in part.parameters())
    got = run_volume(volume, method, batch_size=2)
    assert got.info["precision"] == "bf16" and got.anomaly_map.dtype == np.float32
    assert np.abs(got.anomaly_map - reference.anomaly_map).max() <= BF16_MAP_BOUND
    assert np.abs(got.scores - reference.scores).max() <= BF16_SCORE_BOUND.get(name, 0.02)
    assert np.abs(got.anomaly_map - reference.anomaly_map).max() > 0  # it really ran in bf16
    with pytest.raises(InputError, match="rebuild"):
        run_volume(volume, method, precision="fp32")


# --- AdaCLIP HSF -------------------------------------------------------------------------------
def test_torch_kmeans_matches_scikit_learn_labels():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(6, 25, 96, generator=g)
    data = centres[:, torch.randint(0, 25, (100,), generator=g)] + 0.5 * torch.randn(6, 100, 96, generator=g)
    data = F.normalize(data, dim=-1)
    labels, fallback = kmeans_labels(data, 20)
    assert not fallback.any()
    for b in range(6):
        np.testing.assert_array_equal(labels[b].numpy(), cluster_labels(data[b].numpy(), 20))


def test_fast_hsf_scores_match_scikit_learn_path():
    exact = build_method("adaclip", "tiny-test", device="cpu", hsf="exact")
    fast = build_method("adaclip", "tiny-test", device="cpu", hsf="fast")
    assert exact.config["hsf"] == "exact" and fast.describe()["options"]["hsf"] == "fast"
    assert type(fast).options["hsf"] == "fast"  # the default: it matched scikit-learn on every measured slice
    batch = images(4, seed=3)
    a, b = exact.predict(batch), fast.predict(batch)
    assert torch.allclose(a.scores, b.scores, atol=1e-4)
    assert torch.equal(a.maps, b.maps)  # HSF touches the image score only
    g = torch.Generator().manual_seed(1)
    tokens = [F.normalize(torch.randn(3, 289, 64, generator=g), dim=-1) for _ in range(3)]
    logits = [100 * t @ F.normalize(torch.randn(64, 2, generator=g), dim=0) for t in tokens]
    torch.testing.assert_close(hybrid_semantic_fusion(tokens, logits, 20, "fast"), hybrid_semantic_fusion(tokens, logits, 20, "exact"),
                               rtol=0, atol=1e-5)
    with pytest.raises(InputError, match="hsf"):
        build_method("adaclip", "tiny-test", device="cpu", hsf="approximate")


# --- AnoVL -------------------------------------------------------------------------------------
def test_anovl_sdpa_attention_equals_the_explicit_formula():
    method = build_method("anovl", "tiny-test", device="cpu")
    block = method.clip.visual.transformer.resblocks[0]
    x = torch.randn(2, 10, 64, generator=torch.Generator().manual_seed(0))
    original, vv = dual_attention(block, x)
    attn = block.attn
    q, k, v = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).reshape(2, 10, 3, 4, 16).permute(2, 0, 3, 1, 4).unbind(0)

    def explicit(a, b):
        weights = torch.exp((a @ b.transpose(-2, -1)) * 16 ** -0.5)
        weights = weights / weights.sum(-1, keepdim=True)  # official: exp / sum, scale after the product
        return attn.out_proj((weights @ v).transpose(1, 2).reshape(2, 10, 64))

    torch.testing.assert_close(original, explicit(q, k), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(vv, explicit(v, v), rtol=1e-5, atol=1e-6)


def test_anovl_batched_views_equal_per_slice_views(monkeypatch):
    method = build_method("anovl", "tiny-test", device="cpu")
    batch = images(3, seed=4)
    text, _ = method.text_features()
    per_slice = []
    with torch.no_grad():
        for image in batch.split(1):  # the former path: 22 views of one slice, the original run again
            views = augment_views(image, torch.Generator().manual_seed(method.seed))
            features = encode_visual(method.clip.visual, views, value_value=False).image_features
            per_slice.append(state_probabilities(features, text)[:, 1].mean())
    per_slice = torch.stack(per_slice)
    monkeypatch.setattr(anovl_module, "MAX_VIEWS_PER_FORWARD", 5)  # several chunks, split inside slices
    batched = method.predict(batch)
    torch.testing.assert_close(batched.scores, per_slice, rtol=0, atol=1e-6)
    for i in range(3):
        alone = method.predict(batch[i : i + 1])
        torch.testing.assert_close(alone.maps[0], batched.maps[i], rtol=0, atol=1e-6)
        torch.testing.assert_close(alone.scores[0], batched.scores[i], rtol=0, atol=1e-6)


# --- smoothing ---------------------------------------------------------------------------------
def test_fp32_smoothing_agrees_with_float64():
    from napari_clip_ad.methods import smooth_maps

    maps = torch.rand(4, 64, 60, generator=torch.Generator().manual_seed(0))
    fp32 = smooth_maps(maps, 4.0)
    fp64 = smooth_maps(maps.double(), 4.0)
    assert fp32.dtype == torch.float32 and fp64.dtype == torch.float64
    assert float((fp32.double() - fp64).abs().max()) < 1e-6


# --- engine ------------------------------------------------------------------------------------
def test_engine_sets_eval_once_and_restores_the_mode(real_crop):
    method = build_method("vand", "tiny-test", device="cpu")
    expected = run_volume(real_crop, method, batch_size=1)
    method.train()
    got = run_volume(real_crop, method, batch_size="auto")  # 'auto' on the CPU: the CPU default batch
    assert method.training  # restored after the volume
    np.testing.assert_array_equal(got.anomaly_map, expected.anomaly_map)
    assert got.info["batch_size"] == 8
    with pytest.raises(InputError, match="batch size"):
        run_volume(real_crop, method, batch_size="large")
