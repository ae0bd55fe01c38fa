"""Losses as in the official train.py files (VAND-APRIL-GAN, AnomalyCLIP, AdaCLIP): focal + dice on maps.

Official ``FocalLoss(gamma=2, smooth=1e-5)`` on the 2-channel (normal, abnormal) probability map of each
tapped layer, plus ``BinaryDiceLoss`` on the abnormal channel vs the mask and on the normal channel vs
1 - mask; AnomalyCLIP adds cross-entropy of the image-level (normal, abnormal) logits.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def focal_loss(probs: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, smooth: float = 1e-5) -> torch.Tensor:
    """The official FocalLoss (alpha None, balance_index 0) on probabilities.

    Args:
        probs: (B, 2, H, W) probabilities of (normal, abnormal), or (B, 2) image probabilities.
        target: (B, H, W) or (B,) in {0, 1}.
    """
    n_class = probs.shape[1]
    flat = probs if probs.ndim == 2 else probs.permute(0, 2, 3, 1).reshape(-1, n_class)
    one_hot = F.one_hot(target.reshape(-1).long(), n_class).to(flat.dtype)
    one_hot = one_hot.clamp(smooth / (n_class - 1), 1.0 - smooth)
    pt = (one_hot * flat).sum(dim=1) + smooth
    return (-((1.0 - pt) ** gamma) * pt.log()).mean()


def dice_loss(prob: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """The official BinaryDiceLoss: 1 - mean over the batch of (2|X.Y| + 1) / (|X| + |Y| + 1)."""
    n = target.shape[0]
    x, y = prob.reshape(n, -1), target.reshape(n, -1)
    dice = (2 * (x * y).sum(dim=1) + smooth) / (x.sum(dim=1) + y.sum(dim=1) + smooth)
    return 1.0 - dice.sum() / n


def map_losses(layer_probs: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Sum over tapped layers of focal + dice(abnormal, mask) + dice(normal, 1 - mask).

    Args:
        layer_probs: (B, L, 2, H, W) per-layer (normal, abnormal) probabilities at mask size.
        masks: (B, H, W) in {0, 1}.
    """
    total = layer_probs.new_zeros(())
    for layer in range(layer_probs.shape[1]):
        probs = layer_probs[:, layer].float()
        total = total + focal_loss(probs, masks) + dice_loss(probs[:, 1], masks) + dice_loss(probs[:, 0], 1.0 - masks)
    return total


IMAGE_LOSS = {"anomalyclip": "cross_entropy", "adaclip": "focal"}
"""Image-level loss of each method's train.py (VAND trains on the maps only)."""


def mvfa_loss(details: Any, masks: torch.Tensor) -> torch.Tensor:
    """MVFA-AD's train_zero.py / train_few.py loss, summed over the tapped levels.

    Per level: ``BCEWithLogitsLoss`` of the det head's mean abnormal *probability* against the image
    label (a probability fed as a logit: the official quirk, kept), plus, with masks, focal loss on
    the seg head's 2-channel softmax and ``BinaryDiceLoss`` of its abnormal channel vs the mask (no
    normal-channel dice, unlike VAND). BraTS slices always have masks (empty for normal slices), so
    seg and det losses are always both used, as for the official segmentation datasets.

    Args:
        details: :class:`~napari_clip_ad.methods.mvfa.MvfaDetails` (``layer_probs`` (B, L, 2, H, W),
            ``det_scores`` (B, L)).
        masks: (B, H, W) in {0, 1}.
    """
    labels = masks.flatten(1).amax(dim=1).float()
    total = masks.new_zeros((), dtype=torch.float32)
    for level in range(details.layer_probs.shape[1]):
        total = total + F.binary_cross_entropy_with_logits(details.det_scores[:, level].float(), labels)
        probs = details.layer_probs[:, level].float()
        total = total + focal_loss(probs, masks) + dice_loss(probs[:, 1], masks)
    return total


def aaclip_loss(details: Any, masks: torch.Tensor, text_norm_weight: float = 0.1) -> torch.Tensor:
    """AA-CLIP's train.py losses (``calculate_seg_loss``: focal + dice(normal, 1 - mask) + dice(abnormal, mask)).

    Stage 1 (``details.text`` has grad, one level: the official loop keeps only the last level's loss) adds
    ``text_norm_weight * (mean over the batch of <t_normal, t_abnormal>)^2``; stage 2 (``det_logits``) sums
    the seg loss over levels and adds ``cross_entropy(det @ T, label)`` (unscaled logits, as train.py).
    """
    loss = map_losses(details.layer_probs, masks)
    if getattr(details, "det_logits", None) is not None:
        labels = masks.flatten(1).amax(dim=1).long()
        return F.cross_entropy(details.det_logits.float(), labels) + loss
    text = details.text.float()
    return loss + text_norm_weight * (text[0] * text[1]).sum() ** 2


def method_loss(details: Any, masks: torch.Tensor, method: str) -> torch.Tensor:
    """Training loss of one batch from a method's head output.

    Args:
        details: An object with ``layer_probs`` (B, L, 2, H, W) and optionally ``image_logits`` (B, 2)
            (e.g. AnomalyCLIP's ``HeadDetails``), or an :class:`AnomalyOutput` whose unit maps are
            treated as one layer's abnormal probability.
        masks: (B, H, W) in {0, 1}.
        method: Method name: picks the image-level loss against "slice has tumour" (:data:`IMAGE_LOSS`):
            cross-entropy of ``image_logits`` (AnomalyCLIP) or focal loss on ``image_probs`` (AdaCLIP).
    """
    if method == "mvfa":
        return mvfa_loss(details, masks)
    if method == "aaclip":
        return aaclip_loss(details, masks)
    layer_probs = getattr(details, "layer_probs", None)
    if layer_probs is None:
        abnormal = details.unit_maps()
        layer_probs = torch.stack([1.0 - abnormal, abnormal], dim=1)[:, None]
    loss = map_losses(layer_probs, masks)
    labels = masks.flatten(1).amax(dim=1).long()
    kind = IMAGE_LOSS.get(method)
    if kind == "cross_entropy" and getattr(details, "image_logits", None) is not None:
        loss = loss + F.cross_entropy(details.image_logits.float(), labels)
    elif kind == "focal" and getattr(details, "image_probs", None) is not None:
        loss = loss + focal_loss(details.image_probs.float(), labels)
    return loss
