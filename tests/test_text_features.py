"""Text features: EOT-truncated encoding equals the full context; the disk cache is reused and rebuilt."""

from __future__ import annotations

import pytest
import torch

from napari_clip_ad import build_method
from napari_clip_ad.backbones import load_backbone, set_activation
from napari_clip_ad.methods import text_features as tf
from napari_clip_ad.methods.anomalyclip_prompts import encode_learned_text
from napari_clip_ad.methods.vand_prompts import prompt_sentences


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NAPARI_CLIP_AD_TEXT_CACHE", str(tmp_path / "text-cache"))
    return tmp_path / "text-cache"


@pytest.fixture(scope="module")
def backbone():
    return load_backbone("tiny-test", quick_gelu=False)


def test_truncated_context_equals_full_context(backbone):
    normal, abnormal = prompt_sentences("brain")
    sentences = normal[:20] + abnormal[:20] + ["a", "a much longer sentence about a brain with a damaged region in the middle of it."]
    tokens = backbone.tokenizer(sentences)
    eot = tokens.argmax(dim=-1)
    assert int(eot.max()) + 1 < tokens.shape[1] // 2  # the cut really is a fraction of the context
    with torch.no_grad():
        full = backbone.model.encode_text(tokens)
    truncated = tf.encode_text_truncated(backbone.model, tokens)
    torch.testing.assert_close(truncated, full, rtol=1e-5, atol=1e-5)
    # Any longer cut is the same too; a cut before an EOT is not (the test can fail).
    torch.testing.assert_close(tf.encode_text_truncated(backbone.model, tokens, int(eot.max()) + 7), full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        tf.encode_text_truncated(backbone.model, tokens, int(eot.max()))


def test_anomalyclip_learned_text_truncated_equals_full_context():
    method = build_method("anomalyclip", "tiny-test", device="cpu")
    clip = method.clip
    prompts, tokenized, deep = method.prompt_learner()
    with torch.no_grad():
        got = encode_learned_text(clip, prompts, tokenized, deep)
        # Full 77-token reference: the official loop without the cut.
        x = prompts + clip.positional_embedding.to(prompts.dtype)
        for index, block in enumerate(clip.transformer.resblocks):
            if 0 < index <= len(deep):
                context = deep[index - 1].half().float().unsqueeze(0).expand(x.shape[0], -1, -1)
                x = torch.cat([x[:, :1], context, x[:, 1 + context.shape[1]:]], dim=1)
            x = block(x, attn_mask=clip.attn_mask)
        x = clip.ln_final(x)[torch.arange(2), tokenized.argmax(dim=-1)] @ clip.text_projection
    torch.testing.assert_close(got, x, rtol=1e-5, atol=1e-5)


def test_cache_reused_by_a_new_model_without_encoding(cache_dir):
    first = build_method("vand", "tiny-test", device="cpu")
    expected = first.text_features().clone()
    files = list(cache_dir.glob("vand-*.safetensors"))
    assert len(files) == 1
    second = build_method("vand", "tiny-test", device="cpu")

    def no_encoding(*args, **kwargs):
        raise AssertionError("the text tower ran although the features were cached")

    second.clip.transformer.forward = no_encoding
    torch.testing.assert_close(second.text_features(), expected, rtol=0, atol=0)


def test_corrupt_entry_is_rebuilt(cache_dir):
    expected = build_method("winclip", "tiny-test", device="cpu").text_features.clone()
    (path,) = cache_dir.glob("winclip-*.safetensors")
    path.write_bytes(path.read_bytes()[:100])  # truncated file
    again = build_method("winclip", "tiny-test", device="cpu").text_features
    torch.testing.assert_close(again, expected, rtol=0, atol=0)
    assert tf._load(path, tf._entry_key(build_method("winclip", "tiny-test", device="cpu").clip, "winclip",
                                       {"normal": [], "anomalous": []}), None) is None  # other payload: other key
    calls = []

    def compute():
        calls.append(1)
        return {"text": expected}

    clip = build_method("winclip", "tiny-test", device="cpu").clip
    from napari_clip_ad.methods.winclip_prompts import compositional_prompts

    normal, anomalous = compositional_prompts("brain")
    got = tf.cached_text_features(clip, "winclip", {"normal": normal, "anomalous": anomalous}, compute)
    assert calls == [] and torch.equal(got["text"], expected)  # the rebuilt file is valid and reused


def test_key_depends_on_weights_and_activation():
    a = load_backbone("tiny-test", quick_gelu=False).model
    b = load_backbone("tiny-test", quick_gelu=False).model
    assert tf.text_tower_hash(a) == tf.text_tower_hash(b)
    set_activation(b, True)
    tf._TOWER_HASHES.pop(b)
    assert tf.text_tower_hash(a) != tf.text_tower_hash(b)
    c = load_backbone("tiny-test", quick_gelu=False).model
    with torch.no_grad():
        c.ln_final.weight[0] += 1e-3
    assert tf.text_tower_hash(a) != tf.text_tower_hash(c)
    d = load_backbone("tiny-test", quick_gelu=False).model
    with torch.no_grad():
        d.visual.proj[0, 0] += 1.0  # the visual tower does not change text features
    assert tf.text_tower_hash(a) == tf.text_tower_hash(d)


def test_cache_can_be_switched_off(monkeypatch, cache_dir):
    monkeypatch.setenv("NAPARI_CLIP_AD_TEXT_CACHE", "off")
    build_method("vand", "tiny-test", device="cpu").text_features()
    assert not cache_dir.exists()
