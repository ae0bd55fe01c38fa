"""VAND / APRIL-GAN (Chen et al., CVPR 2023 VAND challenge): linear adapters on tapped CLIP tokens.

Official reference: ByChelsea/VAND-APRIL-GAN (commit f13b8a6): ``test.py`` (zero-shot path),
``model.py`` (``LinearLayer``), ``prompt_ensemble.py`` and its own open_clip copy. Per image:

- the positional embedding is resized once (bicubic, antialias, align_corners False) when the
  model is built for the image size;
- tapped tokens are the raw residual stream after the tapped blocks (no ``ln_post``, no ``proj``),
  CLS dropped; tapped block ``k`` (1-based) goes through ``LinearLayer.fc[i]`` = ``nn.Linear(width,
  embed_dim)``, ``i`` being its rank in block order (the official transformer collects them in block
  order whatever the order of ``features_list``);
- each adapted token is L2-normalised; logits = 100 * token @ text (normal, abnormal), reshaped to
  the patch grid, resized bilinearly (align_corners True) to the image size; the softmax over the
  two channels comes AFTER the resize; the abnormal channel; summed over the tapped layers;
- image score = softmax(100 * normalised image feature @ text)[abnormal], image feature =
  ``ln_post(CLS) @ proj`` (the ordinary ``encode_image``), not mixed with the map maximum;
- no Gaussian filter in the official zero-shot test (``default_sigma`` 0).

At 240 px the official code rebuilds ViT-L-14-336 from its JSON config, which has no quick_gelu
flag: the OpenAI weights then run with exact GELU (``quick_gelu = False``). The official test runs
under CUDA autocast (fp16); here the frozen backbone runs in the method's precision (fp32, or bf16
where chosen) and the head (adapters, logits, resize, softmax) always in fp32.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones import Backbone, resize_positional_embedding
from ..errors import InputError, WeightsError
from .base import AnomalyMethod, AnomalyOutput
from .registry import register_method
from .text_features import cached_text_features
from .vand_prompts import encode_state_text, prompt_sentences

LOGIT_SCALE = 100.0
"""test.py / train.py: ``100.0 * features @ text_features``."""
CHECKPOINT_KEY = "trainable_linearlayer"
"""train.py saves ``{"trainable_linearlayer": LinearLayer.state_dict()}``."""


class VandTapped(NamedTuple):
    """Frozen visual outputs the VAND head needs (cacheable for training).

    Attributes:
        tokens: (B, n_layers, N, width) raw residual stream after the tapped blocks, CLS dropped.
        image_features: (B, E) ``ln_post(CLS) @ proj`` of the last block, not normalised.
    """

    tokens: torch.Tensor
    image_features: torch.Tensor


class HeadDetails(NamedTuple):
    """Everything training needs from one head pass.

    Attributes:
        layer_probs: (B, n_layers, 2, H, W) per-layer softmax (normal, abnormal) at image size
            (what train.py feeds to its focal and dice losses).
        image_logits: (B, 2) 100 * normalised image feature @ text.
        output: The :class:`AnomalyOutput` of the same pass.
    """

    layer_probs: torch.Tensor
    image_logits: torch.Tensor
    output: AnomalyOutput


class LinearLayer(nn.Module):
    """The official ``LinearLayer`` for ViTs: one ``nn.Linear(width, embed_dim)`` per tapped layer."""

    def __init__(self, width: int, embed_dim: int, n_layers: int) -> None:
        super().__init__()
        self.fc = nn.ModuleList([nn.Linear(width, embed_dim) for _ in range(n_layers)])

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, n_layers, N, width) patch tokens (no CLS) -> (B, n_layers, N, embed_dim)."""
        return torch.stack([fc(tokens[:, i]) for i, fc in enumerate(self.fc)], dim=1)


