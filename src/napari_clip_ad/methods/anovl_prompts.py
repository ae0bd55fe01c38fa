"""AnoVL's domain-aware state prompts (official: hq-deng/AnoVL, prompt_ensemble.py).

Each side (normal / abnormal) has 7 state phrases; each state is put into 66 domain templates
(``template.format(state.format(object))``, templates outer loop, states inner loop: 462 sentences
per side). Objects in the official texture list use the textural + surface templates instead of the
image + manufacturing ones. The text feature of a side is the mean of the UNnormalised sentence
embeddings, normalised afterwards; the per-sentence normalised embeddings feed the test-time adapter.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .text_features import encode_sentences
from .prompt_sets import PromptSet

STATE_NORMAL: tuple[str, ...] = (
    "normal {}", "flawless {}", "perfect {}", "unblemished {}",
    "{} without flaw", "{} without defect", "{} without damage",
)
STATE_ABNORMAL: tuple[str, ...] = (
    "damaged {}", "abnormal {}", "imperfect {}", "blemished {}",
    "{} with flaw", "{} with defect", "{} with damage",
)

TEXTURES: frozenset[str] = frozenset({"carpet", "leather", "grid", "tile", "wood"})
"""Objects for which the official code uses the textural/surface template families."""

OBJECT_ALIASES: dict[str, str] = {"macaroni1": "macaroni", "macaroni2": "macaroni"}
"""The official ``class_mapping`` (names substituted before prompting)."""

# The 22 sentence patterns shared by every template family; ``{m}`` is the medium ("industrial photo"),
# ``{a}`` its article, ``{{}}`` the slot for the state phrase.
_PATTERNS: tuple[str, ...] = (
    "a cropped {m} of the {{}}", "a cropped {m} of a {{}}",
    "a close-up {m} of a {{}}", "a close-up {m} of the {{}}",
    "a bright {m} of a {{}}", "a bright {m} of the {{}}",
    "a dark {m} of the {{}}", "a dark {m} of a {{}}",
    "a jpeg corrupted {m} of a {{}}", "a jpeg corrupted {m} of the {{}}",
    "a blurry {m} of the {{}}", "a blurry {m} of a {{}}",
    "{a} {m} of a {{}}", "{a} {m} of the {{}}",
    "{a} {m} of a small {{}}", "{a} {m} of the small {{}}",
    "{a} {m} of a large {{}}", "{a} {m} of the large {{}}",
    "{a} {m} of the {{}} for visual inspection", "{a} {m} of a {{}} for visual inspection",
    "{a} {m} of the {{}} for anomaly detection", "{a} {m} of a {{}} for anomaly detection",
)


def template_family(medium: str) -> tuple[str, ...]:
    """The 22 templates of one medium, e.g. ``"industrial photo"`` -> the official ``inds_temp``."""
    article = "an" if medium[0] in "aeiou" else "a"
    return tuple(p.format(m=medium, a=article) for p in _PATTERNS)


def templates_for(object_name: str) -> tuple[str, ...]:
    """The 66 templates the official code uses for an object.

    Non-textures: industrial photo + industrial image + manufacturing image. Textures: industrial
    photo + textural photo + surface picture (the official file defines ``surf_temp`` twice; the
    second, "surface picture", definition is the one in effect).
    """
    media = ("industrial photo", "textural photo", "surface picture") if object_name in TEXTURES else (
        "industrial photo", "industrial image", "manufacturing image")
    return tuple(t for medium in media for t in template_family(medium))


def state_sentences(object_name: str, states: tuple[str, ...], templates: tuple[str, ...] | None = None) -> list[str]:
    """All sentences of one side, in the official order (templates outer, states inner).

    Args:
        object_name: The object (official aliases applied).
        states: State phrases of the side.
        templates: Other templates (a prompt set's); None for the official :func:`templates_for`.
    """
    name = OBJECT_ALIASES.get(object_name, object_name)
    phrases = [state.format(name) for state in states]
    templates = templates_for(object_name) if templates is None else templates
    return [template.format(phrase) for template in templates for phrase in phrases]


@torch.no_grad()
def encode_state_prompts(
    clip: nn.Module, tokenizer: Callable[..., torch.Tensor], object_name: str, device: torch.device,
    prompt_set: PromptSet | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Text features of both sides (official lists, or a prompt set's states and templates in the same order).

    Returns:
        ``(text, sentences)``: ``text`` (E, 2) with columns (normal, abnormal), each the normalised
        mean of that side's unnormalised sentence embeddings; ``sentences`` (2 * S, E), the normalised
        sentence embeddings, normal side first (what the official ``TextAdapter`` concatenates).
    """
    sides, per_sentence = [], []
    sides_states = (STATE_NORMAL, STATE_ABNORMAL) if prompt_set is None else (prompt_set.normal_states, prompt_set.abnormal_states)
    templates = None if prompt_set is None else prompt_set.templates
    normal, abnormal = (state_sentences(object_name, states, templates) for states in sides_states)
    # Both sides in one batched, EOT-truncated pass (exact: the text tower is causal).
    encoded = encode_sentences(clip, tokenizer, normal + abnormal).to(device)
    for embeddings in (encoded[: len(normal)], encoded[len(normal):]):
        mean = embeddings.mean(dim=0)  # official: mean BEFORE the per-sentence normalisation
        sides.append(mean / mean.norm())
        per_sentence.append(embeddings / embeddings.norm(dim=-1, keepdim=True))
    return torch.stack(sides, dim=1), torch.cat(per_sentence, dim=0)
