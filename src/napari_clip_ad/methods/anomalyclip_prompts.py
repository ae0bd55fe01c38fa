"""AnomalyCLIP's object-agnostic learnable prompts and the text encoder with deep prompt tokens.

Official reference: zqhang/AnomalyCLIP, prompt_ensemble.py (``AnomalyCLIP_PromptLearner``) and
AnomalyCLIP_lib/AnomalyCLIP.py (``encode_text_learn``, ``ResidualAttentionBlock_learnable_token``).
Prompts are ``"X" * n_ctx + " object."`` (normal) and ``"X" * n_ctx + " damaged object."``
(abnormal) with the ``X`` embeddings replaced by the learnable ``ctx_pos`` / ``ctx_neg``. In text
layers 1..depth-1 (0-based) the tokens 1..t_n_ctx are replaced by ``compound_prompts_text[i-1]``.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..backbones.hf_text import encode_hf_text, is_hf_text, replace_slots
from ..errors import InputError

NORMAL_TEMPLATE = "{}"
ABNORMAL_TEMPLATE = "damaged {}"
OBJECT_NAME = "object"


def prompt_sentences(n_ctx: int) -> tuple[str, str]:
    """The normal and abnormal sentences whose ``X`` tokens the learnable context replaces."""
    prefix = " ".join(["X"] * n_ctx)
    return (f"{prefix} {NORMAL_TEMPLATE.format(OBJECT_NAME)}.", f"{prefix} {ABNORMAL_TEMPLATE.format(OBJECT_NAME)}.")


class AnomalyCLIPPromptLearner(nn.Module):
    """Learnable context (``ctx_pos``, ``ctx_neg``) and deep text tokens (``compound_prompts_text``).

    Parameter names and shapes match the official ``prompt_learner`` state dict; the token
    embeddings of the fixed words are non-persistent buffers computed from the backbone
    (:meth:`attach_tokens`), so they are not part of the trainable state.

    Args:
        width: Text transformer width (768 for ViT-L/14).
        n_ctx: Learnable context tokens per prompt (official 12).
        t_n_ctx: Deep prompt tokens per text layer (official 4).
        depth: Text layers with learnable tokens, counting the first (official 9: 8 deep prompts).
    """

    def __init__(self, width: int, n_ctx: int = 12, t_n_ctx: int = 4, depth: int = 9) -> None:
        super().__init__()
        for label, value, low in (("n_ctx", n_ctx, 1), ("t_n_ctx", t_n_ctx, 1), ("depth", depth, 1)):
            if int(value) != value or value < low:
                raise InputError(f"anomalyclip option {label}={value!r} is invalid; use an integer >= {low}")
        self.n_ctx, self.t_n_ctx, self.depth = int(n_ctx), int(t_n_ctx), int(depth)
        self.ctx_pos = nn.Parameter(torch.empty(1, 1, n_ctx, width))
        self.ctx_neg = nn.Parameter(torch.empty(1, 1, n_ctx, width))
        self.compound_prompts_text = nn.ParameterList(
            [nn.Parameter(torch.empty(t_n_ctx, width)) for _ in range(depth - 1)]
        )
        for parameter in self.parameters():
            nn.init.normal_(parameter, std=0.02)
        for name in ("token_prefix_pos", "token_suffix_pos", "token_prefix_neg", "token_suffix_neg"):
            self.register_buffer(name, torch.zeros(0), persistent=False)
        self.register_buffer("tokenized_prompts", torch.zeros(0, dtype=torch.long), persistent=False)

    def attach_tokens(self, token_embedding: nn.Embedding, tokenizer: Callable[..., torch.Tensor]) -> None:
        """Embed the fixed words of both prompts with the backbone's token embedding."""
        sentences = prompt_sentences(self.n_ctx)
        tokens = tokenizer(list(sentences)).long()
        bare = tokenizer([s.split(" ", self.n_ctx)[-1] for s in sentences]).long()
        # The tokenizer truncates silently: every sentence must be its words plus n_ctx X tokens.
        if ((tokens != 0).sum(dim=1) != (bare != 0).sum(dim=1) + self.n_ctx).any():
            raise InputError(
                f"anomalyclip n_ctx={self.n_ctx} does not fit the text encoder's context of {tokens.shape[1]} tokens; use a smaller n_ctx"
            )
        with torch.no_grad():
            embedded = token_embedding(tokens.to(token_embedding.weight.device)).float()
        cut = 1 + self.n_ctx
        self.token_prefix_pos, self.token_suffix_pos = embedded[0:1, None, :1], embedded[0:1, None, cut:]
        self.token_prefix_neg, self.token_suffix_neg = embedded[1:2, None, :1], embedded[1:2, None, cut:]
        self.tokenized_prompts = tokens.to(embedded.device)

    def forward(self) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Prompt embeddings (2, L, width) (normal, abnormal), token ids (2, L), deep prompts."""
        positive = torch.cat([self.token_prefix_pos, self.ctx_pos, self.token_suffix_pos], dim=2)
        negative = torch.cat([self.token_prefix_neg, self.ctx_neg, self.token_suffix_neg], dim=2)
        prompts = torch.cat([positive.flatten(0, 1), negative.flatten(0, 1)], dim=0)
        return prompts, self.tokenized_prompts, list(self.compound_prompts_text)


def encode_learned_text(
    clip: nn.Module, prompts: torch.Tensor, tokenized: torch.Tensor, deep_prompts: list[torch.Tensor]
) -> torch.Tensor:
    """Text features (n, embed_dim) of prompt embeddings, with deep prompts in layers 1..len(deep_prompts).

    Mirrors the official ``encode_text_learn``: causal mask, ``ln_final``, projection of the EOT token.
    The sequence is cut after the last EOT (and the deep-prompt slots): exact by the causal mask,
    a fraction of the full 77-token work (the EOT of ``X * 12 damaged object.`` is token 16).

    An HF BERT text tower (BiomedCLIP) takes ``prompts`` as word embeddings and the deep prompts as
    hidden states 1..t_n_ctx entering layers 1..len(deep_prompts), with the same fp16 rounding;
    the feature is its pooled, projected [CLS] (see :mod:`napari_clip_ad.backbones.hf_text`).
    """
    if is_hf_text(clip):
        def layer_input(index: int, hidden: torch.Tensor) -> torch.Tensor:
            if 0 < index <= len(deep_prompts):
                return replace_slots(hidden, deep_prompts[index - 1].half())
            return hidden

        slots = max([0] + [p.shape[0] for p in deep_prompts])
        return encode_hf_text(clip, tokenized, inputs_embeds=prompts, layer_input=layer_input, prompt_slots=slots)
    transformer = clip.transformer
    batch_first = getattr(transformer, "batch_first", True)
    eot = tokenized.argmax(dim=-1)
    n_pos = max([int(eot.max()) + 1] + [1 + p.shape[0] for p in deep_prompts])
    prompts, mask = prompts[:, :n_pos], clip.attn_mask[:n_pos, :n_pos]
    x = prompts + clip.positional_embedding[:n_pos].to(prompts.dtype)
    used = 0
    for index, block in enumerate(transformer.resblocks):
        if index > 0 and used < len(deep_prompts):
            deep = deep_prompts[used]
            # Official quirk: the deep tokens are cast with .half() before use (fp16 rounding).
            context = deep.half().to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
            x = torch.cat([x[:, :1], context, x[:, 1 + deep.shape[0]:]], dim=1)
            used += 1
        if batch_first:
            x = block(x, attn_mask=mask)
        else:
            x = block(x.transpose(0, 1), attn_mask=mask).transpose(0, 1)
    x = clip.ln_final(x)
    pooled = x[torch.arange(x.shape[0], device=x.device), eot]
    projection = clip.text_projection
    return projection(pooled) if isinstance(projection, nn.Linear) else pooled @ projection
