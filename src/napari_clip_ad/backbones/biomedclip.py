"""BiomedCLIP (open_clip ``CustomTextCLIP``: timm ViT trunk + HF BERT text tower) in the shape the methods tap.

Every CLIP method here reads open_clip's ``VisionTransformer`` (``conv1``, ``class_embedding``,
``positional_embedding``, ``ln_pre``, ``transformer.resblocks`` of ``nn.MultiheadAttention`` blocks,
``ln_post``, ``proj``). BiomedCLIP's image tower is an open_clip ``TimmModel`` wrapping timm's
``vit_base_patch16_224`` (LayerNorm eps 1e-6, no pre-norm, CLS pooling, bias-free linear head
``head.proj``; config ``timm_pool ""`` keeps timm's default ``global_pool='token'``). The same
function written as an open_clip ``VisionTransformer`` is, weight for weight:

- ``patch_embed.proj`` (Conv2d with bias) -> ``conv1`` (replaced by a Conv2d with bias);
- ``cls_token`` -> ``class_embedding``; ``pos_embed`` (CLS row included) -> ``positional_embedding``;
- ``norm_pre`` (Identity in BiomedCLIP) -> ``ln_pre``;
- per block ``norm1/norm2`` -> ``ln_1/ln_2`` (eps 1e-6), ``attn.qkv`` -> ``attn.in_proj_*``,
  ``attn.proj`` -> ``attn.out_proj``, ``mlp.fc1/fc2`` -> ``mlp.c_fc/c_proj`` (exact GELU),
  ``ls1/ls2`` -> ``ls_1/ls_2``;
- ``norm`` -> ``ln_post``; ``head.proj.weight.T`` -> ``proj``; CLS pooling (``pool_type 'tok'``).

So DPAM, AnoVL's V-V attention, WinCLIP's windows, VAND's/MVFA's taps and AdaCLIP's visual prompts
run unchanged. :func:`convert_timm_visual` checks every assumption and refuses other trunks in one
line; tests/test_biomedclip.py compares the result with open_clip's own tower to float rounding.
The text tower stays open_clip's ``HFTextEncoder`` (see :mod:`.hf_text`).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from torch import nn

from ..errors import WeightsError

BIOMEDCLIP_HUB = "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
BIOMEDBERT_HUB = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"
BIOMEDCLIP_CONFIG: dict = {
    "embed_dim": 512,
    "vision_cfg": {"timm_model_name": "vit_base_patch16_224", "timm_model_pretrained": False, "timm_pool": "",
                   "timm_proj": "linear", "image_size": 224},
    "text_cfg": {"hf_model_name": BIOMEDBERT_HUB, "hf_tokenizer_name": BIOMEDBERT_HUB, "hf_proj_type": "mlp",
                 "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": 256},
}
"""``model_cfg`` of the published open_clip_config.json of BiomedCLIP (used to build it from a local file)."""

TINY_DIR = Path(__file__).resolve().parent.parent / "data" / "tiny_biomedclip"
"""Tiny BERT config + small WordPiece vocabulary of the ``tiny-biomedclip`` test backbone."""
TINY_TIMM_NAME = "napari_clip_ad_tiny_biomedclip_vit"
TINY_BIOMEDCLIP_CONFIG: dict = {
    "embed_dim": 32,
    "vision_cfg": {"timm_model_name": TINY_TIMM_NAME, "timm_model_pretrained": False, "timm_pool": "",
                   "timm_proj": "linear", "image_size": 224},
    "text_cfg": {"hf_model_name": str(TINY_DIR), "hf_tokenizer_name": str(TINY_DIR), "hf_model_pretrained": False, "hf_proj_type": "mlp",
                 "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": 256},
}
"""BiomedCLIP's layout, tiny: timm ViT (patch 16, width 64, 12 blocks, 4 heads, eps 1e-6) + 12-layer BERT of width 32."""


def _tiny_timm_vit(pretrained: bool = False, **kwargs):  # noqa: ANN202 - timm model entrypoint
    from timm.models.vision_transformer import VisionTransformer

    kwargs.pop("pretrained_cfg", None), kwargs.pop("pretrained_cfg_overlay", None), kwargs.pop("cache_dir", None)
    model = VisionTransformer(img_size=224, patch_size=16, embed_dim=64, depth=12, num_heads=4, **kwargs)
    model.pretrained_cfg = model.default_cfg = {}  # what timm's builder attaches (open_clip reads default_cfg)
    return model


