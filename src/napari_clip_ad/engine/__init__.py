"""The engine every front end uses: volume -> slices -> method -> 3D map."""

from .preprocess import AXES, preprocess_slices, scale_slices
from .run import VolumeResult, default_batch_size, parse_modality, run_volume

__all__ = ["AXES", "VolumeResult", "default_batch_size", "parse_modality", "preprocess_slices", "run_volume", "scale_slices"]
