"""Text towers that are Hugging Face encoders (open_clip ``HFTextEncoder``: BiomedCLIP's PubMedBERT).

The learned-prompt methods (AnomalyCLIP, AdaCLIP) edit a CLIP text transformer from the inside:
the word embeddings of some tokens are replaced by learned context, and in later layers some hidden
states are replaced by deep prompts. On an HF BERT tower the same edits are made where they mean the
same thing: learned context replaces **word embeddings** (``inputs_embeds``; BERT then adds its
position and token-type embeddings and its embedding LayerNorm, as CLIP adds its positional
embedding), and deep prompts replace hidden states 1..n at the **input of encoder layer i**
(a forward pre-hook, so HF's own attention code runs). The feature is what open_clip's
``HFTextEncoder.forward`` computes: padding mask ``tokens != pad``, its pooler (BiomedCLIP: the
[CLS] token of the last hidden state) and its projection (BiomedCLIP: bias-free MLP).

Padding is masked out of the keys, so running the sequence cut after its last real token gives
the same features to float rounding (tests/test_biomedclip.py) at a fraction of the 256-token work.
Prompt slots (positions 1..n) are always attended, even where they replace padding of a short
sentence (a prompt is input, not padding).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

LayerEdit = Callable[[int, torch.Tensor], torch.Tensor]
"""``(encoder layer index, hidden states (N, L, W)) -> hidden states``, applied entering or leaving that layer."""
LayerInput = LayerEdit


def is_hf_text(clip: nn.Module) -> bool:
    """True when ``clip``'s text tower is an open_clip ``HFTextEncoder`` (e.g. BiomedCLIP)."""
    text = getattr(clip, "text", None)
    return text is not None and hasattr(text, "pooler") and hasattr(text, "proj") and hasattr(text, "transformer")


def hf_text_width(clip: nn.Module) -> int:
    """Hidden width of the HF text encoder (what prompt tokens must have)."""
    return int(clip.text.transformer.get_input_embeddings().weight.shape[1])


def hf_word_embedding(clip: nn.Module) -> nn.Embedding:
    """The word-embedding table (token id -> vector, before position embeddings and LayerNorm)."""
    return clip.text.transformer.get_input_embeddings()


def hf_max_positions(clip: nn.Module) -> int:
    """Longest sequence the encoder's position embeddings cover."""
    return int(getattr(clip.text.config, "max_position_embeddings", 512))


def _encoder_layers(clip: nn.Module) -> nn.ModuleList:
    transformer = clip.text.transformer
    encoder = getattr(transformer, "encoder", transformer)
    layers = getattr(encoder, "layer", None) or getattr(encoder, "layers", None)
    if layers is None:
        raise TypeError(f"HF text model {type(transformer).__name__} has no encoder layer list")
    return layers


def hf_text_depth(clip: nn.Module) -> int:
    """Number of encoder layers."""
    return len(_encoder_layers(clip))


def encode_hf_text(
    clip: nn.Module,
    tokens: torch.Tensor,
    inputs_embeds: torch.Tensor | None = None,
    layer_input: LayerEdit | None = None,
    prompt_slots: int = 0,
    layer_output: LayerEdit | None = None,
    project: bool = True,
) -> torch.Tensor:
    """(N, E) projected features, as ``HFTextEncoder.forward`` with optional prompt edits, truncated.

    Args:
        clip: open_clip model whose ``text`` is an ``HFTextEncoder``.
        tokens: (N, context) token ids (they define the padding mask and, without ``inputs_embeds``, the input).
        inputs_embeds: (N, context or shorter, W) word embeddings to use instead of the ids' (learned context).
        layer_input: Edit of the hidden states entering each encoder layer (deep prompts).
        prompt_slots: Positions 1..prompt_slots hold prompts: always attended.
        layer_output: Edit of the hidden states leaving each encoder layer (residual adapters after a block,
            as AA-CLIP's text adapters; BERT's layers end with their LayerNorm).
        project: False returns the pooled (N, W) hidden state without the tower's projection (a method's
            own head replaces it, as AA-CLIP's ``text_adapter[-1]`` replaces CLIP's ``text_projection``).

    Returns:
        (N, E) features (or (N, W) pooled states), not normalised, in the tower's dtype.
    """
    text = clip.text
    pad = text.config.pad_token_id
    mask = (tokens != pad).long()
    if prompt_slots:
        mask[:, 1 : 1 + prompt_slots] = 1
    used = torch.nonzero(mask.any(dim=0)).max().item() + 1 if mask.any() else 1
    n_pos = min(max(int(used), 1 + prompt_slots), tokens.shape[1])
    tokens, mask = tokens[:, :n_pos], mask[:, :n_pos]
    hooks = []
    if layer_input is not None:
        def make_hook(index: int):  # noqa: ANN202 - forward pre-hook
            def hook(_module, args, kwargs):  # noqa: ANN001, ANN202
                if args:
                    return (layer_input(index, args[0]), *args[1:]), kwargs
                kwargs = dict(kwargs)
                kwargs["hidden_states"] = layer_input(index, kwargs["hidden_states"])
                return args, kwargs
            return hook

        hooks = [layer.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, layer in enumerate(_encoder_layers(clip))]
    if layer_output is not None:
        def make_output_hook(index: int):  # noqa: ANN202 - forward hook
            def hook(_module, _args, output):  # noqa: ANN001, ANN202
                if isinstance(output, tuple):  # transformers < 5 returns (hidden, ...)
                    return (layer_output(index, output[0]), *output[1:])
                return layer_output(index, output)
            return hook

        hooks += [layer.register_forward_hook(make_output_hook(i)) for i, layer in enumerate(_encoder_layers(clip))]
    try:
        if inputs_embeds is None:
            out = text.transformer(input_ids=tokens, attention_mask=mask)
        else:
            out = text.transformer(inputs_embeds=inputs_embeds[:, :n_pos], attention_mask=mask)
    finally:
        for handle in hooks:
            handle.remove()
    pooled = text.pooler(out, mask)
    return text.proj(pooled) if project else pooled


def replace_slots(hidden: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
    """Hidden states with positions 1..n replaced by ``prompts`` ((n, W) shared or (N, n, W) per row)."""
    if prompts.dim() == 2:
        prompts = prompts.unsqueeze(0).expand(hidden.shape[0], -1, -1)
    n = prompts.shape[1]
    return torch.cat([hidden[:, :1], prompts.to(hidden.dtype), hidden[:, 1 + n:]], dim=1)
