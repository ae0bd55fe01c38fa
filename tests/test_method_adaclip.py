"""AdaCLIP: shapes, batch invariance (with HSF), official quirks and checkpoint formats (tiny backbone)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_clip_ad import build_method
from napari_clip_ad.backbones import load_backbone
from napari_clip_ad.errors import InputError, WeightsError
from napari_clip_ad.methods.adaclip_hsf import hybrid_semantic_fusion
from napari_clip_ad.methods.adaclip_prompts import ProjectLayer, PromptLayer, encode_prompted_text, prompt_sentences
from napari_clip_ad.methods.checkpoints import load_method_weights, save_method_weights

SIZE = 240


def make(**options):
    torch.manual_seed(0)
    return build_method("adaclip", "tiny-test", device="cpu", image_size=options.pop("image_size", SIZE), **options)


def images(batch: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def official_checkpoint(width=64, embed=64, n_layers=3, depth=4, length=5, seed=3) -> dict[str, torch.Tensor]:
    """Keys and shapes as AdaCLIP's train.py saves them (text_channel = embed_dim there)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return 0.05 * torch.randn(*shape, generator=g)

    state = {}
    for i in range(depth):
        state[f"clip_model.text_prompter.static_prompts.{i}"] = rand(length, embed)
        state[f"clip_model.visual_prompter.static_prompts.{i}"] = rand(length, width)
    for name, n, d_in, d_out in (
        ("patch_token_layer", n_layers, width, embed), ("cls_token_layer", 1, embed, embed),
        ("dynamic_visual_prompt_generator", length, embed, width), ("dynamic_text_prompt_generator", length, embed, embed),
    ):
        for i in range(n):
            state[f"clip_model.{name}.head.{i}.weight"] = rand(d_out, d_in)
            state[f"clip_model.{name}.head.{i}.bias"] = rand(d_out)
    return state


@pytest.fixture(scope="module")
def method():
    return make()


def test_defaults_shapes_and_unit_maps(method):
    assert method.layers == [3, 6, 9] and method.default_sigma == 4.0 and method.quick_gelu is False
    out = method.predict(images(2))
    assert out.maps.shape == (2, SIZE, SIZE) and out.scores.shape == (2,)
    unit = out.unit_maps()
    assert float(unit.min()) >= 0.0 and float(unit.max()) <= 1.0 and out.map_max == 1.0
    assert torch.isfinite(out.scores).all() and ((out.scores >= 0) & (out.scores <= 1)).all()


def test_text_features_per_image_and_normalised(method):
    with torch.no_grad():
        plain = method.plain_image_features(images(2))
        dynamic = method.dynamic_text_prompt_generator.stacked(plain)
        text = method.text_features(dynamic, 2)
    assert text.shape == (2, 64, 2)
    assert torch.allclose(text.norm(dim=1), torch.ones(2, 2), atol=1e-5)
    assert not torch.allclose(text[0], text[1])  # dynamic prompts depend on the image
    normal, abnormal = prompt_sentences("brain")
    assert (len(normal), len(abnormal)) == (28, 20) and normal[0] == "a bad photo of a brain."


def test_batch_composition_invariance_with_hsf(method):
    x = images(3, seed=5)
    batched = method.predict(x)
    for i in range(3):
        alone = method.predict(x[i : i + 1])
        assert torch.allclose(alone.maps[0], batched.maps[i], atol=1e-5)
        assert abs(float(alone.scores[0]) - float(batched.scores[i])) <= 1e-5


def test_hsf_is_seeded_not_global_rng(method):
    x = images(1, seed=7)
    np.random.seed(1)
    first = method.predict(x).scores
    np.random.seed(12345)
    assert torch.equal(first, method.predict(x).scores)


def test_hsf_changes_scores_only():
    with_hsf, without = make(), make(use_hsf=False)
    without.load_trainable_state(with_hsf.trainable_state_dict(), "test")
    x = images(1, seed=2)
    a, b = with_hsf.predict(x), without.predict(x)
    assert torch.allclose(a.maps, b.maps, atol=1e-6) and not torch.allclose(a.scores, b.scores)


