"""MVFA-AD (Huang et al., CVPR 2024): multi-level residual visual adapters aligned with text, zero/few-shot.

Official reference: MediaBrain-SJTU/MVFA-AD (commit a30bf7b): ``CLIP/adapter.py`` (``ClipAdapter``,
``CLIP_Inplanted``), ``test_zero.py``, ``test_few.py``, ``train_zero.py``, ``train_few.py``, ``utils.py``,
``prompt.py``. Per image:

- input: the official loader does bicubic resize + ``ToTensor`` and **no CLIP mean/std** (the network
  sees RGB in [0, 1]); ``predict`` receives CLIP-normalised slices like every method, so the
  normalisation is undone first (``x * std + mean``);
- positional embedding resized once at load: bicubic, antialias, align_corners False
  (``resize_pos_embed``); at 240 px the model is rebuilt from its JSON config without quick_gelu, so
  the OpenAI weights run with exact GELU (``quick_gelu = False``);
- after each tapped block k (1-based), adapters ``seg_adapters[i]`` and ``det_adapters[i]`` with
  ``i = features.index(k)`` (the position in the ``layers`` list as given) read the residual stream
  (all tokens, CLS included): ``fc1 = LeakyReLU(Linear(width -> embed, no bias))``, ``fc2 =
  LeakyReLU(Linear(embed -> width, no bias))``; the stream becomes ``0.8 x + 0.1 seg_fc2 + 0.1 det_fc2``
  and **later blocks see the changed stream**; the tapped features are the fc1 outputs (no ln_post,
  no proj), collected in block order;
- text: VAND's 7 normal / 5 abnormal states x 35 templates with the object word (``REAL_NAME['Brain']``
  = 'Brain'), per-sentence normalised, averaged, renormalised (``encode_text_with_prompt_ensemble``);
- zero-shot map: per level, seg tokens (CLS dropped) L2-normalised, logits 100 u @ T, the two logit
  maps bilinearly resized (align_corners True) to the image size, softmax, abnormal channel; summed
  over levels (``map_max`` = number of levels). Image score: det tokens, abnormal softmax probability
  averaged over patches, summed over levels (range [0, levels]);
- few-shot (after :meth:`MVFA.set_references`): see :mod:`.mvfa_fewshot`. The official map is
  min-max normalised over the whole evaluated set; ``predict`` normalises over the images of the call
  (so a slice's few-shot map depends on the other slices of that call; zero-shot never does);
  :meth:`MVFA.few_shot_components` + :func:`.mvfa_fewshot.fuse_set` normalise over any set, e.g. a volume.

The official module runs batch 1 on a GPU under fp16 autocast (memory bank in fp32); here any batch
gives the same zero-shot result per image, computed in the backbone's dtype (float32 on the CPU).
Its ViT loop is hard-coded to 24 blocks and the adapters to 1024 -> 768; here width and embed dim are
the backbone's (``visual.proj`` shape) and blocks after the last tapped one are not run (their
output is unused). Likewise the last level's ``fc2`` only feeds the stream after the last tap, which
nothing reads: it never gets a gradient, here as in the official training (Adam leaves it unchanged).
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones import Backbone, embed_patches, grid_for, resize_positional_embedding
from ..errors import InputError, WeightsError
from .adaclip_prompts import run_block
from .base import AnomalyMethod, AnomalyOutput
from .mvfa_fewshot import AUGMENTED_PER_REFERENCE, augment_references, few_shot_maps, fuse_set
from .registry import register_method
from .vand_prompts import encode_state_text

LOGIT_SCALE = 100.0
"""test_zero.py: ``100.0 * patch_tokens @ text_features``."""
STREAM_KEEP, ADAPTER_MIX = 0.8, 0.1
"""adapter.py: ``x = 0.8 * x + 0.1 * seg_adapt_out + 0.1 * det_adapt_out``."""
CHECKPOINT_PARTS = ("seg_adapters", "det_adapters")
"""train_zero.py / train_few.py save ``{"seg_adapters": state_dict, "det_adapters": state_dict}``."""
_ADAPTER_KEY = re.compile(r"(\d+)\.fc([12])\.0\.weight")


class ClipAdapter(nn.Module):
    """The official residual adapter: ``fc1`` (width -> embed) and ``fc2`` (embed -> width), no bias, LeakyReLU."""

    def __init__(self, width: int, bottleneck: int) -> None:
        super().__init__()
        self.fc1 = nn.Sequential(nn.Linear(width, bottleneck, bias=False), nn.LeakyReLU())
        self.fc2 = nn.Sequential(nn.Linear(bottleneck, width, bias=False), nn.LeakyReLU())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(…, width) -> (fc1 output (…, embed), fc2 output (…, width))."""
        middle = self.fc1(x)
        return middle, self.fc2(middle)


