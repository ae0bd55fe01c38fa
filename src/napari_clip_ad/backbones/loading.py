"""Loading CLIP backbones from the registry, open_clip names, the HF hub or local files, safely."""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..errors import WeightsError
from .biomedclip import adapt_custom_text_clip, hub_text_repos, missing_hub_text_repos, require_transformers
from .registry import BACKBONES, TINY_TEST_CONFIG, BackboneSpec

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class Backbone:
    """A loaded, frozen open_clip CLIP model plus what methods need to know about it.

    Attributes:
        name: What the user asked for.
        model: The open_clip ``CLIP`` model (eval mode, requires_grad False), at its native image size.
        tokenizer: Text -> token ids (open_clip tokenizer of the model).
        arch: Architecture name (for checkpoint checks).
        source: Where the weights came from (file, cache path, or "random weights").
        random_weights: True when the weights are random (results mean nothing).
        mean: Normalisation mean. std: normalisation std.
    """

    name: str
    model: nn.Module
    tokenizer: Callable[..., torch.Tensor]
    arch: str
    source: str
    random_weights: bool = False
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """Name for outputs, with '(random weights)' where it applies."""
        return f"{self.name} (random weights)" if self.random_weights else self.name


def register_tiny_test() -> None:
    """Register the ``tiny-test`` architecture with open_clip (idempotent)."""
    from open_clip import factory

    factory._MODEL_CONFIGS.setdefault("tiny-test", dict(TINY_TEST_CONFIG))


def set_activation(model: nn.Module, quick_gelu: bool) -> None:
    """Use QuickGELU or exact GELU in every transformer MLP of both towers (weights unchanged).

    A model marked ``fixed_activation`` (BiomedCLIP's converted timm trunk, trained with exact GELU)
    keeps its own: the methods' switches describe what their official code runs OpenAI weights with.
    """
    from open_clip.transformer import QuickGELU

    if getattr(model, "fixed_activation", False):
        return

    for module in model.modules():
        mlp = getattr(module, "mlp", None)
        if isinstance(mlp, nn.Sequential) and hasattr(mlp, "gelu"):
            mlp.gelu = QuickGELU() if quick_gelu else nn.GELU()


def _freeze(model: nn.Module, device: torch.device) -> nn.Module:
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _hub_reachable(timeout: float = 0.5) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _offline_hint(spec_model: str, pretrained: str) -> str:
    import open_clip

    if spec_model.startswith("hf-hub:"):
        repo = spec_model[len("hf-hub:"):]
        return f"download the repository {repo} (open_clip_config.json and its weights) from the Hugging Face hub into ~/.cache/huggingface/hub, or pass a local checkpoint file as the backbone"
    cfg = open_clip.get_pretrained_cfg(spec_model, pretrained) or {}
    where = cfg.get("hf_hub") or cfg.get("url") or "its open_clip source"
    return f"download {spec_model}:{pretrained} ({where}) into the Hugging Face cache (~/.cache/huggingface/hub), or pass the local checkpoint file as the backbone"


def _cached_hub_file(spec_model: str, pretrained: str) -> str | None:
    """Path of the cached weight file of an open_clip name/tag, or None if not cached."""
    import open_clip
    from huggingface_hub import try_to_load_from_cache

    cfg = open_clip.get_pretrained_cfg(spec_model, pretrained) or {}
    hub = cfg.get("hf_hub", "")
    if not hub:
        return None
    parts = hub.rstrip("/").split("/")
    repo = "/".join(parts[:2])
    names = [parts[2]] if len(parts) > 2 else []
    for name in names + ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]:
        path = try_to_load_from_cache(repo, name)
        if isinstance(path, str):
            return path
    return None


