"""AdaCLIP (Cao et al., ECCV 2024): hybrid static + dynamic prompts in both CLIP towers, and HSF.

Official reference: caoyunkang/AdaCLIP (commit e27ee32): ``method/adaclip.py``, ``method/trainer.py``,
``method/custom_clip.py``, ``test.py``. Per image:

- positional embedding resized once at load: bicubic, align_corners False, NO antialias;
- the image feature of the plain (unprompted) visual pass, ``ln_post(CLS) @ proj``, feeds the
  dynamic prompt generators (one ``nn.Linear`` per prompt token, for each tower);
- prompts (dynamic + static, fp16-rounded) enter the visual and text blocks up to the prompting
  depth (see :mod:`.adaclip_prompts`); the text features therefore depend on the image;
- patch tokens = raw residual stream after each tapped block (CLS and prompts dropped) through
  ``patch_token_layer.head[i]``, L2-normalised; logits = 100 * token @ text (normal, abnormal);
- image feature = ``cls_token_layer`` of the prompted ``ln_post(CLS) @ proj``, normalised; with
  HSF it becomes normalise(0.2 * fused + 0.8 * feature) (:mod:`.adaclip_hsf`); score =
  softmax(100 * feature @ text)[abnormal];
- map: per-layer logits reshaped to the grid, bilinear (align_corners True) to the image size,
  averaged over layers, softmax, (abnormal + 1 - normal) / 2: a probability (``map_max`` 1);
- the evaluation applies a Gaussian filter, sigma 4 (``default_sigma``).

Tapped layers: ``output_layers`` are 1-based block numbers (``(indx + 1) in output_layers``).
The official train.py/test.py hard-code ``n_layers // 4 * (1, 2, 3, 4)`` (6 12 18 24 on ViT-L),
while the study (Table 2) reports feature layers [3, 6, 9] (also the default ``out_layers`` of
the official ``Transformer.forward``). Our default follows the study: blocks 3, 6, 9. The released
checkpoints carry 4 patch heads (trained on 6 12 18 24) and load as published: when ``layers`` is not
given, ``build_method`` takes the blocks from the checkpoint by the official rule (provenance
``layers_from``); an explicit ``layers`` whose count differs from the heads is refused (the official
``strict=False`` loader would silently keep the first heads).

At 240 px the official code rebuilds the model from its JSON config without a quick_gelu flag, so
the OpenAI weights run with exact GELU (``quick_gelu = False``). The official test enforces batch
size 1; here any batch gives the same per-image result (prompts, text features and k-means seeds
are per image) to float precision; HSF's top-k and k-means are discontinuous, so in a rare near-tie
a float-level difference between batch sizes can still move an image score. Official evaluation runs under CUDA autocast; here
the frozen visual tower runs in the method's precision (fp32, or bf16 where chosen) and everything
else (text tower, heads, HSF, logits, maps) in float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones import Backbone, grid_for, resize_positional_embedding
from ..backbones.hf_text import hf_max_positions, hf_text_width, is_hf_text
from ..errors import InputError, WeightsError
from .adaclip_hsf import HSF_MODES, hybrid_semantic_fusion
from .adaclip_prompts import ProjectLayer, PromptLayer, prompt_sentences, run_block, state_text_features
from .base import AnomalyMethod, AnomalyOutput
from .prompt_sets import load_prompt_set, resolve_object_name
from .registry import register_method
from .text_features import cached_text_features

LOGIT_SCALE = 100.0
HSF_ALPHA = 0.2
"""``visual_text_similarity``: ``alpha * clustered_feature + (1 - alpha) * image_feature``."""
CHECKPOINT_PREFIX = "clip_model."
PART_NAMES = (
    "text_prompter", "visual_prompter", "patch_token_layer", "cls_token_layer",
    "dynamic_visual_prompt_generator", "dynamic_text_prompt_generator",
)
"""trainer.py ``learnable_paramter_list``; train.py saves ``clip_model.<part>.<param>`` tensors."""


@dataclass
class AdaCLIPDetails:
    """Everything training needs from one pass.

    Attributes:
        layer_probs: (B, n_layers, 2, H, W) per-layer softmax at image size (``aggregation=False``).
        image_probs: (B, 2) softmax of the image logits (the official ``anomaly_score``).
        output: The :class:`AnomalyOutput` of the same pass.
    """

    layer_probs: torch.Tensor
    image_probs: torch.Tensor
    output: AnomalyOutput


def _as_bool(value: Any, option: str) -> bool:
    if isinstance(value, str) and value.lower() in ("yes", "true", "t", "1", "no", "false", "f", "0"):
        return value.lower() in ("yes", "true", "t", "1")
    if isinstance(value, (bool, int)):
        return bool(value)
    raise InputError(f"adaclip option {option}={value!r} is not a boolean; use true or false")


def _as_int(value: Any, option: str, minimum: int) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = minimum - 1
    if number < minimum or (isinstance(value, float) and value != number):
        raise InputError(f"adaclip option {option}={value!r} must be an integer >= {minimum}")
    return number


@register_method
class AdaCLIP(AnomalyMethod):
    """AdaCLIP on a CLIP ViT (official: OpenAI ViT-L/14@336, exact GELU; study: blocks 3 6 9)."""

    name = "adaclip"
    default_backbone = "openai-vit-l-14-336"
    default_layers = (3, 6, 9)
    default_sigma = 4.0
    quick_gelu = False
    options = {
        "layers": None, "object_name": "brain", "prompting_depth": 4, "prompting_length": 5,
        "prompting_branch": "VL", "prompting_type": "SD", "use_hsf": True, "k_clusters": 20,
        "hsf": "fast",
        "prompts": "industrial",
    }

    def __init__(self, backbone: Backbone, image_size: int = 240, **options: Any) -> None:
        super().__init__(backbone, image_size=image_size, **options)
        self._explicit_object_name = "object_name" in options
        hf_text = is_hf_text(self.clip)  # BiomedCLIP's BERT: prompts enter through backbones/hf_text.py
        for attribute in () if hf_text else ("token_embedding", "transformer", "ln_final", "text_projection", "attn_mask"):
            if getattr(self.clip, attribute, None) is None:
                raise WeightsError(
                    f"backbone {backbone.name!r} has no CLIP text transformer ({attribute} missing); AdaCLIP prompts "
                    "its text tower: use a CLIP ViT backbone such as openai-vit-l-14-336"
                )
        visual = self.clip.visual
        if getattr(visual, "proj", None) is None or not hasattr(visual, "_embeds"):
            raise WeightsError(f"backbone {backbone.name!r} is not an open_clip CLIP ViT with a projected CLS; AdaCLIP needs one")
        resize_positional_embedding(visual, self.image_size, mode="bicubic", antialias=False)
        self._parse_options()
        self.n_patches = grid_for(visual, self.image_size) ** 2
        if self.use_hsf and self.k_clusters > self.n_patches:
            raise InputError(f"adaclip option k_clusters={self.k_clusters} exceeds the {self.n_patches} patches of a {self.image_size} px image")
        n_blocks = len(visual.transformer.resblocks)
        requested = self.config["layers"]
        if requested is None and n_blocks >= max(self.default_layers):
            requested = self.default_layers  # the study's blocks, unscaled, on any deep enough backbone
        self.layers = sorted(self.resolve_layers(requested))
        if len(set(self.layers)) != len(self.layers):
            raise InputError(f"adaclip option layers={self.layers} repeats a block; give each tapped block once")
        self.config["layers"] = list(self.layers)
        width, embed_dim = (int(n) for n in visual.proj.shape)
        text_width = hf_text_width(self.clip) if hf_text else int(self.clip.ln_final.weight.shape[0])
        depth, length, kind = self.prompting_depth, self.prompting_length, self.prompting_type
        self.text_prompter = PromptLayer(text_width, length, depth, kind, enabled="L" in self.prompting_branch)
        self.visual_prompter = PromptLayer(width, length, depth, kind, enabled="V" in self.prompting_branch)
        self.patch_token_layer = ProjectLayer(width, embed_dim, len(self.layers))
        self.cls_token_layer = ProjectLayer(embed_dim, embed_dim, 1)
        self.dynamic_visual_prompt_generator = ProjectLayer(embed_dim, width, length) if "D" in kind else None
        self.dynamic_text_prompt_generator = ProjectLayer(embed_dim, text_width, length) if "D" in kind else None
        for part in self.trainable_parts().values():
            part.to(self.device)
        self._text_cache: dict[tuple[str, str], torch.Tensor] = {}

    def _parse_options(self) -> None:
        branch, kind = str(self.config["prompting_branch"]).upper(), str(self.config["prompting_type"]).upper()
        if branch not in ("", "V", "L", "VL") or kind not in ("", "S", "D", "SD"):
            raise InputError(
                f"adaclip options prompting_branch={branch!r} / prompting_type={kind!r} are invalid; "
                "use a branch of '', V, L, VL and a type of '', S, D, SD"
            )
        if branch and not kind:
            raise InputError(f"adaclip option prompting_branch={branch!r} needs a prompting_type (S, D or SD)")
        self.prompting_branch, self.prompting_type = branch, kind
        self.prompting_depth = _as_int(self.config["prompting_depth"], "prompting_depth", 1)
        self.prompting_length = _as_int(self.config["prompting_length"], "prompting_length", 1)
        positions = hf_max_positions(self.clip) if is_hf_text(self.clip) else int(self.clip.positional_embedding.shape[0])
        if self.prompting_length + 1 > positions:
            raise InputError(f"adaclip option prompting_length={self.prompting_length} does not fit the text context")
        self.use_hsf = _as_bool(self.config["use_hsf"], "use_hsf")
        self.k_clusters = _as_int(self.config["k_clusters"], "k_clusters", 1)
        self.hsf_mode = str(self.config["hsf"]).lower()
        if self.hsf_mode not in HSF_MODES:
            raise InputError(f"adaclip option hsf={self.config['hsf']!r} is invalid; use 'exact' (scikit-learn, official) or 'fast' (torch on the device)")
        self.config["hsf"] = self.hsf_mode
        # Prompt set (prompt_sets.py): the words of the static sentences the learned prompts enter.
        self.prompt_set = load_prompt_set(self.config["prompts"])
        self.config["prompts"] = str(self.config["prompts"])
        object_name = resolve_object_name(self.prompt_set, self.config["object_name"], self._explicit_object_name)
        self.object_name = object_name
        if not isinstance(object_name, str) or not object_name.strip():
            raise InputError(f"adaclip option object_name={object_name!r} is invalid; give the object's name, e.g. 'brain'")
        self.config.update(
            prompting_branch=branch, prompting_type=kind, prompting_depth=self.prompting_depth,
            prompting_length=self.prompting_length, use_hsf=self.use_hsf, k_clusters=self.k_clusters,
        )

    # --- trainable parts ---------------------------------------------------------------------
    def trainable_parts(self) -> dict[str, nn.Module]:
        """The official learnable modules, under their official names."""
        parts = {name: getattr(self, name, None) for name in PART_NAMES}
        return {name: module for name, module in parts.items() if module is not None}

    def on_weights_loaded(self) -> None:
        """Drop cached text features (only the unprompted text is cached)."""
        self._text_cache.clear()

    @property
    def map_max(self) -> float:
        """The map is one softmax probability of the layer-averaged logits."""
        return 1.0

    # --- encoders ----------------------------------------------------------------------------
    def text_features(self, dynamic: torch.Tensor | None, batch: int) -> torch.Tensor:
        """(B, E, 2) normalised (normal, abnormal) text features of each image."""
        tokenizer, object_name = self.backbone.tokenizer, self.object_name
        if not self.text_prompter.enabled:
            key = (str(self.device), object_name)
            if key not in self._text_cache:
                with torch.no_grad():
                    features = cached_text_features(
                        self.clip, self.name, {"sentences": prompt_sentences(object_name, self.prompt_set)},
                        lambda: {"text": state_text_features(self.clip, tokenizer, object_name, None, self.prompt_set)[0]},
                    )
                self._text_cache = {key: features["text"][None]}
            return self._text_cache[key].expand(batch, -1, -1)
        groups = batch if self.text_prompter.use_dynamic else 1
        contexts = self.text_prompter.contexts(dynamic, groups)
        return state_text_features(self.clip, tokenizer, object_name, contexts, self.prompt_set).expand(batch, -1, -1)

    def encode_image(self, images: torch.Tensor, dynamic: torch.Tensor | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Prompted visual pass: ``ln_post(CLS) @ proj`` (B, E) and per tapped block (B, L, width) patch tokens."""
        visual, prompter = self.clip.visual, self.visual_prompter
        x = visual._embeds(images)
        contexts = prompter.contexts(dynamic, images.shape[0]) if prompter.enabled else None
        length = prompter.length if prompter.enabled else 0
        batch_first = getattr(visual.transformer, "batch_first", True)
        tapped = []
        for index, block in enumerate(visual.transformer.resblocks):
            if contexts is not None and index < prompter.depth:
                kept = x if index == 0 else x[:, : x.shape[1] - length]
                x = torch.cat([kept, contexts[:, index].to(x.dtype)], dim=1)
            x = run_block(block, x, batch_first)
            if index + 1 in self.layers:
                tapped.append(x[:, 1 : x.shape[1] - length])
        return visual.ln_post(x[:, 0]) @ visual.proj, tapped

    def plain_image_features(self, images: torch.Tensor) -> torch.Tensor:
        """``ln_post(CLS) @ proj`` of the unprompted visual pass (input of the dynamic prompts)."""
        visual = self.clip.visual
        x = visual.transformer(visual._embeds(images))  # open_clip's Transformer returns (B, L, C)
        return visual.ln_post(x[:, 0]) @ visual.proj

    # --- prediction --------------------------------------------------------------------------
    def forward_details(self, images: torch.Tensor) -> AdaCLIPDetails:
        """One differentiable pass: per-layer probabilities, image probabilities and the output."""
        images = images.to(self.device)
        batch = images.shape[0]
        dynamic_visual = dynamic_text = None
        if self.visual_prompter.use_dynamic or self.text_prompter.use_dynamic:
            with torch.no_grad(), self.backbone_autocast():  # official: the generators' input carries no gradient
                plain = self.plain_image_features(images)
            with self.head_fp32():
                plain = plain.float()
                if self.visual_prompter.use_dynamic:
                    dynamic_visual = self.dynamic_visual_prompt_generator.stacked(plain)
                if self.text_prompter.use_dynamic:
                    dynamic_text = self.dynamic_text_prompt_generator.stacked(plain)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.visual_prompter.enabled), self.backbone_autocast():
            pooled, tapped = self.encode_image(images, dynamic_visual)
        with self.head_fp32():
            return self._head_details(pooled.float(), [t.float() for t in tapped], dynamic_text, batch)

    def _head_details(self, pooled: torch.Tensor, tapped: list[torch.Tensor], dynamic_text: torch.Tensor | None, batch: int) -> AdaCLIPDetails:
        """Text features, projections, HSF, logits and maps in fp32 (autocast off)."""
        text = self.text_features(dynamic_text, batch).to(pooled.dtype)
        patches = [F.normalize(t, dim=-1) for t in self.patch_token_layer.per_layer(tapped)]
        image = F.normalize(self.cls_token_layer.head[0](pooled), dim=-1)
        layer_logits = [LOGIT_SCALE * p @ text for p in patches]
        if self.use_hsf:
            fused = hybrid_semantic_fusion(patches, layer_logits, self.k_clusters, self.hsf_mode)
            image = F.normalize(HSF_ALPHA * fused + (1 - HSF_ALPHA) * image, dim=1)
        image_probs = (LOGIT_SCALE * image.unsqueeze(1) @ text).squeeze(1).softmax(dim=1)
        stacked = torch.stack(layer_logits, dim=1)  # (B, n_layers, L, 2)
        n_layers, side = stacked.shape[1], int(round(stacked.shape[2] ** 0.5))
        grids = stacked.permute(0, 1, 3, 2).reshape(batch * n_layers, 2, side, side)
        size = (self.image_size, self.image_size)
        grids = F.interpolate(grids, size=size, mode="bilinear", align_corners=True).reshape(batch, n_layers, 2, *size)
        probs = grids.mean(dim=1).softmax(dim=1)  # official test order: average logits, then softmax
        maps = (probs[:, 1] + 1 - probs[:, 0]) / 2.0
        output = AnomalyOutput(maps, image_probs[:, 1], self.map_max)
        return AdaCLIPDetails(grids.softmax(dim=2), image_probs, output)

    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        """Raw maps (probabilities in [0, 1]) and HSF image scores."""
        return self.forward_details(images).output

    # --- official checkpoints ----------------------------------------------------------------
    @classmethod
    def checkpoint_head_count(cls, obj: Any, ours: bool) -> int | None:
        """Patch-token heads in a checkpoint (each taps one block); None if it has none."""
        if not isinstance(obj, dict):
            return None
        prefix = "patch_token_layer.head." if ours else f"{CHECKPOINT_PREFIX}patch_token_layer.head."
        heads = {str(k)[len(prefix):].split(".")[0] for k in obj if str(k).startswith(prefix)}
        return len(heads) or None

    def convert_official_checkpoint(self, obj: Any, source: str) -> dict[str, torch.Tensor]:
        """The flat ``{"clip_model.<part>.<param>": tensor}`` dict train.py saves -> our state."""
        if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            found = sorted(map(str, obj))[:3] if isinstance(obj, dict) else type(obj).__name__
            raise WeightsError(f"{source}: not an AdaCLIP checkpoint (expected a flat dict of tensors, found {found})")
        foreign = [k for k in obj if not (str(k).startswith(CHECKPOINT_PREFIX) and str(k)[len(CHECKPOINT_PREFIX):].split(".")[0] in PART_NAMES)]
        if foreign:
            raise WeightsError(
                f"{source}: not an AdaCLIP checkpoint (keys such as {foreign[:2]} are not 'clip_model.<part>' of "
                f"{', '.join(PART_NAMES[:2])}, ...); is it for another method?"
            )
        state = {k[len(CHECKPOINT_PREFIX):]: v.float() for k, v in obj.items()}
        heads = {k.split(".")[2] for k in state if k.startswith("patch_token_layer.head.")}
        if len(heads) != len(self.layers):
            raise WeightsError(
                f"{source}: checkpoint has {len(heads)} patch-token heads but the method taps {len(self.layers)} blocks "
                f"{self.layers}; build it with {len(heads)} layers, or give no layers to take them from the checkpoint"
            )
        for prompter in ("visual_prompter", "text_prompter"):
            static = [v for k, v in state.items() if k.startswith(f"{prompter}.static_prompts.")]
            if static and (len(static) != self.prompting_depth or static[0].shape[0] != self.prompting_length):
                raise WeightsError(
                    f"{source}: checkpoint {prompter} has depth {len(static)} and length {static[0].shape[0]}; build it "
                    f"with prompting_depth={len(static)} prompting_length={static[0].shape[0]}"
                )
        own, theirs = {k.split(".")[0] for k in self.trainable_state_dict()}, {k.split(".")[0] for k in state}
        if own != theirs:
            raise WeightsError(
                f"{source}: checkpoint has parts {sorted(theirs)} but prompting_branch={self.prompting_branch!r} "
                f"prompting_type={self.prompting_type!r} builds {sorted(own)}; pass the branch/type it was trained with"
            )
        return state
