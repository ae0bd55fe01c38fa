"""AA-CLIP training passes (official ``train.py``): stage-1 frozen image features and both stages' predictions.

Stage 1 (``train_text_adapter``) aligns the *text* adapters to frozen image features: the patch tokens
of a "surgery" copy of CLIP (``clip_surgery.visual.DAPM_replace(DPAM_layer=20)``: the last 19 blocks'
attention replaced by V-V attention, ``model/transformer.py: Attention``) after ``ln_post`` and
``proj``, L2-normalised, **plus** the normalised CLS embedding of the unmodified CLIP (not
renormalised). Quirks kept:

- the replaced ``Attention.forward`` reads ``B, N, C = q_x.shape`` from a sequence-first (L, B, C)
  tensor, so its softmax runs over the *images of the batch* at each token position, not over
  tokens (with batch 1 it returns ``v``); only the V-V branch is returned (``x_ori`` is discarded),
  with the qkv bias of the original block and no attention mask;
- ``train.py`` taps levels 6 12 18 24 but reassigns ``loss = calculate_seg_loss(...)`` inside the
  loop, so only the last level's loss (plus the orthogonality term) is back-propagated: only that
  level is computed here (same gradients).

Because the surgery features of a slice depend on the other slices of its batch (first quirk), and
stage 2 adapts the stream from the first block on, neither stage can use the frozen-feature cache.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones import embed_patches
from .aaclip import AAClip
from .adaclip_prompts import run_block


class TextStageDetails(NamedTuple):
    """Stage-1 predictions: ``layer_probs`` (B, 1, 2, H, W) of the last level, anchors (2, embed) with grad."""

    layer_probs: torch.Tensor
    text: torch.Tensor


def batch_mixing_vv_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One open_clip residual block with the official surgery ``Attention`` (see module doc), on (B, L, C).

    Attention runs over the batch axis per token position and head (the official layout quirk).
    """
    attn = block.attn
    width = x.shape[-1]
    heads = attn.num_heads
    h = block.ln_1(x)
    v = F.linear(h, attn.in_proj_weight[2 * width:], attn.in_proj_bias[2 * width:] if attn.in_proj_bias is not None else None)
    batch, length = v.shape[:2]
    v = v.reshape(batch, length, heads, width // heads).permute(1, 2, 0, 3)  # (L, heads, B, hd): the official (B, N) swap
    scale = (width // heads) ** -0.5
    weights = ((v @ v.transpose(-2, -1)) * scale).softmax(dim=-1)
    out = (weights @ v).permute(2, 0, 1, 3).reshape(batch, length, width)
    x = x + block.ls_1(attn.out_proj(out))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


@torch.no_grad()
def surgery_features(method: AAClip, images: torch.Tensor) -> torch.Tensor:
    """Stage-1 image features of the last level (B, N, embed): surgery patch tokens + the plain CLS embedding."""
    visual = method.clip.visual
    blocks = visual.transformer.resblocks
    batch_first = getattr(visual.transformer, "batch_first", True)
    n_blocks, last = len(blocks), max(method.layers)
    first_vv = n_blocks - method.surgery_blocks  # 0-based index of the first replaced block
    x = embed_patches(visual, images.to(method.device))
    shared = min(first_vv, last)
    for block in blocks[:shared]:
        x = run_block(block, x, batch_first)
    plain, surgery = x, x
    for index in range(shared, n_blocks):  # the plain CLIP runs every block for its pooled CLS
        plain = run_block(blocks[index], plain, batch_first)
        if index < last:
            surgery = batch_mixing_vv_block(blocks[index], surgery) if index >= first_vv else run_block(blocks[index], surgery, batch_first)
    cls = visual.ln_post(plain[:, 0]) @ visual.proj
    cls = cls / cls.norm(dim=-1, keepdim=True)
    patches = visual.ln_post(surgery[:, 1:]) @ visual.proj
    patches = patches / patches.norm(dim=-1, keepdim=True)
    return patches + cls.unsqueeze(1)


def text_stage_details(method: AAClip, images: torch.Tensor) -> TextStageDetails:
    """Stage-1 forward: frozen features vs anchors through the (trainable) text adapters."""
    features = surgery_features(method, images)
    text = method.adapted_anchors()
    return TextStageDetails(method.level_probs(features, text).unsqueeze(1), text)


def image_stage_probs(method: AAClip, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stage-2 forward: (layer_probs (B, L, 2, H, W), det logits (B, 2), output maps) with fixed anchors."""
    details = method.forward_details(images)
    probs = torch.stack([method.level_probs(tokens, details.text) for tokens in details.seg_tokens], dim=1)
    det_logits = details.det_token @ details.text.to(details.det_token.dtype).t()
    return probs, det_logits, details.output
