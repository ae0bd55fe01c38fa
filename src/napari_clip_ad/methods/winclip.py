"""WinCLIP (Jeong et al., CVPR 2023), zero-shot, exactly as anomalib implements it.

Reference: anomalib ``src/anomalib/models/image/winclip/`` (torch_model.py, utils.py, prompting.py).
Training-free: a frozen CLIP, a compositional prompt ensemble and multi-scale sliding windows.

What anomalib does (and this module reproduces):

- Text: per side (normal, anomalous) the mean of the *unnormalised* ``encode_text`` outputs of all
  prompts; the cosine similarity normalises the two means when scoring.
- Image: the token sequence of the full image (conv1 patches, CLS prepended, positional embedding
  added: the input of ``patch_dropout``) is encoded by the rest of the visual tower; the pooled,
  projected CLS is the image embedding.
- Windows: for each scale k (in patches), every k x k window (stride 1) of that token sequence, with
  the CLS token in front, is run again through ``patch_dropout -> ln_pre -> transformer -> ln_post ->
  CLS pool -> proj``: one embedding per window (no pooling of full-image tokens).
- Scores: softmax over (normal, anomalous) of cosine similarity / 0.07 (the CLIP temperature anomalib
  uses); the anomalous probability. Window scores become patch scores by the harmonic mean over the
  windows covering a patch; the full-image score (as a constant map) and the per-scale maps are
  combined by a harmonic mean; bilinear upsampling (align_corners False, no antialias) to the input size.
- Image score: the anomalous probability of the image embedding. No Gaussian smoothing (sigma 0).

anomalib targets open_clip < 2.26.1, whose ``Transformer`` takes (L, N, D) input, so its
``permute(1, 0, 2)`` before the transformer is right there; newer open_clip is batch-first, so here
the (N, L, D) sequence is passed as is (attention over the tokens of one window, as intended).

Few-shot WinCLIP+ (``set_references``; anomalib ``WinClipModel`` with ``reference_images``, i.e.
``k_shot > 0``; torch_model.py ``_collect_visual_embeddings`` / ``_compute_few_shot_scores``, utils.py
``visual_association_score``):

- visual memory = ``encode_image`` of the K references: their window embeddings per scale
  (K, n_windows, E) and their patch embeddings (K, P, width): the full image's output tokens after
  ``ln_post``, CLS dropped, NOT projected (open_clip's ``output_tokens``; width 896, not 640, on
  ViT-B-16-plus-240);
- association score = ``min over all K * n memory entries of (1 - cos) / 2`` (windows compared with
  the windows of the same scale at any position, patches with patches at any position);
- few-shot map = arithmetic MEAN of [patch map, harmonic window aggregation per scale] (not the
  harmonic mean of the zero-shot side, and no full-image term);
- final map = (zero-shot map + few-shot map) / 2, then the bilinear upsampling; image score =
  (zero-shot image score + max of the few-shot patch-grid map) / 2. Per image: no set normalisation.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ..backbones import Backbone, grid_for, resize_positional_embedding
from ..errors import InputError, WeightsError
from .base import AnomalyMethod, AnomalyOutput
from .prompt_sets import load_prompt_set, resolve_object_name
from .registry import register_method
from .text_features import cached_text_features, encode_sentences
from .winclip_prompts import compositional_prompts

TEMPERATURE = 0.07
"""anomalib's ``TEMPERATURE`` (the CLIP paper's 0.07) dividing cosine similarities before the softmax."""


def window_indices(grid: int, scale: int) -> torch.Tensor:
    """Patch indices of every ``scale x scale`` window (stride 1) over a ``grid x grid`` patch grid.

    Same windows and order as anomalib's ``make_masks`` (``F.unfold`` of the index grid), transposed:
    one row per window, row-major window positions, row-major patches inside a window.

    Returns:
        Long tensor (n_windows, scale * scale), n_windows = (grid - scale + 1) ** 2.
    """
    if not 1 <= scale <= grid:
        raise InputError(f"window scale {scale} does not fit the {grid}x{grid} patch grid; use scales from 1 to {grid}")
    index_grid = torch.arange(grid * grid, dtype=torch.float64).reshape(1, 1, grid, grid)
    return F.unfold(index_grid, kernel_size=scale, stride=1)[0].T.round().long()


def window_coverage(windows: torch.Tensor, n_patches: int) -> torch.Tensor:
    """Bool (n_windows, n_patches): which patches each window covers."""
    coverage = torch.zeros(windows.shape[0], n_patches, dtype=torch.bool)
    coverage.scatter_(1, windows, True)
    return coverage


def harmonic_aggregation(window_scores: torch.Tensor, coverage: torch.Tensor, grid: int) -> torch.Tensor:
    """Per patch, the harmonic mean of the scores of the windows covering it (anomalib's definition).

    Args:
        window_scores: (B, n_windows) scores in (0, 1].
        coverage: (n_windows, grid * grid) bool from :func:`window_coverage`.
        grid: Side of the patch grid.

    Returns:
        (B, grid, grid); patches covered by no window (or with a zero score) get 0 like anomalib's
        ``nan_to_num(posinf=0.0)``.
    """
    inverse = torch.where(coverage[None], 1.0 / window_scores[:, :, None], torch.zeros((), dtype=window_scores.dtype, device=window_scores.device))
    counts = coverage.sum(dim=0).to(window_scores.dtype)
    return (counts / inverse.sum(dim=1)).nan_to_num(posinf=0.0).reshape(-1, grid, grid)


def anomalous_probability(embeddings: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """softmax(cos(embedding, [normal, anomalous]) / 0.07)[..., 1], anomalib's ``class_scores``."""
    cosine = F.normalize(embeddings, dim=-1) @ F.normalize(text_features, dim=-1).T
    return (cosine / TEMPERATURE).softmax(dim=-1)[..., 1]


def visual_association_score(embeddings: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """(B, n) anomalib's ``visual_association_score``: min over every memory entry of (1 - cos) / 2.

    Args:
        embeddings: (B, n, D) window or patch embeddings of the images.
        memory: (K, m, D) the references' embeddings of the same kind (all K * m entries are compared).
    """
    memory = F.normalize(memory.to(embeddings.device, embeddings.dtype).reshape(-1, embeddings.shape[-1]), dim=-1)
    cosine = F.normalize(embeddings, dim=-1) @ memory.T
    return (1 - cosine).min(dim=-1)[0] / 2


@register_method
class WinCLIP(AnomalyMethod):
    """Zero-shot WinCLIP: window embeddings vs. a compositional prompt ensemble; nothing to train.

    The default backbone is open_clip ViT-B-16-plus-240 with the ``laion400m_e32`` tag from our
    registry; anomalib uses the ``laion400m_e31`` checkpoint of the same model (the previous epoch),
    so numbers match anomalib only when that checkpoint is given as the backbone
    (``ViT-B-16-plus-240:laion400m_e31``).

    Options:
        object_name: Object named in the prompts ("brain").
        scales: Window sides in patches ((2, 3) as anomalib).
        k_shot: Must be 0: few-shot WinCLIP+ is set by the reference images themselves
            (:meth:`set_references`, CLI ``--references/--k-shot``), as anomalib derives ``k_shot``.
        prompts: "industrial" (anomalib's lists), "medical" or a JSON prompt-set file.
    """

    name: ClassVar[str] = "winclip"
    default_backbone: ClassVar[str] = "vit-b-16-plus-240"
    default_layers: ClassVar[tuple[int, ...]] = (12,)
    """Unused: WinCLIP uses the output of the whole visual tower, not tapped blocks."""
    default_sigma: ClassVar[float] = 0.0
    """anomalib's WinCLIP applies no Gaussian filter to its maps."""
    quick_gelu: ClassVar[bool | None] = False
    """anomalib builds ViT-B-16-plus-240 with open_clip's default (exact) GELU."""
    options: ClassVar[dict[str, Any]] = {"object_name": "brain", "scales": (2, 3), "k_shot": 0, "prompts": "industrial"}
    supports_references: ClassVar[bool] = True

    def __init__(self, backbone: Backbone, image_size: int = 240, **options: Any) -> None:
        super().__init__(backbone, image_size=image_size, **options)
        if int(self.config["k_shot"]) != 0:
            raise InputError(
                f"winclip k_shot {self.config['k_shot']}: few-shot is set by the reference images, not this option; "
                "keep k_shot 0 and give K normal references (set_references, or --references with --k-shot)"
            )
        self.prompt_set = load_prompt_set(self.config["prompts"])
        self.config["prompts"] = str(self.config["prompts"])
        object_name = resolve_object_name(self.prompt_set, self.config["object_name"], "object_name" in options)
        self.object_name = object_name
        if not isinstance(object_name, str) or not object_name.strip():
            raise InputError(f"winclip object_name {object_name!r}: give the object the prompts should name, e.g. 'brain'")
        visual = self.clip.visual
        self.grid = grid_for(visual, self.image_size)
        # anomalib never resizes (ViT-B-16-plus-240 runs at its native 240 px, where this is a no-op);
        # other sizes/backbones get the shared default resize (bicubic, antialias).
        resize_positional_embedding(visual, self.image_size)
        scales = self.config["scales"]
        scales = (scales,) if isinstance(scales, int) else tuple(scales)
        if not scales or not all(isinstance(k, int) and not isinstance(k, bool) for k in scales):
            raise InputError(f"winclip scales {self.config['scales']!r}: give window sides in patches as integers, e.g. 2,3")
        self.scales = scales
        self.config["scales"] = scales
        n_patches = self.grid * self.grid
        for i, scale in enumerate(scales):
            windows = window_indices(self.grid, scale)
            # CLS (index 0) in front of each window; +1 because the CLS precedes the patch tokens.
            self.register_buffer(f"_windows_{i}", torch.cat([torch.zeros(len(windows), 1, dtype=torch.long), windows + 1], dim=1), persistent=False)
            self.register_buffer(f"_coverage_{i}", window_coverage(windows, n_patches), persistent=False)
        self._text_cache: torch.Tensor | None = None
        self._window_memory: list[torch.Tensor] | None = None
        self._patch_memory: torch.Tensor | None = None

    # --- text -------------------------------------------------------------------------------
    @property
    def text_features(self) -> torch.Tensor:
        """(2, D) L2-normalised (normal, anomalous) ensemble embeddings, computed once in fp32."""
        if self._text_cache is None:
            normal, anomalous = compositional_prompts(self.object_name, self.prompt_set)

            def compute() -> dict[str, torch.Tensor]:
                # One batched, EOT-truncated pass over both sides (exact: the text tower is causal).
                embedded = encode_sentences(self.clip, self.backbone.tokenizer, normal + anomalous)
                means = [embedded[: len(normal)].mean(dim=0), embedded[len(normal):].mean(dim=0)]
                # anomalib stores the unnormalised means and normalises them in every cosine similarity.
                return {"text": F.normalize(torch.stack(means), dim=-1)}

            payload = {"normal": normal, "anomalous": anomalous}
            self._text_cache = cached_text_features(self.clip, self.name, payload, compute)["text"]
        return self._text_cache.to(self.device)

    def on_weights_loaded(self) -> None:
        """Drop the cached text features."""
        self._text_cache = None

    def convert_official_checkpoint(self, obj: Any, source: str) -> dict[str, torch.Tensor]:
        """WinCLIP has no trained parts, so no checkpoint applies."""
        raise WeightsError(f"{source}: method 'winclip' is training-free and takes no weights; drop the weights argument")

    # --- visual -----------------------------------------------------------------------------
    def windows(self, i: int) -> torch.Tensor:
        """(n_windows, 1 + k*k) token indices (CLS first) of the windows of scale ``self.scales[i]``."""
        return getattr(self, f"_windows_{i}")

    def coverage(self, i: int) -> torch.Tensor:
        """(n_windows, grid*grid) patch coverage of the windows of scale ``self.scales[i]``."""
        return getattr(self, f"_coverage_{i}")

    def _input_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1 + P, W): patch embeddings with the CLS token and positional embedding (before patch dropout)."""
        visual = self.clip.visual
        x = visual.conv1(images)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        return torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)

    def _encode_sequences(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, L, W) token sequences -> (N, E) projected CLS embeddings (anomalib's window path)."""
        visual = self.clip.visual
        x = visual.ln_pre(visual.patch_dropout(tokens))
        x = visual.ln_post(visual.transformer(x))
        pooled, _ = visual._global_pool(x)
        return pooled @ visual.proj if visual.proj is not None else pooled

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Image embeddings (B, E) and per-scale window embeddings [(B, n_windows, E)]."""
        image_embeddings, window_embeddings, _ = self.encode_all(images)
        return image_embeddings, window_embeddings

    def encode_all(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """anomalib's ``encode_image``: image (B, E), per-scale window [(B, n_windows, E)], patch (B, P, width) embeddings."""
        tokens = self._input_tokens(images)
        visual = self.clip.visual
        # The full image goes through the tower exactly as open_clip's encode_image does; with
        # output_tokens (anomalib sets it) the second output are the ln_post'd, unprojected patch tokens.
        full = visual.transformer(visual.ln_pre(visual.patch_dropout(tokens)))
        pooled, patch_embeddings = visual._pool(full)
        image_embeddings = pooled @ visual.proj if visual.proj is not None else pooled
        window_embeddings = []
        for i in range(len(self.scales)):
            index = self.windows(i)
            selected = tokens[:, index]  # (B, n_windows, 1 + k*k, W)
            flat = self._encode_sequences(selected.reshape(-1, *selected.shape[2:]))
            window_embeddings.append(flat.reshape(tokens.shape[0], index.shape[0], -1))
        return image_embeddings, window_embeddings, patch_embeddings

    # --- few-shot (WinCLIP+) ----------------------------------------------------------------
    @property
    def n_references(self) -> int:
        """Number of reference images in the visual memory (0: zero-shot)."""
        return 0 if self._patch_memory is None else int(self._patch_memory.shape[0])

    @torch.no_grad()
    def set_references(self, images: torch.Tensor | None) -> None:
        """Collect the visual memory of K normal slices (anomalib ``_collect_visual_embeddings``), or clear it.

        Args:
            images: (K, 3, H, W) normal slices preprocessed exactly like :meth:`predict`'s input; None
                returns to zero-shot.
        """
        if images is None:
            self._window_memory, self._patch_memory = None, None
            return
        self._check_reference_images(images)
        with self.backbone_autocast():  # the same precision as the images scored against this memory
            _, windows, patches = self.encode_all(images.to(self.device))
        self._window_memory, self._patch_memory = [w.float() for w in windows], patches.float()

    def few_shot_scores(self, patch_embeddings: torch.Tensor, window_embeddings: list[torch.Tensor]) -> torch.Tensor:
        """(B, grid, grid) anomalib ``_compute_few_shot_scores``: mean of the patch map and each scale's map."""
        assert self._patch_memory is not None and self._window_memory is not None
        maps = [visual_association_score(patch_embeddings, self._patch_memory).reshape(-1, self.grid, self.grid)]
        for i, (embeddings, memory) in enumerate(zip(window_embeddings, self._window_memory)):
            maps.append(harmonic_aggregation(visual_association_score(embeddings, memory), self.coverage(i), self.grid))
        return torch.stack(maps).mean(dim=0)

    def patch_scores(self, image_scores: torch.Tensor, window_embeddings: list[torch.Tensor]) -> torch.Tensor:
        """(B, grid, grid) zero-shot map: harmonic mean of the full-image score and each scale's map."""
        text = self.text_features
        maps = [image_scores.view(-1, 1, 1).expand(-1, self.grid, self.grid)]
        for i, embeddings in enumerate(window_embeddings):
            maps.append(harmonic_aggregation(anomalous_probability(embeddings, text), self.coverage(i), self.grid))
        return (len(self.scales) + 1) / (1.0 / torch.stack(maps)).sum(dim=0)

    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        """Anomalous-probability maps (B, H, W) in [0, 1] and image scores (B,)."""
        with self.backbone_autocast():
            image_embeddings, window_embeddings, patch_embeddings = self.encode_all(images)
        with self.head_fp32():
            image_embeddings, window_embeddings = image_embeddings.float(), [w.float() for w in window_embeddings]
            patch_embeddings = patch_embeddings.float() if isinstance(patch_embeddings, torch.Tensor) else patch_embeddings
            image_scores = anomalous_probability(image_embeddings, self.text_features)
            patch_maps = self.patch_scores(image_scores, window_embeddings)
            if self._patch_memory is not None:
                few_shot = self.few_shot_scores(patch_embeddings, window_embeddings)
                patch_maps = (patch_maps + few_shot) / 2
                image_scores = (image_scores + few_shot.amax(dim=(-2, -1))) / 2
            maps = F.interpolate(patch_maps[:, None], size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        return AnomalyOutput(maps=maps, scores=image_scores, map_max=self.map_max)
