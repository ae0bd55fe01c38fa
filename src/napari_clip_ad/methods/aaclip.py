"""AA-CLIP (Ma et al., CVPR 2025): anomaly-aware text anchors (stage 1) and aligned patch features (stage 2).

Official reference: Mwxinnn/AA-CLIP (commit 53db195): ``model/adapter.py`` (``AdaptedCLIP``),
``model/adapter_modules.py`` (``SimpleAdapter``, ``SimpleProj``), ``forward_utils.py``, ``train.py``,
``test.py``, ``dataset/constants.py``. Per image:

- input: CLIP mean/std normalised (``dataset/__init__.py``), positional embedding resized once with
  bicubic + antialias (``model/model.py: resize_pos_embed``); the OpenAI weights are rebuilt from the
  JSON config without ``quick_gelu`` (``model/model_configs/ViT-L-14-336.json``): exact GELU;
- visual: after block ``i < image_adapt_until`` (0-based) the whole residual stream (CLS included)
  goes through ``layer_adapters[i]`` = LeakyReLU(Linear(width -> width, no bias)), rescaled to the
  stream's per-token norm and mixed ``x = 0.1 a + 0.9 x``; the patch tokens after each tapped block
  (``levels`` 6 12 18 24 on ViT-L, in block order) pass ``ln_post`` (no ``proj``), ``seg_proj[i]``
  (Linear width -> embed, LeakyReLU only with ``--relu``, which the released script does not pass)
  and L2 normalisation; the det token is ``det_proj`` of the last level, normalised per patch and
  averaged over patches (not renormalised);
- text: ``text_adapter[i]`` (LeakyReLU(Linear(text width -> text width))) after text block
  ``i < text_adapt_until`` with the same norm-matched mix (weight 0.1); the end-of-text token after
  ``ln_final`` goes through ``text_adapter[-1]`` = LeakyReLU(Linear(text width -> embed)) **instead of**
  ``text_projection`` (the projection is unused). Anchors: ``PROMPTS`` of ``dataset/constants.py``
  (3 normal / 5 abnormal states x 2 templates, object word ``REAL_NAMES['Brain']`` = 'scan'), each
  sentence normalised, averaged per state, renormalised. Option ``prompts`` (``medical`` or a JSON file,
  :mod:`.prompt_sets`) swaps the states and templates, same order and averaging;
- map (``calculate_similarity_map(test=True)``, domain 'Medical' for Brain): per level
  ``p = 100 f @ T``; ``(p_abnormal + 1 - p_normal) / 2`` on the patch grid, Gaussian blur (kornia
  ``gaussian_blur2d``, kernel 9, sigma 1.5, reflect border), bilinear resize (align_corners True);
  summed over levels. These are raw scaled cosines, not probabilities: per level in [-99.5, 100.5].
  Our ``maps`` are the exact affine image ``(official + 99.5 L) / 200`` in [0, L] (``map_max`` = L
  levels, so the unit maps the engine uses lie in [0, 1]); :func:`official_map` inverts it;
- image score (``metrics_eval``, domain 'Medical'): the maximum of the pixel map; the official code
  min-max normalises maps over the whole evaluated set first (a monotone step, not applied here), so
  ``scores`` is the peak of the official raw map. The det-token score ``(det @ T)[:, 1] + 1) / 2``
  that ``test.py`` computes is discarded by ``metrics_eval`` for medical data; it is in
  :class:`AAClipDetails` (stage-2 training uses its logits).

Quirks kept or noted: the ViT and text loops are hard-coded to 24 and 12 blocks and the adapters to
1024/768 (here: the backbone's depths and widths; blocks after the last level are not run, their
output is unused); ``test.py`` defines ``get_support_features`` but never calls it and ``--shot``
does not reach the test loader: there is no few-shot inference mode (``set_references`` refuses).
The official model runs fp32; so does this one (``low_precision_ready`` False: adapters mix into the
residual stream between blocks). Training (two stages) is in :mod:`.aaclip_stages`.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones import Backbone, embed_patches, grid_for, resize_positional_embedding
from ..backbones.hf_text import encode_hf_text, hf_text_depth, hf_text_width, is_hf_text
from ..errors import InputError, WeightsError
from .adaclip_prompts import run_block
from .base import AnomalyMethod, AnomalyOutput
from .prompt_sets import load_prompt_set, resolve_object_name
from .registry import register_method

LOGIT_SCALE = 100.0
"""forward_utils.py ``calculate_similarity_map``: ``100.0 * torch.matmul(patch_features, text)``."""
NORMAL_STATES = ("{}", "a {}", "the {}")
ABNORMAL_STATES = ("a damaged {}", "a broken {}", "a {} with flaw", "a {} with defect", "a {} with damage")
TEMPLATES = ("{}.", "a photo of {}.")
"""dataset/constants.py ``PROMPTS`` (states outer, templates inner, as ``get_adapted_single_class_text_embedding``)."""
BLUR_KERNEL, BLUR_SIGMA = 9, 1.5
"""forward_utils.py: domain 'Medical' (Brain) -> kernel 9, sigma 1.5 ('Industrial': 7 and 1)."""
MAP_OFFSET, MAP_SPAN = 99.5, 200.0
"""Per level the official map lies in [-99.5, 100.5]: ours is ``(official + 99.5) / 200`` per level."""
_OFFICIAL_PARTS = {"image_adapter": "image_adapter*.pth", "text_adapter": "text_adapter.pth"}


class SimpleAdapter(nn.Module):
    """Official ``SimpleAdapter``/``SimpleProj(relu=True)``: ``fc = Sequential(Linear(no bias), LeakyReLU)``."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(c_in, c_out, bias=False), nn.LeakyReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Linear then LeakyReLU."""
        return self.fc(x)


