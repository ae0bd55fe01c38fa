"""CLIP backbones: one registry, open_clip names, hub names and local files; frozen; sized per method."""

from .geometry import embed_patches, grid_for, patch_size_of, resize_positional_embedding
from .loading import CLIP_MEAN, CLIP_STD, Backbone, is_dinov2, is_random_backbone, load_backbone, register_tiny_test, set_activation
from .registry import BACKBONES, BackboneSpec

__all__ = [
    "BACKBONES", "CLIP_MEAN", "CLIP_STD", "Backbone", "BackboneSpec", "embed_patches", "grid_for", "is_dinov2", "is_random_backbone",
    "load_backbone",
    "patch_size_of", "register_tiny_test", "resize_positional_embedding", "set_activation",
]
