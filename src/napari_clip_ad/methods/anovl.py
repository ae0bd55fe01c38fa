"""AnoVL: training-free zero-shot anomaly detection with V-V attention and domain-aware state prompts.

Official code: hq-deng/AnoVL (commit 3a70bfd), vl_test.py run as in test_zero_shot.sh
(ViT-B-16-plus-240 ``laion400m_e32``, features 3 6 9 12, image 240, seed 111). Per image:

* map: the final V-V patch tokens (see :mod:`.anovl_attention`) on the patch grid, through the
  test-time adapter when ``tta`` is on, L2-normalised, softmax over (normal, abnormal) of
  token @ text with NO temperature, abnormal channel; replicate-pad 1, 3x3 average pooling
  (stride 1), bilinear resize to the image size with align_corners=True. No Gaussian filter.
* score: mean over 22 augmented views (:func:`.anovl_tta.augment_views`) of the abnormal
  probability softmax(normalised CLS feature @ text), no temperature. The adapter does not touch it.

``tta=False`` (what the study ran) has no trainable parts. ``tta=True`` is the official test-time
adaptation: per image, the adapter is re-initialised and fitted on the method's own pseudo-labels
(``tta_epochs`` AdamW steps at ``tta_lr``), even inside a batch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..backbones import Backbone, resize_positional_embedding
from ..errors import InputError
from .anovl_attention import encode_visual
from .anovl_prompts import STATE_ABNORMAL, STATE_NORMAL, encode_state_prompts, state_sentences
from .anovl_tta import StateAdapter, adapt_tokens, augment_view_batch, state_probabilities, view_order
from .base import AnomalyMethod, AnomalyOutput
from .prompt_sets import load_prompt_set, resolve_object_name
from .registry import register_method
from .text_features import cached_text_features

MAX_VIEWS_PER_FORWARD = 176
"""Bound on augmented views per backbone forward (8 slices x 22 views; ~1.5 GB of activations on ViT-B/16+)."""
MAP_ENTRY = 6
"""The official map reads ``patch_tokens_ln[6]``: it needs at least 4 tapped layers (2 entries each)."""


@register_method
class AnoVL(AnomalyMethod):
    """AnoVL (zero-shot, training-free; optional per-image test-time adaptation)."""

    name = "anovl"
    default_backbone = "vit-b-16-plus-240"
    default_layers = (3, 6, 9, 12)
    default_sigma = 0.0
    quick_gelu = False
    official_fp32 = True
    options = {"layers": None, "object_name": "brain", "tta": False, "tta_epochs": 5, "tta_lr": 0.001, "seed": 111,
               "prompts": "industrial"}

    def __init__(self, backbone: Backbone, image_size: int = 240, **options: Any) -> None:
        super().__init__(backbone, image_size=image_size, **options)
        # The official factory sets the config image size and open_clip's resize_pos_embed
        # (bicubic, antialias) adapts the checkpoint; a no-op at ViT-B-16-plus-240's native 240 px.
        resize_positional_embedding(self.clip.visual, self.image_size, mode="bicubic", antialias=True)
        self.layers = self.resolve_layers(self.config["layers"])
        if 2 * len(self.layers) <= MAP_ENTRY:
            raise InputError(
                f"anovl needs at least 4 tapped layers (its map reads entry {MAP_ENTRY} of the tapped-token list), "
                f"got {self.layers}; the map is the final V-V state whichever layers are tapped"
            )
        # Prompt set (prompt_sets.py): "industrial" keeps the official lists; others swap the words only.
        self.prompt_set = load_prompt_set(self.config["prompts"])
        self.config["prompts"] = str(self.config["prompts"])
        self.object_name = str(resolve_object_name(self.prompt_set, self.config["object_name"], "object_name" in options)).strip()
        if not self.object_name:
            raise InputError("anovl option object_name is empty; pass the imaged object, e.g. 'brain'")
        self.tta = bool(self.config["tta"])
        self.tta_epochs = int(self.config["tta_epochs"])
        self.tta_lr = float(self.config["tta_lr"])
        self.seed = int(self.config["seed"])
        if self.tta_epochs < 0 or not self.tta_lr > 0:
            raise InputError(f"anovl tta_epochs must be >= 0 and tta_lr > 0 (got {self.tta_epochs}, {self.tta_lr})")
        self._text_cache: tuple[torch.Tensor, torch.Tensor] | None = None
        self.adapter: StateAdapter | None = None

    # --- text ---------------------------------------------------------------------------------
    def text_features(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached ``(text (E, 2), sentences (2 * S, E))`` of the state prompts for ``object_name``."""
        device = self.device
        if self._text_cache is None or self._text_cache[0].device != device:
            def compute() -> dict[str, torch.Tensor]:
                text, sentences = encode_state_prompts(self.clip, self.backbone.tokenizer, self.object_name, device, self.prompt_set)
                return {"text": text, "sentences": sentences}

            normal_states, abnormal_states, templates = (STATE_NORMAL, STATE_ABNORMAL, None) if self.prompt_set is None else (
                self.prompt_set.normal_states, self.prompt_set.abnormal_states, self.prompt_set.templates)
            payload = {"normal": state_sentences(self.object_name, normal_states, templates),
                       "abnormal": state_sentences(self.object_name, abnormal_states, templates)}
            cached = cached_text_features(self.clip, self.name, payload, compute)
            self._text_cache = (cached["text"], cached["sentences"])
        return self._text_cache

    def on_weights_loaded(self) -> None:
        self._text_cache = None

    # --- inference ----------------------------------------------------------------------------
    def _generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed)

    def image_scores(self, images: torch.Tensor, original_features: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) mean abnormal probability of the CLS feature over each image's 22 augmented views.

        All slices x views of a batch run together, :data:`MAX_VIEWS_PER_FORWARD` per forward.

        Args:
            images: (B, 3, H, W).
            original_features: (B, E) CLS features of the un-augmented images when already computed
                (the map's pass gives them): the original view is then not run again.
        """
        text, _ = self.text_features()
        order = view_order(self._generator())
        views = augment_view_batch(images, order)  # (B, 22, 3, H, W), the same order for every image
        slot = int((order == 0).nonzero()[0, 0])  # position of the original view (CPU tensor: no device sync)
        keep = [i for i in range(order.numel()) if original_features is None or i != slot]
        flat = views[:, keep].reshape(-1, *views.shape[2:])
        with self.backbone_autocast():
            encoded = [encode_visual(self.clip.visual, chunk, value_value=False).image_features
                       for chunk in flat.split(MAX_VIEWS_PER_FORWARD)]
        features = torch.cat(encoded).float().reshape(images.shape[0], len(keep), -1)
        if original_features is not None:
            original = original_features.float()[:, None]
            features = torch.cat([features[:, :slot], original, features[:, slot:]], dim=1)
        return state_probabilities(features, text)[..., 1].mean(dim=1)

    def _adapted(self, grid_tokens: torch.Tensor) -> torch.Tensor:
        """Per image: test-time adaptation of (B, h, w, E) tokens (each image on its own)."""
        text, sentences = self.text_features()
        if self.adapter is None:
            self.adapter = StateAdapter(text.shape[0], sentences.shape[0]).to(grid_tokens.device)
        self.adapter.to(grid_tokens.device)
        out = []
        for tokens in grid_tokens.split(1):
            generator = self._generator()
            # The official seeded stream serves aug's shuffle first; keep that draw so the adapter's
            # initialisation uses the same generator state whether or not the score was computed.
            torch.randperm(22, generator=generator)
            out.append(adapt_tokens(self.adapter, tokens, text, sentences, self.tta_epochs, self.tta_lr, generator))
        return torch.cat(out)

    def anomaly_maps(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        """(B, H, W) abnormal probability maps from (B, N, E) final V-V patch tokens."""
        batch, n_tokens, dim = patch_tokens.shape
        side = int(n_tokens ** 0.5)
        grid_tokens = patch_tokens.reshape(batch, side, side, dim)  # official resize_tokens
        if self.tta:
            grid_tokens = self._adapted(grid_tokens)
        text, _ = self.text_features()
        maps = state_probabilities(grid_tokens, text)[..., 1].unsqueeze(1)
        maps = F.avg_pool2d(F.pad(maps, (1, 1, 1, 1), mode="replicate"), 3, stride=1, padding=0)
        maps = F.interpolate(maps, size=self.image_size, mode="bilinear", align_corners=True)
        return maps[:, 0]

    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        """Maps and scores; the backbone is frozen and the adapter (if any) is fitted per image.

        The official test runs in float32 without autocast, so autocast is switched off here (the
        frozen backbone runs in bf16 only when the method's precision says so; the rest stays fp32).
        """
        with torch.autocast(images.device.type, enabled=False):
            images = images.float()
            with torch.no_grad(), self.backbone_autocast():
                visual = encode_visual(self.clip.visual, images)
            maps = self.anomaly_maps(visual.patch_tokens.float())
            with torch.no_grad():
                scores = self.image_scores(images, visual.image_features)
        return AnomalyOutput(maps=maps, scores=scores, map_max=self.map_max)
