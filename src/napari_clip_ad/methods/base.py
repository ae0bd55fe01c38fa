"""The method interface every anomaly-detection method implements."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..backbones import Backbone
from ..errors import InputError, WeightsError


@dataclass
class AnomalyOutput:
    """What a method predicts for a batch of slices.

    Attributes:
        maps: (B, H, W) anomaly maps at input resolution, exactly as the official test code has them
            before its Gaussian smoothing (e.g. VAND sums 4 per-layer probabilities: range [0, 4]).
        scores: (B,) image-level anomaly scores as the official test code computes them.
        map_max: Upper bound of ``maps`` (the number of summed per-layer maps); ``maps / map_max``
            lies in [0, 1] and is what the engine and all outputs use.
    """

    maps: torch.Tensor
    scores: torch.Tensor
    map_max: float = 1.0

    def unit_maps(self) -> torch.Tensor:
        """Maps divided by their fixed upper bound: in [0, 1], comparable across slices and volumes."""
        return (self.maps / self.map_max).clamp_(0.0, 1.0) if not self.maps.requires_grad else (self.maps / self.map_max).clamp(0.0, 1.0)


class AnomalyMethod(nn.Module):
    """Base class: a frozen CLIP backbone plus the method's (possibly trainable) parts.

    Subclasses set the class attributes, build their parts in ``__init__`` and implement ``forward``.
    Trainable parts are plain ``nn.Module`` attributes listed by :meth:`trainable_parts`; everything
    else is frozen. Text features that do not depend on trainable parameters are computed once.
    """

    name: ClassVar[str] = ""
    default_backbone: ClassVar[str] = "openai-vit-l-14-336"
    default_layers: ClassVar[tuple[int, ...]] = (6, 12, 18, 24)
    default_sigma: ClassVar[float] = 0.0
    quick_gelu: ClassVar[bool | None] = None
    """Activation the official code runs the backbone with (None: keep the backbone's own)."""
    options: ClassVar[dict[str, Any]] = {}
    """Accepted keyword options and their defaults (others are refused)."""
    vision_only: ClassVar[bool] = False
    """True where the method needs no text tower (it then accepts vision-only backbones such as DINOv2)."""
    smooth_after_resize: ClassVar[bool] = False
    """True where the official code resizes the map to the original image first and smooths there."""

    def __init__(self, backbone: Backbone, image_size: int = 240, **options: Any) -> None:
        super().__init__()
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise InputError(f"method {self.name!r} has no option(s) {unknown}; it takes {sorted(self.options) or 'none'}")
        self.config: dict[str, Any] = {**self.options, **options}
        self.backbone = backbone
        self.clip = backbone.model
        self.image_size = int(image_size)

    # --- layers -----------------------------------------------------------------------------
    def resolve_layers(self, layers: tuple[int, ...] | list[int] | None) -> list[int]:
        """Tapped blocks, counted from 1 as the official scripts do; scaled for shallower backbones.

        The defaults name blocks of a 24-block ViT-L; on a backbone with N blocks the default indices
        are scaled by N/24 (rounded) so tiny test models tap the same relative depths.
        """
        n_blocks = len(self.clip.visual.transformer.resblocks)
        if layers is None:
            reference = 24 if max(self.default_layers) > 12 else 12
            layers = [max(1, round(i * n_blocks / reference)) for i in self.default_layers]
        layers = [int(i) for i in layers]
        bad = [i for i in layers if not 1 <= i <= n_blocks]
        if bad:
            raise InputError(f"layers {bad} do not exist: the backbone has blocks 1..{n_blocks}")
        return layers

    # --- trainable parts --------------------------------------------------------------------
    def trainable_parts(self) -> dict[str, nn.Module]:
        """Name -> module of every trainable part (empty for training-free methods)."""
        return {}

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Flat state dict of the trainable parts, keys ``<part>.<param>``."""
        state: dict[str, torch.Tensor] = {}
        for part, module in self.trainable_parts().items():
            for key, value in module.state_dict().items():
                state[f"{part}.{key}"] = value
        return state

    def load_trainable_state(self, state: dict[str, torch.Tensor], source: str) -> None:
        """Load trainable weights strictly: missing, unexpected or mis-shaped tensors are refused."""
        own = self.trainable_state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise WeightsError(
                f"{source}: does not fit method {self.name!r} (missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}); is it for another method?"
            )
        for key, value in state.items():
            if tuple(value.shape) != tuple(own[key].shape):
                raise WeightsError(
                    f"{source}: tensor {key} has shape {tuple(value.shape)} but method {self.name!r} on backbone "
                    f"{self.backbone.name} needs {tuple(own[key].shape)}; it was trained for another backbone or layers"
                )
        for part, module in self.trainable_parts().items():
            prefix = f"{part}."
            module.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, strict=True)
        self.on_weights_loaded()

    def on_weights_loaded(self) -> None:
        """Hook: drop caches that depend on trainable weights (e.g. text features)."""

    def convert_official_checkpoint(self, obj: Any, source: str) -> dict[str, torch.Tensor]:
        """Map the authors' released checkpoint object to :meth:`trainable_state_dict` keys.

        Raises:
            WeightsError: The object is not this method's official format.
        """
        raise WeightsError(f"{source}: method {self.name!r} has no released checkpoint format")

    # --- few-shot references ----------------------------------------------------------------
    supports_references: ClassVar[bool] = False
    """True where the official code has a few-shot mode with normal reference images."""

    def set_references(self, images: torch.Tensor | None) -> None:
        """Build the few-shot memory bank from normal reference slices, or clear it with None.

        Args:
            images: (K, 3, H, W) normal slices preprocessed exactly like :meth:`predict`'s input, or
                None to return to zero-shot (bitwise the zero-shot output).

        Raises:
            InputError: The method has no few-shot mode in its official code.
        """
        if images is None:
            return
        raise InputError(f"method {self.name!r} has no few-shot mode with normal references; use it zero-shot (k-shot 0)")

    @property
    def n_references(self) -> int:
        """Number of reference images in the memory bank (0: zero-shot)."""
        return 0

    # --- inference --------------------------------------------------------------------------
    @property
    def map_max(self) -> float:
        """Upper bound of the raw maps (number of summed per-layer maps)."""
        return 1.0

    @property
    def device(self) -> torch.device:
        """Device of the backbone's parameters."""
        return next(self.clip.parameters()).device

    def forward(self, images: torch.Tensor) -> AnomalyOutput:  # pragma: no cover - abstract
        """Differentiable prediction (used by training)."""
        raise NotImplementedError

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> AnomalyOutput:
        """Anomaly maps and image scores for a batch of preprocessed slices.

        Args:
            images: (B, 3, H, W) float tensor, resized to ``image_size`` and CLIP-normalised.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise InputError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        if images.shape[-2:] != (self.image_size, self.image_size):
            raise InputError(f"images are {tuple(images.shape[-2:])} px but the method was built for {self.image_size} px")
        was_training = self.training
        self.eval()
        try:
            return self(images.to(self.device))
        finally:
            self.train(was_training)

    def describe(self) -> dict[str, Any]:
        """Provenance for outputs: method, backbone (labelled 'random weights' where so), size, options."""
        return {
            "method": self.name,
            "backbone": self.backbone.label,
            "backbone_arch": self.backbone.arch,
            "random_weights": self.backbone.random_weights,
            "image_size": self.image_size,
            "options": {k: v for k, v in self.config.items() if isinstance(v, (int, float, str, bool, list, tuple, type(None)))},
        }