def test_hsf_fused_feature_is_mean_of_cluster_centres():
    torch.manual_seed(0)
    tokens = [F.normalize(torch.randn(1, 30, 8), dim=-1) for _ in range(2)]
    logits = [torch.randn(1, 30, 2) for _ in range(2)]
    fused = hybrid_semantic_fusion(tokens, logits, k_clusters=3)
    # k_top = min(30, 15): the 15 most abnormal patches; 3 clusters; the result is a unit vector.
    assert fused.shape == (1, 8) and torch.allclose(fused.norm(dim=1), torch.ones(1))


def test_prompts_rounded_to_fp16_before_use():
    static = make(prompting_type="S")  # context = static prompt alone, so its rounding is visible
    x = images(1, seed=4)
    state = static.trainable_state_dict()
    base = static.predict(x).maps
    static.load_trainable_state({k: v.half().float() if "static_prompts" in k else v for k, v in state.items()}, "t")
    assert torch.equal(static.predict(x).maps, base)
    static.load_trainable_state({k: v + 1e-3 if "visual_prompter" in k else v for k, v in state.items()}, "t")
    assert not torch.equal(static.predict(x).maps, base)


def test_text_block0_prompt_unused_visual_block0_used(method):
    x = images(1, seed=4)
    state = {k: v.clone() for k, v in method.trainable_state_dict().items()}
    try:
        base = method.predict(x).maps
        method.load_trainable_state({**state, "text_prompter.static_prompts.0": torch.randn(5, 64)}, "t")
        assert torch.equal(method.predict(x).maps, base)  # official: text block 0 gets no prompt
        method.load_trainable_state({**state, "visual_prompter.static_prompts.0": torch.randn(5, 64)}, "t")
        assert not torch.allclose(method.predict(x).maps, base)
    finally:
        method.load_trainable_state(state, "restore")


def test_text_cut_after_end_token_equals_full_context(method):
    clip = method.clip
    tokens = method.backbone.tokenizer(prompt_sentences("brain")[1][:3])
    contexts = (0.1 * torch.randn(2, 4, 5, 64)).half()
    with torch.no_grad():
        ours = encode_prompted_text(clip, tokens, contexts)
        full = []
        for g in range(2):
            x = clip.token_embedding(tokens) + clip.positional_embedding
            for i, block in enumerate(clip.transformer.resblocks):
                if 1 <= i < 4:
                    x = torch.cat([x[:, :1], contexts[g, i].float().expand(3, -1, -1), x[:, 6:]], dim=1)
                x = block(x, attn_mask=clip.attn_mask)
            full.append(clip.ln_final(x[torch.arange(3), tokens.argmax(-1)]) @ clip.text_projection)
    assert torch.allclose(ours, torch.stack(full), atol=1e-5)


def test_positional_embedding_bicubic_without_antialias(method):
    original = load_backbone("tiny-test").model.visual.positional_embedding.detach()
    grid = original[1:].reshape(1, 16, 16, -1).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(17, 17), mode="bicubic", align_corners=False, antialias=False)
    expected = torch.cat([original[:1], expected.permute(0, 2, 3, 1).reshape(289, -1)])
    assert torch.allclose(method.clip.visual.positional_embedding, expected, atol=1e-6)


def test_vit_l_part_shapes_follow_the_official_formula():
    width, embed, depth, length = 1024, 768, 4, 5
    expected = {k[len("clip_model."):]: tuple(v.shape) for k, v in official_checkpoint(width, embed, 4, depth, length).items()}
    parts = {
        "text_prompter": PromptLayer(embed, length, depth, "SD", True),
        "visual_prompter": PromptLayer(width, length, depth, "SD", True),
        "patch_token_layer": ProjectLayer(width, embed, 4), "cls_token_layer": ProjectLayer(embed, embed, 1),
        "dynamic_visual_prompt_generator": ProjectLayer(embed, width, length),
        "dynamic_text_prompt_generator": ProjectLayer(embed, embed, length),
    }
    ours = {f"{p}.{k}": tuple(v.shape) for p, m in parts.items() for k, v in m.state_dict().items()}
    assert ours == expected


def test_predict_no_grad_forward_grad(method):
    assert not method.predict(images(1)).maps.requires_grad
    out = method(images(1))
    (out.maps.mean() + out.scores.sum()).backward()
    grads = {name: p.grad for name, p in method.named_parameters()}
    try:
        for part in ("visual_prompter.static_prompts.0", "text_prompter.static_prompts.1", "patch_token_layer.head.0.weight",
                     "cls_token_layer.head.0.weight", "dynamic_visual_prompt_generator.head.0.weight",
                     "dynamic_text_prompt_generator.head.4.weight"):
            assert grads[part] is not None and grads[part].abs().sum() > 0, part
        assert all(p.grad is None for p in method.clip.parameters())
    finally:
        method.zero_grad(set_to_none=True)


