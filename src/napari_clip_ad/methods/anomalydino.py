"""AnomalyDINO (Damm et al., WACV 2025): patch kNN on DINOv2 features against a few normal references.

Official reference: dammsi/AnomalyDINO (commit b3435f0): ``src/detection.py`` (``run_anomaly_detection``),
``src/backbones.py`` (``DINOv2Wrapper``), ``src/utils.py`` (``dists2map``, ``augment_image``),
``src/post_eval.py`` (``mean_top1p``) and ``run_anomalydino_batched.py`` (zero-shot mutual scoring).

Few-shot (references set):
- patch features = ``model.get_intermediate_layers(x)[0]``: the last block (any block with ``layers``),
  through the final LayerNorm, CLS/registers dropped;
- memory bank = all reference patches (only foreground ones when ``masking`` and ``mask_references``, the
  official ``mask_ref_images``, default False), L2-normalised (``faiss.normalize_L2``); with ``rotation``
  each reference also enters rotated by 45, 90, ..., 315 degrees (``augment_image``);
- test patch distance = squared L2 to its nearest normalised bank patch / 2 (faiss ``IndexFlatL2`` on
  normalised features: ``1 - cos``); background patches (``masking``) get 0;
- image score = ``mean_top1p``: mean of the top ``int(0.01 * n_patches)`` distances over the whole grid
  (zeros of masked patches included), the maximum when that is 0;
- map = ``dists2map``: the patch-grid distances resized bilinearly (cv2 INTER_LINEAR = align_corners False)
  to the image, then ``gaussian_filter(sigma=4)``. ``predict`` returns the resized map before the filter;
  the engine applies ``default_sigma`` after resizing to the slice grid (``smooth_after_resize``), the
  official order.

Zero-shot (no references; ``run_anomalydino_batched.py``): every image of the call is scored against all
patches of the other images (not masked: the official code masks only the scored image's output), per patch
the mean of the cosine distances strictly below the 0.1 % quantile (``torch.kthvalue``), masked patches set
to 0, image score = mean of the top 1 % (``dists_to_score``).

Masking (``compute_background_mask``): first principal component of the image's patch features (sklearn's
randomized PCA, seeded here; sign as sklearn fixes it) > 10; if the central crop
(20 % border) keeps <= 35 % of its patches, ``-pc1 > 10`` instead; then a 3x3 dilation and a 3x3 closing. The
official code runs the morphology on the (n_patches, 1) column, so it acts along the flattened raster order:
reproduced here as 1-D operations.

Rotation of references: the official code rotates the raw image (cv2.warpAffine, bilinear, reflect-101
border) before resizing; here the preprocessed tensor is rotated (bilinear, reflection border): multiples of
90 degrees are exact, the others differ at the borders.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F

from ..backbones import Backbone, is_dinov2
from ..backbones.dinov2 import dinov2_features, set_dinov2_image_size
from ..errors import InputError
from .base import AnomalyMethod, AnomalyOutput
from .knn import MAX_ELEMENTS, lowest_cosine_mean, nearest_sq_l2
from .registry import register_method

ROTATION_ANGLES = (0, 45, 90, 135, 180, 225, 270, 315)
"""``augment_image``'s angles (degrees, counter-clockwise as cv2.getRotationMatrix2D)."""
MASK_THRESHOLD = 10.0
ZERO_SHOT_QUANTILE = 0.001


class PatchFeatures(NamedTuple):
    """Normalised patch features of a batch and the foreground mask.

    Attributes:
        tokens: (B, N, C) L2-normalised float32 features.
        mask: (B, N) bool foreground (all True without masking).
        grid: Side of the square patch grid.
    """

    tokens: torch.Tensor
    mask: torch.Tensor
    grid: int


def mean_top1p(distances: torch.Tensor, max_fallback: bool = True) -> torch.Tensor:
    """Official image score per row of (B, N): mean of the ``int(0.01 * N)`` largest; max when that is 0."""
    k = int(distances.shape[1] * 0.01)
    if k == 0:
        if not max_fallback:
            raise InputError(f"{distances.shape[1]} patches are too few for a top-1% score; use a larger image size")
        return distances.amax(dim=1)
    return distances.topk(k, dim=1).values.mean(dim=1)


def first_principal_component(features: torch.Tensor) -> torch.Tensor:
    """Scores on the first principal component (N,), as the official ``PCA(1, svd_solver='randomized')``.

    sklearn's randomized solver itself, with a fixed ``random_state`` (the official code leaves it to numpy's
    global generator, so its masks vary from run to run where the spectrum has no clear gap; on real DINOv2
    features the first component dominates and every seed gives the exact component).
    """
    from sklearn.decomposition import PCA

    x = features.detach().float().cpu().numpy()
    pc = PCA(n_components=1, svd_solver="randomized", random_state=0).fit_transform(x)[:, 0]
    return torch.from_numpy(pc).to(features.device)


