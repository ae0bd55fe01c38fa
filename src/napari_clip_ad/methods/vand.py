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

Few-shot (``set_references``; official ``test.py --mode few_shot`` with ``few_shot.py``'s ``memory``):

- memory bank per few-shot layer (option ``few_shot_layers``, default = ``layers``: the official
  ``test_few_shot.sh`` passes ``--few_shot_features 6 12 18 24`` like ``--features_list``): the raw
  tapped tokens of the K reference images, CLS dropped (``p[0, 1:, :]``), NOT adapted by the
  ``LinearLayer``, concatenated over the images: (K * N, width). few_shot.py builds it under
  ``no_grad`` only (no autocast); ``set_references`` likewise computes it in full precision;
- per test image and layer: ``1 - cosine`` (sklearn ``pairwise.cosine_similarity(memory, tokens)``)
  minimised over the memory, reshaped to the patch grid, bilinear resize (align_corners True) to the
  image size; summed over the layers and ADDED to the zero-shot map (not averaged), so the raw map
  lies in [0, n_layers + 2 * n_few_shot_layers] (``map_max``);
- image score: per image the zero-shot text probability; then over the evaluated set (test.py's
  metric loop, per class) ``0.5 * (score + minmax(max of each image's map))``. ``predict``
  normalises over the images of the call (:meth:`VAND.set_scores`), the volume engine over the
  whole volume. Where every map maximum is equal (e.g. one image) the official 0/0 is NaN; here
  the normalised term is 0.

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
from .prompt_sets import load_prompt_set, resolve_object_name
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
    options = {"layers": None, "object_name": "brain", "few_shot_layers": None, "prompts": "industrial"}
    supports_references = True

    def __init__(self, backbone: Backbone, image_size: int = 240, **options: Any) -> None:
        super().__init__(backbone, image_size=image_size, **options)
        visual = self.clip.visual
        if getattr(visual, "proj", None) is None or not hasattr(self.clip, "encode_text"):
            raise WeightsError(
                f"backbone {backbone.name!r} has no projected CLIP image feature or text encoder; "
                "VAND needs a CLIP ViT such as openai-vit-l-14-336"
            )
        self.prompt_set = load_prompt_set(self.config["prompts"])
        self.config["prompts"] = str(self.config["prompts"])
        object_name = resolve_object_name(self.prompt_set, self.config["object_name"], "object_name" in options)
        self.object_name = object_name
        if not isinstance(object_name, str) or not object_name.strip():
            raise InputError(f"vand option object_name={object_name!r} is invalid; give the object's name, e.g. 'brain'")
        resize_positional_embedding(visual, self.image_size, mode="bicubic", antialias=True)
        layers = self.resolve_layers(self.config["layers"])
        if len(set(layers)) != len(layers):
            raise InputError(f"vand option layers={layers} repeats a block; give each tapped block once")
        self.layers = sorted(layers)
        few_shot_layers = self.resolve_layers(self.config["few_shot_layers"]) if self.config["few_shot_layers"] is not None else self.layers
        if len(set(few_shot_layers)) != len(few_shot_layers):
            raise InputError(f"vand option few_shot_layers={few_shot_layers} repeats a block; give each block once")
        # The official transformer collects out_layers in block order, so the memory is in block order too.
        self.few_shot_layers = sorted(few_shot_layers)
        self._memory: list[torch.Tensor] | None = None
        self._n_references = 0
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
        """Each tapped layer's map is a probability; they are summed (plus 2 per few-shot layer: 1 - cos <= 2)."""
        return float(len(self.layers) + (2 * len(self.few_shot_layers) if self._memory is not None else 0))

    # --- few-shot -----------------------------------------------------------------------------
    @property
    def n_references(self) -> int:
        """Number of reference images in the memory bank (0: zero-shot)."""
        return self._n_references

    @torch.no_grad()
    def raw_tokens(self, images: torch.Tensor, layers: list[int]) -> list[torch.Tensor]:
        """Raw residual-stream patch tokens (B, N, width) after each block of ``layers`` (CLS dropped)."""
        out = self.clip.visual.forward_intermediates(
            images.to(self.device), indices=[i - 1 for i in layers], output_fmt="NLC", intermediates_only=True
        )
        return list(out["image_intermediates"])

    def set_references(self, images: torch.Tensor | None) -> None:
        """Build the official few-shot memory bank from K normal slices, or clear it (None: zero-shot).

        Args:
            images: (K, 3, H, W) normal slices preprocessed exactly like :meth:`predict`'s input.
        """
        if images is None:
            self._memory, self._n_references = None, 0
            return
        self._check_reference_images(images)
        # few_shot.py: no autocast (full precision); a bf16-cast backbone can only run under its own autocast.
        context = self.backbone_autocast() if self.precision == "bf16" else torch.autocast(self.device.type, enabled=False)
        with context:
            tokens = self.raw_tokens(images.float(), self.few_shot_layers)
        # few_shot.py: torch.cat over the images of each layer's (N, width) tokens -> (K * N, width).
        self._memory = [layer.reshape(-1, layer.shape[-1]).float() for layer in tokens]
        self._n_references = int(images.shape[0])

    def few_shot_maps(self, tokens: list[torch.Tensor]) -> torch.Tensor:
        """(B, H, W) sum over the few-shot layers of the upsampled nearest-neighbour cosine distance."""
        assert self._memory is not None
        size = (self.image_size, self.image_size)
        total = None
        for layer, memory in zip(tokens, self._memory):
            memory = F.normalize(memory.to(layer.device), dim=-1)
            cosine = F.normalize(layer.float(), dim=-1) @ memory.t()  # (B, N, K * N)
            distance = (1.0 - cosine).amin(dim=-1)  # test.py: np.min(1 - cos, 0) over the memory
            side = int(distance.shape[-1] ** 0.5)
            upsampled = F.interpolate(distance.reshape(-1, 1, side, side), size=size, mode="bilinear", align_corners=True)[:, 0]
            total = upsampled if total is None else total + upsampled
        return total

    def set_scores(self, scores: torch.Tensor, peaks: torch.Tensor) -> torch.Tensor:
        """Few-shot: test.py's ``0.5 * (score + minmax over the set of each map's maximum)``; else unchanged."""
        if self._memory is None:
            return scores
        peaks = peaks.to(scores.dtype)
        span = peaks.max() - peaks.min() if peaks.numel() else peaks.new_zeros(())
        normalised = (peaks - peaks.min()) / span if span > 0 else torch.zeros_like(peaks)
        return 0.5 * (scores + normalised)

    # --- text --------------------------------------------------------------------------------
    def text_features(self) -> torch.Tensor:
        """Normalised (normal, abnormal) text features (2, E), fp32, computed once (disk-cached across processes)."""
        key = str(self.device)
        if key not in self._text_cache:
            name = self.object_name
            features = cached_text_features(
                self.clip, self.name, {"sentences": prompt_sentences(name, self.prompt_set)},
                lambda: {"text": encode_state_text(self.clip, self.backbone.tokenizer, name, self.prompt_set)},
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
        """Raw maps (sum of the tapped layers' abnormal probabilities, plus the few-shot maps) and image scores.

        With references the scores are the per-image part; :meth:`set_scores` combines them over a set.
        """
        tapped = self.tap_tokens(images)
        output = self.head(tapped)
        if self._memory is None:
            return output
        # test.py re-encodes the image for few_shot_features; the same blocks give the same tokens.
        tokens = list(tapped.tokens.unbind(1)) if self.few_shot_layers == self.layers else self.raw_tokens(images, self.few_shot_layers)
        maps = output.maps + self.few_shot_maps(tokens).to(output.maps.dtype)
        return AnomalyOutput(maps, output.scores, self.map_max)

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
