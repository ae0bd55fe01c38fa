"""napari-clip-ad: CLIP-based zero-shot anomaly detection on brain MRI (BraTS), in napari and headless.

The core (IO, metrics, backbones, methods, engine, training) imports neither napari nor Qt; the
plugin lives in :mod:`napari_clip_ad._napari`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["__version__", "build_method", "find_cases", "list_methods", "load_case", "sample_case", "run_volume"]

if TYPE_CHECKING:  # pragma: no cover
    from .engine import run_volume
    from .io import find_cases, load_case
    from .methods import build_method, list_methods
    from .sample import sample_case

_LAZY = {
    "load_case": "io",
    "find_cases": "io",
    "sample_case": "sample",
    "build_method": "methods",
    "list_methods": "methods",
    "run_volume": "engine",
}


def __getattr__(name: str) -> Any:
    """Import heavy submodules (torch, open_clip) only when their names are first used."""
    if name in _LAZY:
        import importlib

        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
