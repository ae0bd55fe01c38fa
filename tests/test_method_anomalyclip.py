"""AnomalyCLIP: learned prompts, DPAM visual tokens, maps/scores, official checkpoints (tiny-test backbone)."""

from __future__ import annotations

import collections

import pytest
import torch

from napari_clip_ad import build_method
from napari_clip_ad.errors import InputError, WeightsError
from napari_clip_ad.methods.anomalyclip import AnomalyCLIP
from napari_clip_ad.methods.anomalyclip_dpam import iter_dpam_blocks
from napari_clip_ad.methods.anomalyclip_prompts import AnomalyCLIPPromptLearner, prompt_sentences
from napari_clip_ad.methods.checkpoints import load_method_weights, save_method_weights

SIZE = 240


@pytest.fixture(scope="module")
def method() -> AnomalyCLIP:
    torch.manual_seed(0)
    return build_method("anomalyclip", "tiny-test", device="cpu")


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def official_checkpoint(method: AnomalyCLIP, seed: int = 5, n_ctx: int | None = None) -> dict:
    """A random checkpoint with the keys, shapes and dtypes train.py saves (``prompt_learner.state_dict()``)."""
    gen = torch.Generator().manual_seed(seed)
    learner = method.prompt_learner
    n_ctx = learner.n_ctx if n_ctx is None else n_ctx
    width = learner.ctx_pos.shape[-1]
    tokens = method.backbone.tokenizer(list(prompt_sentences(n_ctx))).long()
    embedded = method.clip.token_embedding(tokens).detach()
    state = collections.OrderedDict()
    for i in range(learner.depth - 1):
        state[f"compound_prompts_text.{i}"] = torch.randn(learner.t_n_ctx, width, generator=gen) * 0.3
    for i in range(learner.depth - 1):
        state[f"compound_prompt_projections.{i}.weight"] = torch.randn(896, width, generator=gen)
        state[f"compound_prompt_projections.{i}.bias"] = torch.randn(896, generator=gen)
    state["ctx_pos"] = torch.randn(1, 1, n_ctx, width, generator=gen) * 0.3
    state["ctx_neg"] = torch.randn(1, 1, n_ctx, width, generator=gen) * 0.3
    state["token_prefix_pos"] = embedded[0:1, None, :1].clone()
    state["token_suffix_pos"] = embedded[0:1, None, 1 + n_ctx:].clone()
    state["token_prefix_neg"] = embedded[1:2, None, :1].clone()
    state["token_suffix_neg"] = embedded[1:2, None, 1 + n_ctx:].clone()
    state["tokenized_prompts_pos"] = tokens[0:1, None].int().clone()
    state["tokenized_prompts_neg"] = tokens[1:2, None].int().clone()
    return {"prompt_learner": state}


def test_defaults_and_options(method: AnomalyCLIP) -> None:
    assert method.default_backbone == "openai-vit-l-14-336" and method.default_sigma == 4 and method.quick_gelu is True
    # 12-block test backbone: taps 3 6 9 12 and DPAM in the last 10 blocks (official: 6 12 18 24, last 19 of 24).
    assert method.layers == [3, 6, 9, 12] and method.n_dpam == 10
    with pytest.raises(InputError, match="dpam_layer"):
        build_method("anomalyclip", "tiny-test", device="cpu", dpam_layer=14)
    with pytest.raises(InputError, match="n_ctx"):
        build_method("anomalyclip", "tiny-test", device="cpu", n_ctx=80)
    with pytest.raises(InputError, match="object_name"):
        build_method("anomalyclip", "tiny-test", device="cpu", object_name="brain")


def test_prompt_learner_matches_official_state_for_vit_l() -> None:
    learner = AnomalyCLIPPromptLearner(768, n_ctx=12, t_n_ctx=4, depth=9)
    shapes = {k: tuple(v.shape) for k, v in learner.state_dict().items()}
    expected = {"ctx_pos": (1, 1, 12, 768), "ctx_neg": (1, 1, 12, 768)}
    expected.update({f"compound_prompts_text.{i}": (4, 768) for i in range(8)})
    assert shapes == expected
    assert prompt_sentences(12) == ("X X X X X X X X X X X X object.", "X X X X X X X X X X X X damaged object.")


def test_text_features_normalised_and_cached(method: AnomalyCLIP) -> None:
    with torch.no_grad():
        text = method.text_features()
        assert text.shape == (2, 64)
        torch.testing.assert_close(text.norm(dim=-1), torch.ones(2))
        assert method.text_features() is text
    learner = AnomalyCLIPPromptLearner(64)
    learner.attach_tokens(method.clip.token_embedding, method.backbone.tokenizer)
    prompts, tokens, deep = learner()
    assert prompts.shape == (2, 77, 64) and tokens.shape == (2, 77) and len(deep) == 8
    torch.testing.assert_close(prompts[0, 1:13], learner.ctx_pos[0, 0])
    torch.testing.assert_close(prompts[1, 1:13], learner.ctx_neg[0, 0])