@register_method
class VAND(AnomalyMethod):
    """VAND / APRIL-GAN on a CLIP ViT (official: OpenAI ViT-L/14@336, exact GELU at 240 px, taps 6 12 18 24)."""

    name = "vand"
    default_backbone = "openai-vit-l-14-336"
    default_layers = (6, 12, 18, 24)
    default_sigma = 0.0
    quick_gelu = False
    options = {"layers": None, "object_name": "brain"}

    def __init__(self, backbone: Backbone, image_size: int = 240, **options: Any) -> None:
        super().__init__(backbone, image_size=image_size, **options)
        visual = self.clip.visual
        if getattr(visual, "proj", None) is None or not hasattr(self.clip, "encode_text"):
            raise WeightsError(
                f"backbone {backbone.name!r} has no projected CLIP image feature or text encoder; "
                "VAND needs a CLIP ViT such as openai-vit-l-14-336"
            )
        object_name = self.config["object_name"]
        if not isinstance(object_name, str) or not object_name.strip():
            raise InputError(f"vand option object_name={object_name!r} is invalid; give the object's name, e.g. 'brain'")
        resize_positional_embedding(visual, self.image_size, mode="bicubic", antialias=True)
        layers = self.resolve_layers(self.config["layers"])
        if len(set(layers)) != len(layers):
            raise InputError(f"vand option layers={layers} repeats a block; give each tapped block once")
        self.layers = sorted(layers)
        width, embed_dim = (int(n) for n in visual.proj.shape)
        self.linear = LinearLayer(width, embed_dim, len(self.layers)).to(self.device)
        self._text_cache: dict[str, torch.Tensor] = {}

    # --- trainable parts ---------------------------------------------------------------------
    def trainable_parts(self) -> dict[str, nn.Module]:
        """The per-layer linear adapters (official ``LinearLayer``)."""
        return {"linear": self.linear}

    def on_weights_loaded(self) -> None:
        """The text features do not depend on the adapters: nothing to drop."""

    @property
    def map_max(self) -> float:
        """Each tapped layer's map is a probability; they are summed."""
        return float(len(self.layers))

    # --- text --------------------------------------------------------------------------------
    def text_features(self) -> torch.Tensor:
        """Normalised (normal, abnormal) text features (2, E), fp32, computed once (disk-cached across processes)."""
        key = str(self.device)
        if key not in self._text_cache:
            name = self.config["object_name"]
            features = cached_text_features(
                self.clip, self.name, {"sentences": prompt_sentences(name)},
                lambda: {"text": encode_state_text(self.clip, self.backbone.tokenizer, name)},
            )
            self._text_cache = {key: features["text"]}
        return self._text_cache[key]

    # --- visual + head -----------------------------------------------------------------------
    @torch.no_grad()
    def tap_tokens(self, images: torch.Tensor) -> VandTapped:
        """Frozen visual outputs (raw tapped tokens without CLS, image feature) in one backbone pass."""
        visual = self.clip.visual
        with self.backbone_autocast():
            out = visual.forward_intermediates(
                images.to(self.device), indices=[i - 1 for i in self.layers], output_fmt="NLC", intermediates_only=False
            )
        tokens = torch.stack(out["image_intermediates"], dim=1)
        return VandTapped(tokens, out["image_features"])

    def head_details(self, tapped: VandTapped | torch.Tensor, image_features: torch.Tensor | None = None) -> HeadDetails:
        """Maps, scores and per-layer probabilities from (possibly cached) tapped tokens (fp32, autocast off)."""
        with self.head_fp32():
            return self._head_details(tapped, image_features)

    def _head_details(self, tapped: VandTapped | torch.Tensor, image_features: torch.Tensor | None) -> HeadDetails:
        tokens, image = tapped if image_features is None else (tapped, image_features)
        text = self.text_features()
        adapted = self.linear(tokens.to(self.linear.fc[0].weight.dtype))
        adapted = adapted / adapted.norm(dim=-1, keepdim=True)
        logits = LOGIT_SCALE * adapted @ text.to(adapted.dtype).t()
        batch, n_layers, n_tokens, _ = logits.shape
        side = int(n_tokens**0.5)
        logits = logits.permute(0, 1, 3, 2).reshape(batch * n_layers, 2, side, side)
        size = (self.image_size, self.image_size)
        # Official order: bilinear resize of the logits (align_corners True), then softmax.
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=True)
        probs = logits.softmax(dim=1).reshape(batch, n_layers, 2, *size)
        maps = probs[:, :, 1].sum(dim=1)
        image = image.float()
        image = image / image.norm(dim=-1, keepdim=True)
        image_logits = LOGIT_SCALE * image @ text.float().t()
        scores = image_logits.softmax(dim=-1)[:, 1]
        return HeadDetails(probs, image_logits, AnomalyOutput(maps, scores, self.map_max))

    def head(self, tapped: VandTapped | torch.Tensor, image_features: torch.Tensor | None = None) -> AnomalyOutput:
        """:class:`AnomalyOutput` from ``head(tap_tokens(x))`` or ``head(tokens, image_features)``."""
        return self.head_details(tapped, image_features).output

    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        """Raw maps (sum of the tapped layers' abnormal probabilities) and image scores."""
        return self.head(self.tap_tokens(images))

    # --- official checkpoints ----------------------------------------------------------------
    @classmethod
    def checkpoint_head_count(cls, obj: Any, ours: bool) -> int | None:
        """Linear heads ``fc.<i>`` in a checkpoint (each maps one tapped block); None if it has none."""
        state = obj if ours else (obj.get(CHECKPOINT_KEY) if isinstance(obj, dict) else None)
        if not isinstance(state, dict):
            return None
        prefix = "linear.fc." if ours else "fc."
        heads = {str(k)[len(prefix):].split(".")[0] for k in state if str(k).startswith(prefix)}
        return len(heads) or None

    def convert_official_checkpoint(self, obj: Any, source: str) -> dict[str, torch.Tensor]:
        """``{"trainable_linearlayer": LinearLayer.state_dict()}`` as train.py saves it -> our state."""
        if not isinstance(obj, dict) or not isinstance(obj.get(CHECKPOINT_KEY), dict):
            found = sorted(map(str, obj))[:4] if isinstance(obj, dict) else type(obj).__name__
            raise WeightsError(f"{source}: not a VAND checkpoint (expected a dict with {CHECKPOINT_KEY!r}, found {found})")
        state = obj[CHECKPOINT_KEY]
        if not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise WeightsError(f"{source}: {CHECKPOINT_KEY!r} holds no tensors; not a VAND checkpoint")
        expected = {k: tuple(v.shape) for k, v in self.linear.state_dict().items()}
        linear_keys = [re.fullmatch(r"fc\.(\d+)\.(weight|bias)", k) for k in state]
        n_theirs = len({m.group(1) for m in linear_keys if m})
        if all(linear_keys) and n_theirs != len(self.layers):
            raise WeightsError(
                f"{source}: checkpoint has {n_theirs} linear layers but the method taps {len(self.layers)} blocks "
                f"{self.layers}; build it with {n_theirs} layers, or give no layers to take them from the checkpoint"
            )
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if missing or unexpected:
            raise WeightsError(f"{source}: not the official VAND LinearLayer format (missing {missing[:3]}, unexpected {unexpected[:3]})")
        for key, shape in expected.items():
            if tuple(state[key].shape) != shape:
                raise WeightsError(
                    f"{source}: {key} has shape {tuple(state[key].shape)} but backbone {self.backbone.name} needs {shape} "
                    "(width -> embed dim); it was trained for another backbone"
                )
        return {f"linear.{k}": state[k].float() for k in expected}
