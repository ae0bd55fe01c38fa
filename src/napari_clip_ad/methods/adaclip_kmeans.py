"""scikit-learn's ``KMeans(n_clusters=k, n_init="auto", random_state=0)`` for a batch, in torch on the device.

AdaCLIP's HSF clusters ~100 tokens per image with scikit-learn on the host (``.cpu().numpy()`` per
image). This is the same algorithm, batched over images and run where the tokens are:

- seeding: greedy k-means++ exactly as ``sklearn.cluster._kmeans._kmeans_plusplus`` (first centre
  from ``RandomState.choice``, ``2 + int(log k)`` local trials per centre drawn by
  ``RandomState.uniform`` and placed by ``searchsorted`` on the cumulative squared distances, the
  trial that lowers the potential most kept). The random numbers do not depend on the data, so
  they are drawn once on the host from ``RandomState(seed)`` in scikit-learn's order and reused;
- Lloyd iterations as ``_kmeans_single_lloyd``: at most 300; stop when the labels repeat (strict
  convergence) or when the summed squared centre shift is <= 1e-4 x the mean feature variance,
  then relabel with the final centres.

Distances are computed in float64 (scikit-learn: float64 for the seeding, float32 for Lloyd), so
labels can differ from scikit-learn only where two distances tie to float32 rounding. Images in which
a cluster runs empty (scikit-learn then relocates centres; not reproduced here) are reported so the
caller can cluster them with scikit-learn instead. One host sync per Lloyd iteration for the whole
batch (convergence test), none per image.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

MAX_ITER = 300
TOL = 1e-4
"""scikit-learn's defaults (``max_iter``, ``tol``)."""


@lru_cache(maxsize=32)
def seeding_draws(n_samples: int, k_clusters: int, seed: int) -> tuple[int, np.ndarray]:
    """First centre index and the (k - 1, trials) uniforms scikit-learn's k-means++ draws from ``RandomState(seed)``."""
    state = np.random.RandomState(seed)
    weights = np.ones(n_samples, dtype=np.float32)
    first = int(state.choice(n_samples, p=weights / weights.sum()))
    trials = 2 + int(np.log(k_clusters))
    uniforms = np.stack([state.uniform(size=trials) for _ in range(1, k_clusters)]) if k_clusters > 1 else np.zeros((0, trials))
    return first, uniforms


_DRAWS_ON_DEVICE: dict[tuple, torch.Tensor] = {}


def _device_draws(n_samples: int, k_clusters: int, seed: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The seeding uniforms as a tensor on ``device``, uploaded once (no host-to-device copy per batch)."""
    key = (n_samples, k_clusters, seed, str(device), dtype)
    if key not in _DRAWS_ON_DEVICE:
        _DRAWS_ON_DEVICE[key] = torch.as_tensor(seeding_draws(n_samples, k_clusters, seed)[1], dtype=dtype, device=device)
    return _DRAWS_ON_DEVICE[key]


def _sq_distances(points: torch.Tensor, sq_norms: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """(B, m, n) squared distances of centres (B, m, d) to points (B, n, d), clipped at 0."""
    distances = sq_norms[:, None, :] - 2.0 * centres @ points.transpose(1, 2) + (centres * centres).sum(-1)[..., None]
    return distances.clamp_min_(0.0)


def kmeans_plusplus(points: torch.Tensor, k_clusters: int, seed: int = 0) -> torch.Tensor:
    """(B, k) indices of scikit-learn's greedy k-means++ seeds for each image of ``points`` (B, n, d) float64."""
    batch, n_samples, _ = points.shape
    first, _ = seeding_draws(n_samples, k_clusters, seed)
    uniforms_t = _device_draws(n_samples, k_clusters, seed, points.device, points.dtype)
    sq_norms = (points * points).sum(-1)
    rows = torch.arange(batch, device=points.device)
    index = torch.full((batch, k_clusters), first, dtype=torch.long, device=points.device)
    closest = _sq_distances(points, sq_norms, points[:, first : first + 1])[:, 0]  # (B, n)
    potential = closest.sum(-1)
    for c in range(1, k_clusters):
        targets = uniforms_t[c - 1][None] * potential[:, None]  # (B, trials)
        candidates = torch.searchsorted(closest.cumsum(-1).contiguous(), targets.contiguous()).clamp_max_(n_samples - 1)
        to_candidates = _sq_distances(points, sq_norms, points[rows[:, None], candidates])  # (B, trials, n)
        to_candidates = torch.minimum(closest[:, None], to_candidates)
        best = to_candidates.sum(-1).argmin(dim=1)  # first minimum, as np.argmin
        closest = to_candidates[rows, best]
        potential = closest.sum(-1)
        index[:, c] = candidates[rows, best]
    return index


def kmeans_labels(data: torch.Tensor, k_clusters: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means labels of each image's points, as scikit-learn's seeded ``KMeans(...).fit_predict``.

    Args:
        data: (B, n, d) points (any float dtype; computed in float64).
        k_clusters: Number of clusters (<= n).
        seed: scikit-learn ``random_state``.

    Returns:
        ``(labels, fallback)``: (B, n) long labels, and (B,) bool, True where a cluster ran empty
        (scikit-learn would relocate a centre there: use it for those images).
    """
    points = data.detach().to(torch.float64)
    points = points - points.mean(dim=1, keepdim=True)  # scikit-learn centres the data too
    batch, n_samples, _ = points.shape
    rows = torch.arange(batch, device=points.device)
    sq_norms = (points * points).sum(-1)
    tolerance = points.var(dim=1, unbiased=False).mean(dim=1) * TOL
    centres = points[rows[:, None], kmeans_plusplus(points, k_clusters, seed)]
    labels_old = torch.full((batch, n_samples), -1, dtype=torch.long, device=points.device)
    labels = labels_old.clone()
    active = torch.ones(batch, dtype=torch.bool, device=points.device)
    strict = torch.zeros(batch, dtype=torch.bool, device=points.device)
    empty = torch.zeros(batch, dtype=torch.bool, device=points.device)
    for _ in range(MAX_ITER):
        new_labels = _sq_distances(points, sq_norms, centres).argmin(dim=1)
        members = torch.nn.functional.one_hot(new_labels, k_clusters).to(points.dtype)  # (B, n, k)
        counts = members.sum(dim=1)  # (B, k)
        sums = members.transpose(1, 2) @ points
        new_centres = torch.where(counts[..., None] > 0, sums / counts.clamp_min(1)[..., None], centres)
        shift = ((new_centres - centres) ** 2).sum(dim=(1, 2))
        empty |= active & (counts == 0).any(dim=1)
        step = active[:, None]
        labels = torch.where(step, new_labels, labels)
        centres = torch.where(step[..., None], new_centres, centres)
        same = (new_labels == labels_old).all(dim=1)
        strict |= active & same
        active = active & ~same & ~(shift <= tolerance)
        labels_old = labels
        if not bool(active.any()):  # one host sync per iteration for the whole batch
            break
    relabelled = _sq_distances(points, sq_norms, centres).argmin(dim=1)
    return torch.where(strict[:, None], labels, relabelled), empty