def background_mask(features: torch.Tensor, grid: int, threshold: float = MASK_THRESHOLD, border: float = 0.2) -> torch.Tensor:
    """Official ``compute_background_mask(masking_type=True)`` of one image's (N, C) features -> (N,) bool."""
    pc = first_principal_component(features)
    mask = pc > threshold
    lo, hi = int(grid * border), int(grid * (1 - border))
    centre = mask.view(grid, grid)[lo:hi, lo:hi]
    if centre.sum() <= centre.numel() * 0.35:
        mask = -pc > threshold
    x = mask.float().view(1, 1, -1)
    x = F.max_pool1d(x, 3, 1, 1)  # dilation (3x3 kernel on an (N, 1) column = 3 along the sequence)
    x = F.max_pool1d(x, 3, 1, 1)  # closing: dilation ...
    x = -F.max_pool1d(-x, 3, 1, 1)  # ... then erosion (borders neutral, as cv2's default border value)
    return x.view(-1) > 0.5


def rotate_images(images: torch.Tensor, degrees: float) -> torch.Tensor:
    """Rotate (B, C, H, W) images counter-clockwise about the centre (bilinear, reflection border)."""
    if degrees % 360 == 0:
        return images
    if degrees % 90 == 0:
        return torch.rot90(images, int(degrees // 90) % 4, dims=(2, 3))
    a = math.radians(degrees)
    cos, sin = math.cos(a), math.sin(a)
    theta = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0]], dtype=images.dtype, device=images.device)
    grid = F.affine_grid(theta.expand(images.shape[0], 2, 3), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


@register_method
class AnomalyDINO(AnomalyMethod):
    """Training-free patch kNN on DINOv2 features; few-shot with references, batched zero-shot without."""

    low_precision_ready = False  # fp32 features (no bf16 split of backbone and kNN yet)
    name: ClassVar[str] = "anomalydino"
    default_backbone: ClassVar[str] = "dinov2-vits14"
    default_layers: ClassVar[tuple[int, ...]] = (12,)
    default_sigma: ClassVar[float] = 4.0
    smooth_after_resize: ClassVar[bool] = True
    vision_only: ClassVar[bool] = True
    supports_references: ClassVar[bool] = True
    options: ClassVar[dict[str, Any]] = {
        "layers": None,
        "masking": False,
        "mask_references": False,
        "rotation": False,
        "bank_dtype": "float32",
        "max_elements": MAX_ELEMENTS,
    }

    def __init__(self, backbone: Backbone, image_size: int = 448, **options: Any) -> None:
        super().__init__(backbone, image_size, **options)
        if not is_dinov2(backbone):
            raise InputError(f"anomalydino needs a DINOv2 backbone (e.g. dinov2-vits14 or a dinov2_*_pretrain.pth file), not {backbone.name!r}")
        self.grid = set_dinov2_image_size(self.clip, backbone.info, self.image_size)
        layers = self.resolve_layers(self.config["layers"])
        if len(layers) != 1:
            raise InputError(f"anomalydino taps one block (layers={layers}); give a single block, e.g. layers=[{layers[-1]}]")
        self.layers = layers
        if self.config["bank_dtype"] not in ("float32", "bfloat16"):
            raise InputError(f"anomalydino option bank_dtype={self.config['bank_dtype']!r}: use float32 or bfloat16")
        self._bank: torch.Tensor | None = None
        self._n_refs = 0

    # --- backbone ------------------------------------------------------------------------------
    def resolve_layers(self, layers: Any) -> list[int]:
        """Tapped block (from 1); default the last block (the official ``get_intermediate_layers(x)``)."""
        n_blocks = len(self.clip.blocks)
        if layers is None:
            return [n_blocks]
        layers = [int(i) for i in ([layers] if isinstance(layers, int) else layers)]
        bad = [i for i in layers if not 1 <= i <= n_blocks]
        if bad:
            raise InputError(f"layers {bad} do not exist: the backbone has blocks 1..{n_blocks}")
        return layers

    @property
    def device(self) -> torch.device:
        """Device of the backbone's parameters."""
        return next(self.clip.parameters()).device

    @torch.no_grad()
    def patch_features(self, images: torch.Tensor, masking: bool | None = None) -> PatchFeatures:
        """L2-normalised patch features of the tapped block and the official foreground mask."""
        self._check(images)
        tokens = dinov2_features(self.clip, images.to(self.device), self.layers)[0][0].float()
        use_mask = self.config["masking"] if masking is None else masking
        if use_mask:
            mask = torch.stack([background_mask(t, self.grid) for t in tokens])
        else:
            mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return PatchFeatures(F.normalize(tokens, dim=-1), mask, self.grid)

    def _check(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != 3:
            raise InputError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        if images.shape[-2:] != (self.image_size, self.image_size):
            raise InputError(f"images are {tuple(images.shape[-2:])} px but the method was built for {self.image_size} px")

    # --- references ------------------------------------------------------------------------------
    def set_references(self, images: torch.Tensor | None) -> None:
        """Build the memory bank from normal references (rotated copies with ``rotation``); None clears it."""
        if images is None:
            self._bank, self._n_refs = None, 0
            return
        if images.shape[0] < 1:
            raise InputError("anomalydino needs at least one reference image (or None for zero-shot)")
        angles = ROTATION_ANGLES if self.config["rotation"] else (0,)
        masking = bool(self.config["masking"] and self.config["mask_references"])
        parts = []
        for angle in angles:
            feats = self.patch_features(rotate_images(images.to(self.device).float(), angle), masking=masking)
            parts.append(feats.tokens[feats.mask])
        self.set_bank(torch.cat(parts), images.shape[0])

    def set_bank(self, bank: torch.Tensor, n_references: int) -> None:
        """Use (M, C) L2-normalised patch features as the memory bank (e.g. cached pool features)."""
        dtype = torch.bfloat16 if self.config["bank_dtype"] == "bfloat16" else torch.float32
        self._bank = bank.to(self.device, dtype)
        self._n_refs = int(n_references)

    @property
    def n_references(self) -> int:
        """Number of reference images in the memory bank (0: zero-shot)."""
        return self._n_refs

    # --- scoring -----------------------------------------------------------------------------------
    def score_against_bank(self, feats: PatchFeatures, bank: torch.Tensor) -> torch.Tensor:
        """(B, N) few-shot patch distances (``1 - cos`` via faiss's squared-L2 / 2), 0 on background."""
        out = torch.zeros(feats.mask.shape, device=feats.tokens.device)
        queries = feats.tokens[feats.mask]
        if queries.shape[0]:
            out[feats.mask] = nearest_sq_l2(queries, bank, self.config["max_elements"]) / 2.0
        return out

    def score_zero_shot(self, feats: PatchFeatures) -> torch.Tensor:
        """(B, N) batched zero-shot distances: each image against all patches of the others."""
        b, n, _ = feats.tokens.shape
        if b < 2 or int(ZERO_SHOT_QUANTILE * (b - 1) * n) < 2:
            need = math.ceil(2 / (ZERO_SHOT_QUANTILE * n)) + 1
            raise InputError(
                f"anomalydino zero-shot scores each image against the others of the batch: {b} image(s) of {n} patches "
                f"are too few (need at least {need}); give more slices or set references"
            )
        out = torch.empty((b, n), device=feats.tokens.device)
        for i in range(b):
            others = torch.cat([feats.tokens[:i], feats.tokens[i + 1 :]]).reshape(-1, feats.tokens.shape[-1])
            out[i] = lowest_cosine_mean(feats.tokens[i], others, ZERO_SHOT_QUANTILE, self.config["max_elements"])
        return out.masked_fill_(~feats.mask, 0.0)

    def output_from_distances(self, distances: torch.Tensor, zero_shot: bool = False) -> AnomalyOutput:
        """Maps at input resolution (bilinear, before the Gaussian) and official image scores."""
        b = distances.shape[0]
        grid_maps = distances.view(b, 1, self.grid, self.grid)
        maps = F.interpolate(grid_maps, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)[:, 0]
        scores = mean_top1p(distances, max_fallback=True)
        return AnomalyOutput(maps, scores, self.map_max)

    @property
    def map_max(self) -> float:
        """Cosine distances of nearest neighbours: in [0, 1] unless every reference is anti-correlated."""
        return 1.0

    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        """Few-shot against the memory bank, or batched zero-shot when no references are set."""
        feats = self.patch_features(images)
        if self._bank is None:
            return self.output_from_distances(self.score_zero_shot(feats), zero_shot=True)
        return self.output_from_distances(self.score_against_bank(feats, self._bank))

    def describe(self) -> dict[str, Any]:
        """Provenance plus the tapped block and the number of references."""
        return {**super().describe(), "layers": list(self.layers), "n_references": self._n_refs}
