"""BiomedCLIP (timm ViT trunk + HF BERT text tower) under every CLIP method, on a tiny random model (random weights).

``tiny-biomedclip`` is open_clip's own ``CustomTextCLIP`` (``TimmModel`` + ``HFTextEncoder``) at toy size,
built offline from a small local vocabulary; the real ``biomedclip`` differs only in sizes and weights.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

from napari_clip_ad.backbones import load_backbone  # noqa: E402
from napari_clip_ad.backbones.availability import backbone_availability  # noqa: E402
from napari_clip_ad.backbones.biomedclip import (  # noqa: E402
    BIOMEDBERT_HUB, BIOMEDCLIP_CONFIG, BIOMEDCLIP_HUB, TINY_BIOMEDCLIP_CONFIG, convert_timm_visual, register_tiny_biomedclip,
)
from napari_clip_ad.backbones.hf_text import encode_hf_text, hf_word_embedding, replace_slots  # noqa: E402
from napari_clip_ad.errors import WeightsError  # noqa: E402
from napari_clip_ad.methods import build_method, list_methods, method_class  # noqa: E402
from napari_clip_ad.methods.text_features import encode_sentences  # noqa: E402

CLIP_METHODS = [n for n in list_methods() if method_class(n).needs_backbone and not method_class(n).vision_only]
SENTENCES = ["a photo of a damaged brain.", "x x x x object.", "a cropped photo of the flawless brain without defect."]


def _open_clip_tiny() -> nn.Module:
    """open_clip's own tiny BiomedCLIP-layout model (TimmModel image tower, unconverted), seeded."""
    import open_clip

    register_tiny_biomedclip()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = open_clip.create_model("tiny-biomedclip", pretrained=None, pretrained_text=False).eval()
    for parameter in model.parameters():  # random LayerNorm affine and biases, so no mapping error hides behind 1/0
        if parameter.dim() == 1:
            parameter.data.normal_(0.0, 0.5).add_(1.0)
    return model


@pytest.fixture(scope="module")
def reference() -> nn.Module:
    return _open_clip_tiny()


@pytest.fixture(scope="module")
def tiny():
    return load_backbone("tiny-biomedclip")


