"""What the detect widget records about a run: devices available, weights hashes, result metadata."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..methods import AnomalyMethod


def available_devices() -> list[str]:
    """Devices torch can use here: the CPU, every CUDA GPU, Apple's MPS."""
    devices = ["cpu"]
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        gpus = ["cuda"] + ([f"cuda:{i}" for i in range(count)] if count > 1 else [])
        devices = gpus + devices
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devices.insert(0, "mps")
    return devices


def auto_device() -> str:
    """The device ``auto`` means: CUDA, then Apple MPS, then the CPU."""
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    return "mps" if mps is not None and mps.is_available() else "cpu"


def has_accelerator() -> bool:
    """True when a GPU (CUDA or MPS) is available."""
    return available_devices() != ["cpu"]


def sha256_of(path: str | Path | None) -> str | None:
    """Hex SHA-256 of a file (None for no file)."""
    if path is None:
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def run_metadata(method: AnomalyMethod, info: dict[str, Any], weights_sha256: str | None) -> dict[str, Any]:
    """Provenance kept in the anomaly-map layer's metadata."""
    return {
        "method": method.name,
        "backbone": method.backbone.label,
        "random_weights": bool(method.backbone.random_weights),
        "weights": getattr(method, "weights_source", None),
        "weights_sha256": weights_sha256,
        "napari_clip_ad_version": __version__,
        "info": dict(info),
    }