def test_official_checkpoint_loads_and_changes_maps(tmp_path):
    path = tmp_path / "pretrained_test.pth"
    state = official_checkpoint()
    torch.save(state, path)
    fresh = make()
    before = fresh.predict(images(1)).maps
    loaded = make(weights=path)
    assert torch.equal(loaded.trainable_state_dict()["patch_token_layer.head.2.weight"], state["clip_model.patch_token_layer.head.2.weight"])
    assert not torch.allclose(loaded.predict(images(1)).maps, before)


@pytest.mark.parametrize(
    "state, message",
    [
        (official_checkpoint(width=1024, embed=768), "shape"),
        (official_checkpoint(depth=3), "prompting_depth"),
        ({"trainable_linearlayer": {"fc.0.weight": torch.zeros(64, 64)}}, "AdaCLIP"),
        ({"prompt_learner.ctx_pos": torch.zeros(1, 1, 12, 64)}, "another method"),
    ],
)
def test_mismatched_checkpoints_refused(tmp_path, state, message):
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError, match=message):
        make(weights=path)


def test_released_four_head_checkpoint_loads_as_published(tmp_path):
    """Issue 13 item 8: the released AdaCLIP weights (4 heads) load without naming layers."""
    path = tmp_path / "pretrained_all.pth"
    torch.save(official_checkpoint(n_layers=4), path)
    loaded = make(weights=path)
    n_blocks = len(loaded.clip.visual.transformer.resblocks)
    step = n_blocks // 4  # official test.py: substage = n_layers // 4; features_list = substage x (1, 2, 3, 4)
    assert loaded.layers == [step, 2 * step, 3 * step, 4 * step]
    assert "4 per-layer heads" in loaded.describe()["layers_from"]
    explicit = make(weights=path, layers=[step, 2 * step, 3 * step, 4 * step])
    x = images(2, seed=5)
    assert torch.equal(explicit.predict(x).maps, loaded.predict(x).maps)
    with pytest.raises(WeightsError, match="4 patch-token heads but the method taps 3 blocks"):
        make(weights=path, layers=[3, 6, 9])


def test_our_file_records_its_layers(tmp_path):
    method = make(layers=[2, 5, 7, 11])
    path = save_method_weights(method, tmp_path / "adaclip4.safetensors")
    again = make(weights=path)
    assert again.layers == [2, 5, 7, 11] and "header" in again.describe()["layers_from"]


def test_branch_type_mismatch_refused(tmp_path):
    path = tmp_path / "static_only.pth"
    torch.save({k: v for k, v in official_checkpoint().items() if "dynamic" not in k}, path)
    with pytest.raises(WeightsError, match="prompting_type"):
        make(weights=path)
    assert make(prompting_type="S", weights=path).predict(images(1)).maps.shape == (1, SIZE, SIZE)


def test_safetensors_round_trip(tmp_path, method):
    path = save_method_weights(method, tmp_path / "adaclip.safetensors")
    other = make(prompting_depth=4)
    torch.manual_seed(9)
    for p in other.parameters():
        if p.requires_grad:
            p.data.normal_()
    load_method_weights(other, path)
    x = images(1, seed=8)
    assert torch.allclose(other.predict(x).maps, method.predict(x).maps, atol=1e-6)


class _Payload:
    def __reduce__(self):
        return (print, ("never run",))


def test_unsafe_pickle_refused(tmp_path):
    path = tmp_path / "evil.pth"
    with path.open("wb") as handle:
        pickle.dump({"clip_model.cls_token_layer.head.0.weight": _Payload()}, handle)
    with pytest.raises(WeightsError, match="refused|not a readable"):
        make(weights=path)


@pytest.mark.parametrize(
    "options",
    [{"prompting_branch": "X"}, {"prompting_type": "Q"}, {"prompting_branch": "VL", "prompting_type": ""},
     {"prompting_depth": 0}, {"k_clusters": 1000}, {"layers": [3, 3]}, {"use_hsf": "maybe"}],
)
def test_invalid_options_refused(options):
    with pytest.raises(InputError):
        make(**options)