def load_backbone(
    name: str,
    device: str | torch.device = "cpu",
    quick_gelu: bool | None = None,
    trusted: bool = False,
) -> Backbone:
    """Load a CLIP backbone by registry name, open_clip ``ARCH:TAG``, ``hf-hub:`` name, or local file.

    Args:
        name: Registry name (see ``BACKBONES``), ``ARCH:TAG``, ``hf-hub:org/repo``, or a checkpoint path.
        device: Where to put the model.
        quick_gelu: Force QuickGELU (True) or exact GELU (False) in every block; None keeps the
            backbone's own activation. Methods pass what their official code runs with.
        trusted: Allow TorchScript archives (they can run code when loaded).

    Returns:
        The frozen backbone at its native image size (methods resize positional embeddings).

    Raises:
        WeightsError: Unknown name, weights missing offline (in under a second), unreadable or unsafe file.
    """
    device = torch.device(device)
    if Path(name).expanduser().is_file():
        from .local_file import load_local_checkpoint

        backbone = load_local_checkpoint(Path(name).expanduser(), trusted=trusted)
    elif name in BACKBONES and BACKBONES[name].family == "dinov2":
        backbone = _load_dinov2(BACKBONES[name])
    else:
        backbone = _load_named(name)
        if not backbone.random_weights:  # a damaged cache file must not give NaN maps (local files: checked on read)
            from .local_file import check_tensors

            check_tensors(backbone.model.state_dict(), f"backbone {name}", expected=backbone.model.state_dict())
    if quick_gelu is not None and backbone.info.get("family") != "dinov2":
        set_activation(backbone.model, quick_gelu)
    backbone.info["quick_gelu"] = quick_gelu
    backbone.model = _freeze(backbone.model, device)
    return backbone


def is_random_backbone(name: str) -> bool:
    """True for random-weights backbones (``tiny-test``, ``random:ARCH``), whose results mean nothing."""
    try:
        return _spec_for(name).random_weights
    except WeightsError:  # a file or an unknown name: not one of ours, so not random
        return False