def test_text_cache_follows_parameter_updates(images: torch.Tensor) -> None:
    method = build_method("anomalyclip", "tiny-test", device="cpu")
    with torch.no_grad():
        before = method.text_features().clone()
    optimizer = torch.optim.Adam(method.prompt_learner.parameters(), lr=0.1)
    method.train()
    method(images[:1]).maps.mean().backward()
    optimizer.step()
    with torch.no_grad():
        assert not torch.allclose(method.text_features(), before)


def test_deep_prompts_are_rounded_to_fp16(method: AnomalyCLIP) -> None:
    deep = method.prompt_learner.compound_prompts_text[0]
    with torch.no_grad():
        base = method.text_features().clone()
        saved = deep.detach().clone()
        # A relative nudge below fp16 resolution: the official .half() removes it exactly.
        deep.copy_(saved.half().float() * (1 + 1e-5))
        torch.testing.assert_close(method.text_features(), base, rtol=0, atol=0)
        deep.copy_(saved + 0.5)
        assert not torch.allclose(method.text_features(), base)
        deep.copy_(saved)


def test_maps_scores_and_bounds(method: AnomalyCLIP, images: torch.Tensor) -> None:
    out = method.predict(images)
    assert out.maps.shape == (3, SIZE, SIZE) and out.scores.shape == (3,)
    assert out.map_max == 4.0
    unit = out.unit_maps()
    assert 0.0 <= float(unit.min()) and float(unit.max()) <= 1.0
    assert float(out.maps.max()) <= 4.0 and ((out.scores >= 0) & (out.scores <= 1)).all()
    details = method.head_details(method.tap_tokens(images))
    assert details.layer_probs.shape == (3, 4, 2, SIZE, SIZE)
    torch.testing.assert_close(details.layer_probs.sum(dim=2), torch.ones(3, 4, SIZE, SIZE))
    torch.testing.assert_close(details.output.maps, out.maps)
    torch.testing.assert_close(details.image_logits.softmax(-1)[:, 1], out.scores)


