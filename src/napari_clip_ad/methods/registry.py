"""Method registry and :func:`build_method`, the one way every front end builds a method."""

from __future__ import annotations

import difflib
import importlib
from pathlib import Path
from typing import Any

import torch

from ..backbones import Backbone, load_backbone, set_activation
from ..errors import InputError
from .base import AnomalyMethod

METHODS: dict[str, type[AnomalyMethod]] = {}
_BUILTIN_MODULES = ("vand", "anomalyclip", "anovl", "adaclip", "winclip", "intensity", "mvfa", "anomalydino", "musc", "aaclip")


def register_method(cls: type[AnomalyMethod]) -> type[AnomalyMethod]:
    """Class decorator adding a method under ``cls.name``."""
    METHODS[cls.name] = cls
    return cls


def _load_builtins() -> None:
    for module in _BUILTIN_MODULES:
        try:
            importlib.import_module(f".{module}", __package__)
        except ModuleNotFoundError as exc:
            if exc.name != f"{__package__}.{module}":
                raise


def list_methods() -> list[str]:
    """Names of the available methods."""
    _load_builtins()
    return sorted(METHODS)


def method_class(name: str) -> type[AnomalyMethod]:
    """The class of a method name, with a did-you-mean error for unknown names."""
    _load_builtins()
    key = name.lower()
    if key not in METHODS:
        close = difflib.get_close_matches(key, list(METHODS), n=1, cutoff=0.5)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise InputError(f"unknown method {name!r}.{hint} Available: {', '.join(sorted(METHODS))}")
    return METHODS[key]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' -> CUDA when available, else CPU; a CUDA request without CUDA is a clear error."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InputError(f"--device {device!r}: not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' requested but no CUDA GPU is available here; use --device cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise InputError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s) (cuda:0...); "
                         "give an existing index or cuda")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise InputError("--device mps: Apple MPS is not available here; use --device cpu or auto")
    if device.type not in ("cpu", "cuda", "mps"):
        raise InputError(f"--device {device}: not supported; use auto, cpu, cuda or cuda:N")
    return device


def build_method(
    name: str,
    backbone: str | Backbone | None = None,
    weights: str | Path | None = None,
    image_size: int = 240,
    device: str | torch.device = "auto",
    init_seed: int = 0,
    precision: str | None = None,
    **options: Any,
) -> AnomalyMethod:
    """Build a ready-to-predict method.

    Args:
        name: Method name (see :func:`list_methods`).
        backbone: Registry name, open_clip ``ARCH:TAG``, ``hf-hub:`` name, local file, or a loaded
            :class:`~napari_clip_ad.backbones.Backbone`; None uses the method's default backbone.
        weights: The method's trained parts: a released checkpoint as published, one of our
            safetensors files, or a released-weights name (``napari-clip-ad weights list``).
        image_size: Square input size (the study used 240).
        device: "auto", "cpu", "cuda", ...
        init_seed: Seed of the random initialisation of trainable parts (so untrained or
            from-scratch methods are reproducible); the global RNG is left untouched.
        precision: Frozen-backbone precision: 'auto' (bf16 where the CPU/GPU runs it natively and it
            pays, see :mod:`.precision`), 'fp32' (parity), 'bf16'; None keeps the long-standing default
            (fp32 on the CPU, bf16/fp16 autocast on CUDA). Heads and text stay fp32.
        **options: Method options (e.g. ``layers``, ``object_name``).

    Returns:
        The method on ``device`` in eval mode.
    """
    cls = method_class(name)
    target = resolve_device(device)
    if not isinstance(image_size, int) or isinstance(image_size, bool) or not 16 <= image_size <= 4096:
        raise InputError(f"--image-size {image_size!r}: the image size must be a whole number of pixels in [16, 4096] (the study: 240)")
    if not cls.needs_backbone:  # model-free (intensity baseline): nothing to load; provenance says "no model"
        if weights is not None:
            raise InputError(f"method {cls.name!r} has no trainable parts; drop --weights {weights}")
        return cls(None, image_size=image_size, **options).eval()
    if backbone is None:
        backbone = cls.default_backbone
    if isinstance(backbone, Backbone):
        if cls.quick_gelu is not None:
            set_activation(backbone.model, cls.quick_gelu)
    else:
        backbone = load_backbone(str(backbone), device="cpu", quick_gelu=cls.quick_gelu)
    if backbone.info.get("family") == "dinov2" and not cls.vision_only:
        raise InputError(f"method {cls.name!r} needs a CLIP backbone with a text tower; {backbone.name!r} is a vision-only DINOv2 (use it with anomalydino or musc)")
    loaded, origin = None, None
    if weights is not None:
        from .checkpoints import checkpoint_layers, read_weights_file

        loaded = read_weights_file(weights)
        found = checkpoint_layers(cls, loaded, _n_blocks(backbone))
        # A released checkpoint loads as published: its heads fix the tapped blocks unless the user named them
        # (then a contradiction is refused by the method's loader with the count it found).
        if found is not None and options.get("layers") is None:
            options["layers"], origin = found
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        method = cls(backbone, image_size=image_size, **options)
    if loaded is not None:
        from .checkpoints import load_method_weights

        method.layers_origin = origin
        load_method_weights(method, loaded)
    method = method.to(target).eval()
    method.set_precision(precision)
    return method


def _n_blocks(backbone: Backbone) -> int:
    """Number of transformer blocks of the backbone's visual tower (open_clip towers; timm trunks' ``blocks``)."""
    visual = getattr(backbone.model, "visual", backbone.model)
    transformer = getattr(visual, "transformer", None)
    blocks = getattr(transformer, "resblocks", None) if transformer is not None else getattr(visual, "blocks", None)
    return len(blocks) if blocks is not None else 0
