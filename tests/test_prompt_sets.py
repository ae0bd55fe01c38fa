"""Prompt sets: 'industrial' (official, unchanged), the shipped 'medical' set, JSON files (tiny random backbone)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from napari_clip_ad import build_method
from napari_clip_ad.backbones import load_backbone
from napari_clip_ad.errors import InputError
from napari_clip_ad.methods import adaclip_prompts, anovl_prompts, vand_prompts, winclip_prompts
from napari_clip_ad.methods.prompt_sets import load_prompt_set

METHODS = ("vand", "winclip", "anovl", "adaclip")
EXTRA = {"adaclip": {"prompting_branch": "V"}}
"""AdaCLIP with an unprompted text branch: its text features are then the plain prompt sentences'."""


@pytest.fixture(scope="module")
def backbone():
    return load_backbone("tiny-test", device="cpu")


def text_of(method) -> torch.Tensor:
    """The text features each method scores with."""
    if method.name == "vand":
        return method.text_features()
    if method.name == "winclip":
        return method.text_features
    if method.name == "anovl":
        return method.text_features()[0]
    return method.text_features(None, 1)


def encode_mean(clip, tokenizer, sentences: list[str], normalise_first: bool) -> torch.Tensor:
    with torch.no_grad():
        e = clip.encode_text(tokenizer(sentences)).float()
    mean = (F.normalize(e, dim=-1) if normalise_first else e).mean(0)
    return mean / mean.norm()


def test_shipped_sets() -> None:
    assert load_prompt_set("industrial") is None
    medical = load_prompt_set("medical")
    assert medical.source == "medical" and medical.object_name == "brain"
    assert "{} with a tumour" in medical.abnormal_states and "healthy {}" in medical.normal_states
    assert any("metastasis" in s for s in medical.abnormal_states) and any("oedema" in s for s in medical.abnormal_states)
    assert all(t.count("{}") == 1 for t in medical.templates)


def test_industrial_is_the_official_text_bitwise(backbone) -> None:
    clip, tok = backbone.model, backbone.tokenizer
    # VAND: per-state mean of normalised sentence features (official lists, states outer).
    vand = build_method("vand", backbone, device="cpu", prompts="industrial")
    official = [[t.format(s.format("brain")) for s in states for t in vand_prompts.TEMPLATES]
                for states in (vand_prompts.NORMAL_STATES, vand_prompts.ABNORMAL_STATES)]
    assert torch.equal(vand.text_features(), torch.stack([encode_mean(clip, tok, side, True) for side in official]))
    assert torch.equal(vand.text_features(), build_method("vand", backbone, device="cpu").text_features())
    # WinCLIP: normalised mean of unnormalised embeddings (anomalib's lists).
    win = build_method("winclip", backbone, device="cpu")
    official = [[t.format(s.format("brain")) for s in states for t in winclip_prompts.TEMPLATES]
                for states in (winclip_prompts.NORMAL_STATES, winclip_prompts.ANOMALOUS_STATES)]
    torch.testing.assert_close(win.text_features, torch.stack([encode_mean(clip, tok, side, False) for side in official]), atol=0, rtol=0)
    # AnoVL: templates outer, states inner; AdaCLIP: its own 4 templates.
    anovl = build_method("anovl", backbone, device="cpu")
    sides = [anovl_prompts.state_sentences("brain", s) for s in (anovl_prompts.STATE_NORMAL, anovl_prompts.STATE_ABNORMAL)]
    assert sides[0][:2] == ["a cropped industrial photo of the normal brain", "a cropped industrial photo of the flawless brain"]
    # Batched, EOT-truncated encoding (methods/text_features.py) is exact up to float rounding of the batch.
    torch.testing.assert_close(text_of(anovl), torch.stack([encode_mean(clip, tok, side, False) for side in sides], dim=1),
                               atol=1e-6, rtol=0)
    assert adaclip_prompts.prompt_sentences("brain")[1][0] == "a bad photo of a damaged brain."
    for name in METHODS:
        assert build_method(name, backbone, device="cpu").describe()["options"]["prompts"] == "industrial"


@pytest.mark.parametrize("name", METHODS)
def test_medical_set_changes_the_text_features(backbone, name: str) -> None:
    industrial = build_method(name, backbone, device="cpu", **EXTRA.get(name, {}))
    medical = build_method(name, backbone, device="cpu", prompts="medical", **EXTRA.get(name, {}))
    assert medical.describe()["options"]["prompts"] == "medical"
    a, b = text_of(industrial), text_of(medical)
    assert a.shape == b.shape and not torch.allclose(a, b, atol=1e-4)


def test_prompt_file_words_and_object_name(backbone, tmp_path: Path) -> None:
    path = tmp_path / "lung.json"
    path.write_text(json.dumps({
        "object_name": "lung", "normal_states": ["clear {}"], "abnormal_states": ["{} with a nodule", "{} with fibrosis"],
        "templates": ["a CT slice of a {}.", "a scan of the {}."],
    }))
    prompt_set = load_prompt_set(str(path))
    assert vand_prompts.prompt_sentences("lung", prompt_set) == (
        ["a CT slice of a clear lung.", "a scan of the clear lung."],
        ["a CT slice of a lung with a nodule.", "a scan of the lung with a nodule.",
         "a CT slice of a lung with fibrosis.", "a scan of the lung with fibrosis."],
    )
    assert anovl_prompts.state_sentences("lung", prompt_set.abnormal_states, prompt_set.templates)[:2] == [
        "a CT slice of a lung with a nodule.", "a CT slice of a lung with fibrosis."]  # AnoVL: templates outer
    vand = build_method("vand", backbone, device="cpu", prompts=path)
    assert vand.object_name == "lung" and vand.describe()["options"]["prompts"] == str(path)
    clip, tok = backbone.model, backbone.tokenizer
    expected = torch.stack([encode_mean(clip, tok, side, True) for side in vand_prompts.prompt_sentences("lung", prompt_set)])
    torch.testing.assert_close(vand.text_features(), expected, atol=1e-6, rtol=0)
    # An explicit object_name option wins over the set's.
    assert build_method("winclip", backbone, device="cpu", prompts=str(path), object_name="liver").object_name == "liver"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "invalid JSON at line 1"),
        ("[1, 2]", "expected a JSON object"),
        ('{"normal_states": ["{}"], "abnormal_states": ["bad {}"]}', "'templates' must be a non-empty list"),
        ('{"normal_states": ["healthy"], "abnormal_states": ["bad {}"], "templates": ["a {}."]}', "'normal_states' entry 'healthy' must contain exactly one"),
        ('{"normal_states": ["{}"], "abnormal_states": ["bad {}"], "templates": ["a {} {}."]}', "for the state phrase"),
        ('{"normal_states": ["{}"], "abnormal_states": ["{0} x"], "templates": ["a {}."]}', "'abnormal_states' entry"),
        ('{"normal_states": ["{}"], "abnormal_states": ["bad {}"], "templates": ["a {}."], "states": []}', "unknown field"),
        ('{"normal_states": ["{}"], "abnormal_states": ["bad {}"], "templates": ["a {}."], "object_name": 3}', "'object_name' must be"),
    ],
)
def test_bad_prompt_files_are_refused_in_one_line(backbone, tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "prompts.json"
    path.write_text(content)
    with pytest.raises(InputError, match=message) as info:
        build_method("vand", backbone, device="cpu", prompts=str(path))
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_unknown_set_name_is_refused(backbone) -> None:
    with pytest.raises(InputError, match="no such file and not a known set") as info:
        build_method("anovl", backbone, device="cpu", prompts="veterinary")
    assert "\n" not in str(info.value)
