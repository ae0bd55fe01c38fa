"""Training slices: axial slices of the training cases, whole-tumour masks, seeded augmentation."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..engine.preprocess import preprocess_slices, scale_slices
from ..errors import InputError
from ..io import MODALITIES, case_id_of, load_case


@dataclass
class SliceSet:
    """Raw axial slices and their whole-tumour masks.

    Attributes:
        images: (N, C, H, W) float32 raw intensities, C = 1 (one modality) or 3.
        masks: (N, H, W) bool whole tumour.
        case_ids: Case of each slice. slice_index: z index of each slice in its case.
    """

    images: torch.Tensor
    masks: torch.Tensor
    case_ids: list[str]
    slice_index: list[int]

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def labels(self) -> torch.Tensor:
        """(N,) 1 where the slice contains tumour."""
        return self.masks.flatten(1).any(dim=1).long()


def load_slices(
    case_paths: Sequence[Path],
    modalities: Sequence[str],
    max_slices_per_case: int | None = None,
    balance: bool = False,
    seed: int = 0,
) -> SliceSet:
    """Axial brain slices and whole-tumour masks of labelled cases (slices without brain are skipped).

    Args:
        case_paths: Case folders (each needs a segmentation).
        modalities: One modality or three (the three input channels).
        max_slices_per_case: Keep this many brain slices per case, evenly spaced; None keeps all.
        balance: Subsample the larger of the tumour / normal slice groups (seeded) to the other's size.
        seed: Seed of the balancing.
    """
    images, masks, ids, index = [], [], [], []
    load_mods = sorted(set(modalities), key=MODALITIES.index)
    for path in case_paths:
        case = load_case(path, modalities=load_mods)
        if case.whole_tumour is None:
            raise InputError(f"{path}: case {case.case_id} has no segmentation; training needs labelled cases")
        brain = case.brain_mask.reshape(case.shape[0], -1).any(axis=1)
        keep = np.flatnonzero(brain)
        if max_slices_per_case is not None and len(keep) > max_slices_per_case:
            keep = keep[np.linspace(0, len(keep) - 1, max_slices_per_case).round().astype(int)]
        stack = np.stack([case.image(m)[keep] for m in modalities], axis=1)
        images.append(torch.from_numpy(np.ascontiguousarray(stack, dtype=np.float32)))
        masks.append(torch.from_numpy(np.ascontiguousarray(case.whole_tumour[keep])))
        ids += [case_id_of(path)] * len(keep)
        index += keep.tolist()
    if not images:
        raise InputError("no training cases: the split's train part is empty; check --data and --split")
    slices = SliceSet(torch.cat(images), torch.cat(masks), ids, index)
    return balance_slices(slices, seed) if balance else slices


def balance_slices(slices: SliceSet, seed: int) -> SliceSet:
    """Equal numbers of tumour and normal slices (the larger group subsampled, order kept)."""
    labels = slices.labels.numpy()
    positive, negative = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    n = min(len(positive), len(negative))
    if n == 0:
        return slices
    rng = np.random.default_rng([seed, 7])
    keep = np.sort(np.concatenate([rng.choice(positive, n, replace=False), rng.choice(negative, n, replace=False)]))
    return SliceSet(slices.images[keep], slices.masks[keep], [slices.case_ids[i] for i in keep], [slices.slice_index[i] for i in keep])


@dataclass(frozen=True)
class Augmentation:
    """One seeded draw: horizontal / vertical flip, rotation (deg), scale, gamma (intensity jitter)."""

    flip_x: bool = False
    flip_y: bool = False
    angle: float = 0.0
    scale: float = 1.0
    gamma: float = 1.0

    @staticmethod
    def draw(seed: int, slice_id: int, view: int) -> Augmentation:
        """The augmentation of view ``view`` of slice ``slice_id``; view 0 is the identity."""
        if view == 0:
            return Augmentation()
        rng = np.random.default_rng([seed, slice_id, view])
        flips = rng.random(2) < 0.5
        return Augmentation(bool(flips[0]), bool(flips[1]), float(rng.uniform(-10, 10)), float(rng.uniform(0.9, 1.1)),
                            float(np.exp(rng.uniform(-0.2, 0.2))))

    def grid(self, shape: tuple[int, int]) -> torch.Tensor:
        """Sampling grid (1, H, W, 2) of the rotation/scale/flips, for ``grid_sample``."""
        theta = math.radians(self.angle)
        cos, sin = math.cos(theta) / self.scale, math.sin(theta) / self.scale
        fx, fy = (-1.0 if self.flip_x else 1.0), (-1.0 if self.flip_y else 1.0)
        matrix = torch.tensor([[[cos * fx, -sin * fy, 0.0], [sin * fx, cos * fy, 0.0]]], dtype=torch.float32)
        return F.affine_grid(matrix, [1, 1, *shape], align_corners=False)


def augmented_batch(
    images: torch.Tensor,
    masks: torch.Tensor,
    augmentations: Sequence[Augmentation],
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply each slice's augmentation to image and mask alike, then the study's preprocessing.

    Args:
        images: (B, C, H, W) raw slices. masks: (B, H, W) bool.
        augmentations: One per slice.

    Returns:
        CLIP input (B, 3, S, S) and float masks (B, S, S) in {0, 1} (nearest resize), S = image_size.
    """
    images, masks = images.float(), masks.float()[:, None]
    identity = [a == Augmentation() for a in augmentations]
    if not all(identity):
        grids = torch.cat([a.grid(tuple(images.shape[-2:])) for a in augmentations]).to(images.device)
        warped = F.grid_sample(images, grids, mode="bilinear", padding_mode="zeros", align_corners=False)
        warped_masks = F.grid_sample(masks, grids, mode="nearest", padding_mode="zeros", align_corners=False)
        keep = torch.tensor(identity, device=images.device).view(-1, 1, 1, 1)
        images, masks = torch.where(keep, images, warped), torch.where(keep, masks, warped_masks)
    gamma = torch.tensor([a.gamma for a in augmentations], dtype=torch.float32, device=images.device).view(-1, 1, 1, 1)
    scaled = scale_slices(images).pow(gamma)
    inputs = preprocess_slices(scaled[:, 0] if scaled.shape[1] == 1 else scaled, image_size, mean, std)
    masks = F.interpolate(masks, size=(image_size, image_size), mode="nearest")[:, 0]
    return inputs, masks
