"""Anomaly-detection methods behind one interface: :func:`build_method` and ``predict``."""

from .base import AnomalyMethod, AnomalyOutput
from .postprocess import smooth_maps
from .registry import METHODS, build_method, list_methods, method_class, register_method, resolve_device

__all__ = [
    "METHODS", "AnomalyMethod", "AnomalyOutput", "build_method", "list_methods", "method_class",
    "register_method", "resolve_device", "smooth_maps",
]