class SimpleProj(nn.Module):
    """Official ``SimpleProj``: ``fc = Linear`` (no bias), or ``Sequential(Linear, LeakyReLU)`` with relu."""

    def __init__(self, c_in: int, c_out: int, relu: bool) -> None:
        super().__init__()
        linear = nn.Linear(c_in, c_out, bias=False)
        self.fc = nn.Sequential(linear, nn.LeakyReLU()) if relu else linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Projection (and LeakyReLU with relu)."""
        return self.fc(x)


class AAClipDetails(NamedTuple):
    """Everything stage-2 training needs from one pass.

    Attributes:
        seg_tokens: per level (B, N, embed) normalised patch features.
        det_token: (B, embed) mean of the normalised det features.
        text: (2, embed) normalised (normal, abnormal) anchors used.
        output: The :class:`AnomalyOutput` of the same pass.
    """

    seg_tokens: list[torch.Tensor]
    det_token: torch.Tensor
    text: torch.Tensor
    output: AnomalyOutput


def norm_matched_mix(x: torch.Tensor, adapted: torch.Tensor, weight: float) -> torch.Tensor:
    """adapter.py: ``a * |x| / |a|`` per token, then ``w a + (1 - w) x``."""
    adapted = adapted * x.norm(dim=-1, keepdim=True) / adapted.norm(dim=-1, keepdim=True)
    return weight * adapted + (1 - weight) * x


def gaussian_blur(maps: torch.Tensor, kernel: int = BLUR_KERNEL, sigma: float = BLUR_SIGMA) -> torch.Tensor:
    """kornia ``gaussian_blur2d`` (reflect border) on (B, 1, H, W): normalised 1-D kernel, separable."""
    x = torch.arange(kernel, dtype=torch.float64) - kernel // 2
    if kernel % 2 == 0:
        x = x + 0.5
    weights = torch.exp(-x.pow(2) / (2 * sigma**2))
    weights = (weights / weights.sum()).to(maps.dtype).to(maps.device)
    pad = kernel // 2
    padded = F.pad(maps, (pad, pad, pad, pad), mode="reflect")
    out = F.conv2d(padded, weights.view(1, 1, 1, kernel))
    return F.conv2d(out, weights.view(1, 1, kernel, 1))


def official_map(output: AnomalyOutput) -> torch.Tensor:
    """The official ``test.py`` map (sum of levels, before its set-wise min-max) from our ``maps``."""
    levels = round(output.map_max)
    return output.maps * MAP_SPAN - MAP_OFFSET * levels


def official_parts(obj: Any, source: str) -> dict[str, torch.Tensor]:
    """Flat ``image_adapter.*`` / ``text_adapter.*`` tensors of an official checkpoint object.

    Accepts ``{"image_adapter": state_dict, ...}`` (``image_adapter*.pth``) merged with
    ``{"text_adapter": state_dict, ...}`` (``text_adapter.pth``), as train.py saves them.
    """
    if not isinstance(obj, dict) or not any(isinstance(obj.get(p), dict) for p in _OFFICIAL_PARTS):
        found = sorted(map(str, obj))[:4] if isinstance(obj, dict) else type(obj).__name__
        raise WeightsError(f"{source}: not an AA-CLIP checkpoint (expected train.py's dict with 'image_adapter' and "
                           f"'text_adapter' state dicts, found {found})")
    state: dict[str, torch.Tensor] = {}
    for part in _OFFICIAL_PARTS:
        values = obj.get(part)
        if not isinstance(values, dict) or not all(isinstance(v, torch.Tensor) for v in values.values()):
            raise WeightsError(f"{source}: no {part!r} state dict; AA-CLIP needs {_OFFICIAL_PARTS[part]} as train.py writes "
                               "it (give image_adapter*.pth with text_adapter.pth in the same folder)")
        state.update({f"{part}.{k}": v for k, v in values.items()})
    return state


def count_indices(state: dict[str, Any], prefix: str) -> int:
    """Number of distinct ``<prefix><i>.`` module indices among the keys."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({m.group(1) for k in state if (m := pattern.match(str(k)))})