def register_tiny_biomedclip() -> None:
    """Register the tiny timm trunk with timm and ``tiny-biomedclip`` with open_clip (idempotent)."""
    import timm
    from open_clip import factory
    from timm.models import register_model

    if not timm.is_model(TINY_TIMM_NAME):
        _tiny_timm_vit.__name__ = TINY_TIMM_NAME
        register_model(_tiny_timm_vit)
    factory._MODEL_CONFIGS.setdefault("tiny-biomedclip", dict(TINY_BIOMEDCLIP_CONFIG))


def is_timm_visual(visual: nn.Module) -> bool:
    """True for an open_clip ``TimmModel`` image tower (BiomedCLIP's)."""
    return hasattr(visual, "trunk") and hasattr(visual, "head") and not hasattr(visual, "conv1")


def _refuse(reason: str) -> WeightsError:
    return WeightsError(f"BiomedCLIP-style timm image tower not supported: {reason}; only a plain timm ViT "
                        "(class token, CLS pooling, linear bias-free head) can be tapped by these methods")


@torch.no_grad()
def convert_timm_visual(visual: nn.Module) -> nn.Module:
    """An open_clip ``VisionTransformer`` computing exactly what the ``TimmModel`` ``visual`` computes.

    Args:
        visual: open_clip ``TimmModel`` whose trunk is a timm ``VisionTransformer``.

    Returns:
        The equivalent open_clip ``VisionTransformer`` (same dtype and device, eval mode).

    Raises:
        WeightsError: A trunk or head this mapping does not cover (named in the message).
    """
    from open_clip.transformer import LayerNorm, VisionTransformer
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    trunk = visual.trunk
    if not isinstance(trunk, TimmViT):
        raise _refuse(f"trunk is {type(trunk).__name__}, not a timm VisionTransformer")
    if trunk.global_pool != "token" or trunk.cls_token is None or getattr(trunk, "num_prefix_tokens", 1) != 1:
        raise _refuse(f"global_pool {trunk.global_pool!r} with {getattr(trunk, 'num_prefix_tokens', '?')} prefix tokens")
    if getattr(trunk, "no_embed_class", False) or getattr(trunk, "dynamic_img_size", False):
        raise _refuse("position embedding without the class token or dynamic image size")
    if not isinstance(trunk.fc_norm, nn.Identity) or not isinstance(trunk.head, nn.Identity):
        raise _refuse("fc_norm or a classifier head on the trunk")
    head_layers = dict(visual.head.named_children())
    proj_layer = head_layers.get("proj")
    if set(head_layers) - {"drop", "proj"} or not isinstance(proj_layer, nn.Linear) or proj_layer.bias is not None:
        raise _refuse(f"head {list(head_layers)} is not drop + bias-free linear proj")
    blocks = list(trunk.blocks)
    first = blocks[0]
    eps = float(first.norm1.eps)
    norms = [trunk.norm] + [m for b in blocks for m in (b.norm1, b.norm2)]
    if any(not isinstance(n, nn.LayerNorm) or float(n.eps) != eps for n in norms):
        raise _refuse("norm layers other than one LayerNorm eps throughout")
    if not isinstance(trunk.norm_pre, (nn.Identity, nn.LayerNorm)):
        raise _refuse(f"pre-norm {type(trunk.norm_pre).__name__}")
    for block in blocks:
        attn = block.attn
        if not isinstance(getattr(attn, "q_norm", nn.Identity()), nn.Identity) or not isinstance(getattr(attn, "norm", nn.Identity()), nn.Identity):
            raise _refuse("qk-norm or attention inner norm")
        if type(block.mlp.act) is not nn.GELU or getattr(block.mlp.act, "approximate", "none") != "none":
            raise _refuse(f"MLP activation {block.mlp.act}")
        if not isinstance(block.mlp.norm, nn.Identity) or attn.qkv.bias is None or block.attn.proj.bias is None:
            raise _refuse("MLP norm or bias-free attention")
        for ls in (block.ls1, block.ls2):
            if not isinstance(ls, nn.Identity) and not hasattr(ls, "gamma"):
                raise _refuse(f"layer scale {type(ls).__name__}")
    patch = trunk.patch_embed.proj
    width = int(trunk.embed_dim)
    heads = int(first.attn.num_heads)
    mlp_ratio = first.mlp.fc1.out_features / width
    grid = trunk.patch_embed.grid_size
    layer_scale = any(hasattr(b.ls1, "gamma") for b in blocks)
    with torch.random.fork_rng(devices=[]):  # its random init is overwritten below: leave the caller's RNG as it was
        converted = VisionTransformer(
            image_size=(grid[0] * patch.kernel_size[0], grid[1] * patch.kernel_size[1]), patch_size=patch.kernel_size[0],
            width=width, layers=len(blocks), heads=heads, mlp_ratio=mlp_ratio, ls_init_value=1.0 if layer_scale else None,
            output_dim=proj_layer.out_features, no_ln_pre=isinstance(trunk.norm_pre, nn.Identity), pool_type="tok",
            act_layer=nn.GELU, norm_layer=partial(LayerNorm, eps=eps),
        )
        # timm's patch embedding has a bias; open_clip's conv1 has none: a biased conv of the same shape.
        converted.conv1 = nn.Conv2d(3, width, kernel_size=patch.kernel_size, stride=patch.stride, bias=patch.bias is not None)
    converted.conv1.load_state_dict(patch.state_dict())
    converted.class_embedding.copy_(trunk.cls_token.reshape(-1))
    converted.positional_embedding.copy_(trunk.pos_embed.reshape(-1, width))
    if isinstance(trunk.norm_pre, nn.LayerNorm):
        converted.ln_pre.load_state_dict(trunk.norm_pre.state_dict())
    for source, target in zip(blocks, converted.transformer.resblocks):
        target.ln_1.load_state_dict(source.norm1.state_dict())
        target.ln_2.load_state_dict(source.norm2.state_dict())
        target.attn.in_proj_weight.copy_(source.attn.qkv.weight)
        target.attn.in_proj_bias.copy_(source.attn.qkv.bias)
        target.attn.out_proj.load_state_dict(source.attn.proj.state_dict())
        target.mlp.c_fc.load_state_dict(source.mlp.fc1.state_dict())
        target.mlp.c_proj.load_state_dict(source.mlp.fc2.state_dict())
        if layer_scale:
            for ls_source, ls_target in ((source.ls1, target.ls_1), (source.ls2, target.ls_2)):
                ls_target.gamma.copy_(ls_source.gamma if hasattr(ls_source, "gamma") else torch.ones_like(ls_target.gamma))
    converted.ln_post.load_state_dict(trunk.norm.state_dict())
    converted.proj.copy_(proj_layer.weight.t())
    reference = trunk.patch_embed.proj.weight
    return converted.to(device=reference.device, dtype=reference.dtype).eval()


