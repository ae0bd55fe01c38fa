"""Image-size handling of ViT backbones: positional-embedding resizing and patch grids."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import WeightsError


def patch_size_of(visual: nn.Module) -> int:
    """Patch size of an open_clip VisionTransformer."""
    conv = getattr(visual, "conv1", None)
    if conv is None:
        raise WeightsError(
            f"the visual tower {type(visual).__name__} is not an open_clip VisionTransformer; "
            "these methods tap its blocks and need one (e.g. a CLIP ViT backbone)"
        )
    return int(conv.kernel_size[0])


def grid_for(visual: nn.Module, image_size: int) -> int:
    """Side of the patch grid for a square image (trailing pixels that do not fill a patch are dropped)."""
    patch = patch_size_of(visual)
    if image_size < patch or image_size % 1:
        raise WeightsError(f"image size {image_size} is smaller than the backbone's patch size {patch}")
    return image_size // patch


def resize_positional_embedding(
    visual: nn.Module, image_size: int, mode: str = "bicubic", antialias: bool = True
) -> nn.Module:
    """Resize the visual positional embedding (CLS row kept) to the grid of ``image_size``, in place.

    Args:
        visual: open_clip VisionTransformer.
        image_size: Square input size the model will see.
        mode: Interpolation mode (the official codes differ: VAND bicubic+antialias, AdaCLIP bicubic,
            AnomalyCLIP bilinear).
        antialias: Passed to ``F.interpolate`` (align_corners is always False, as in every official code).
    """
    grid = grid_for(visual, image_size)
    pos = visual.positional_embedding.data
    old = int(round((pos.shape[0] - 1) ** 0.5))
    if old != grid:
        cls_row, grid_rows = pos[:1], pos[1:]
        grid_rows = grid_rows.reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
        kwargs = {"antialias": antialias} if mode in ("bilinear", "bicubic") else {}
        grid_rows = F.interpolate(grid_rows, size=(grid, grid), mode=mode, align_corners=False, **kwargs)
        grid_rows = grid_rows.permute(0, 2, 3, 1).reshape(grid * grid, -1).to(pos.dtype)
        visual.positional_embedding = nn.Parameter(torch.cat([cls_row, grid_rows]), requires_grad=False)
    visual.image_size = (image_size, image_size)
    visual.grid_size = (grid, grid)
    return visual


def embed_patches(visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """CLS + patch embeddings plus positional embedding, after ``ln_pre``: (B, 1 + N, width).

    The input of the first transformer block of an open_clip VisionTransformer (no patch dropout).
    """
    x = visual.conv1(images.to(visual.conv1.weight.dtype))
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
    return visual.ln_pre(x)
