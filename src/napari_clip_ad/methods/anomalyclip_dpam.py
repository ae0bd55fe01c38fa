"""AnomalyCLIP's visual side: DPAM (a value-value attention path) in the last blocks of a CLIP ViT.

Official reference: zqhang/AnomalyCLIP, AnomalyCLIP_lib/AnomalyCLIP.py (``DAPM_replace``,
``Attention``, ``ResidualAttentionBlock.forward``, ``Transformer.AnomalyCLIP_forward``,
``VisionTransformer.forward``). In each DPAM block the block's own in_proj / out_proj weights give
two attention outputs of ``ln_1(original stream)``: the ordinary q-k one and a V-V one (q and k both
replaced by v). The original stream is the plain CLIP residual stream (attention + MLP); the V-V
stream starts as the input of the first DPAM block and only accumulates the V-V outputs (no MLP).
Tapped blocks inside the DPAM range give their V-V stream, blocks before it their plain stream.
Nothing here has parameters: the visual outputs can be cached.
"""

from __future__ import annotations

from typing import Iterator, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones.geometry import embed_patches


class VisualOutputs(NamedTuple):
    """Frozen visual outputs AnomalyCLIP's head needs (cacheable for training).

    Attributes:
        tokens: (B, n_layers, N, E) patch tokens of the tapped blocks after ``ln_post`` and ``proj``
            (CLS dropped), not normalised.
        image_features: (B, E) original-path CLS of the last block times ``proj`` (no ``ln_post``).
    """

    tokens: torch.Tensor
    image_features: torch.Tensor



def attention_paths(block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Original (softmax(q k^T s) v) and V-V (softmax(v v^T s) v) attention of ``x`` (B, N, C).

    Both reuse the block's ``in_proj`` and go through its ``out_proj``; s = head_dim ** -0.5.
    """
    attn = block.attn
    batch, n_tokens, width = x.shape
    heads = attn.num_heads
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = qkv.reshape(batch, n_tokens, 3, heads, width // heads).permute(2, 0, 3, 1, 4).unbind(0)
    scale = (width // heads) ** -0.5
    original = F.scaled_dot_product_attention(q, k, v, scale=scale)
    value_value = F.scaled_dot_product_attention(v, v, v, scale=scale)

    def merge(out: torch.Tensor) -> torch.Tensor:
        return attn.out_proj(out.transpose(1, 2).reshape(batch, n_tokens, width))

    return merge(original), merge(value_value)


def _plain_block(block: nn.Module, x: torch.Tensor, batch_first: bool) -> torch.Tensor:
    if batch_first:
        return block(x)
    return block(x.transpose(0, 1)).transpose(0, 1)


def iter_dpam_blocks(
    visual: nn.Module, images: torch.Tensor, n_dpam: int
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor | None]]:
    """Run the visual blocks with DPAM in the last ``n_dpam`` of them.

    Yields:
        (block index counted from 1, original stream (B, 1 + N, width), V-V stream or None before
        the DPAM range), after each block.
    """
    transformer = visual.transformer
    batch_first = getattr(transformer, "batch_first", True)
    blocks = transformer.resblocks
    first_dpam = len(blocks) - n_dpam
    x = embed_patches(visual, images)
    value_stream: torch.Tensor | None = None
    for i, block in enumerate(blocks):
        if i < first_dpam:
            x = _plain_block(block, x, batch_first)
        else:
            original, value_value = attention_paths(block, block.ln_1(x))
            # The V-V stream starts from the first DPAM block's input and skips every MLP.
            value_stream = (x if value_stream is None else value_stream) + block.ls_1(value_value)
            x = x + block.ls_1(original)
            x = x + block.ls_2(block.mlp(block.ln_2(x)))
        yield i + 1, x, value_stream


def dpam_visual_outputs(visual: nn.Module, images: torch.Tensor, taps: Sequence[int], n_dpam: int) -> VisualOutputs:
    """Projected tapped tokens and the image feature, as AnomalyCLIP's ``encode_image`` gives them."""
    wanted = set(taps)
    tapped: dict[int, torch.Tensor] = {}
    final = images
    for index, original, value_stream in iter_dpam_blocks(visual, images, n_dpam):
        if index in wanted:
            tapped[index] = original if value_stream is None else value_stream
        final = original
    tokens = torch.stack([visual.ln_post(tapped[i][:, 1:]) @ visual.proj for i in taps], dim=1)
    # Official quirk: the image feature is the CLS of the original path times proj WITHOUT ln_post.
    image_features = final[:, 0] @ visual.proj
    return VisualOutputs(tokens, image_features)