def test_converted_trunk_equals_open_clips_timm_tower(reference):
    state = torch.random.get_rng_state()
    visual = convert_timm_visual(reference.visual)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is untouched
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = reference.encode_image(images)
        got = visual(images)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        blocks = [2, 5, 11]
        theirs = reference.visual.forward_intermediates(images, indices=blocks, output_fmt="NLC", intermediates_only=True)
        ours = visual.forward_intermediates(images, indices=blocks, output_fmt="NLC", intermediates_only=True)
    for a, b in zip(ours["image_intermediates"], theirs["image_intermediates"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert isinstance(visual.ln_pre, nn.Identity) and visual.ln_post.eps == 1e-6 and visual.conv1.bias is not None


def test_conversion_is_exact_on_biomedclips_own_architecture():
    """The published config (timm vit_base_patch16_224, pool '', linear head), random weights: one image."""
    from open_clip.model import _build_vision_tower

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        tower = _build_vision_tower(BIOMEDCLIP_CONFIG["embed_dim"], dict(BIOMEDCLIP_CONFIG["vision_cfg"])).eval()
    visual = convert_timm_visual(tower)
    image = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(visual(image), tower(image), atol=1e-5, rtol=1e-4)
    assert visual.proj.shape == (768, 512) and len(visual.transformer.resblocks) == 12


def test_other_timm_trunks_are_refused_by_name(reference):
    import copy

    changed = copy.deepcopy(reference.visual)
    changed.trunk.global_pool = "avg"
    with pytest.raises(WeightsError, match="global_pool 'avg'"):
        convert_timm_visual(changed)


def test_text_features_truncated_equal_open_clips_encode_text(reference):
    tokens = _tokenizer()(SENTENCES)
    assert tokens.shape[1] == 256  # BiomedCLIP's context, padded
    with torch.no_grad():
        full = reference.encode_text(tokens)
        torch.testing.assert_close(encode_hf_text(reference, tokens), full, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(encode_sentences(reference, _tokenizer(), SENTENCES), full, atol=1e-5, rtol=1e-5)
        # Word embeddings passed in (the learned-context path) give the same feature as the ids.
        embedded = hf_word_embedding(reference)(tokens)
        torch.testing.assert_close(encode_hf_text(reference, tokens, inputs_embeds=embedded), full, atol=1e-5, rtol=1e-5)


def test_deep_prompts_replace_the_hidden_states_entering_a_layer(reference):
    tokens = _tokenizer()(SENTENCES[1:2])
    with torch.no_grad():
        plain = reference.encode_text(tokens)
        hidden = reference.text.transformer(input_ids=tokens[:, :8], attention_mask=(tokens[:, :8] != 0).long(),
                                            output_hidden_states=True).hidden_states
        # hidden_states[i] enters layer i: putting back what is there changes nothing ...
        same = encode_hf_text(reference, tokens, layer_input=lambda i, h: replace_slots(h, hidden[i][0, 1:3]) if i == 4 else h, prompt_slots=2)
        torch.testing.assert_close(same, plain, atol=1e-5, rtol=1e-5)
        # ... and anything else there does.
        other = encode_hf_text(reference, tokens, layer_input=lambda i, h: replace_slots(h, torch.ones(2, h.shape[-1])) if i == 4 else h, prompt_slots=2)
    assert (other - plain).abs().max() > max(1e-5, 50 * float((same - plain).abs().max()))


def test_edits_leaving_a_layer_equal_edits_entering_the_next_and_unprojected_pooling(reference):
    """The hooks AA-CLIP-style residual text adapters need: after layer i == before layer i + 1; pooled [CLS] unprojected."""
    tokens = _tokenizer()(SENTENCES)
    double = lambda h: h * 1.5  # noqa: E731
    with torch.no_grad():
        after = encode_hf_text(reference, tokens, layer_output=lambda i, h: double(h) if i == 2 else h)
        before = encode_hf_text(reference, tokens, layer_input=lambda i, h: double(h) if i == 3 else h)
        torch.testing.assert_close(after, before, atol=1e-6, rtol=1e-6)
        assert (after - reference.encode_text(tokens)).abs().max() > 1e-4
        pooled = encode_hf_text(reference, tokens, project=False)
        torch.testing.assert_close(reference.text.proj(pooled), reference.encode_text(tokens), atol=1e-5, rtol=1e-5)
    assert pooled.shape == (len(SENTENCES), 32)


def _tokenizer():
    import open_clip

    register_tiny_biomedclip()
    return open_clip.get_tokenizer("tiny-biomedclip")


def test_tiny_backbone_is_converted_seeded_and_keeps_exact_gelu(tiny):
    from open_clip.transformer import VisionTransformer

    assert isinstance(tiny.model.visual, VisionTransformer) and tiny.random_weights and tiny.info["text"] == "hf"
    again = load_backbone("tiny-biomedclip", quick_gelu=True)  # a method's QuickGELU switch is for OpenAI weights
    assert all(type(b.mlp.gelu) is nn.GELU for b in again.model.visual.transformer.resblocks)
    for (name, a), (_, b) in zip(tiny.model.state_dict().items(), again.model.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("name", CLIP_METHODS)
def test_every_clip_method_runs_on_biomedclip_and_a_slice_alone_equals_the_batch(name):
    method = build_method(name, "tiny-biomedclip", image_size=112, device="cpu")
    if getattr(method, "volume_level", False):
        pytest.skip(f"{name} scores whole volumes")
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(3, 3, 112, 112, generator=generator)
    out = method.predict(images)
    alone = method.predict(images[1:2])
    assert out.maps.shape == (3, 112, 112) and torch.isfinite(out.maps).all() and torch.isfinite(out.scores).all()
    assert out.maps.std() > 0  # a real map, not a constant
    torch.testing.assert_close(alone.maps[0], out.maps[1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(alone.scores[0], out.scores[1], atol=1e-5, rtol=1e-4)
    towers = method.describe()["backbone_towers"]
    assert towers["text"] == "hf" and "converted" in towers["visual"]


def test_anomalyclip_learned_context_equal_to_the_words_gives_the_plain_text_feature(tiny):
    """Learned context set to the embeddings of the 'X' words it replaces, no deep prompts: open_clip's encode_text."""
    from napari_clip_ad.methods.anomalyclip_prompts import encode_learned_text

    method = build_method("anomalyclip", tiny, image_size=112, device="cpu", depth=1)
    learner = method.prompt_learner
    x_embedding = hf_word_embedding(method.clip)(learner.tokenized_prompts[:, 1 : 1 + learner.n_ctx])
    with torch.no_grad():
        learner.ctx_pos.copy_(x_embedding[0][None, None])
        learner.ctx_neg.copy_(x_embedding[1][None, None])
        prompts, tokens, deep = learner()
        ours = encode_learned_text(method.clip, prompts, tokens, deep)
        torch.testing.assert_close(ours, method.clip.encode_text(tokens), atol=1e-5, rtol=1e-5)


def test_local_checkpoint_as_published_loads_and_matches(reference, tmp_path):
    folder = tmp_path / "BiomedCLIP-tiny"
    folder.mkdir()
    torch.save(reference.state_dict(), folder / "open_clip_pytorch_model.bin")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_BIOMEDCLIP_CONFIG}))
    backbone = load_backbone(str(folder / "open_clip_pytorch_model.bin"))
    images, tokens = torch.randn(1, 3, 224, 224), _tokenizer()(SENTENCES)
    with torch.no_grad():
        torch.testing.assert_close(backbone.model.encode_image(images), reference.encode_image(images), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(backbone.model.encode_text(tokens), reference.encode_text(tokens), atol=1e-5, rtol=1e-5)
    assert torch.equal(backbone.tokenizer(SENTENCES), tokens)


def test_local_checkpoint_without_its_text_files_names_them(reference, tmp_path):
    """No open_clip_config.json: BiomedCLIP's own config, whose BERT files are not cached here."""
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(reference.state_dict(), path)
    with pytest.raises(WeightsError) as info:
        load_backbone(str(path))
    assert BIOMEDBERT_HUB in str(info.value) and "\n" not in str(info.value)


def test_local_checkpoint_with_text_files_but_wrong_shapes_is_refused(reference, tmp_path):
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(reference.state_dict(), path)
    for name in ("config.json", "vocab.txt", "tokenizer_config.json"):  # the tiny BERT beside a file claiming BiomedCLIP's ViT-B
        shutil.copy(Path(TINY_BIOMEDCLIP_CONFIG["text_cfg"]["hf_model_name"]) / name, tmp_path / name)
    with pytest.raises(WeightsError, match="not a BiomedCLIP-style open_clip checkpoint") as info:
        load_backbone(str(path))
    assert "\n" not in str(info.value)


def _fake_hub_cache(root: Path, repo: str, files: dict[str, str]) -> None:
    snapshot = root / f"models--{repo.replace('/', '--')}" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    for name, text in files.items():
        (snapshot / name).write_text(text)


def test_hub_biomedclip_offline_names_the_missing_text_tower(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(WeightsError, match="not in the local cache and the hub is offline"):
        load_backbone("biomedclip")
    _fake_hub_cache(tmp_path, BIOMEDCLIP_HUB, {"open_clip_config.json": json.dumps({"model_cfg": BIOMEDCLIP_CONFIG})})
    with pytest.raises(WeightsError) as info:
        load_backbone("biomedclip")
    assert BIOMEDBERT_HUB in str(info.value) and "offline" in str(info.value) and "\n" not in str(info.value)
    availability = backbone_availability("biomedclip")
    assert not availability.available and BIOMEDBERT_HUB in availability.message


def test_open_clip_vit_backbones_are_untouched(monkeypatch, tmp_path):
    """pmc-vit-l-14 and every open_clip ViT: no conversion, activation switch as before, same offline message."""
    from napari_clip_ad.backbones.biomedclip import adapt_custom_text_clip

    plain = load_backbone("tiny-test", quick_gelu=True)
    visual = plain.model.visual
    assert adapt_custom_text_clip(plain.model) == "" and plain.model.visual is visual and "visual" not in plain.info
    assert all(type(b.mlp.gelu).__name__ == "QuickGELU" for b in visual.transformer.resblocks)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(WeightsError, match="ryanyip7777/pmc_vit_l_14"):
        load_backbone("pmc-vit-l-14")


@pytest.fixture(scope="module")
def cohort(shared_data: Path, tmp_path_factory) -> Path:
    """Four small real cases: 3 slices through the tumour at two offsets of each BraTS 2023 case, cropped 96 x 96."""
    import nibabel as nib
    import numpy as np

    root = tmp_path_factory.mktemp("biomedclip-cohort")
    sources = sorted(p.name for p in (shared_data / "brats2023").iterdir() if p.is_dir())[:2]
    for number, source in enumerate(sources):
        images = {kind: nib.load(shared_data / "brats2023" / source / f"{source}-{kind}.nii.gz") for kind in ("t2w", "t2f", "seg")}
        seg = np.asarray(images["seg"].dataobj)
        centre = int(np.flatnonzero(seg.reshape(-1, seg.shape[2]).any(axis=0)).mean())
        for offset in range(2):
            case_id = f"BraTS-GLI-{9100 + 10 * number + offset:05d}-000"
            (root / case_id).mkdir()
            z = slice(centre - 6 + 6 * offset, centre - 3 + 6 * offset)
            for kind, image in images.items():
                nib.save(image.slicer[72:168, 72:168, z], root / case_id / f"{case_id}-{kind}.nii.gz")
    return root


def test_train_from_scratch_with_biomedclip_then_infer(cohort, tmp_path):
    """train --setup biomedclip (backbone biomedclip unless given): one epoch of AnomalyCLIP's BERT prompts, weights infer."""
    from safetensors.torch import load_file

    from napari_clip_ad.cli import main
    from napari_clip_ad.train import resolve_config

    assert resolve_config("anomalyclip", "biomedclip").backbone == "biomedclip"
    assert resolve_config("anomalyclip", "biomedclip").weights is None
    status = main(["train", "--method", "anomalyclip", "--setup", "biomedclip", "--backbone", "tiny-biomedclip", "--data", str(cohort),
                   "--out", str(tmp_path / "run"), "--epochs", "1", "--batch-size", "4", "--device", "cpu", "--max-slices-per-case", "3"])
    assert status == 0
    weights = tmp_path / "run" / "checkpoints" / "last.safetensors"
    trained = load_file(str(weights))
    method = build_method("anomalyclip", "tiny-biomedclip", weights=weights, image_size=112, device="cpu")
    untrained = build_method("anomalyclip", "tiny-biomedclip", image_size=112, device="cpu")
    assert any(not torch.equal(v, untrained.trainable_state_dict()[k]) for k, v in trained.items())
    assert all(torch.equal(v, method.trainable_state_dict()[k]) for k, v in trained.items())
    assert torch.isfinite(method.predict(torch.randn(1, 3, 112, 112)).maps).all()


def test_study_biomedclip_setup_runs_the_tiny_twin(cohort, tmp_path):
    """--setups biomedclip with the smoke backbone tiny-test: the cell trains and infers on tiny-biomedclip."""
    import csv

    from napari_clip_ad.cli import main

    out = tmp_path / "study"
    status = main(["study", "--data", str(cohort), "--out", str(out), "--methods", "vand", "--setups", "biomedclip",
                   "--backbone", "tiny-test", "--epochs", "1", "--device", "cpu", "--max-slices-per-case", "3", "--no-baseline"])
    assert status == 0
    done = json.loads((out / "cells" / "vand-biomedclip" / "done.json").read_text())
    assert done["trained"] and done["config"]["backbone"] == "tiny-biomedclip" and done["weights"].endswith(".safetensors")
    with open(out / "report" / "table1.csv") as handle:
        assert {(r["method"], r["setup"]) for r in csv.DictReader(handle)} == {("vand", "biomedclip")}


@pytest.mark.parametrize("name", [n for n in CLIP_METHODS if method_class(n).supports_references])
def test_few_shot_on_biomedclip_and_back_to_zero_shot_bitwise(name):
    method = build_method(name, "tiny-biomedclip", image_size=112, device="cpu")
    generator = torch.Generator().manual_seed(2)
    images, references = torch.randn(2, 3, 112, 112, generator=generator), torch.randn(2, 3, 112, 112, generator=generator)
    zero = method.predict(images)
    method.set_references(references)
    few = method.predict(images)
    assert method.n_references == 2 and torch.isfinite(few.maps).all() and not torch.equal(few.maps, zero.maps)
    method.set_references(None)
    again = method.predict(images)
    assert torch.equal(again.maps, zero.maps) and torch.equal(again.scores, zero.scores)
