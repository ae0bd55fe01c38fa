"""AnomalyCLIP (Zhou et al., ICLR 2024): object-agnostic learnable prompts + DPAM visual tokens.

Official reference: zqhang/AnomalyCLIP (commit 45ed4dd), test.py / train.py. Per image:
``text`` = the normalised normal / abnormal features of the learned prompts; image score =
softmax(normalised image feature @ text / 0.07)[abnormal]; per tapped layer the normalised
projected V-V tokens give softmax(token @ text / 0.07), bilinearly resized (align_corners False)
to the image size, map = (abnormal + 1 - normal) / 2; maps summed over the tapped layers. The
test-time Gaussian filter (sigma 4) is applied by the engine (``default_sigma``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones import Backbone, resize_positional_embedding
from ..backbones.hf_text import hf_text_width, hf_word_embedding, is_hf_text
from ..errors import InputError, WeightsError
from .anomalyclip_dpam import VisualOutputs, dpam_visual_outputs
from .anomalyclip_prompts import AnomalyCLIPPromptLearner, encode_learned_text
from .base import AnomalyMethod, AnomalyOutput
from .registry import register_method

LOG = logging.getLogger(__name__)
TEMPERATURE = 0.07
OFFICIAL_DPAM_LAYER = 20
"""test.py / train.py: DPAM in the last DPAM_layer - 1 = 19 of ViT-L's 24 blocks."""
PROJECTION_OUT = 896
"""Width of the official (unused) ``compound_prompt_projections`` linear layers."""


@dataclass
class HeadDetails:
    """Everything training needs from one head pass.

    Attributes:
        layer_probs: (B, n_layers, 2, H, W) per-layer (normal, abnormal) probabilities at image size.
        image_logits: (B, 2) normalised image feature @ text / 0.07.
        output: The :class:`AnomalyOutput` of the same pass.
    """

    layer_probs: torch.Tensor
    image_logits: torch.Tensor
    output: AnomalyOutput


