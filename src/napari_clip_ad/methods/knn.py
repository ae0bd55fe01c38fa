"""Exact nearest-neighbour searches of patch features in torch: batched matmuls, chunked, bounded memory.

Used by AnomalyDINO (1-NN cosine distance to a memory bank; mean of the closest 0.1 % in its batched
zero-shot mode) and MuSc (per reference image, the distance to its nearest patch). Each function works on
the device of its inputs, in float32 (features stored in bf16 are upcast chunk by chunk), and never holds
more than ``max_elements`` similarities at once (default 2**26: 256 MiB of float32).
"""

from __future__ import annotations

import contextlib

import torch

MAX_ELEMENTS = 1 << 26
"""Default bound on the similarity block held at once (elements)."""


def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    # The engine runs methods under CUDA autocast; distances are always computed in float32.
    return torch.autocast(device.type, enabled=False) if device.type in ("cuda", "cpu") else contextlib.nullcontext()


def _rows_per_chunk(n_cols: int, max_elements: int) -> int:
    return max(1, max_elements // max(1, n_cols))


def nearest_sq_l2(queries: torch.Tensor, bank: torch.Tensor, max_elements: int = MAX_ELEMENTS) -> torch.Tensor:
    """Squared L2 distance of each query to its nearest bank row, as faiss ``IndexFlatL2`` computes it.

    ``|q|^2 + |b|^2 - 2 q.b`` (faiss's BLAS path), clamped at 0.

    Args:
        queries: (Q, C) features.
        bank: (M, C) features (any float dtype; upcast per chunk).
        max_elements: Bound on the (query chunk x bank chunk) block.

    Returns:
        (Q,) float32 distances.
    """
    device = queries.device
    best = torch.full((queries.shape[0],), float("inf"), device=device)
    if bank.shape[0] == 0:
        raise ValueError("empty memory bank")
    with _no_autocast(device):
        q_all = queries.float()
        q_norm = (q_all * q_all).sum(1)
        bank_rows = min(bank.shape[0], max(1, int(max_elements**0.5) * 4))
        q_rows = _rows_per_chunk(bank_rows, max_elements)
        for b0 in range(0, bank.shape[0], bank_rows):
            b = bank[b0 : b0 + bank_rows].to(device).float()
            b_norm = (b * b).sum(1)
            for q0 in range(0, q_all.shape[0], q_rows):
                q = q_all[q0 : q0 + q_rows]
                d = q_norm[q0 : q0 + q_rows, None] + b_norm[None] - 2.0 * (q @ b.t())
                best[q0 : q0 + q_rows] = torch.minimum(best[q0 : q0 + q_rows], d.amin(1))
    return best.clamp_min_(0.0)


def mean_of_lowest(distances_fn, n_queries: int, n_bank: int, k: int, device: torch.device, bank_rows: int) -> torch.Tensor:
    """Mean of the bank distances strictly below each query's k-th smallest one (AnomalyDINO zero-shot).

    ``distances_fn(b0, b1)`` returns the (Q, b1 - b0) distances to bank rows b0:b1. The k smallest per query
    are merged chunk by chunk (exact), then the official rule of ``calculate_cosine_distances`` is applied:
    ``kth = kthvalue(d, k)``, mean of ``d[d < kth]`` (strictly below: the k-th itself and its ties excluded).
    """
    kept = torch.empty((n_queries, 0), device=device)
    for b0 in range(0, n_bank, bank_rows):
        d = distances_fn(b0, min(n_bank, b0 + bank_rows))
        both = torch.cat([kept, d], dim=1)
        kept = torch.topk(both, min(k, both.shape[1]), dim=1, largest=False, sorted=True).values
    kth = kept[:, k - 1 : k]
    below = kept < kth
    count = below.sum(1)
    # Where the k smallest all tie, nothing lies strictly below: the official code returns NaN (0 / 0);
    # the tied distance itself is returned instead.
    return torch.where(count > 0, (kept * below).sum(1) / count.clamp_min(1), kth[:, 0])


def lowest_cosine_mean(
    queries: torch.Tensor, bank: torch.Tensor, quantile: float = 0.001, max_elements: int = MAX_ELEMENTS
) -> torch.Tensor:
    """Per query: mean of the cosine distances below the ``quantile`` of its distances to the bank.

    dammsi/AnomalyDINO ``run_anomalydino_batched.py`` ``calculate_cosine_distances``: features L2-normalised,
    ``1 - q @ b.T``, ``k = int(quantile * M)``, mean of the distances strictly below the k-th smallest.

    Args:
        queries: (Q, C) L2-normalised features.
        bank: (M, C) L2-normalised features.
    """
    device = queries.device
    k = int(quantile * bank.shape[0])
    if k < 1:
        raise ValueError(f"{bank.shape[0]} reference patches are too few for the {quantile:.1%} quantile")
    with _no_autocast(device):
        q = queries.float()
        rows = max(k, _rows_per_chunk(q.shape[0], max_elements))

        def distances(b0: int, b1: int) -> torch.Tensor:
            return 1.0 - q @ bank[b0:b1].to(device).float().t()

        return mean_of_lowest(distances, q.shape[0], bank.shape[0], k, device, rows)


def per_image_nearest_l2(
    queries: torch.Tensor, refs: torch.Tensor, max_elements: int = MAX_ELEMENTS, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """For each query patch and each reference image, the L2 distance to that image's nearest patch.

    As xrli-U/MuSc ``_MSM.compute_scores_fast``: ``torch.cdist`` (its matmul path ``|q|^2 + |r|^2 - 2 q.r``,
    clamped at 0, square root) followed by the minimum over the reference image's patches.

    Args:
        queries: (Q, C) features.
        refs: (R, L, C) features of R reference images with L patches each.
        valid: Optional (R, L) bool: only these patches count (an image without any gives +inf).

    Returns:
        (Q, R) float32 distances.
    """
    device = queries.device
    n_refs, n_patches, _ = refs.shape
    out = torch.empty((queries.shape[0], n_refs), device=device)
    with _no_autocast(device):
        q_all = queries.float()
        q_norm = (q_all * q_all).sum(1)
        ref_chunk = max(1, min(n_refs, _rows_per_chunk(n_patches * min(q_all.shape[0], 4096), max_elements)))
        q_rows = max(1, _rows_per_chunk(ref_chunk * n_patches, max_elements))
        for r0 in range(0, n_refs, ref_chunk):
            r = refs[r0 : r0 + ref_chunk].to(device).float()
            nr = r.shape[0]
            flat = r.reshape(nr * n_patches, -1)
            r_norm = (flat * flat).sum(1)
            for q0 in range(0, q_all.shape[0], q_rows):
                q = q_all[q0 : q0 + q_rows]
                d = q_norm[q0 : q0 + q_rows, None] + r_norm[None] - 2.0 * (q @ flat.t())
                if valid is not None:
                    d = d.masked_fill(~valid[r0 : r0 + nr].reshape(1, -1), float("inf"))
                out[q0 : q0 + q_rows, r0 : r0 + nr] = d.view(q.shape[0], nr, n_patches).amin(2)
    return out.clamp_min_(0.0).sqrt_()
