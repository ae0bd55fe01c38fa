"""MVFA-AD's few-shot path: reference augmentation, memory bank, nearest-neighbour map, set-wise fusion.

Official reference: MediaBrain-SJTU/MVFA-AD (commit a30bf7b), ``utils.py`` (``augment``, ``rot_img``,
``translation_img``, ``hflip_img``, ``vflip_img``, ``cos_sim``) and ``test_few.py`` (memory bank and
``test``). Quirks kept:

- the K normal references become 11 K images: the originals, rotations by -pi/8, -pi/16, pi/16, pi/8,
  translations by (+-0.1, +-0.1) (normalised coordinates), one horizontal and one vertical flip; rotations
  and translations by ``affine_grid`` + ``grid_sample`` (bilinear, reflection padding, align_corners
  False), on the CPU in float32 as the official ``.type(torch.FloatTensor)`` forces;
- the memory holds the seg-adapter tokens of every augmented image **with the CLS row** (``p[0]``),
  unnormalised, float32 (built outside autocast);
- per tapped level: ``min`` over the memory of ``1 - cos`` (``cos_sim`` clamps norms at 1e-8) for
  each patch (CLS dropped on the query side), bilinear resize (align_corners True), summed over levels;
- the final map is ``0.5 * minmax(zero-shot maps) + 0.5 * minmax(few-shot maps)`` with min and max
  over the **whole evaluated set**, and the image score is that map's maximum (segmentation datasets
  such as Brain; the det-head variant for classification-only datasets is not used here).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ROTATIONS = (-math.pi / 8, -math.pi / 16, math.pi / 16, math.pi / 8)
TRANSLATIONS = ((0.1, 0.1), (-0.1, 0.1), (-0.1, -0.1), (0.1, -0.1))
AUGMENTED_PER_REFERENCE = 1 + len(ROTATIONS) + len(TRANSLATIONS) + 2
COS_EPS = 1e-8


def _warp(images: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    theta = matrix[None].to(torch.float32).repeat(images.shape[0], 1, 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def augment_references(images: torch.Tensor) -> torch.Tensor:
    """The official ``augment(fewshot_img)`` (no mask): (K, 3, H, W) in [0, 1] -> (11 K, 3, H, W).

    Order: originals, the four rotations, the four translations, horizontal flip, vertical flip
    (each block holds all K images). Runs on the CPU in float32; returns on the input's device.
    """
    device = images.device
    x = images.detach().to("cpu", torch.float32)
    parts = [x]
    for angle in ROTATIONS:
        theta = torch.tensor(angle)  # float32, as torch.tensor(python float) in get_rot_mat
        cos, sin = torch.cos(theta), torch.sin(theta)
        parts.append(_warp(x, torch.stack([torch.stack([cos, -sin, torch.zeros(())]), torch.stack([sin, cos, torch.zeros(())])])))
    for a, b in TRANSLATIONS:
        parts.append(_warp(x, torch.tensor([[1.0, 0.0, a], [0.0, 1.0, b]])))
    parts.append(x.flip(-1))  # kornia hflip
    parts.append(x.flip(-2))  # kornia vflip
    return torch.cat(parts).to(device)


def cosine_similarity(memory: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """The official ``cos_sim(a, b)``: (M, D) x (N, D) -> (M, N), norms clamped at 1e-8."""
    a = memory / memory.norm(dim=1, keepdim=True).clamp(min=COS_EPS)
    b = queries / queries.norm(dim=1, keepdim=True).clamp(min=COS_EPS)
    return a @ b.t()


def few_shot_maps(memory: list[torch.Tensor], tokens: list[torch.Tensor], image_size: int) -> torch.Tensor:
    """Per-image few-shot maps, summed over levels (the official ``score_map_few``).

    Args:
        memory: Per level, (M, D) seg-adapter tokens of the augmented references (CLS rows included).
        tokens: Per level, (B, N, D) seg-adapter patch tokens of the images (CLS dropped).
        image_size: Output side.

    Returns:
        (B, image_size, image_size) float32 maps; each level contributes values in [0, 2].
    """
    batch, n_tokens = tokens[0].shape[:2]
    side = round(n_tokens**0.5)
    total = torch.zeros(batch, image_size, image_size, dtype=torch.float32, device=tokens[0].device)
    for bank, level in zip(memory, tokens):
        bank = bank.to(level.device, torch.float32)
        for b in range(batch):  # one image at a time: the (M, N) similarity of all images would not fit
            distance = (1.0 - cosine_similarity(bank, level[b].float())).min(dim=0).values
            grid = distance.reshape(1, 1, side, side)
            total[b] += F.interpolate(grid, size=(image_size, image_size), mode="bilinear", align_corners=True)[0, 0]
    return total


def min_max(values: torch.Tensor) -> torch.Tensor:
    """``(v - v.min()) / (v.max() - v.min())`` over the whole tensor (a constant tensor gives zeros)."""
    low, high = values.min(), values.max()
    span = high - low
    if span <= 0:  # the official code would divide by zero (NaN); a constant set carries no ranking
        return torch.zeros_like(values)
    return (values - low) / span


def fuse_set(zero_maps: torch.Tensor, few_maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The official few-shot fusion over an evaluated set: maps and image scores.

    Args:
        zero_maps: (S, H, W) zero-shot maps (sum of the seg levels' abnormal probabilities) of the set.
        few_maps: (S, H, W) few-shot maps of the same images.

    Returns:
        (S, H, W) maps ``0.5 * minmax(zero) + 0.5 * minmax(few)`` in [0, 1] (min and max over the whole
        set) and (S,) scores = per-image maximum of those maps.
    """
    fused = 0.5 * min_max(zero_maps.float()) + 0.5 * min_max(few_maps.float())
    return fused, fused.flatten(1).amax(dim=1)