@register_method
class AAClip(AnomalyMethod):
    """AA-CLIP on a CLIP ViT (official: OpenAI ViT-L/14@336 at 518 px, exact GELU, levels 6 12 18 24)."""

    name = "aaclip"
    default_backbone = "openai-vit-l-14-336"
    default_layers = (6, 12, 18, 24)
    default_sigma = 0.0  # the official blur is inside the map (per level, on the patch grid)
    quick_gelu = False
    low_precision_ready = False
    options = {"layers": None, "object_name": "scan", "image_adapt_until": None, "text_adapt_until": None,
               "image_adapt_weight": 0.1, "text_adapt_weight": 0.1, "relu": False, "surgery_blocks": None,
               "prompts": "industrial"}

    def __init__(self, backbone: Backbone, image_size: int = 240, **options: Any) -> None:
        super().__init__(backbone, image_size=image_size, **options)
        clip = self.clip
        visual = clip.visual
        hf_text = is_hf_text(clip)  # BiomedCLIP's BERT: adapters leave each encoder layer (backbones/hf_text.py)
        needed = (getattr(visual, "proj", None) is not None and hasattr(visual, "conv1")
                  and (hf_text or (hasattr(clip, "token_embedding") and hasattr(getattr(clip, "transformer", None), "resblocks"))))
        if not needed:
            raise WeightsError(f"backbone {backbone.name!r} is not an open_clip CLIP ViT with a projected image feature and "
                               "a built-in text transformer; AA-CLIP needs one such as openai-vit-l-14-336")
        self.prompt_set = load_prompt_set(self.config["prompts"])
        self.config["prompts"] = str(self.config["prompts"])
        object_name = resolve_object_name(self.prompt_set, self.config["object_name"], "object_name" in options)
        if not isinstance(object_name, str) or not object_name.strip():
            raise InputError(f"aaclip option object_name={object_name!r} is invalid; give the object word, e.g. 'scan'")
        self.object_name = object_name
        resize_positional_embedding(visual, self.image_size, mode="bicubic", antialias=True)
        self.grid = grid_for(visual, self.image_size)
        layers = self.resolve_layers(self.config["layers"])
        if len(set(layers)) != len(layers):
            raise InputError(f"aaclip option layers={layers} repeats a block; give each tapped block once")
        self.layers = sorted(layers)  # adapter.py appends tokens in block order: seg_proj[i] is the i-th tapped block
        self.config["layers"] = list(self.layers)
        n_visual = len(visual.transformer.resblocks)
        n_text = hf_text_depth(clip) if hf_text else len(clip.transformer.resblocks)
        self.image_adapt_until = self._depth("image_adapt_until", 6, 24, n_visual)
        self.text_adapt_until = self._depth("text_adapt_until", 3, 12, n_text)
        self.surgery_blocks = self._depth("surgery_blocks", 19, 24, n_visual)  # train.py: DAPM_replace(20): blocks -1..-19
        for key in ("image_adapt_weight", "text_adapt_weight"):
            value = self.config[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise InputError(f"aaclip option {key}={value!r} must be a number in [0, 1] (official 0.1)")
        if not isinstance(self.config["relu"], bool):
            raise InputError(f"aaclip option relu={self.config['relu']!r} must be true or false (official: false)")
        width, embed_dim = (int(n) for n in visual.proj.shape)
        text_width = hf_text_width(clip) if hf_text else int(clip.token_embedding.weight.shape[1])
        relu = self.config["relu"]
        # adapter.py: nn.ModuleDict {"layer_adapters", "seg_proj", "det_proj"} and ModuleList text adapters + proj,
        # xavier_uniform_ on every weight (_init_weights_).
        self.image_adapter = nn.ModuleDict({
            "layer_adapters": nn.ModuleList([SimpleAdapter(width, width) for _ in range(self.image_adapt_until)]),
            "seg_proj": nn.ModuleList([SimpleProj(width, embed_dim, relu) for _ in self.layers]),
            "det_proj": SimpleProj(width, embed_dim, relu),
        })
        self.text_adapter = nn.ModuleList([SimpleAdapter(text_width, text_width) for _ in range(self.text_adapt_until)]
                                          + [SimpleProj(text_width, embed_dim, relu=True)])
        for part in (self.image_adapter, self.text_adapter):
            for p in part.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
        self.image_adapter.to(self.device)
        self.text_adapter.to(self.device)
        self._text_cache: dict[str, torch.Tensor] = {}

    def _depth(self, key: str, official: int, official_depth: int, depth: int) -> int:
        value = self.config[key]
        if value is None:  # scaled like the tapped blocks on shallower towers
            value = min(depth, max(1, round(official * depth / official_depth)))
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= depth:
            raise InputError(f"aaclip option {key}={value!r} must be a whole number in [0, {depth}] (this tower's blocks)")
        self.config[key] = int(value)
        return int(value)

    # --- trainable parts ---------------------------------------------------------------------
    def trainable_parts(self) -> dict[str, nn.Module]:
        """Official ``image_adapter`` (ModuleDict) and ``text_adapter`` (ModuleList), names as train.py saves them."""
        return {"image_adapter": self.image_adapter, "text_adapter": self.text_adapter}

    def stage_parts(self) -> dict[str, list[nn.Module]]:
        """Training stages in order (train.py): stage 1 trains the text adapter, stage 2 the image adapter."""
        return {"text": [self.text_adapter], "image": [self.image_adapter]}

    def on_weights_loaded(self) -> None:
        """Text anchors depend on the text adapter: recompute them."""
        self._text_cache = {}

    @property
    def map_max(self) -> float:
        """Number of summed levels (each level's map is affinely mapped to [0, 1])."""
        return float(len(self.layers))

    # --- text --------------------------------------------------------------------------------
    def encode_adapted_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """adapter.py ``encode_text``: adapters in the first text blocks, ``text_adapter[-1]`` on the EOT token.

        The causal mask makes the end-of-text feature independent of later positions, so the sequence is
        cut after the last end token (same result, less work).
        """
        clip = self.clip
        if is_hf_text(clip):
            # BERT: each adapter mixes into a layer's output ([CLS] pooled, no ln_final: BERT's layers end normalised).
            until, weight = self.text_adapt_until, float(self.config["text_adapt_weight"])

            def adapt(index: int, x: torch.Tensor) -> torch.Tensor:
                return norm_matched_mix(x, self.text_adapter[index](x), weight) if index < until else x

            return self.text_adapter[-1](encode_hf_text(clip, tokens, layer_output=adapt, project=False))
        transformer = clip.transformer
        batch_first = getattr(transformer, "batch_first", True)
        eot = tokens.argmax(dim=-1)
        n_pos = int(eot.max()) + 1
        cast = transformer.get_cast_dtype() if hasattr(transformer, "get_cast_dtype") else torch.float32
        x = clip.token_embedding(tokens[:, :n_pos]).to(cast) + clip.positional_embedding[:n_pos].to(cast)
        mask = clip.attn_mask[:n_pos, :n_pos] if clip.attn_mask is not None else None
        for index, block in enumerate(transformer.resblocks):
            x = run_block(block, x, batch_first, attn_mask=mask)
            if index < self.text_adapt_until:
                x = norm_matched_mix(x, self.text_adapter[index](x), float(self.config["text_adapt_weight"]))
        x = clip.ln_final(x)
        return self.text_adapter[-1](x[torch.arange(x.shape[0], device=x.device), eot])

    def anchor_sentences(self) -> tuple[list[str], list[str]]:
        """(normal, abnormal) prompt sentences in the official order (states outer); a prompt set swaps the words."""
        name = self.object_name
        words = self.prompt_set
        normal, abnormal, templates = ((NORMAL_STATES, ABNORMAL_STATES, TEMPLATES) if words is None
                                       else (words.normal_states, words.abnormal_states, words.templates))

        def expand(states: tuple[str, ...]) -> list[str]:
            return [template.format(state.format(name)) for state in states for template in templates]

        return expand(normal), expand(abnormal)

    def adapted_anchors(self) -> torch.Tensor:
        """(2, embed) normalised (normal, abnormal) anchors through the text adapters (differentiable)."""
        normal, abnormal = self.anchor_sentences()
        tokens = self.backbone.tokenizer(normal + abnormal).to(self.device)
        embedded = self.encode_adapted_text(tokens)
        embedded = embedded / embedded.norm(dim=-1, keepdim=True)
        anchors = []
        for part in (embedded[: len(normal)], embedded[len(normal):]):
            mean = part.mean(dim=0)
            anchors.append(mean / mean.norm())
        return torch.stack(anchors)

    def text_features(self) -> torch.Tensor:
        """The anchors (2, embed), computed once without grad (test.py / stage 2 of train.py)."""
        key = str(self.device)
        if key not in self._text_cache:
            with torch.no_grad():
                self._text_cache = {key: self.adapted_anchors().float()}
        return self._text_cache[key]

    # --- visual ------------------------------------------------------------------------------
    def visual_tokens(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """adapter.py ``forward``: normalised seg tokens of every level (B, N, embed) and the det token (B, embed)."""
        visual = self.clip.visual
        batch_first = getattr(visual.transformer, "batch_first", True)
        weight = float(self.config["image_adapt_weight"])
        x = embed_patches(visual, images.to(self.device))
        tapped = []
        for index, block in enumerate(visual.transformer.resblocks[: max(self.layers)]):
            x = run_block(block, x, batch_first)
            if index < self.image_adapt_until:
                x = norm_matched_mix(x, self.image_adapter["layer_adapters"][index](x), weight)
            if index + 1 in self.layers:
                tapped.append(visual.ln_post(x[:, 1:]))
        seg = [F.normalize(self.image_adapter["seg_proj"][i](t), dim=-1) for i, t in enumerate(tapped)]
        det = F.normalize(self.image_adapter["det_proj"](tapped[-1]), dim=-1).mean(dim=1)
        return seg, det

    def logit_grid(self, tokens: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """(B, 2, g, g) scaled cosines ``100 f @ T`` on the patch grid."""
        logits = LOGIT_SCALE * tokens @ text.to(tokens.dtype).t()
        return logits.permute(0, 2, 1).reshape(logits.shape[0], 2, self.grid, self.grid)

    def level_map(self, tokens: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """calculate_similarity_map(test=True) of one level: (B, H, W) official map."""
        grid = self.logit_grid(tokens, text)
        raw = (grid[:, 1] + 1 - grid[:, 0]) / 2
        blurred = gaussian_blur(raw.unsqueeze(1))
        size = (self.image_size, self.image_size)
        return F.interpolate(blurred, size=size, mode="bilinear", align_corners=True)[:, 0]

    def level_probs(self, tokens: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """calculate_similarity_map(test=False) (training): bilinear resize of the logits, then softmax: (B, 2, H, W)."""
        size = (self.image_size, self.image_size)
        return F.interpolate(self.logit_grid(tokens, text), size=size, mode="bilinear", align_corners=True).softmax(dim=1)

    def forward_details(self, images: torch.Tensor) -> AAClipDetails:
        """One pass: tokens, anchors and the output (differentiable in the image adapter)."""
        text = self.text_features()
        seg, det = self.visual_tokens(images)
        official = torch.stack([self.level_map(tokens, text) for tokens in seg]).sum(dim=0)
        levels = len(self.layers)
        maps = (official + MAP_OFFSET * levels) / MAP_SPAN
        scores = official.flatten(1).amax(dim=1)  # metrics_eval, domain 'Medical': image score = map max
        return AAClipDetails(seg, det, text, AnomalyOutput(maps, scores, float(levels)))

    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        """Maps (affine image of the official map, in [0, levels]) and scores (peak of the official map)."""
        return self.forward_details(images).output

    def describe(self) -> dict[str, Any]:
        """Provenance, with how our maps relate to the official ones."""
        info = super().describe()
        info["map_definition"] = ("sum over levels of (official level map + 99.5) / 200; official = maps * 200 - "
                                  f"99.5 * {len(self.layers)}; score = peak of the official map (test.py, Medical)")
        return info

    # --- official checkpoints ----------------------------------------------------------------
    @classmethod
    def checkpoint_head_count(cls, obj: Any, ours: bool) -> int | None:
        """Number of ``seg_proj`` heads (one per tapped level)."""
        if ours:
            return count_indices(obj, "image_adapter.seg_proj.") or None
        image = obj.get("image_adapter") if isinstance(obj, dict) else None
        return (count_indices(image, "seg_proj.") or None) if isinstance(image, dict) else None

    def convert_official_checkpoint(self, obj: Any, source: str) -> dict[str, torch.Tensor]:
        """train.py's ``image_adapter*.pth`` (+ ``text_adapter.pth`` beside it, merged by the reader) -> our state."""
        state = official_parts(obj, source)
        counts = {
            "layers": (count_indices(state, "image_adapter.seg_proj."), len(self.layers)),
            "image_adapt_until": (count_indices(state, "image_adapter.layer_adapters."), self.image_adapt_until),
            "text_adapt_until": (count_indices(state, "text_adapter.") - 1, self.text_adapt_until),
        }
        for key, (theirs, ours) in counts.items():
            if theirs != ours:
                what = f"{theirs} tapped levels" if key == "layers" else f"{key} {theirs}"
                raise WeightsError(f"{source}: checkpoint has {what} but the method was built with {ours}; "
                                   f"build it with {key}={theirs if key != 'layers' else '<' + str(theirs) + ' blocks>'}")
        relu = any(str(k).startswith("image_adapter.det_proj.fc.0.") for k in state)
        if relu != self.config["relu"]:
            raise WeightsError(f"{source}: checkpoint was trained with relu={relu} (seg/det projections) but the method "
                               f"was built with relu={self.config['relu']}; build it with relu={relu}")
        own = self.trainable_state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise WeightsError(f"{source}: not the official AA-CLIP adapter format (missing {missing[:3]}, unexpected {unexpected[:3]})")
        for key, value in own.items():
            if tuple(state[key].shape) != tuple(value.shape):
                raise WeightsError(f"{source}: {key} has shape {tuple(state[key].shape)} but backbone {self.backbone.name} "
                                   f"needs {tuple(value.shape)}; it was trained for another backbone")
        return {k: v.float() for k, v in state.items()}
