"""MuSc (Li et al., ICLR 2024): zero-shot mutual scoring of unlabeled images, CLIP or DINOv2 backbones.

Official reference: xrli-U/MuSc (commit b76b93d): ``models/musc.py`` (``make_category_data``),
``models/modules/_LNAMD.py``, ``models/modules/_MSM.py``, ``models/modules/_RsCIN.py``, configs/musc.yaml.

- Tokens: CLIP: the raw residual stream after blocks ``feature_layers + 1`` = (6, 12, 18, 24) of ViT-L
  (its own open_clip copy, no ``ln_post``); DINOv2: ``get_intermediate_layers(n=[...], norm=True)``.
  On shallower backbones the default blocks are scaled to the same relative depths.
- CLIP at a size other than the native one: the official factory rebuilds the model from its JSON config,
  which has no quick_gelu flag, so OpenAI weights then run with exact GELU (QuickGELU at the native size);
  its ``resize_pos_embed`` is bicubic without antialias.
- LNAMD for each r in (1, 3, 5): per layer a LayerNorm over the whole (C, H, W) map (fresh
  ``nn.LayerNorm``: no affine, eps 1e-5), then PatchCore's patchify with zero padding (r - 1) / 2 and
  ``adaptive_avg_pool1d`` over the (C, r, r) block, which is an r x r mean that counts the padding
  (``avg_pool2d(count_include_pad=True)``); each aggregated patch L2-normalised per layer.
- MSM: for each image, each patch, each OTHER image: the L2 distance to that image's nearest patch
  (``torch.cdist``); the mean of the lowest ``int(0.3 * (n_images - 1))`` of those; averaged over the
  layers, then over r. The map is resized bilinearly with align_corners True to the image size; no Gaussian.
- Image score: RsCIN on the maps' maxima: min-max normalised over the run, smoothed by the class-token
  similarity graph (``MMO`` with k in (1, 2, 3), the repository's default outside VisA): CLIP class token =
  normalised ``encode_image``; DINOv2 = ``model(x)`` (final-norm CLS, not normalised).

``predict(images)`` is the official run on that set (each image against the others; at least 6 images).
``set_references(pool)`` then ``predict(x)``: the official run on x + pool, rows of x (the pool's features are
extracted once). The official code runs under CUDA autocast (fp16); distances here are float32.
"""

from __future__ import annotations

from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F

from ..backbones import Backbone, is_dinov2, resize_positional_embedding, set_activation
from ..backbones.dinov2 import dinov2_features, set_dinov2_image_size
from ..errors import InputError
from .base import AnomalyMethod, AnomalyOutput
from .knn import MAX_ELEMENTS, per_image_nearest_l2
from .registry import register_method

R_LIST = (1, 3, 5)
TOPMIN_MAX = 0.3
RSCIN_K = (1, 2, 3)
MIN_IMAGES = 6


class MuscFeatures(NamedTuple):
    """Backbone outputs MuSc scores from (cacheable).

    Attributes:
        tokens: (B, n_layers, N, C) tapped patch tokens (CLS dropped).
        cls: (B, E) class tokens for RsCIN.
    """

    tokens: torch.Tensor
    cls: torch.Tensor


