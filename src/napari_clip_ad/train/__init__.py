"""Headless training of the methods' trainable parts on BraTS slices (frozen CLIP, cached features)."""

from .config import SETUPS, STUDY_DEFAULTS, TrainConfig, default_config, resolve_config
from .loop import Trainer, build_trainable
from .run import run_training, validation_split

__all__ = [
    "SETUPS", "STUDY_DEFAULTS", "TrainConfig", "Trainer", "build_trainable", "default_config", "resolve_config",
    "run_training", "validation_split",
]