@register_method
class AnomalyCLIP(AnomalyMethod):
    """AnomalyCLIP on a CLIP ViT (official: OpenAI ViT-L/14@336, QuickGELU, taps 6 12 18 24)."""

    name = "anomalyclip"
    default_backbone = "openai-vit-l-14-336"
    default_layers = (6, 12, 18, 24)
    default_sigma = 4.0
    quick_gelu = True
    options = {"layers": None, "dpam_layer": None, "n_ctx": 12, "t_n_ctx": 4, "depth": 9}

    def __init__(self, backbone: Backbone, image_size: int = 240, **options: Any) -> None:
        super().__init__(backbone, image_size=image_size, **options)
        hf_text = is_hf_text(self.clip)  # BiomedCLIP's BERT: prompts enter through backbones/hf_text.py
        for attribute in () if hf_text else ("token_embedding", "transformer", "ln_final", "text_projection", "attn_mask"):
            if getattr(self.clip, attribute, None) is None:
                raise WeightsError(
                    f"backbone {backbone.name!r} has no CLIP text transformer ({attribute} missing); "
                    "AnomalyCLIP inserts prompt tokens into it: use a CLIP ViT backbone such as openai-vit-l-14-336"
                )
        # Official: bilinear (align_corners False, no antialias), at forward time; same as once here.
        resize_positional_embedding(self.clip.visual, self.image_size, mode="bilinear", antialias=False)
        self.layers = self.resolve_layers(self.config["layers"])
        self.n_dpam = self._resolve_dpam(self.config["dpam_layer"])
        self.config["dpam_layer"] = self.n_dpam + 1
        width = hf_text_width(self.clip) if hf_text else int(self.clip.ln_final.weight.shape[0])
        self.prompt_learner = AnomalyCLIPPromptLearner(width, self.config["n_ctx"], self.config["t_n_ctx"], self.config["depth"])
        embedding = hf_word_embedding(self.clip) if hf_text else self.clip.token_embedding
        self.prompt_learner.attach_tokens(embedding, backbone.tokenizer)
        self.prompt_learner.to(self.device)
        self._text_cache: tuple[tuple, torch.Tensor] | None = None

    def _resolve_dpam(self, dpam_layer: int | None) -> int:
        """Number of DPAM blocks: official 19 of 24; the same fraction on other depths by default."""
        n_blocks = len(self.clip.visual.transformer.resblocks)
        if dpam_layer is None:
            return max(1, round((OFFICIAL_DPAM_LAYER - 1) * n_blocks / 24))
        if int(dpam_layer) != dpam_layer or not 1 <= dpam_layer <= n_blocks + 1:
            raise InputError(f"anomalyclip option dpam_layer={dpam_layer!r} is invalid; use 1..{n_blocks + 1} (1: no DPAM)")
        return int(dpam_layer) - 1

    # --- trainable parts ---------------------------------------------------------------------
    def trainable_parts(self) -> dict[str, nn.Module]:
        """The learnable prompts, under the official name ``prompt_learner``."""
        return {"prompt_learner": self.prompt_learner}

    def on_weights_loaded(self) -> None:
        """Drop the cached text features."""
        self._text_cache = None

    @property
    def map_max(self) -> float:
        """Each tapped layer's map lies in [0, 1]; they are summed."""
        return float(len(self.layers))

    # --- text --------------------------------------------------------------------------------
    def text_features(self) -> torch.Tensor:
        """Normalised (normal, abnormal) text features (2, E); cached while no gradient is needed."""
        params = list(self.prompt_learner.parameters())
        needs_grad = torch.is_grad_enabled() and any(p.requires_grad for p in params)
        key = tuple((p._version, p.data_ptr(), str(p.device)) for p in params)
        if not needs_grad and self._text_cache is not None and self._text_cache[0] == key:
            return self._text_cache[1]
        prompts, tokenized, deep = self.prompt_learner()
        features = encode_learned_text(self.clip, prompts, tokenized, deep).float()
        features = features / features.norm(dim=-1, keepdim=True)
        if not needs_grad:
            features = features.detach()
            self._text_cache = (key, features)
        return features

    # --- visual + head -----------------------------------------------------------------------
    @torch.no_grad()
    def tap_tokens(self, images: torch.Tensor) -> VisualOutputs:
        """Frozen visual outputs (projected V-V tokens of the tapped layers, image feature)."""
        with self.backbone_autocast():
            return dpam_visual_outputs(self.clip.visual, images.to(self.device), self.layers, self.n_dpam)

    def head_details(self, visual: VisualOutputs) -> HeadDetails:
        """Maps, scores, per-layer probabilities and image logits from cached visual outputs (fp32, autocast off)."""
        with self.head_fp32():
            return self._head_details(visual)

    def _head_details(self, visual: VisualOutputs) -> HeadDetails:
        text = self.text_features()
        tokens = visual.tokens.float()
        tokens = tokens / tokens.norm(dim=-1, keepdim=True)
        batch, n_layers, n_tokens, _ = tokens.shape
        side = int(n_tokens**0.5)
        probs = (torch.einsum("blne,ke->blnk", tokens, text) / TEMPERATURE).softmax(dim=-1)
        probs = probs.reshape(batch * n_layers, side, side, 2).permute(0, 3, 1, 2)
        size = (self.image_size, self.image_size)
        probs = F.interpolate(probs, size=size, mode="bilinear", align_corners=False)
        probs = probs.reshape(batch, n_layers, 2, *size)
        maps = ((probs[:, :, 1] + 1 - probs[:, :, 0]) / 2.0).sum(dim=1)
        image = visual.image_features.float()
        image = image / image.norm(dim=-1, keepdim=True)
        logits = image @ text.t() / TEMPERATURE
        scores = logits.softmax(dim=-1)[:, 1]
        return HeadDetails(probs, logits, AnomalyOutput(maps, scores, self.map_max))

    def head(self, visual: VisualOutputs) -> AnomalyOutput:
        """:class:`AnomalyOutput` from (possibly cached) visual outputs; differentiable in the prompts."""
        return self.head_details(visual).output

    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        """Raw maps (sum over tapped layers, before the sigma-4 smoothing) and image scores."""
        return self.head(self.tap_tokens(images))

    # --- official checkpoints ----------------------------------------------------------------
    def convert_official_checkpoint(self, obj: Any, source: str) -> dict[str, torch.Tensor]:
        """``{"prompt_learner": state_dict}`` as train.py saves it -> our trainable state.

        The fixed-word embeddings and token ids are checked and dropped (they are recomputed from
        the backbone); ``compound_prompt_projections`` (built but never used by the official
        forward) are checked and dropped.
        """
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt_learner"), dict):
            found = sorted(obj)[:4] if isinstance(obj, dict) else type(obj).__name__
            raise WeightsError(f"{source}: not an AnomalyCLIP checkpoint (expected a dict with 'prompt_learner', found {found})")
        state = obj["prompt_learner"]
        learner = self.prompt_learner
        if not all(isinstance(v, torch.Tensor) for v in state.values()) or "ctx_pos" not in state:
            raise WeightsError(f"{source}: 'prompt_learner' holds no AnomalyCLIP prompt tensors (ctx_pos missing)")
        n_deep = len([k for k in state if k.startswith("compound_prompts_text.")])
        got = (state["ctx_pos"].shape[-2] if state["ctx_pos"].ndim == 4 else None, n_deep + 1,
               state["compound_prompts_text.0"].shape[0] if n_deep else learner.t_n_ctx)
        want = (learner.n_ctx, learner.depth, learner.t_n_ctx)
        if got != want:
            raise WeightsError(
                f"{source}: checkpoint has n_ctx={got[0]}, depth={got[1]}, t_n_ctx={got[2]} but the method was built with "
                f"n_ctx={want[0]}, depth={want[1]}, t_n_ctx={want[2]}; build it with the checkpoint's options"
            )
        width = learner.ctx_pos.shape[-1]
        expected = {f"prompt_learner.{k}": tuple(v.shape) for k, v in learner.state_dict().items()}
        fixed = {
            "token_prefix_pos": tuple(learner.token_prefix_pos.shape), "token_suffix_pos": tuple(learner.token_suffix_pos.shape),
            "token_prefix_neg": tuple(learner.token_prefix_neg.shape), "token_suffix_neg": tuple(learner.token_suffix_neg.shape),
            "tokenized_prompts_pos": (1, 1, learner.tokenized_prompts.shape[1]),
            "tokenized_prompts_neg": (1, 1, learner.tokenized_prompts.shape[1]),
        }
        for i in range(learner.depth - 1):
            fixed[f"compound_prompt_projections.{i}.weight"] = (PROJECTION_OUT, width)
            fixed[f"compound_prompt_projections.{i}.bias"] = (PROJECTION_OUT,)
        official_keys = {k[len("prompt_learner."):] for k in expected} | set(fixed)
        missing, unexpected = sorted(official_keys - set(state)), sorted(set(state) - official_keys)
        if missing or unexpected:
            raise WeightsError(f"{source}: not the official AnomalyCLIP prompt_learner format (missing {missing[:3]}, unexpected {unexpected[:3]})")
        for key, shape in fixed.items():
            if tuple(state[key].shape) != shape:
                raise WeightsError(
                    f"{source}: {key} has shape {tuple(state[key].shape)}, expected {shape}: "
                    f"it was trained for another backbone (text width {width} here)"
                )
        tokens = torch.cat([state["tokenized_prompts_pos"].reshape(1, -1), state["tokenized_prompts_neg"].reshape(1, -1)])
        if not torch.equal(tokens.long().cpu(), learner.tokenized_prompts.cpu()):
            raise WeightsError(f"{source}: its prompt token ids differ from AnomalyCLIP's 'X... object.' prompts; not an AnomalyCLIP checkpoint")
        self._warn_if_other_embeddings(state, source)
        return {f"prompt_learner.{k}": state[k].float() for k in (k[len("prompt_learner."):] for k in expected)}

    def _warn_if_other_embeddings(self, state: dict[str, torch.Tensor], source: str) -> None:
        learner = self.prompt_learner
        ours = torch.cat([learner.token_prefix_pos, learner.token_suffix_pos], dim=2).cpu()
        theirs = torch.cat([state["token_prefix_pos"], state["token_suffix_pos"]], dim=2).float().cpu()
        if not torch.allclose(ours, theirs, atol=1e-3):
            LOG.warning("%s: its word embeddings differ from backbone %s's; it was trained on another backbone", source, self.backbone.label)
