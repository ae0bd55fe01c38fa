"""AdaCLIP's hybrid learnable prompts and its prompted CLIP text encoder.

Official reference: caoyunkang/AdaCLIP (commit e27ee32), ``method/adaclip.py``: ``PromptLayer``,
``ProjectLayer`` and ``TextEmbebddingLayer``. Module and parameter names mirror the official ones
(``static_prompts.<i>``, ``head.<i>.weight``) so a released checkpoint maps by prefix only.

Where prompts enter (official ``PromptLayer.forward_text`` / ``forward_visual``), with ``context_i``
= dynamic (per image) + ``static_prompts[i]`` (prompting type "SD"), rounded to fp16 (``.half()``):

- visual block ``i < depth``: block 0 appends ``length`` context tokens after the patch tokens;
  blocks ``1 .. depth-1`` replace those last ``length`` tokens; later blocks keep them; tapped
  tokens exclude them.
- text block ``i``, ``1 <= i < depth``: tokens ``1 .. length`` (the first words after the start
  token, not padding) are replaced; block 0 gets nothing, so the text ``static_prompts[0]`` is a
  trained-but-unused parameter of the official model.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones.hf_text import encode_hf_text, is_hf_text, replace_slots
from .prompt_sets import PromptSet

NORMAL_STATES: tuple[str, ...] = (
    "{}", "flawless {}", "perfect {}", "unblemished {}", "{} without flaw", "{} without defect", "{} without damage",
)
ABNORMAL_STATES: tuple[str, ...] = ("damaged {}", "broken {}", "{} with flaw", "{} with defect", "{} with damage")
TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.", "a low resolution photo of the {}.", "a bad photo of the {}.", "a cropped photo of the {}.",
)
"""``TextEmbebddingLayer``: 7 normal and 5 abnormal states inside 4 templates (states outer)."""


def prompt_sentences(object_name: str, prompt_set: PromptSet | None = None) -> tuple[list[str], list[str]]:
    """(normal, abnormal) sentences in the official order; '-' in the name becomes a space.

    ``prompt_set`` swaps the states and templates (same order); None keeps the official lists.
    """
    name = object_name.replace("-", " ")
    normal, abnormal, templates = (NORMAL_STATES, ABNORMAL_STATES, TEMPLATES) if prompt_set is None else (
        prompt_set.normal_states, prompt_set.abnormal_states, prompt_set.templates)

    def expand(states: tuple[str, ...]) -> list[str]:
        return [template.format(state.format(name)) for state in states for template in templates]

    return expand(normal), expand(abnormal)


class PromptLayer(nn.Module):
    """Static prompts of one branch (official ``PromptLayer``): ``static_prompts[i]`` (length, channel).

    Args:
        channel: Width of the residual stream the prompts enter.
        length: Number of prompt tokens.
        depth: Number of prompted blocks.
        prompting_type: "S" static, "D" dynamic, "SD" both.
        enabled: False builds no parameters (branch not prompted).
    """

    def __init__(self, channel: int, length: int, depth: int, prompting_type: str, enabled: bool) -> None:
        super().__init__()
        self.length, self.depth, self.enabled = length, depth, enabled
        self.use_static = enabled and "S" in prompting_type
        self.use_dynamic = enabled and "D" in prompting_type
        self.static_prompts = nn.ParameterList(
            [nn.Parameter(torch.empty(length, channel)) for _ in range(depth)] if self.use_static else []
        )
        for prompt in self.static_prompts:
            nn.init.normal_(prompt, std=0.02)

    def contexts(self, dynamic: torch.Tensor | None, groups: int) -> torch.Tensor:
        """Per-group prompt tokens of every prompted block, in float16: (groups, depth, length, C).

        Args:
            dynamic: (groups, length, C) per-image dynamic prompts, or None without them.
            groups: Number of images (1 when the prompts do not depend on the image).
        """
        parts = []
        for index in range(self.depth):
            context = self.static_prompts[index].unsqueeze(0).expand(groups, -1, -1) if self.use_static else 0.0
            if self.use_dynamic:
                context = dynamic + context
            parts.append(context)
        # Official quirk: ``.half()`` before concatenation with the float32 stream (callers cast back).
        return torch.stack(parts, dim=1).half()


class ProjectLayer(nn.Module):
    """Official ``ProjectLayer``: ``head[i] = nn.Linear(input_dim, output_dim)``, one per replica."""

    def __init__(self, input_dim: int, output_dim: int, replicas: int) -> None:
        super().__init__()
        self.head = nn.ModuleList([nn.Linear(input_dim, output_dim) for _ in range(replicas)])

    def per_layer(self, tokens: list[torch.Tensor]) -> list[torch.Tensor]:
        """``head[i](tokens[i])`` for each tapped layer (``is_array=True``; CLS already removed)."""
        return [head(t) for head, t in zip(self.head, tokens)]

    def stacked(self, features: torch.Tensor) -> torch.Tensor:
        """(B, in) -> (B, replicas, out): every head on the same input (``stack=True, is_array=False``)."""
        return torch.stack([head(features) for head in self.head], dim=1)


def run_block(block: nn.Module, x: torch.Tensor, batch_first: bool, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """One open_clip residual block on (N, L, C) tokens, whatever the transformer's layout."""
    if batch_first:
        return block(x, attn_mask=attn_mask)
    return block(x.transpose(0, 1), attn_mask=attn_mask).transpose(0, 1)


