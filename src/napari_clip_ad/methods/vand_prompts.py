"""VAND / APRIL-GAN's text side: the state-word x template prompt ensemble.

Official reference: ByChelsea/VAND-APRIL-GAN (commit f13b8a6), ``prompt_ensemble.py``
(``encode_text_with_prompt_ensemble``). The object name fills ``{}`` of each state phrase, each
phrase fills ``{}`` of every template (state-major order); per state all sentences are encoded with
the standard ``encode_text``, L2-normalised, averaged and L2-normalised again.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .text_features import encode_sentences
from .prompt_sets import PromptSet

NORMAL_STATES: tuple[str, ...] = (
    "{}", "flawless {}", "perfect {}", "unblemished {}", "{} without flaw", "{} without defect", "{} without damage",
)
ABNORMAL_STATES: tuple[str, ...] = ("damaged {}", "broken {}", "{} with flaw", "{} with defect", "{} with damage")
TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.", "a low resolution photo of the {}.", "a bad photo of the {}.", "a cropped photo of the {}.",
    "a bright photo of a {}.", "a dark photo of the {}.", "a photo of my {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a jpeg corrupted photo of a {}.", "a blurry photo of the {}.", "a photo of the {}.",
    "a good photo of the {}.", "a photo of one {}.", "a close-up photo of the {}.", "a photo of a {}.",
    "a low resolution photo of a {}.", "a photo of a large {}.", "a blurry photo of a {}.",
    "a jpeg corrupted photo of the {}.", "a good photo of a {}.", "a photo of the small {}.",
    "a photo of the large {}.", "a black and white photo of a {}.", "a dark photo of a {}.", "a photo of a cool {}.",
    "a photo of a small {}.", "there is a {} in the scene.", "there is the {} in the scene.",
    "this is a {} in the scene.", "this is the {} in the scene.", "this is one {} in the scene.",
)


def prompt_sentences(object_name: str, prompt_set: PromptSet | None = None) -> tuple[list[str], list[str]]:
    """All (normal, abnormal) sentences for ``object_name``, in the official order (states outer).

    Args:
        object_name: Word filling the state phrases.
        prompt_set: Other states/templates (same order and averaging); None for the official lists.
    """
    normal, abnormal, templates = (NORMAL_STATES, ABNORMAL_STATES, TEMPLATES) if prompt_set is None else (
        prompt_set.normal_states, prompt_set.abnormal_states, prompt_set.templates)

    def expand(states: tuple[str, ...]) -> list[str]:
        return [template.format(state.format(object_name)) for state in states for template in templates]

    return expand(normal), expand(abnormal)


@torch.no_grad()
def encode_state_text(
    clip: nn.Module, tokenizer: Callable[..., torch.Tensor], object_name: str, prompt_set: PromptSet | None = None
) -> torch.Tensor:
    """Normalised (normal, abnormal) text features (2, E), as ``encode_text_with_prompt_ensemble``.

    Args:
        clip: open_clip CLIP model (its standard ``encode_text`` is used).
        tokenizer: The model's tokenizer.
        object_name: Word filling the prompts (the official code uses the class name).
        prompt_set: Other states/templates (see :mod:`.prompt_sets`); None for the official lists.
    """
    normal, abnormal = prompt_sentences(object_name, prompt_set)
    # Both states in one batched, EOT-truncated pass (same features as the official per-state calls).
    embedded = encode_sentences(clip, tokenizer, normal + abnormal)
    embedded = embedded / embedded.norm(dim=-1, keepdim=True)
    features = []
    for part in (embedded[: len(normal)], embedded[len(normal):]):
        mean = part.mean(dim=0)
        features.append(mean / mean.norm())
    return torch.stack(features)