def adapt_custom_text_clip(model: nn.Module) -> str:
    """Swap a BiomedCLIP-style model's ``TimmModel`` image tower for its exact open_clip ``VisionTransformer``, in place.

    The converted model keeps the activation it was trained with (``fixed_activation``: the methods'
    QuickGELU switches describe OpenAI weights, not a timm trunk). Models whose visual tower is
    already an open_clip ViT are left untouched; a timm trunk the mapping does not cover is kept
    (the tapping methods then refuse it by name).

    Returns:
        What was done, for provenance ("" when nothing applied).
    """
    visual = getattr(model, "visual", None)
    if visual is None or not is_timm_visual(visual):
        return ""
    try:
        model.visual = convert_timm_visual(visual)
    except WeightsError as exc:
        return f"timm image tower kept ({exc})"
    model.fixed_activation = True
    return "timm ViT trunk converted to an open_clip VisionTransformer (exact)"


def is_biomedclip_state(state: dict) -> bool:
    """True for an open_clip ``CustomTextCLIP`` state dict with a timm trunk and an HF text tower."""
    return any(k.startswith("visual.trunk.") for k in state) and any(k.startswith("text.transformer.") for k in state)


def hub_text_repos(model_cfg: dict) -> list[str]:
    """HF hub repositories an open_clip model config needs for its text tower (config and tokenizer)."""
    text_cfg = model_cfg.get("text_cfg", {})
    names = {text_cfg.get("hf_model_name"), text_cfg.get("hf_tokenizer_name")}
    return sorted(n for n in names if n and not Path(n).is_dir())


