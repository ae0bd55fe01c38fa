"""AnoVL's visual side: a value-value (V-V) attention path in every block of a CLIP ViT.

Official reference: hq-deng/AnoVL, open_clip/transformer.py (``VisionTransformer.forward`` replaces
the attention of all 12 blocks by ``Attention``; ``ResidualAttentionBlock.forward``; ``Transformer``)
and model.py (``LinearLayer``). Each block computes, from ``ln_1`` of the ORIGINAL stream and with
its own in_proj / out_proj weights, the ordinary attention (softmax(q k^T s) v) and a V-V attention
(q and k replaced by v). The original stream is plain CLIP (attention + MLP); the V-V stream starts
as the block-1 input and only accumulates the V-V outputs (the MLP is skipped).

The official blocks update the V-V tensor in place (``x += x_res``), so every V-V entry of the
tapped-token list is one tensor holding the state after the LAST block; the map reads entry 6 of
``patch_tokens_ln`` (the V-V entry of the 4th tapped layer), i.e. that final V-V state, whatever the
tapped layers. The image feature is the original stream's CLS (the official code copies it into
the V-V tensor's row 0), through ``ln_post`` and ``proj``. The official block has no LayerScale; we
apply the block's ``ls_1`` / ``ls_2``, which are identities on every CLIP backbone in the registry.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones.geometry import embed_patches


class VisualTokens(NamedTuple):
    """What AnoVL reads from the visual tower.

    Attributes:
        patch_tokens: (B, N, E) final V-V patch tokens through ``ln_post`` and ``proj`` (not
            normalised), or None when only the original path was run.
        image_features: (B, E) original-path CLS through ``ln_post`` and ``proj`` (not normalised).
    """

    patch_tokens: torch.Tensor | None
    image_features: torch.Tensor



def dual_attention(block: nn.Module, x: torch.Tensor, value_value: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Original and V-V attention outputs of ``x`` (B, N, width), both through ``out_proj``.

    Matches the official ``Attention``: logits are ``(a @ b^T) * head_dim**-0.5``, softmax, times v.
    Both paths run through ``F.scaled_dot_product_attention`` (fused, no (N, N) matrix kept), the
    same function up to float rounding (~1e-7; the official scales after the product and normalises
    its original path with ``exp / sum`` without a max shift, which SDPA's softmax cannot overflow).

    Returns:
        ``(original, value_value)``; the second is None when ``value_value`` is False.
    """
    attn = block.attn
    batch, n_tokens, width = x.shape
    heads = attn.num_heads
    scale = (width // heads) ** -0.5
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = qkv.reshape(batch, n_tokens, 3, heads, width // heads).permute(2, 0, 3, 1, 4).unbind(0)

    def merge(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        out = F.scaled_dot_product_attention(query, key, v, scale=scale)
        return attn.out_proj(out.transpose(1, 2).reshape(batch, n_tokens, width))

    original = merge(q, k)
    if not value_value:
        return original, None
    return original, merge(v, v)


def encode_visual(visual: nn.Module, images: torch.Tensor, value_value: bool = True) -> VisualTokens:
    """Run the visual tower with AnoVL's V-V path in every block.

    Args:
        visual: open_clip VisionTransformer (positional embedding already sized for ``images``).
        images: (B, 3, H, W) CLIP-normalised.
        value_value: False runs only the original path (enough for the image feature).
    """
    original = embed_patches(visual, images)
    vv = original if value_value else None
    for block in visual.transformer.resblocks:
        attended, vv_attended = dual_attention(block, block.ln_1(original), value_value)
        if vv is not None:
            vv = vv + block.ls_1(vv_attended)  # V-V stream: no MLP
        original = original + block.ls_1(attended)
        original = original + block.ls_2(block.mlp(block.ln_2(original)))
    image_features = visual.ln_post(original[:, 0]) @ visual.proj
    patch_tokens = visual.ln_post(vv[:, 1:]) @ visual.proj if vv is not None else None
    return VisualTokens(patch_tokens, image_features)