def test_batch_composition_invariance(method: AnomalyCLIP, images: torch.Tensor) -> None:
    alone = method.predict(images[1:2])
    batch = method.predict(images)
    torch.testing.assert_close(alone.maps[0], batch.maps[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(alone.scores[0], batch.scores[1], atol=1e-5, rtol=0)


def test_dpam_changes_only_its_blocks(method: AnomalyCLIP, images: torch.Tensor) -> None:
    visual = method.clip.visual
    with torch.no_grad():
        plain = visual.forward_intermediates(
            images[:2], indices=list(range(12)), output_fmt="NLC", output_extra_tokens=True, intermediates_only=True
        )
        streams = list(iter_dpam_blocks(visual, images[:2], method.n_dpam))
    first_dpam = 12 - method.n_dpam + 1
    for index, original, value_stream in streams:
        reference = torch.cat([plain["image_intermediates_prefix"][index - 1], plain["image_intermediates"][index - 1]], dim=1)
        torch.testing.assert_close(original, reference, atol=1e-4, rtol=1e-4)
        if index < first_dpam:
            assert value_stream is None
        else:
            assert value_stream is not None and (value_stream - original).abs().max() > 1e-2
    # V-V stream: previous V-V (or, at the first DPAM block, the block input) + V-V attention of
    # ln_1(original stream), computed by torch's attention with q and k projections set to v's.
    blocks = visual.transformer.resblocks
    with torch.no_grad():
        for index in range(first_dpam, 13):
            block = blocks[index - 1]
            width = block.attn.embed_dim
            vv = torch.nn.MultiheadAttention(width, block.attn.num_heads, batch_first=True)
            vv.in_proj_weight.copy_(block.attn.in_proj_weight[2 * width:].repeat(3, 1))
            vv.in_proj_bias.copy_(block.attn.in_proj_bias[2 * width:].repeat(3))
            vv.out_proj.load_state_dict(block.attn.out_proj.state_dict())
            _, previous, previous_vv = streams[index - 2]
            normed = block.ln_1(previous)
            expected = (previous if previous_vv is None else previous_vv) + vv(normed, normed, normed, need_weights=False)[0]
            torch.testing.assert_close(streams[index - 1][2], expected, atol=1e-4, rtol=1e-4)
    # The image feature is the plain final CLS times proj, without ln_post (official quirk).
    with torch.no_grad():
        feature = method.tap_tokens(images[:2]).image_features
    torch.testing.assert_close(feature, plain["image_intermediates_prefix"][-1][:, 0] @ visual.proj, atol=1e-4, rtol=1e-4)


def test_dpam_layer_one_taps_plain_stream(images: torch.Tensor) -> None:
    method = build_method("anomalyclip", "tiny-test", device="cpu", dpam_layer=1, layers=[4, 12])
    visual = method.clip.visual
    with torch.no_grad():
        plain = visual.forward_intermediates(images[:1], indices=[3, 11], output_fmt="NLC", intermediates_only=True)
        tokens = method.tap_tokens(images[:1]).tokens
    expected = torch.stack([visual.ln_post(t) @ visual.proj for t in plain["image_intermediates"]], dim=1)
    torch.testing.assert_close(tokens, expected, atol=1e-4, rtol=1e-4)


def test_predict_no_grad_forward_grad(method: AnomalyCLIP, images: torch.Tensor) -> None:
    assert not method.predict(images[:1]).maps.requires_grad
    method.prompt_learner.zero_grad()
    out = method(images[:2])
    (out.maps.mean() + out.scores.mean()).backward()
    learner = method.prompt_learner
    for param in (learner.ctx_pos, learner.ctx_neg, learner.compound_prompts_text[0]):
        assert param.grad is not None and param.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in method.clip.named_parameters())
    learner.zero_grad()


def test_official_checkpoint_loads_and_changes_maps(tmp_path, method: AnomalyCLIP, images: torch.Tensor) -> None:
    path = tmp_path / "epoch_15.pth"
    checkpoint = official_checkpoint(method)
    torch.save(checkpoint, path)
    loaded = build_method("anomalyclip", "tiny-test", device="cpu", weights=path)
    torch.testing.assert_close(loaded.prompt_learner.ctx_neg, checkpoint["prompt_learner"]["ctx_neg"])
    torch.testing.assert_close(loaded.prompt_learner.compound_prompts_text[7], checkpoint["prompt_learner"]["compound_prompts_text.7"])
    assert not torch.allclose(loaded.predict(images[:1]).maps, method.predict(images[:1]).maps, atol=1e-3)


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda c: {"trainable_linearlayer": {"fc.0.weight": torch.zeros(64, 64)}}, "not an AnomalyCLIP checkpoint"),
        (lambda c: c["prompt_learner"], "not an AnomalyCLIP checkpoint"),
        (lambda c: {"prompt_learner": {k: v for k, v in c["prompt_learner"].items() if k != "token_suffix_neg"}}, "missing"),
        (lambda c: {"prompt_learner": {**c["prompt_learner"], "ctx_pos": torch.zeros(1, 1, 12, 32)}}, "shape"),
        (lambda c: {"prompt_learner": {**c["prompt_learner"], "compound_prompt_projections.0.bias": torch.zeros(3)}}, "shape"),
        (lambda c: {"prompt_learner": {**c["prompt_learner"], "tokenized_prompts_pos": torch.zeros(1, 1, 77, dtype=torch.int)}}, "token ids"),
    ],
)
def test_mismatched_checkpoints_refused(tmp_path, method: AnomalyCLIP, corrupt, message: str) -> None:
    path = tmp_path / "bad.pth"
    torch.save(corrupt(official_checkpoint(method)), path)
    with pytest.raises(WeightsError, match=message):
        load_method_weights(method, path)


def test_checkpoint_with_other_prompt_length_names_the_option(tmp_path, method: AnomalyCLIP) -> None:
    path = tmp_path / "ctx8.pth"
    torch.save(official_checkpoint(method, n_ctx=8), path)
    with pytest.raises(WeightsError, match="n_ctx=8"):
        load_method_weights(method, path)
    other = build_method("anomalyclip", "tiny-test", device="cpu", n_ctx=8, weights=path)
    assert other.prompt_learner.ctx_pos.shape == (1, 1, 8, 64)


def test_safetensors_round_trip(tmp_path, images: torch.Tensor) -> None:
    trained = build_method("anomalyclip", "tiny-test", device="cpu")
    with torch.no_grad():
        for param in trained.prompt_learner.parameters():
            param.normal_(std=0.3)
    path = save_method_weights(trained, tmp_path / "anomalyclip.safetensors")
    fresh = build_method("anomalyclip", "tiny-test", device="cpu")
    before = fresh.predict(images[:1]).maps
    load_method_weights(fresh, path)
    after = fresh.predict(images[:1])
    torch.testing.assert_close(after.maps, trained.predict(images[:1]).maps)
    assert not torch.allclose(after.maps, before, atol=1e-3)


class _Payload:
    def __reduce__(self):
        return (print, ("this would run",))


def test_unsafe_pickle_refused(tmp_path, method: AnomalyCLIP) -> None:
    path = tmp_path / "unsafe.pth"
    torch.save({"prompt_learner": _Payload()}, path)
    with pytest.raises(WeightsError, match="refused"):
        load_method_weights(method, path)