def _spec_for(name: str) -> BackboneSpec:
    if name in BACKBONES:
        return BACKBONES[name]
    if name.startswith("random:"):
        # Any open_clip architecture with seeded random weights: for speed benchmarks without downloads.
        return BackboneSpec(name, name[len("random:"):], random_weights=True, description="random weights")
    if name.startswith("hf-hub:"):
        return BackboneSpec(name, name)
    if ":" in name:
        arch, tag = name.split(":", 1)
        return BackboneSpec(name, arch, tag, quick_gelu=tag == "openai")
    if Path(name).suffix in (".pt", ".pth", ".bin", ".safetensors", ".ckpt"):
        raise WeightsError(f"{name}: backbone file not found; check the path")
    import difflib

    close = difflib.get_close_matches(name, list(BACKBONES), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise WeightsError(
        f"unknown backbone {name!r}.{hint} Use one of {', '.join(BACKBONES)}, an open_clip 'ARCH:TAG', "
        "an 'hf-hub:org/repo' name, or a local checkpoint file"
    )


def dinov2_backbone(state: dict[str, torch.Tensor], name: str, source: str, random_weights: bool = False) -> Backbone:
    """A vision-only DINOv2 :class:`Backbone` (ImageNet mean/std, no tokenizer) from a state dict."""
    from .dinov2 import IMAGENET_MEAN, IMAGENET_STD, build_dinov2, no_text

    model, info = build_dinov2(state, source)
    return Backbone(name, model, no_text, info["arch"], source, random_weights, IMAGENET_MEAN, IMAGENET_STD, info)


def is_dinov2(backbone: Backbone) -> bool:
    """True for a vision-only DINOv2 backbone."""
    return backbone.info.get("family") == "dinov2"


def _load_dinov2(spec: BackboneSpec) -> Backbone:
    from .dinov2 import TINY_DINOV2, load_named_dinov2, tiny_dinov2_state

    if spec.random_weights:
        state = tiny_dinov2_state(0, TINY_DINOV2["registers"], TINY_DINOV2["depth"], TINY_DINOV2["width"], TINY_DINOV2["grid"])
        return dinov2_backbone(state, spec.name, "random weights", random_weights=True)
    state, source = load_named_dinov2(spec.name)
    return dinov2_backbone(state, spec.name, source)


def _load_named(name: str) -> Backbone:
    import open_clip

    spec = _spec_for(name)
    if spec.random_weights:
        register_tiny_test()
        from .biomedclip import register_tiny_biomedclip

        register_tiny_biomedclip()
        if spec.model not in open_clip.list_models():
            raise WeightsError(f"unknown open_clip architecture {spec.model!r} in backbone {name!r}; see open_clip.list_models()")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            root = logging.getLogger()
            was_disabled, root.disabled = root.disabled, True  # silence open_clip's "initialized randomly"
            try:
                model = open_clip.create_model(spec.model, pretrained=None, pretrained_text=False)
            finally:
                root.disabled = was_disabled
            converted = adapt_custom_text_clip(model)
        return Backbone(name, model, open_clip.get_tokenizer(spec.model), spec.model, "random weights", True, info=_info(model, converted))
    if spec.model.startswith("hf-hub:"):
        if not _hub_reachable():
            from huggingface_hub import try_to_load_from_cache

            repo = spec.model[len("hf-hub:"):]
            if not isinstance(try_to_load_from_cache(repo, "open_clip_config.json"), str):
                raise WeightsError(f"backbone {name!r} is not in the local cache and the hub is offline: {_offline_hint(spec.model, '')}")
            missing = missing_hub_text_repos(_cached_model_cfg(repo))
            if missing:
                raise WeightsError(f"backbone {name!r} needs its text tower's files, not in the local cache, and the hub is offline: "
                                   f"download {', '.join(missing)} (config.json, vocab.txt, tokenizer_config.json) into ~/.cache/huggingface/hub")
    elif spec.pretrained:
        if spec.model not in open_clip.list_models():
            raise WeightsError(f"unknown open_clip architecture {spec.model!r} in backbone {name!r}; see open_clip.list_models()")
        if spec.pretrained not in open_clip.list_pretrained_tags_by_model(spec.model):
            tags = ", ".join(open_clip.list_pretrained_tags_by_model(spec.model)) or "none"
            raise WeightsError(f"{spec.model} has no pretrained tag {spec.pretrained!r} (known: {tags})")
        if _cached_hub_file(spec.model, spec.pretrained) is None and not _hub_reachable():
            raise WeightsError(f"backbone {name!r} weights are not in the local cache and the hub is offline: {_offline_hint(spec.model, spec.pretrained)}")
    if spec.model.startswith("hf-hub:") and hub_text_repos(_cached_model_cfg(spec.model[len("hf-hub:"):])):
        require_transformers(f"backbone {name!r}")
    try:
        model = open_clip.create_model(spec.model, pretrained=spec.pretrained or None, force_quick_gelu=spec.quick_gelu and not spec.model.startswith("hf-hub:"))
        tokenizer = open_clip.get_tokenizer(spec.model)
    except Exception as exc:  # network, hub or format problems from open_clip / huggingface_hub
        raise WeightsError(f"backbone {name!r} could not be loaded: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    converted = adapt_custom_text_clip(model)
    arch = spec.model
    return Backbone(name, model, tokenizer, arch, f"{spec.model}:{spec.pretrained}".rstrip(":"), info=_info(model, converted))


def _info(model: nn.Module, converted: str) -> dict[str, Any]:
    """Backbone facts for provenance: an HF text tower, a converted timm image tower."""
    from .hf_text import is_hf_text

    info: dict[str, Any] = {}
    if is_hf_text(model):
        info["text"] = "hf"
    if converted:
        info["visual"] = converted
    return info


def _cached_model_cfg(repo: str) -> dict:
    """``model_cfg`` of a hub repository's cached open_clip_config.json ({} when not cached or unreadable)."""
    import json

    from huggingface_hub import try_to_load_from_cache

    path = try_to_load_from_cache(repo, "open_clip_config.json")
    if not isinstance(path, str):
        return {}
    try:
        return dict(json.loads(Path(path).read_text()).get("model_cfg", {}))
    except (OSError, ValueError):
        return {}