def missing_hub_text_repos(model_cfg: dict) -> list[str]:
    """Those of :func:`hub_text_repos` whose config.json or vocabulary is not in the local HF cache."""
    from huggingface_hub import try_to_load_from_cache

    missing = []
    for repo in hub_text_repos(model_cfg):
        has_config = isinstance(try_to_load_from_cache(repo, "config.json"), str)
        has_vocab = any(isinstance(try_to_load_from_cache(repo, f), str) for f in ("vocab.txt", "tokenizer.json"))
        if not (has_config and has_vocab):
            missing.append(repo)
    return missing


def require_transformers(what: str) -> None:
    """Refuse in one line when ``transformers`` (HF text towers) is not installed."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise WeightsError(f"{what} has a Hugging Face text tower and needs the 'transformers' package: pip install transformers") from None


def load_biomedclip_file(path: Path, state: dict):  # noqa: ANN201 - returns loading.Backbone (import cycle)
    """A BiomedCLIP-style model from a local open_clip state dict (``open_clip_pytorch_model.bin`` as published).

    The architecture is the ``model_cfg`` of an ``open_clip_config.json`` next to the file (the hub
    repository's layout), else BiomedCLIP's. The text tower's config and tokenizer come from a
    ``config.json`` + ``vocab.txt`` next to the file, else from the HF cache of the repository the
    config names (microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract for BiomedCLIP).
    """
    import copy
    import json

    from open_clip.model import CustomTextCLIP
    from open_clip.tokenizer import HFTokenizer

    from .loading import Backbone

    require_transformers(str(path))
    folder = path.parent
    sidecar = folder / "open_clip_config.json"
    try:
        model_cfg = copy.deepcopy(json.loads(sidecar.read_text())["model_cfg"]) if sidecar.is_file() else copy.deepcopy(BIOMEDCLIP_CONFIG)
    except (OSError, ValueError, KeyError) as exc:
        raise WeightsError(f"{sidecar}: not a readable open_clip_config.json with a model_cfg ({exc}); fix or remove it") from None
    if model_cfg["vision_cfg"].get("timm_model_name") == TINY_TIMM_NAME:
        register_tiny_biomedclip()
    text_cfg, vision_cfg = model_cfg["text_cfg"], model_cfg["vision_cfg"]
    if (folder / "config.json").is_file() and (folder / "vocab.txt").is_file():
        text_cfg["hf_model_name"] = text_cfg["hf_tokenizer_name"] = str(folder)
    missing = missing_hub_text_repos(model_cfg)
    if missing:
        raise WeightsError(
            f"{path}: its text tower needs {', '.join(missing)} (config.json, vocab.txt, tokenizer_config.json) in the "
            "Hugging Face cache, or those files next to the checkpoint")
    text_cfg["hf_model_pretrained"], vision_cfg["timm_model_pretrained"] = False, False
    try:
        model = CustomTextCLIP(**model_cfg)
        target = model.state_dict()
        # transformers < 4.31 saved BERT's position_ids buffer; newer models do not keep it.
        model.load_state_dict({k: v for k, v in state.items() if k in target or not k.endswith("position_ids")})
        tokenizer = HFTokenizer(text_cfg["hf_tokenizer_name"], context_length=text_cfg.get("context_length", 77))
    except Exception as exc:  # shape or key mismatch, unreadable text config
        raise WeightsError(f"{path}: not a BiomedCLIP-style open_clip checkpoint matching its config ({str(exc).splitlines()[0][:200]})") from None
    converted = adapt_custom_text_clip(model)
    arch = f"CustomTextCLIP({vision_cfg.get('timm_model_name')}+{Path(str(text_cfg.get('hf_model_name'))).name})"
    return Backbone(str(path), model, tokenizer, arch, str(path), info={"family": "clip", "text": "hf", "visual": converted})