class MvfaStem(NamedTuple):
    """Frozen part of the visual pass (cacheable for training).

    Attributes:
        stream: (B, 1 + N, width) residual stream after the first tapped block, before its adapters:
            everything earlier is frozen; every later block sees adapted input and must run in training.
    """

    stream: torch.Tensor


class MvfaDetails(NamedTuple):
    """Everything training needs from one pass.

    Attributes:
        layer_probs: (B, levels, 2, H, W) per-level softmax (normal, abnormal) of the seg maps at image size.
        det_scores: (B, levels) per-level mean abnormal probability of the det tokens (fed to
            ``BCEWithLogitsLoss`` by the official train scripts).
        output: The zero-shot :class:`AnomalyOutput` of the same pass.
    """

    layer_probs: torch.Tensor
    det_scores: torch.Tensor
    output: AnomalyOutput


def adapter_count(obj: Any, source: str = "checkpoint") -> int:
    """Number of adapter pairs (= tapped levels) in an official MVFA checkpoint object.

    Raises:
        WeightsError: ``obj`` is not ``{"seg_adapters": state_dict, "det_adapters": state_dict}``.
    """
    if not isinstance(obj, dict) or not all(isinstance(obj.get(p), dict) for p in CHECKPOINT_PARTS):
        found = sorted(map(str, obj))[:4] if isinstance(obj, dict) else type(obj).__name__
        raise WeightsError(f"{source}: not an MVFA-AD checkpoint (expected a dict with 'seg_adapters' and 'det_adapters', found {found})")
    counts = set()
    for part in CHECKPOINT_PARTS:
        state = obj[part]
        matches = [_ADAPTER_KEY.fullmatch(str(k)) for k in state]
        if not state or not all(matches) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise WeightsError(
                f"{source}: {part!r} is not an MVFA-AD adapter state dict (keys '<i>.fc1.0.weight', '<i>.fc2.0.weight'; "
                f"found {sorted(map(str, state))[:3]})"
            )
        counts.add(len({m.group(1) for m in matches if m}))
    if len(counts) != 1:
        raise WeightsError(f"{source}: seg_adapters and det_adapters hold different numbers of adapters {sorted(counts)}")
    return counts.pop()


