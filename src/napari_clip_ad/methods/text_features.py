"""Fixed text features: encoded only up to the last end-of-text token, batched, and cached on disk.

Two facts make the first call cheap:

- CLIP's text transformer is causal: the feature read at the end-of-text (EOT) position depends only
  on the tokens before it. Running the sequence cut after the longest EOT of a batch (instead of the
  full 77-token context) gives the same features to float rounding (tests/test_text_features.py)
  at a fraction of the work (VAND's longest sentence ends at token 16 of 77).
- Text features of fixed prompts depend only on the text tower's weights, its activation and the
  sentences. They are stored as safetensors in the user cache dir under a content hash of all
  three (plus the method and its prompt settings), so a second process encodes nothing. A
  corrupt or mismatching entry is rebuilt; writes are atomic.

Cache folder: ``$NAPARI_CLIP_AD_TEXT_CACHE`` (``off`` disables the disk cache), else
``$XDG_CACHE_HOME/napari-clip-ad/text-features`` (``~/.cache/...``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..atomic import atomic_path
from ..backbones.hf_text import encode_hf_text, is_hf_text

LOG = logging.getLogger(__name__)
FORMAT_VERSION = 1
"""Bump when the meaning of cached entries changes (then old entries are simply not found)."""
CHUNK = 512
"""Sentences per text-tower forward (bounds memory on long prompt lists)."""
_TOWER_HASHES: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()


def text_cache_dir() -> Path | None:
    """Folder of cached text features, or None when disabled (``NAPARI_CLIP_AD_TEXT_CACHE=off``)."""
    root = os.environ.get("NAPARI_CLIP_AD_TEXT_CACHE")
    if root is not None and root.strip().lower() in ("off", "0", "false", "no", ""):
        return None
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache"))
    return Path(xdg) / "napari-clip-ad" / "text-features"


def _truncatable(clip: nn.Module) -> bool:
    """True for an open_clip text tower whose pooled token comes from a causal, position-read EOT."""
    return (
        getattr(clip, "transformer", None) is not None
        and getattr(clip, "attn_mask", None) is not None
        and getattr(clip, "text_pool_type", "argmax") in ("argmax", "eos")
        and hasattr(clip, "token_embedding")
    )


def eot_positions(clip: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """(N,) position of the token each sentence's feature is read from (open_clip's ``text_global_pool``)."""
    if getattr(clip, "text_pool_type", "argmax") == "eos":
        return (tokens == clip.text_eos_id).int().argmax(dim=-1)
    return tokens.argmax(dim=-1)


@torch.no_grad()
def encode_text_truncated(clip: nn.Module, tokens: torch.Tensor, n_positions: int | None = None) -> torch.Tensor:
    """``clip.encode_text(tokens)`` computed on the sequence cut after the last EOT, in float32.

    Exact by the causal mask: positions after the EOT cannot influence it. An HF text tower
    (BiomedCLIP's BERT) masks its padding, so it runs cut after the last real token
    (:func:`~napari_clip_ad.backbones.hf_text.encode_hf_text`); other towers without a causal mask
    or with another pooling run the ordinary ``encode_text``.

    Args:
        clip: open_clip CLIP model.
        tokens: (N, context) token ids.
        n_positions: Sequence length to run; None: the longest EOT + 1 (the shortest exact cut).
            A cut before an EOT is refused (ValueError).

    Returns:
        (N, E) float32 projected features, not normalised.
    """
    with torch.autocast(tokens.device.type, enabled=False):
        if is_hf_text(clip):
            return encode_hf_text(clip, tokens).float()
        if not _truncatable(clip):
            return clip.encode_text(tokens).float()
        eot = eot_positions(clip, tokens)
        n_pos = int(eot.max()) + 1 if n_positions is None else int(n_positions)
        if n_pos <= int(eot.max()) or n_pos > tokens.shape[1]:
            raise ValueError(f"n_positions {n_pos} must cover the last end-of-text token ({int(eot.max())}) and fit the context")
        cast = clip.transformer.get_cast_dtype()
        x = clip.token_embedding(tokens[:, :n_pos]).to(cast) + clip.positional_embedding[:n_pos].to(cast)
        x = clip.transformer(x, attn_mask=clip.attn_mask[:n_pos, :n_pos])
        x = clip.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), eot]
        projection = clip.text_projection
        if projection is not None:
            x = projection(x) if isinstance(projection, nn.Linear) else x @ projection
        return x.float()


@torch.no_grad()
def encode_sentences(clip: nn.Module, tokenizer: Callable[..., torch.Tensor], sentences: Sequence[str]) -> torch.Tensor:
    """(N, E) float32 unnormalised features of ``sentences``, in chunks of :data:`CHUNK`, truncated."""
    device = next(clip.parameters()).device
    tokens = tokenizer(list(sentences)).to(device)
    return torch.cat([encode_text_truncated(clip, part) for part in tokens.split(CHUNK)])


def text_tower_hash(clip: nn.Module) -> str:
    """Content hash of the text tower: every non-visual tensor (names, shapes, dtypes, bytes) and its layer types.

    The layer types catch what the weights do not say (QuickGELU vs exact GELU). Computed once per
    model object (~1 s for ViT-L/14's text tower).
    """
    cached = _TOWER_HASHES.get(clip)
    if cached is not None:
        return cached
    digest = hashlib.blake2b(digest_size=20)
    tensors = [*clip.named_parameters(), *clip.named_buffers()]
    for name, tensor in sorted(tensors, key=lambda item: item[0]):
        if name.startswith("visual.") or name in ("logit_scale", "logit_bias"):
            continue
        data = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tuple(data.shape)}|{data.dtype}".encode())
        if data.numel():
            digest.update(data.reshape(-1).view(torch.uint8).numpy())  # buffer protocol: no extra copy
    layers = sorted({f"{type(m).__name__}({m.extra_repr()})" for n, m in clip.named_modules()
                     if not n.startswith("visual") and not list(m.children())})
    digest.update("|".join(layers).encode())
    value = digest.hexdigest()
    _TOWER_HASHES[clip] = value
    return value


def _entry_key(clip: nn.Module, method: str, payload: dict[str, Any]) -> str:
    description = json.dumps({"format": FORMAT_VERSION, "method": method, "tower": text_tower_hash(clip), "payload": payload},
                             sort_keys=True, default=str)
    return hashlib.sha256(description.encode()).hexdigest()


def _load(path: Path, key: str, names: set[str] | None) -> dict[str, torch.Tensor] | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            if (handle.metadata() or {}).get("key") != key:
                return None
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 - safe_open is not iterable
    except Exception:  # noqa: BLE001 - unreadable, truncated or not safetensors: rebuilt by the caller
        return None
    if not tensors or (names is not None and set(tensors) != names):
        return None
    if not all(t.is_floating_point() and bool(torch.isfinite(t).all()) for t in tensors.values()):
        return None
    return tensors


def cached_text_features(
    clip: nn.Module,
    method: str,
    payload: dict[str, Any],
    compute: Callable[[], dict[str, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """Text features from the disk cache, or computed by ``compute`` and stored there.

    Args:
        clip: The CLIP model whose text tower ``compute`` uses (hashed into the key).
        method: Method name (part of the key).
        payload: JSON-able description of everything else the features depend on (sentences or
            prompt options).
        compute: Builds the features: name -> float tensor.

    Returns:
        name -> float32 tensor on the model's device.
    """
    device = next(clip.parameters()).device
    folder = text_cache_dir()
    if folder is None:
        return {k: v.float().to(device) for k, v in compute().items()}
    key = _entry_key(clip, method, payload)
    path = folder / f"{method}-{key[:32]}.safetensors"
    if path.is_file():
        loaded = _load(path, key, None)
        if loaded is not None:
            return {k: v.to(device) for k, v in loaded.items()}
        LOG.warning("text-feature cache entry %s is unreadable or stale; rebuilding it", path)
    features = {k: v.detach().float().contiguous() for k, v in compute().items()}
    try:
        from safetensors.torch import save_file

        with atomic_path(path) as tmp:
            save_file({k: v.cpu() for k, v in features.items()}, str(tmp), metadata={"key": key, "method": method})
    except OSError as exc:  # a read-only or full cache folder must not stop inference
        LOG.warning("could not write the text-feature cache %s (%s); continuing without it", path, exc)
    return {k: v.to(device) for k, v in features.items()}