def encode_prompted_text(clip: nn.Module, tokens: torch.Tensor, contexts: torch.Tensor | None) -> torch.Tensor:
    """Text embeddings with prompt tokens in blocks ``1 .. depth-1`` (official ``AdaCLIP.encode_text``).

    The causal mask makes the end-of-text feature independent of later positions, so the sequence
    is cut after the last end token (and the prompt slots): same result, a fraction of the work.
    Block 0 gets no prompt, so it runs once for all groups.

    Args:
        clip: open_clip CLIP model (OpenAI-style text tower).
        tokens: (N, context) token ids of the sentences.
        contexts: (G, depth, length, C) prompts per group (image), or None for the plain encoder.

    Returns:
        (G, N, E) projected end-token features (G = 1 without contexts), not normalised.

    An HF BERT text tower (BiomedCLIP) gets the same prompts as hidden states 1..length entering
    its layers 1..depth-1 and gives its pooled, projected [CLS] (see :mod:`napari_clip_ad.backbones.hf_text`).
    """
    if is_hf_text(clip):
        return _encode_prompted_hf_text(clip, tokens, contexts)
    length = 0 if contexts is None else contexts.shape[2]
    eot = tokens.argmax(dim=-1)
    n_pos = max(int(eot.max()) + 1, 1 + length)
    cast = clip.transformer.get_cast_dtype()
    x = clip.token_embedding(tokens[:, :n_pos]).to(cast) + clip.positional_embedding[:n_pos].to(cast)
    mask = clip.attn_mask[:n_pos, :n_pos] if clip.attn_mask is not None else None
    batch_first = getattr(clip.transformer, "batch_first", True)
    blocks = clip.transformer.resblocks
    x = run_block(blocks[0], x, batch_first, mask)
    groups = 1 if contexts is None else contexts.shape[0]
    n_sentences = tokens.shape[0]
    if groups > 1:
        x = x.unsqueeze(0).expand(groups, -1, -1, -1).reshape(groups * n_sentences, n_pos, -1)
    depth = 0 if contexts is None else contexts.shape[1]
    for index in range(1, len(blocks)):
        if index < depth:
            context = contexts[:, index].to(x.dtype)
            context = context.unsqueeze(1).expand(-1, n_sentences, -1, -1).reshape(groups * n_sentences, length, -1)
            x = torch.cat([x[:, :1], context, x[:, 1 + length:]], dim=1)
        x = run_block(blocks[index], x, batch_first, mask)
    rows = torch.arange(x.shape[0], device=x.device)
    pooled = clip.ln_final(x[rows, eot.repeat(groups)])
    projection = clip.text_projection
    pooled = projection(pooled) if isinstance(projection, nn.Linear) else pooled @ projection
    return pooled.reshape(groups, n_sentences, -1)


def _encode_prompted_hf_text(clip: nn.Module, tokens: torch.Tensor, contexts: torch.Tensor | None) -> torch.Tensor:
    """HF-tower branch of :func:`encode_prompted_text`: (G, N, E)."""
    n_sentences = tokens.shape[0]
    if contexts is None:
        return encode_hf_text(clip, tokens).reshape(1, n_sentences, -1)
    groups, depth, length = contexts.shape[:3]
    rows = tokens.repeat(groups, 1)

    def layer_input(index: int, hidden: torch.Tensor) -> torch.Tensor:
        if not 1 <= index < depth:
            return hidden
        context = contexts[:, index].unsqueeze(1).expand(-1, n_sentences, -1, -1).reshape(groups * n_sentences, length, -1)
        return replace_slots(hidden, context)

    return encode_hf_text(clip, rows, layer_input=layer_input, prompt_slots=length).reshape(groups, n_sentences, -1)


def state_text_features(
    clip: nn.Module,
    tokenizer: Callable[..., torch.Tensor],
    object_name: str,
    contexts: torch.Tensor | None,
    prompt_set: PromptSet | None = None,
) -> torch.Tensor:
    """(G, E, 2) normalised (normal, abnormal) text features per group (official ``encode_text``).

    Per state: every sentence embedded and L2-normalised, averaged, L2-normalised; then the
    official ``F.normalize(text_features, dim=1)`` over the embedding axis.
    """
    normal, abnormal = prompt_sentences(object_name, prompt_set)
    device = next(clip.parameters()).device
    tokens = tokenizer(normal + abnormal).to(device)
    embedded = encode_prompted_text(clip, tokens, contexts).float()
    embedded = embedded / embedded.norm(dim=-1, keepdim=True)
    features = []
    for part in (embedded[:, : len(normal)], embedded[:, len(normal):]):
        mean = part.mean(dim=1)
        features.append(mean / mean.norm(dim=-1, keepdim=True))
    return F.normalize(torch.stack(features, dim=2), dim=1)