def checkpoint_layers(obj: Any, n_blocks: int, source: str = "checkpoint") -> list[int] | None:
    """Tapped blocks a released checkpoint implies: 4 adapters -> ``n_blocks // 4 * (1, 2, 3, 4)``.

    The official scripts tap ``features_list`` 6 12 18 24 on the 24-block ViT-L; other adapter counts
    do not say which blocks they sit on (None: the caller must give ``layers``).
    """
    count = adapter_count(obj, source)
    return [n_blocks // 4 * i for i in (1, 2, 3, 4)] if count == 4 and n_blocks >= 4 else None


@register_method
class MVFA(AnomalyMethod):
    """MVFA-AD on a CLIP ViT (official: OpenAI ViT-L/14@336 at 240 px, exact GELU, adapters after 6 12 18 24)."""

    name = "mvfa"
    default_backbone = "openai-vit-l-14-336"
    default_layers = (6, 12, 18, 24)
    default_sigma = 0.0
    quick_gelu = False
    low_precision_ready = False  # the adapters mix into the residual stream between blocks: fp32 throughout
    options = {"layers": None, "object_name": "Brain"}
    supports_references = True

    def __init__(self, backbone: Backbone, image_size: int = 240, **options: Any) -> None:
        super().__init__(backbone, image_size=image_size, **options)
        visual = self.clip.visual
        if getattr(visual, "proj", None) is None or not hasattr(visual, "conv1") or not hasattr(self.clip, "encode_text"):
            raise WeightsError(
                f"backbone {backbone.name!r} is not an open_clip CLIP ViT with a projected image feature and a text "
                "encoder; MVFA-AD needs one such as openai-vit-l-14-336"
            )
        object_name = self.config["object_name"]
        if not isinstance(object_name, str) or not object_name.strip():
            raise InputError(f"mvfa option object_name={object_name!r} is invalid; give the object's name, e.g. 'Brain'")
        resize_positional_embedding(visual, self.image_size, mode="bicubic", antialias=True)
        self.grid = grid_for(visual, self.image_size)
        layers = self.resolve_layers(self.config["layers"])
        if len(set(layers)) != len(layers):
            raise InputError(f"mvfa option layers={layers} repeats a block; give each tapped block once")
        self.layers = layers  # adapter i sits after block layers[i] (official features.index), as given
        self.config["layers"] = list(layers)
        width, embed_dim = (int(n) for n in visual.proj.shape)
        self.seg_adapters = nn.ModuleList([ClipAdapter(width, embed_dim) for _ in layers]).to(self.device)
        self.det_adapters = nn.ModuleList([ClipAdapter(width, embed_dim) for _ in layers]).to(self.device)
        self._text_cache: dict[str, torch.Tensor] = {}
        self._memory: list[torch.Tensor] | None = None
        self._n_references = 0

    # --- trainable parts ---------------------------------------------------------------------
    def trainable_parts(self) -> dict[str, nn.Module]:
        """The seg and det adapters (official ``seg_adapters`` / ``det_adapters``)."""
        return {"seg_adapters": self.seg_adapters, "det_adapters": self.det_adapters}

    def on_weights_loaded(self) -> None:
        """A memory bank built with the old adapters is stale: drop it (zero-shot until set again)."""
        self._memory, self._n_references = None, 0

    @property
    def map_max(self) -> float:
        """Zero-shot: the levels' probabilities are summed; few-shot: the fused map is in [0, 1]."""
        return 1.0 if self._memory is not None else float(len(self.layers))

    # --- text --------------------------------------------------------------------------------
    def text_features(self) -> torch.Tensor:
        """Normalised (normal, abnormal) text features (2, E), computed once per device."""
        key = str(self.device)
        if key not in self._text_cache:
            self._text_cache = {key: encode_state_text(self.clip, self.backbone.tokenizer, self.config["object_name"])}
        return self._text_cache[key]

    # --- visual ------------------------------------------------------------------------------
    def _unnormalise(self, images: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.backbone.mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(self.backbone.std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
        return images * std + mean

    def _stem_from_unit_images(self, images: torch.Tensor) -> MvfaStem:
        visual = self.clip.visual
        batch_first = getattr(visual.transformer, "batch_first", True)
        x = embed_patches(visual, images)
        for block in visual.transformer.resblocks[: min(self.layers)]:
            x = run_block(block, x, batch_first)
        return MvfaStem(x)

    @torch.no_grad()
    def tap_tokens(self, images: torch.Tensor) -> MvfaStem:
        """The frozen stem of CLIP-normalised images: the stream up to the first adapter (no grad)."""
        return self._stem_from_unit_images(self._unnormalise(images.to(self.device)))

    def adapted_tokens(self, stem: MvfaStem | torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Seg and det fc1 tokens (B, 1 + N, embed) of every level, in block order, from the stem on."""
        stream = stem.stream if isinstance(stem, MvfaStem) else stem
        visual = self.clip.visual
        blocks = visual.transformer.resblocks
        batch_first = getattr(visual.transformer, "batch_first", True)
        first, last = min(self.layers), max(self.layers)
        seg_tokens, det_tokens = [], []
        x = stream
        for number in range(first, last + 1):  # block `first` already ran in the stem
            if number > first:
                x = run_block(blocks[number - 1], x, batch_first)
            if number in self.layers:
                index = self.layers.index(number)
                seg_middle, seg_out = self.seg_adapters[index](x)
                det_middle, det_out = self.det_adapters[index](x)
                x = STREAM_KEEP * x + ADAPTER_MIX * seg_out + ADAPTER_MIX * det_out
                seg_tokens.append(seg_middle)
                det_tokens.append(det_middle)
        return seg_tokens, det_tokens

    # --- zero-shot head ----------------------------------------------------------------------
    def head_details(self, stem: MvfaStem | torch.Tensor) -> MvfaDetails:
        """Zero-shot maps, scores and per-level probabilities from a (possibly cached) stem."""
        seg_tokens, det_tokens = self.adapted_tokens(stem)
        return self._zero_shot(seg_tokens, det_tokens)

    def _zero_shot(self, seg_tokens: list[torch.Tensor], det_tokens: list[torch.Tensor]) -> MvfaDetails:
        text = self.text_features()
        size = (self.image_size, self.image_size)
        probs, det_scores = [], []
        for seg, det in zip(seg_tokens, det_tokens):
            det = det[:, 1:] / det[:, 1:].norm(dim=-1, keepdim=True)
            det_logits = LOGIT_SCALE * det @ text.to(det.dtype).t()
            det_scores.append(det_logits.softmax(dim=-1)[..., 1].mean(dim=-1))
            seg = seg[:, 1:] / seg[:, 1:].norm(dim=-1, keepdim=True)
            logits = LOGIT_SCALE * seg @ text.to(seg.dtype).t()
            batch = logits.shape[0]
            grid = logits.permute(0, 2, 1).reshape(batch, 2, self.grid, self.grid)
            # Official order: bilinear resize of the logits (align_corners True), then softmax.
            probs.append(F.interpolate(grid, size=size, mode="bilinear", align_corners=True).softmax(dim=1))
        layer_probs = torch.stack(probs, dim=1)
        scores = torch.stack(det_scores, dim=1)
        output = AnomalyOutput(layer_probs[:, :, 1].sum(dim=1), scores.sum(dim=1), float(len(self.layers)))
        return MvfaDetails(layer_probs, scores, output)

    def head(self, stem: MvfaStem | torch.Tensor) -> AnomalyOutput:
        """Zero-shot :class:`AnomalyOutput` from ``head(tap_tokens(x))``."""
        return self.head_details(stem).output

    def forward_details(self, images: torch.Tensor) -> MvfaDetails:
        """One differentiable zero-shot pass (the frozen stem without grad)."""
        return self.head_details(self.tap_tokens(images))

    # --- few-shot ----------------------------------------------------------------------------
    @torch.no_grad()
    def set_references(self, images: torch.Tensor | None) -> None:
        """Build the memory bank of the official few-shot test from K normal slices, or clear it (None).

        The references (preprocessed like :meth:`predict`'s input) are brought back to [0, 1], augmented
        to 11 K images (:func:`.mvfa_fewshot.augment_references`) and encoded with the current adapters;
        the memory keeps every seg-adapter token, CLS rows included, in float32.
        """
        if images is None:
            self._memory, self._n_references = None, 0
            return
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3 or images.shape[0] < 1:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise InputError(f"references must be (K, 3, H, W) with K >= 1, got {shape}")
        if images.shape[-2:] != (self.image_size, self.image_size):
            raise InputError(f"references are {tuple(images.shape[-2:])} px but the method was built for {self.image_size} px")
        was_training = self.training
        self.eval()
        try:
            augmented = augment_references(self._unnormalise(images.float()).cpu())
            banks: list[list[torch.Tensor]] = [[] for _ in self.layers]
            for start in range(0, augmented.shape[0], 8):
                chunk = augmented[start : start + 8].to(self.device)
                seg_tokens, _ = self.adapted_tokens(self._stem_from_unit_images(chunk))
                for level, tokens in enumerate(seg_tokens):
                    banks[level].append(tokens.float().reshape(-1, tokens.shape[-1]))
        finally:
            self.train(was_training)
        self._memory = [torch.cat(bank) for bank in banks]
        self._n_references = int(images.shape[0])
        assert self._memory[0].shape[0] == images.shape[0] * AUGMENTED_PER_REFERENCE * (1 + self.grid**2)

    @property
    def n_references(self) -> int:
        """Number of reference slices in the memory bank (0: zero-shot)."""
        return self._n_references

    @torch.no_grad()
    def few_shot_components(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-image (zero-shot map, few-shot map) before the set-wise fusion, for any set of images.

        Fuse them over the evaluated set with :func:`.mvfa_fewshot.fuse_set` (e.g. over a whole volume).
        """
        if self._memory is None:
            raise InputError("mvfa has no references: call set_references(images) first (or use zero-shot predict)")
        seg_tokens, det_tokens = self.adapted_tokens(self.tap_tokens(images))
        zero = self._zero_shot(seg_tokens, det_tokens).output.maps.float()
        few = few_shot_maps(self._memory, [t[:, 1:] for t in seg_tokens], self.image_size)
        return zero, few

    @property
    def set_normalised(self) -> bool:
        """Few-shot maps are min-max normalised over the evaluated set (the volume engine: the whole volume)."""
        return self._memory is not None

    def set_components(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(zero-shot maps, few-shot maps) of a batch, fused over the whole set by :meth:`fuse_set_components`."""
        return self.few_shot_components(images)

    def fuse_set_components(self, components) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
        """The official fusion over the evaluated set: ``0.5 minmax(zero) + 0.5 minmax(few)``, score = map max."""
        return fuse_set(*components)

    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        """Zero-shot: raw maps (sum of levels) and det scores. Few-shot: the fused map over this batch."""
        if self._memory is None:
            return self.forward_details(images).output
        zero, few = self.few_shot_components(images)
        maps, scores = fuse_set(zero, few)
        return AnomalyOutput(maps, scores, 1.0)

    def describe(self) -> dict[str, Any]:
        """Provenance, with the number of references and where the few-shot normalisation happens."""
        info = super().describe()
        info["k_shot"] = self._n_references
        if self._memory is not None:
            info["few_shot_normalisation"] = ("min-max over the evaluated set (official): predict's call, or the whole "
                                              "volume in run_volume / infer / the study")
        return info

    # --- official checkpoints ----------------------------------------------------------------
    @classmethod
    def checkpoint_layer_count(cls, obj: Any, source: str = "checkpoint") -> int:
        """Number of tapped levels an official checkpoint fixes (its adapter count)."""
        return adapter_count(obj, source)

    @classmethod
    def checkpoint_head_count(cls, obj: Any, ours: bool) -> int | None:
        """Adapters per part in a checkpoint (each sits after one tapped block), for ``build_method``'s layer rule."""
        if ours:
            heads = {str(k).split(".")[1] for k in obj if str(k).startswith("seg_adapters.")}
            return len(heads) or None
        try:
            return adapter_count(obj)
        except WeightsError:
            return None  # not this method's format: convert_official_checkpoint says so in one line

    def convert_official_checkpoint(self, obj: Any, source: str) -> dict[str, torch.Tensor]:
        """``{"seg_adapters": ..., "det_adapters": ...}`` as train_zero.py / train_few.py save it -> our state."""
        count = adapter_count(obj, source)
        if count != len(self.layers):
            raise WeightsError(
                f"{source}: checkpoint has {count} adapter pairs but the method taps {len(self.layers)} blocks "
                f"{self.layers}; build it with {count} layers (the released MVFA-AD weights: layers 6 12 18 24)"
            )
        state: dict[str, torch.Tensor] = {}
        for part in CHECKPOINT_PARTS:
            own = getattr(self, part).state_dict()
            theirs = obj[part]
            missing, unexpected = sorted(set(own) - set(theirs)), sorted(set(theirs) - set(own))
            if missing or unexpected:
                raise WeightsError(f"{source}: {part} is not the official adapter format (missing {missing[:3]}, unexpected {unexpected[:3]})")
            for key, value in own.items():
                if tuple(theirs[key].shape) != tuple(value.shape):
                    raise WeightsError(
                        f"{source}: {part}.{key} has shape {tuple(theirs[key].shape)} but backbone {self.backbone.name} needs "
                        f"{tuple(value.shape)} (width {self.clip.visual.proj.shape[0]}, embed {self.clip.visual.proj.shape[1]}); "
                        "it was trained for another backbone"
                    )
                state[f"{part}.{key}"] = theirs[key].float()
        return state
