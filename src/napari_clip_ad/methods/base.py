"""The method interface every anomaly-detection method implements."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..backbones import Backbone
from ..errors import InputError, WeightsError
from . import precision as _precision


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
    needs_backbone: ClassVar[bool] = True
    """False for model-free methods (the ``intensity`` baseline): ``build_method`` loads no backbone."""
    volume_level: ClassVar[bool] = False
    """True when the method scores whole volumes (``volume_map``) instead of batches of slices."""
    low_precision_ready: ClassVar[bool] = True
    """False where the forward does not yet keep heads in fp32 under a bf16 backbone: the method stays fp32."""
    official_fp32: ClassVar[bool] = False
    """The official test runs in fp32 even on a GPU (then precision None keeps fp32 on CUDA too)."""
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
        self.precision = "fp32"
        """Resolved precision of the frozen visual tower: 'fp32', 'bf16' (weights cast) or 'fp16' (CUDA autocast)."""

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

    @classmethod
    def checkpoint_head_count(cls, obj: Any, ours: bool) -> int | None:
        """Number of per-layer heads a checkpoint carries, where that fixes the tapped blocks (else None).

        Args:
            obj: Our flat state dict (``ours``) or the object of an authors' released checkpoint.
            ours: Which of the two ``obj`` is.
        """
        return None

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

    # --- precision --------------------------------------------------------------------------
    def set_precision(self, precision: str | None) -> str:
        """Resolve and apply the backbone precision (see :mod:`.precision`); casts weights once.

        Args:
            precision: 'auto', 'fp32', 'bf16', or None (fp32 on the CPU, autocast on CUDA).

        Returns:
            The resolved precision ('fp32', 'bf16' or 'fp16').

        Raises:
            InputError: Unknown or unsupported precision, or a bf16 model asked to go back to fp32.
        """
        if not self.low_precision_ready:  # its forward has no fp32/low-precision split yet: stays fp32
            if precision == "bf16":
                raise InputError(f"method {self.name!r} runs in fp32 only (its backbone and adapters are not split "
                                 "into precision regions yet); use --precision fp32 or auto")
            return self.precision
        resolved = _precision.resolve_precision(precision, self.device, self.clip.visual, self.official_fp32)
        if resolved == self.precision:
            return resolved
        if self.precision == "bf16":
            raise InputError(f"method {self.name!r} was built with bf16 backbone weights; rebuild it with precision {resolved} (fp32 weights are not kept)")
        _precision.cast_visual(self.clip.visual, resolved)
        self.precision = resolved
        return resolved

    def backbone_autocast(self):  # noqa: ANN201 - a context manager
        """Context for frozen-backbone computations: autocast in the method's low precision, else unchanged."""
        return _precision.backbone_autocast(self.device, self.precision)

    def head_fp32(self):  # noqa: ANN201 - a context manager
        """Context for heads, logits, softmax and interpolation: autocast off (fp32)."""
        return _precision.head_fp32(self.device)

    def _check_reference_images(self, images: torch.Tensor) -> None:
        """Refuse reference images that are not (K >= 1, 3, image_size, image_size) like predict's input."""
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3 or images.shape[0] < 1:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise InputError(f"reference images must be a (K, 3, H, W) tensor with K >= 1, got {shape}")
        if images.shape[-2:] != (self.image_size, self.image_size):
            raise InputError(
                f"reference images are {tuple(images.shape[-2:])} px but method {self.name!r} was built for "
                f"{self.image_size} px; preprocess them like the slices to analyse"
            )
        if not torch.isfinite(images).all():
            raise InputError("reference images contain NaN/inf values; preprocess them like the slices to analyse")

    @property
    def set_normalised(self) -> bool:
        """True when the official maps are normalised over the evaluated set (MVFA-AD few-shot).

        Then the volume engine collects :meth:`set_components` of every slice and calls
        :meth:`fuse_set_components` once over the whole volume; ``predict`` normalises over its call.
        """
        return False

    def set_components(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:  # pragma: no cover - optional
        """Per-image map components before the set-wise fusion (only where :attr:`set_normalised`)."""
        raise NotImplementedError

    def fuse_set_components(self, components: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover
        """(maps (S, H, W) in [0, map_max], scores (S,)) of a whole evaluated set from its components."""
        raise NotImplementedError

    def set_scores(self, scores: torch.Tensor, peaks: torch.Tensor) -> torch.Tensor:
        """Image scores of an evaluated set, where the official score normalises over that set.

        Default: the per-image scores unchanged. :meth:`predict` applies it over the images of the call;
        the volume engine over all analysed slices of a volume.

        Args:
            scores: (N,) per-image scores as ``forward`` returns them.
            peaks: (N,) maximum of each image's map (any positive scaling of the raw map).
        """
        return scores

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
    def predict(self, images: torch.Tensor, over_set: bool = True) -> AnomalyOutput:
        """Anomaly maps and image scores for a batch of preprocessed slices.

        Args:
            images: (B, 3, H, W) float tensor, resized to ``image_size`` and CLIP-normalised.
            over_set: Apply :meth:`set_scores` over the images of this call (False: per-image scores,
                for callers that combine a larger set themselves, like the volume engine).
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise InputError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        if images.shape[-2:] != (self.image_size, self.image_size):
            raise InputError(f"images are {tuple(images.shape[-2:])} px but the method was built for {self.image_size} px")
        if not self.training:  # the engine sets eval once per volume: no per-batch walk over ~400 modules
            output = self(images.to(self.device))
        else:
            self.eval()
            try:
                output = self(images.to(self.device))
            finally:
                self.train(True)
        if over_set and type(self).set_scores is not AnomalyMethod.set_scores:
            output = AnomalyOutput(output.maps, self.set_scores(output.scores, output.maps.flatten(1).amax(dim=1)), output.map_max)
        return output

    def describe(self) -> dict[str, Any]:
        """Provenance for outputs: method, backbone (labelled 'random weights' where so), size, options."""
        return {
            "method": self.name,
            "backbone": self.backbone.label,
            "backbone_arch": self.backbone.arch,
            "random_weights": self.backbone.random_weights,
            "image_size": self.image_size,
            "precision": self.precision,
            "options": {k: v for k, v in self.config.items() if isinstance(v, (int, float, str, bool, list, tuple, type(None)))},
            **({"layers_from": self.layers_origin} if getattr(self, "layers_origin", None) else {}),
            **({"k_shot": self.n_references} if self.supports_references else {}),
            # BiomedCLIP-style backbones: how their timm trunk / HF text tower are run (absent for open_clip ViTs).
            **({"backbone_towers": {k: self.backbone.info[k] for k in ("visual", "text") if k in self.backbone.info}}
               if any(k in self.backbone.info for k in ("visual", "text")) else {}),
        }
