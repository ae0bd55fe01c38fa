"""DINOv2 backbones (vision only) on timm's ``VisionTransformer``, with the official positional interpolation.

Weights come from a local file in the official torch-hub layout (``dinov2_vits14_pretrain.pth`` as Meta
publishes it), from timm's converted copy in the Hugging Face cache (``timm/vit_small_patch14_dinov2.lvd142m``),
or from the torch-hub cache. The architecture is read from the tensor shapes (heads = width // 64, as in every
released DINOv2). The forward is timm's; the one place timm differs from facebookresearch/dinov2 is the
positional-embedding interpolation (timm: bicubic to a size with antialias), so the official one
(``DinoVisionTransformer.interpolate_pos_encoding`` in dinov2/models/vision_transformer.py) is computed here
once per image size and stored in the model.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError, WeightsError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

DINOV2_HUB_FILES: dict[str, tuple[str, str]] = {
    # registry name -> (official torch-hub file, timm hub model)
    "dinov2-vits14": ("dinov2_vits14_pretrain.pth", "vit_small_patch14_dinov2.lvd142m"),
    "dinov2-vitb14": ("dinov2_vitb14_pretrain.pth", "vit_base_patch14_dinov2.lvd142m"),
    "dinov2-vitl14": ("dinov2_vitl14_pretrain.pth", "vit_large_patch14_dinov2.lvd142m"),
    "dinov2-vitg14": ("dinov2_vitg14_pretrain.pth", "vit_giant_patch14_dinov2.lvd142m"),
    "dinov2-vits14-reg": ("dinov2_vits14_reg4_pretrain.pth", "vit_small_patch14_reg4_dinov2.lvd142m"),
    "dinov2-vitb14-reg": ("dinov2_vitb14_reg4_pretrain.pth", "vit_base_patch14_reg4_dinov2.lvd142m"),
    "dinov2-vitl14-reg": ("dinov2_vitl14_reg4_pretrain.pth", "vit_large_patch14_reg4_dinov2.lvd142m"),
    "dinov2-vitg14-reg": ("dinov2_vitg14_reg4_pretrain.pth", "vit_giant_patch14_reg4_dinov2.lvd142m"),
}

TINY_DINOV2 = {"width": 64, "depth": 12, "patch": 14, "grid": 16, "registers": 0}
"""The ``tiny-dinov2`` random test architecture (one head of 64, 12 blocks, native 224 px)."""


def is_dinov2_state(state: dict[str, torch.Tensor]) -> bool:
    """True for a DINOv2 state dict in the official (torch hub) or timm layout."""
    return "patch_embed.proj.weight" in state and "blocks.0.attn.qkv.weight" in state and "pos_embed" in state


def _to_timm_layout(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], bool]:
    """Official -> timm keys (as timm's ``_convert_dinov2``); returns (state, was_official)."""
    official = "mask_token" in state or "register_tokens" in state or any(".mlp.w12." in k for k in state)
    if not official:
        return dict(state), False
    out: dict[str, torch.Tensor] = {}
    rest = {k: v for k, v in state.items() if k != "mask_token"}
    if "register_tokens" in rest:
        # With registers the timm model is no_embed_class: the CLS row of pos_embed is folded into cls_token.
        out["reg_token"] = rest.pop("register_tokens")
        out["cls_token"] = rest.pop("cls_token") + rest["pos_embed"][:, 0]
        out["pos_embed"] = rest.pop("pos_embed")[:, 1:]
    for key, value in rest.items():
        out[key.replace(".mlp.w12.", ".mlp.fc1.").replace(".mlp.w3.", ".mlp.fc2.")] = value
    return out, True


def build_dinov2(state: dict[str, torch.Tensor], source: str) -> tuple[nn.Module, dict[str, Any]]:
    """A timm VisionTransformer holding a DINOv2 state dict; architecture from the tensor shapes.

    Raises:
        WeightsError: The tensors do not form a DINOv2 ViT.
    """
    from timm.layers import SwiGLUPacked
    from timm.models.vision_transformer import VisionTransformer

    timm_state, official = _to_timm_layout(state)
    try:
        width, _, patch, _ = timm_state["patch_embed.proj.weight"].shape
        depth = len({k.split(".")[1] for k in timm_state if k.startswith("blocks.")})
        registers = int(timm_state["reg_token"].shape[1]) if "reg_token" in timm_state else 0
        n_pos = timm_state["pos_embed"].shape[1] - (0 if registers else 1)
        grid = int(round(math.sqrt(n_pos)))
        if grid * grid != n_pos:
            raise ValueError(f"pos_embed has {n_pos} patch rows, not a square grid")
        hidden = timm_state["blocks.0.mlp.fc1.weight"].shape[0]
        swiglu = hidden == timm_state["blocks.0.mlp.fc2.weight"].shape[1] * 2
        kwargs: dict[str, Any] = dict(
            img_size=grid * patch, patch_size=patch, embed_dim=width, depth=depth, num_heads=max(1, width // 64),
            mlp_ratio=hidden / width, init_values=1e-5 if "blocks.0.ls1.gamma" in timm_state else None,
            num_classes=0, reg_tokens=registers, no_embed_class=registers > 0,
        )
        if swiglu:
            kwargs.update(mlp_layer=SwiGLUPacked, act_layer=nn.SiLU)
        model = VisionTransformer(**kwargs)
        model.load_state_dict(timm_state, strict=True)
    except Exception as exc:
        raise WeightsError(f"{source}: not a DINOv2 ViT state dict ({str(exc).splitlines()[0][:200]})") from None
    info = {
        "family": "dinov2", "width": int(width), "depth": depth, "patch": int(patch), "native_grid": grid,
        "registers": registers, "layout": "official torch-hub" if official else "timm",
        # dinov2/hub/backbones.py: plain models interpolate with offset 0.1, no antialias; the -reg models
        # with antialias and offset 0.0 (then F.interpolate gets an output size, not a scale factor).
        "interpolate_antialias": registers > 0, "interpolate_offset": 0.0 if registers else 0.1,
    }
    model.register_buffer("native_pos_embed", model.pos_embed.detach().clone(), persistent=False)
    arch = f"DINOv2 ViT(width={width},depth={depth},patch={patch}{',reg' + str(registers) if registers else ''})"
    info["arch"] = arch
    return model, info


def official_patch_pos_embed(patch_pos: torch.Tensor, grid: int, antialias: bool, offset: float) -> torch.Tensor:
    """Resample (1, M*M, C) patch positional rows to a (grid x grid) grid as facebookresearch/dinov2 does.

    Quirk kept from ``interpolate_pos_encoding``: with an offset the call passes ``scale_factor =
    (grid + 0.1) / M`` (not an output size), in float32, bicubic, align_corners False.
    """
    n, dim = patch_pos.shape[1], patch_pos.shape[2]
    m = int(math.sqrt(n))
    x = patch_pos.float().reshape(1, m, m, dim).permute(0, 3, 1, 2)
    if offset:
        scale = (float(grid + offset) / m, float(grid + offset) / m)
        x = F.interpolate(x, mode="bicubic", antialias=antialias, scale_factor=scale)
    else:
        x = F.interpolate(x, mode="bicubic", antialias=antialias, size=(grid, grid))
    if tuple(x.shape[-2:]) != (grid, grid):
        raise InputError(f"positional embedding could not be resampled to {grid}x{grid}")
    return x.permute(0, 2, 3, 1).reshape(1, grid * grid, dim).to(patch_pos.dtype)


def set_dinov2_image_size(model: nn.Module, info: dict[str, Any], image_size: int) -> int:
    """Prepare the model for square inputs of ``image_size`` (a multiple of the patch size); returns the grid.

    The stored positional embedding is recomputed from the native one with the official interpolation
    (unchanged at the native grid, as the official code returns ``pos_embed`` as is there).
    """
    patch = info["patch"]
    if image_size < patch or image_size % patch:
        raise InputError(f"image size {image_size} is not a multiple of the DINOv2 patch size {patch} (e.g. {max(patch, image_size // patch * patch)})")
    grid = image_size // patch
    native = model.native_pos_embed
    has_cls_row = not info["registers"]
    if grid == info["native_grid"]:
        pos = native
    else:
        rows = native[:, 1:] if has_cls_row else native
        rows = official_patch_pos_embed(rows, grid, info["interpolate_antialias"], info["interpolate_offset"])
        pos = torch.cat([native[:, :1], rows], dim=1) if has_cls_row else rows
    model.pos_embed = nn.Parameter(pos.clone(), requires_grad=False)
    model.patch_embed.img_size = (image_size, image_size)
    model.patch_embed.grid_size = (grid, grid)
    model.patch_embed.num_patches = grid * grid
    return grid


def dinov2_features(
    model: nn.Module, images: torch.Tensor, blocks: list[int], norm: bool = True, need_cls: bool = False
) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """Patch tokens after the given blocks (counted from 1) and, if asked, the final CLS output.

    As the official ``get_intermediate_layers(x, n=[i-1, ...], norm=True)``: each tapped output goes through
    the final LayerNorm, CLS and register tokens dropped. The CLS output is the official ``model(x)``: the
    final-norm CLS token of the last block (the head is Identity). Without ``need_cls`` the blocks after the
    last tapped one are not run.

    Returns:
        ([(B, N, C) per block], (B, C) CLS output or None).
    """
    x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
    prefix = model.num_prefix_tokens
    wanted = set(blocks)
    taken: dict[int, torch.Tensor] = {}
    last = len(model.blocks) if need_cls else max(blocks)
    for i, block in enumerate(model.blocks, start=1):
        if i > last:
            break
        x = block(x)
        if i in wanted:
            taken[i] = (model.norm(x) if norm else x)[:, prefix:]
    cls = model.norm(x)[:, 0] if need_cls else None
    return [taken[i] for i in blocks], cls


def tiny_dinov2_state(seed: int = 0, registers: int = 0, depth: int = 12, width: int = 64, grid: int = 16) -> dict[str, torch.Tensor]:
    """A random DINOv2 state dict in the official torch-hub key layout (for tests and smoke runs).

    Official layout: ``cls_token``, ``pos_embed`` (1, 1 + grid**2, C), ``register_tokens`` (registers only),
    ``mask_token``, ``patch_embed.proj``, ``blocks.i.{norm1,attn.qkv,attn.proj,ls1.gamma,norm2,mlp.fc1,mlp.fc2,
    ls2.gamma}``, ``norm``; layer scale present (init_values 1.0 in dinov2/hub/backbones.py).
    """
    from timm.models.vision_transformer import VisionTransformer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = VisionTransformer(
            img_size=grid * 14, patch_size=14, embed_dim=width, depth=depth, num_heads=max(1, width // 64),
            init_values=1.0, num_classes=0, reg_tokens=registers, no_embed_class=registers > 0,
        )
        nn.init.normal_(model.pos_embed, std=0.02)
        nn.init.normal_(model.cls_token, std=0.02)
        for block in model.blocks:  # layer scale well away from 0 so every block matters in random models
            block.ls1.gamma.data.uniform_(0.5, 1.0)
            block.ls2.gamma.data.uniform_(0.5, 1.0)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if registers:
            nn.init.normal_(model.reg_token, std=0.02)
            cls_row = torch.randn(1, 1, width) * 0.02
            state["register_tokens"] = model.reg_token.detach().clone()
            del state["reg_token"]
            state["pos_embed"] = torch.cat([cls_row, state["pos_embed"]], dim=1)
            state["cls_token"] = state["cls_token"] - cls_row[:, 0]
    state["mask_token"] = torch.zeros(1, width)
    return state


def load_named_dinov2(name: str) -> tuple[dict[str, torch.Tensor], str]:
    """State dict of a registered DINOv2 name from the torch-hub cache or timm's Hugging Face cache.

    Raises:
        WeightsError: Not cached and the hub is offline (one line naming what to download).
    """
    from .local_file import read_state_dict

    hub_file, timm_name = DINOV2_HUB_FILES[name]
    torch_home = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch"))
    local = torch_home / "hub" / "checkpoints" / hub_file
    if local.is_file():
        return read_state_dict(local), str(local)
    from huggingface_hub import try_to_load_from_cache

    repo = f"timm/{timm_name}"
    for filename in ("model.safetensors", "pytorch_model.bin"):
        path = try_to_load_from_cache(repo, filename)
        if isinstance(path, str):
            return read_state_dict(Path(path)), path
    from .loading import _hub_reachable

    if not _hub_reachable():
        raise WeightsError(
            f"backbone {name!r} is not in the local cache and the hub is offline: download {repo} (model.safetensors) "
            f"into ~/.cache/huggingface/hub or {hub_file} into {local.parent}, or pass that file as the backbone"
        )
    try:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(repo, "model.safetensors")
    except Exception as exc:
        raise WeightsError(f"backbone {name!r} could not be downloaded from {repo}: {str(exc).splitlines()[0][:160]}") from None
    return read_state_dict(Path(path)), path


def no_text(*_: Any, **__: Any) -> torch.Tensor:
    """Tokenizer stand-in of vision-only backbones: refuses with one line."""
    raise InputError("DINOv2 backbones have no text tower; use a CLIP backbone for text-prompted methods")