def lnamd(tokens: torch.Tensor, r: int) -> torch.Tensor:
    """LNAMD of (B, n_layers, N, C) tokens -> (B, n_layers, N, C) aggregated, L2-normalised per layer."""
    b, n_layers, n, c = tokens.shape
    side = int(n**0.5)
    x = tokens.float().reshape(b * n_layers, side, side, c).permute(0, 3, 1, 2)
    x = F.layer_norm(x, x.shape[1:], eps=1e-5)
    if r != 1:
        x = F.avg_pool2d(x, r, stride=1, padding=(r - 1) // 2, count_include_pad=True)
    x = x.permute(0, 2, 3, 1).reshape(b, n_layers, n, c)
    return x / x.norm(dim=-1, keepdim=True)


def msm(query: torch.Tensor, refs: torch.Tensor, exclude: torch.Tensor | None = None, max_elements: int = MAX_ELEMENTS) -> torch.Tensor:
    """Mutual scoring of (Q, N, C) query images against (R, N, C) reference images -> (Q, N) scores.

    Args:
        query: Aggregated patches of the scored images.
        refs: Aggregated patches of the images they are scored against.
        exclude: (Q,) index into ``refs`` of each query image itself (its own column is dropped), or None.
    """
    q_count, n, c = query.shape
    n_refs = refs.shape[0] - (0 if exclude is None else 1)
    k = int(n_refs * TOPMIN_MAX)
    if k < 1:
        raise InputError(f"musc needs at least {MIN_IMAGES} images to score each against the others; got {n_refs + 1}")
    out = torch.empty((q_count, n), device=query.device)
    for i in range(q_count):
        d = per_image_nearest_l2(query[i], refs, max_elements)  # (N, R)
        if exclude is not None:
            keep = torch.ones(refs.shape[0], dtype=torch.bool, device=d.device)
            keep[int(exclude[i])] = False
            d = d[:, keep]
        out[i] = d.topk(k, dim=1, largest=False).values.mean(dim=1)
    return out


def rscin(max_scores: torch.Tensor, cls: torch.Tensor, k_list: tuple[int, ...] = RSCIN_K) -> torch.Tensor:
    """RsCIN image scores: min-max normalised maxima smoothed over the class-token similarity graph."""
    s = max_scores.double()
    s = ((s - s.min()) / (s.max() - s.min())).float()
    w = cls.float() @ cls.float().t()
    n = w.shape[0]
    results = []
    for k in k_list:
        drop = torch.topk(w, n - k, dim=1, largest=False).indices
        w_mask = w.clone().scatter_(1, drop, 0.0)
        p = w_mask / w_mask.sum(dim=1, keepdim=True)
        results.append(p @ s)
    return torch.stack(results, dim=-1).mean(-1)


@register_method
class MuSc(AnomalyMethod):
    """Zero-shot mutual scoring over the images of a call (or of the call plus a reference pool)."""

    low_precision_ready = False  # fp32 features (no bf16 split of backbone and kNN yet)
    name: ClassVar[str] = "musc"
    default_backbone: ClassVar[str] = "openai-vit-l-14-336"
    default_layers: ClassVar[tuple[int, ...]] = (6, 12, 18, 24)
    default_sigma: ClassVar[float] = 0.0
    vision_only: ClassVar[bool] = True
    supports_references: ClassVar[bool] = True
    options: ClassVar[dict[str, Any]] = {"layers": None, "r_list": R_LIST, "max_elements": MAX_ELEMENTS}

    def __init__(self, backbone: Backbone, image_size: int = 240, **options: Any) -> None:
        super().__init__(backbone, image_size, **options)
        self.dino = is_dinov2(backbone)
        if self.dino:
            self.grid = set_dinov2_image_size(self.clip, backbone.info, self.image_size)
        else:
            visual = getattr(self.clip, "visual", None)
            if visual is None or not hasattr(visual, "conv1") or getattr(visual, "proj", None) is None:
                raise InputError(f"musc needs a CLIP ViT or DINOv2 backbone; {backbone.name!r} is neither")
            native = int(round((visual.positional_embedding.shape[0] - 1) ** 0.5)) * int(visual.conv1.kernel_size[0])
            openai_like = "laion" not in backbone.source.lower() and "hf-hub" not in backbone.source
            set_activation(self.clip, quick_gelu=openai_like and native == self.image_size)
            resize_positional_embedding(visual, self.image_size, mode="bicubic", antialias=False)
            self.grid = visual.grid_size[0]
        self.layers = self.resolve_layers(self.config["layers"])
        self.r_list = tuple(int(r) for r in self.config["r_list"])
        if not self.r_list or any(r < 1 or r % 2 == 0 for r in self.r_list):
            raise InputError(f"musc option r_list={self.config['r_list']}: give odd aggregation degrees such as (1, 3, 5)")
        self._pool: MuscFeatures | None = None

    def resolve_layers(self, layers: Any) -> list[int]:
        """Tapped blocks from 1; defaults (6, 12, 18, 24) scaled to the backbone's depth."""
        if not self.dino:
            return super().resolve_layers(layers)
        n_blocks = len(self.clip.blocks)
        if layers is None:
            return [max(1, round(i * n_blocks / 24)) for i in self.default_layers]
        layers = [int(i) for i in layers]
        bad = [i for i in layers if not 1 <= i <= n_blocks]
        if bad:
            raise InputError(f"layers {bad} do not exist: the backbone has blocks 1..{n_blocks}")
        return layers

    @property
    def device(self) -> torch.device:
        """Device of the backbone's parameters."""
        return next(self.clip.parameters()).device

    # --- features ---------------------------------------------------------------------------------
    @torch.no_grad()
    def extract(self, images: torch.Tensor) -> MuscFeatures:
        """Tapped tokens and class tokens of a batch (one backbone pass)."""
        images = images.to(self.device)
        if self.dino:
            tokens, cls = dinov2_features(self.clip, images, self.layers, norm=True, need_cls=True)
            return MuscFeatures(torch.stack(tokens, dim=1).float(), cls.float())
        visual = self.clip.visual
        out = visual.forward_intermediates(images, indices=[i - 1 for i in self.layers], output_fmt="NLC", intermediates_only=False)
        tokens = torch.stack(out["image_intermediates"], dim=1).float()
        return MuscFeatures(tokens, F.normalize(out["image_features"].float(), dim=-1))

    # --- references ------------------------------------------------------------------------------
    def set_references(self, images: torch.Tensor | None) -> None:
        """Add a pool of images to every later run (their rows are not returned); None clears it."""
        if images is None:
            self._pool = None
            return
        self._pool = self.extract(images)

    def set_pool_features(self, features: MuscFeatures | None) -> None:
        """Use cached pool features (from :meth:`extract`) as the references."""
        self._pool = features

    @property
    def n_references(self) -> int:
        """Number of pool images joined to every run."""
        return 0 if self._pool is None else int(self._pool.tokens.shape[0])

    # --- scoring ---------------------------------------------------------------------------------------
    def output(self, patch: torch.Tensor, cls_all: torch.Tensor, rows: int) -> AnomalyOutput:
        """Maps (bilinear, align_corners True) for all images of the run, RsCIN scores, first ``rows`` kept."""
        b = patch.shape[0]
        maps = F.interpolate(patch.view(b, 1, self.grid, self.grid), size=(self.image_size, self.image_size), mode="bilinear", align_corners=True)[:, 0]
        scores = rscin(maps.reshape(b, -1).amax(dim=1), cls_all)
        return AnomalyOutput(maps[:rows].float(), scores[:rows], self.map_max)

    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        """The official run on ``images`` (plus the pool when set); rows of ``images``."""
        feats = self.extract(images)
        n_total = feats.tokens.shape[0] + self.n_references
        if n_total < MIN_IMAGES:
            raise InputError(f"musc scores each image against the others of the run: {n_total} image(s) given, at least {MIN_IMAGES} needed")
        if self._pool is not None:
            tokens = torch.cat([feats.tokens, self._pool.tokens.to(feats.tokens.device)])
            cls = torch.cat([feats.cls, self._pool.cls.to(feats.cls.device)])
        else:
            tokens, cls = feats.tokens, feats.cls
        b = images.shape[0]
        exclude = torch.arange(b, device=tokens.device)
        patch = self.patch_scores_against(tokens[:b], tokens, exclude)
        if self._pool is None:
            return self.output(patch, cls, b)
        # RsCIN needs the maxima of every image of the run: score the pool rows too.
        pool_patch = self.patch_scores_against(tokens[b:], tokens, torch.arange(b, tokens.shape[0], device=tokens.device))
        return self.output(torch.cat([patch, pool_patch]), cls, b)

    def patch_scores_against(self, query: torch.Tensor, refs: torch.Tensor, exclude: torch.Tensor | None) -> torch.Tensor:
        """(Q, N) MSM scores of query tokens (B, layers, N, C) against reference tokens, averaged."""
        per_r = []
        for r in self.r_list:
            zq, zr = lnamd(query, r), lnamd(refs, r)
            per_layer = [msm(zq[:, layer], zr[:, layer], exclude, self.config["max_elements"]) for layer in range(zq.shape[1])]
            per_r.append(torch.stack(per_layer).double().mean(0))
        return torch.stack(per_r).mean(0)

    @property
    def map_max(self) -> float:
        """MSM distances of normalised features: at most 2."""
        return 2.0

    def describe(self) -> dict[str, Any]:
        """Provenance plus blocks, r list and the pool size."""
        return {**super().describe(), "layers": list(self.layers), "r_list": list(self.r_list), "n_references": self.n_references}
