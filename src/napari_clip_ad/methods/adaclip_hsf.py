"""AdaCLIP's Hybrid Semantic Fusion (HSF): k-means over the most abnormal patch tokens.

Official reference: caoyunkang/AdaCLIP (commit e27ee32), ``method/adaclip.py``
(``HybridSemanticFusion``, the "upgraded" variant the authors ship). Per image:

1. abnormality per patch = softmax over (normal, abnormal) of the tapped layers' mean patch logits
   (before any resizing), abnormal channel;
2. the ``5 * k`` most abnormal patches (``torch.topk`` order) of every tapped layer are taken from
   the projected, normalised patch tokens; their layer-wise concatenation is clustered by
   scikit-learn ``KMeans(n_clusters=k, n_init="auto")``;
3. each cluster's centre is the mean of its members' tokens over all layers; the fused feature is
   the mean of the cluster centres, L2-normalised.

Reproducibility: the official KMeans draws its k-means++ seeds from numpy's global RNG; here every
image uses ``random_state=0``, so a slice gets the same score alone or inside any batch.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

TOP_K_PER_CLUSTER = 5
"""``n_aggregate_patch_tokens = k_clusters * 5``."""
KMEANS_SEED = 0


def cluster_labels(data: np.ndarray, k_clusters: int) -> np.ndarray:
    """k-means labels of (n, d) points: the official KMeans, seeded with ``random_state=0``.

    This is the per-image cost of AdaCLIP: it runs on the CPU with scikit-learn, as officially.
    """
    from sklearn.cluster import KMeans

    return KMeans(n_clusters=k_clusters, n_init="auto", random_state=KMEANS_SEED).fit_predict(data)


HSF_MODES = ("exact", "fast")
"""``exact``: scikit-learn on the host, image by image (the official path). ``fast``: the same
seeded k-means in torch, batched on the device (:mod:`.adaclip_kmeans`)."""


def hybrid_semantic_fusion(
    patch_tokens: list[torch.Tensor], layer_logits: list[torch.Tensor], k_clusters: int, mode: str = "exact"
) -> torch.Tensor:
    """Fused abnormal semantics per image, (B, E), L2-normalised (differentiable w.r.t. the tokens).

    Args:
        patch_tokens: Per tapped layer (B, L, E) projected, normalised patch tokens.
        layer_logits: Per tapped layer (B, L, 2) ``100 * token @ text`` logits.
        k_clusters: Number of k-means clusters.
        mode: ``exact`` (scikit-learn per image) or ``fast`` (torch, batched; images where a cluster
            runs empty fall back to scikit-learn).
    """
    abnormality = torch.stack(layer_logits, dim=1).mean(dim=1).softmax(dim=2)[:, :, 1]
    k_top = min(abnormality.shape[1], k_clusters * TOP_K_PER_CLUSTER)
    top = torch.topk(abnormality, k=k_top, dim=1).indices
    index = top.unsqueeze(-1).expand(-1, -1, patch_tokens[0].shape[-1])
    selected = torch.stack([tokens.gather(1, index) for tokens in patch_tokens], dim=1)  # (B, n_layers, k_top, E)
    data = selected.permute(0, 2, 1, 3).reshape(selected.shape[0], k_top, -1)  # per image: (k_top, n_layers * E)
    if mode == "fast":
        from .adaclip_kmeans import kmeans_labels

        labels, fallback = kmeans_labels(data, k_clusters, KMEANS_SEED)
        if bool(fallback.any()):  # one sync per batch; rare (a cluster ran empty)
            for b in fallback.nonzero()[:, 0].tolist():
                labels[b] = torch.as_tensor(cluster_labels(data[b].detach().float().cpu().numpy(), k_clusters).astype(np.int64), device=labels.device)
    elif mode == "exact":
        labels = torch.stack([
            torch.as_tensor(cluster_labels(d.detach().float().cpu().numpy(), k_clusters).astype(np.int64)) for d in data
        ]).to(selected.device)
    else:
        raise ValueError(f"HSF mode {mode!r}: use one of {HSF_MODES}")
    # Cluster means over all layers' member tokens, for every image at once. An empty cluster (only
    # possible with duplicate tokens) would make the official mean NaN; it is left out here instead.
    members = F.one_hot(labels, k_clusters).to(selected.dtype).transpose(1, 2)  # (B, k, k_top)
    counts = members.sum(dim=2, keepdim=True)  # (B, k, 1)
    centres = (members @ selected.mean(dim=1)) / counts.clamp_min(1)
    present = (counts > 0).to(selected.dtype)
    fused = (centres * present).sum(dim=1) / present.sum(dim=1)
    return F.normalize(fused, dim=1)
