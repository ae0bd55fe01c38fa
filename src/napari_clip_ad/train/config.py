"""Training configuration: the study's per-method settings (Table 2), setups, file + CLI overrides."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import InputError

SETUPS = ("industrial", "finetune", "brats", "pmc", "biomedclip")
"""industrial: released weights, nothing trained; finetune: released weights trained further;
brats: trainable parts from random init; pmc: PMC-CLIP backbone, random-init trainable parts;
biomedclip: BiomedCLIP backbone, random-init trainable parts (not in the study's default grid)."""

PMC_BACKBONE = "pmc-vit-l-14"
BIOMEDCLIP_BACKBONE = "biomedclip"
FROM_SCRATCH_SETUPS = ("brats", "pmc", "biomedclip")
"""Setups whose trainable parts start from random init (no released weights)."""
SETUP_BACKBONES = {"pmc": PMC_BACKBONE, "biomedclip": BIOMEDCLIP_BACKBONE}
"""Setups that fix the backbone (when none is given)."""

STUDY_DEFAULTS: dict[str, dict[str, Any]] = {
    # Study Table 2 (image size 240 for all). Optimiser settings from the official train.py files. layers None =
    # the method's default taps, which are the study's (VAND/AnomalyCLIP 6 12 18 24, AdaCLIP 3 6 9), scaled on
    # shallower backbones.
    "vand": {"epochs": 10, "batch_size": 8, "lr": 1e-3, "betas": [0.5, 0.999], "layers": None,
             "released": "vand-mvtec"},
    "anomalyclip": {"epochs": 15, "batch_size": 8, "lr": 1e-3, "betas": [0.5, 0.999], "layers": None,
                    "released": "anomalyclip-mvtec"},
    "adaclip": {"epochs": 5, "batch_size": 1, "lr": 1e-2, "betas": [0.5, 0.999], "layers": None,
                "released": "adaclip-mvtec-colondb", "options": {"prompting_depth": 4}, "optimizer": "adamw",
                # The released checkpoints carry 4 patch heads trained on blocks 6 12 18 24 (official
                # train.py); the study's [3, 6, 9] applies to the from-scratch setups.
                "released_layers": [6, 12, 18, 24]},
    # MVFA-AD (not in the study): train_zero.py settings (50 epochs, batch 1, Adam lr 1e-4, betas 0.5 0.999;
    # train_few.py uses lr 1e-3 on its 88 augmented shots). Released weights: the zero-shot Brain checkpoint.
    "mvfa": {"epochs": 50, "batch_size": 1, "lr": 1e-4, "betas": [0.5, 0.999], "layers": None,
             "released": "mvfa-zero-brain"},
    # AA-CLIP (not in the study): train.py defaults. Stage 1 (text adapter) 5 epochs, batch 16, Adam lr 1e-5; stage 2
    # (image adapter) 20 epochs, batch 2, Adam lr 5e-4 with MultiStepLR([16000, 32000], 0.5) stepped per batch; betas
    # 0.5 0.999 for both; orthogonality weight 0.1. `epochs` counts both stages; batch_size / lr are stage 2's.
    # The authors released no weights.
    "aaclip": {"epochs": 25, "batch_size": 2, "lr": 5e-4, "betas": [0.5, 0.999], "layers": None, "released": None,
               "stages": {"text_epochs": 5, "text_batch_size": 16, "text_lr": 1e-5, "milestones": [16000, 32000],
                          "gamma": 0.5, "text_norm_weight": 0.1}},
    "anovl": {"epochs": 0, "batch_size": 8, "lr": 0.0, "betas": [0.5, 0.999], "layers": None, "released": None},
}


@dataclass
class TrainConfig:
    """Everything that determines a training run (saved as RUN_DIR/config.json).

    Attributes:
        method: Method name. setup: one of :data:`SETUPS`.
        backbone: Backbone name (None: the method's default; ``pmc`` forces ``pmc-vit-l-14``).
        weights: Starting weights for ``finetune`` (released name or file); None elsewhere.
        epochs, batch_size, lr, betas, optimizer: Optimisation as the official scripts ('adam'; AdaCLIP
            'adamw' with torch's default weight decay 0.01).
        image_size: Square input size. layers: tapped blocks (None: method default).
        options: Extra method options. modality: 't2w', or three joined by '+'.
        seed: Seeds the split, the random init, augmentation and the batch order.
        test_fraction: Patient fraction held out as the test split when no split file is given.
        val_fraction: Patient fraction of the train split used for validation (at least one patient).
        augment: Seeded flips, small rotation/scale, intensity jitter. views: augmented views per slice
            (view 0 is the un-augmented slice); each epoch samples one view per slice.
        cache: Compute the frozen encoder once per (slice, view) and keep it (RAM, then disk).
        cache_memory_gb: RAM the cache may hold per process before it spills to ``RUN_DIR/feature_cache``
            (None: half the machine's memory shared by the ranks). Does not change results.
        balance: Subsample the larger of tumour / normal slices to the size of the other.
        max_slices_per_case: Keep at most this many brain slices per case (evenly spaced); None: all.
        threshold: Map threshold for val_dice. device: 'auto', 'cpu', 'cuda'...
        stop_after_epoch: Stop (as if killed) after this epoch; for resume tests.
        stages: Two-stage training (AA-CLIP): ``text_epochs`` (the first epochs train the text adapter with
            ``text_batch_size`` and ``text_lr``), ``milestones`` / ``gamma`` (per-batch MultiStepLR of the
            second stage), ``text_norm_weight``; None for one-stage methods.
    """

    method: str = "vand"
    setup: str = "brats"
    backbone: str | None = None
    weights: str | None = None
    epochs: int = 10
    batch_size: int = 8
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.5, 0.999])
    optimizer: str = "adam"
    image_size: int = 240
    layers: list[int] | None = None
    options: dict[str, Any] = field(default_factory=dict)
    modality: str = "t2w"
    seed: int = 0
    test_fraction: float = 0.3
    val_fraction: float = 0.2
    augment: bool = True
    views: int = 4
    cache: bool = True
    cache_memory_gb: float | None = None
    balance: bool = False
    max_slices_per_case: int | None = None
    threshold: float = 0.5
    device: str = "auto"
    stop_after_epoch: int | None = None
    stages: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict."""
        return asdict(self)

    def method_options(self) -> dict[str, Any]:
        """Keyword options for ``build_method`` (layers + extra options)."""
        options = dict(self.options)
        if self.layers is not None:
            options["layers"] = list(self.layers)
        return options


def default_config(method: str, setup: str) -> TrainConfig:
    """The study's settings for a method and setup."""
    method = method.lower()
    if setup not in SETUPS:
        raise InputError(f"unknown setup {setup!r}; use one of {', '.join(SETUPS)}")
    study = STUDY_DEFAULTS.get(method, {})
    config = TrainConfig(method=method, setup=setup)
    for key in ("epochs", "batch_size", "lr", "betas", "layers", "optimizer"):
        if key in study:
            setattr(config, key, study[key])
    if "stages" in study:
        config.stages = dict(study["stages"])
    config.options = dict(study.get("options", {}))
    if setup in ("industrial", "finetune"):
        config.weights = study.get("released")
        if study.get("released_layers"):
            config.layers = list(study["released_layers"])
    if setup in SETUP_BACKBONES:
        config.backbone = SETUP_BACKBONES[setup]
    return config


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a JSON config file (keys of :class:`TrainConfig`)."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not a JSON config ({str(exc).splitlines()[0]}); fix the file") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path}: a config must be a JSON object with TrainConfig keys")
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(raw) - known - {"comment"})
    if unknown:
        raise InputError(f"{path}: unknown config keys {unknown}; known keys: {', '.join(sorted(known))}")
    raw.pop("comment", None)
    return raw


def resolve_config(method: str, setup: str, file: str | Path | None = None, **overrides: Any) -> TrainConfig:
    """Study defaults, then the config file, then non-None overrides (CLI flags)."""
    config = default_config(method, setup)
    values = load_config_file(file) if file is not None else {}
    for key, given in (("method", method), ("setup", setup)):
        if key in values and str(values[key]).lower() != given.lower():
            raise InputError(f"{file}: config is for {key} {values[key]!r} but {given!r} was asked for; use the matching config")
    origin = {key: f"{file}: field {key!r}" for key in values}
    given = {k: v for k, v in overrides.items() if v is not None}
    values.update(given)
    origin.update({key: f"--{key.replace('_', '-')}" for key in given})
    for key, value in values.items():
        setattr(config, key, value)
    check_config_values(config, origin)
    config.method, config.setup = config.method.lower(), config.setup
    if config.setup not in SETUPS:
        raise InputError(f"unknown setup {config.setup!r}; use one of {', '.join(SETUPS)}")
    if config.setup in SETUP_BACKBONES and config.backbone in (None, ""):
        config.backbone = SETUP_BACKBONES[config.setup]
    if config.setup in FROM_SCRATCH_SETUPS:
        config.weights = None
    if config.optimizer not in ("adam", "adamw"):
        raise InputError(f"optimizer {config.optimizer!r} is not supported; use 'adam' or 'adamw'")
    return config


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


_WHOLE = "a whole number"
_CHECKS: dict[str, tuple[Any, str]] = {
    # field: (test of the value, what it must be)
    "method": (lambda v: isinstance(v, str) and v != "", "a method name"),
    "backbone": (lambda v: v is None or isinstance(v, str), "a backbone name or null"),
    "weights": (lambda v: v is None or isinstance(v, str), "a weights name or file, or null"),
    "epochs": (lambda v: _is_int(v) and v >= 0, f"{_WHOLE} >= 0"),
    "batch_size": (lambda v: _is_int(v) and v >= 1, f"{_WHOLE} >= 1"),
    "lr": (lambda v: _is_number(v) and v >= 0, "a finite learning rate > 0"),
    "betas": (lambda v: isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_number(b) and 0 <= b < 1 for b in v),
              "two numbers in [0, 1), e.g. [0.5, 0.999]"),
    "optimizer": (lambda v: v in ("adam", "adamw"), "'adam' or 'adamw'"),
    "image_size": (lambda v: _is_int(v) and 16 <= v <= 4096, f"{_WHOLE} of pixels in [16, 4096] (the study: 240)"),
    "layers": (lambda v: v is None or (isinstance(v, (list, tuple)) and len(v) > 0 and all(_is_int(i) and i >= 1 for i in v)),
               "null or a list of block numbers >= 1"),
    "options": (lambda v: isinstance(v, dict), "a JSON object of method options"),
    "modality": (lambda v: isinstance(v, str), "a modality name such as 't2w' or 't1c+t2w+t2f'"),
    "seed": (lambda v: _is_int(v) and 0 <= v < 2**32, f"{_WHOLE} in [0, 2**32)"),
    "test_fraction": (lambda v: _is_number(v) and 0 < v < 1, "a number in (0, 1)"),
    "val_fraction": (lambda v: _is_number(v) and 0 < v < 1, "a number in (0, 1)"),
    "augment": (lambda v: isinstance(v, bool), "true or false"),
    "views": (lambda v: _is_int(v) and v >= 1, f"{_WHOLE} >= 1"),
    "cache": (lambda v: isinstance(v, bool), "true or false"),
    "cache_memory_gb": (lambda v: v is None or (_is_number(v) and v >= 0), "null or a finite number of GiB >= 0 (0: all on disk)"),
    "balance": (lambda v: isinstance(v, bool), "true or false"),
    "max_slices_per_case": (lambda v: v is None or (_is_int(v) and v >= 1), f"null (all) or {_WHOLE} >= 1"),
    "threshold": (lambda v: _is_number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "device": (lambda v: isinstance(v, str) and v != "", "'auto', 'cpu', 'cuda' or 'cuda:N'"),
    "stop_after_epoch": (lambda v: v is None or (_is_int(v) and v >= 1), f"null or {_WHOLE} >= 1"),
    "stages": (lambda v: v is None or _stages_ok(v),
               "null or an object with text_epochs (>= 1; train.py's text_epoch 0, the unadapted text tower, is not offered), text_batch_size (>= 1), text_lr (> 0), milestones (list of "
               "steps), gamma (> 0), text_norm_weight (>= 0)"),
}


def _stages_ok(value: Any) -> bool:
    keys = {"text_epochs", "text_batch_size", "text_lr", "milestones", "gamma", "text_norm_weight"}
    return (isinstance(value, dict) and set(value) == keys and _is_int(value["text_epochs"]) and value["text_epochs"] >= 1
            and _is_int(value["text_batch_size"]) and value["text_batch_size"] >= 1
            and _is_number(value["text_lr"]) and value["text_lr"] > 0 and _is_number(value["gamma"]) and value["gamma"] > 0
            and _is_number(value["text_norm_weight"]) and value["text_norm_weight"] >= 0
            and isinstance(value["milestones"], list) and all(_is_int(m) and m >= 0 for m in value["milestones"]))


def check_config_values(config: TrainConfig, origin: dict[str, str] | None = None) -> None:
    """Refuse a wrong type or value in any field, naming the flag or config-file field it came from.

    Runs before anything is written, so a bad ``--lr nan`` or ``"batch_size": "2"`` leaves the run
    folder as it was.
    """
    origin = origin or {}
    for key, (test, expected) in _CHECKS.items():
        value = getattr(config, key)
        if not test(value):
            where = origin.get(key, f"config field {key!r}")
            raise InputError(f"{where}: must be {expected}, got {json.dumps(value) if _jsonable(value) else repr(value)}")
    trains = config.epochs > 0 and config.setup != "industrial" and STUDY_DEFAULTS.get(config.method, {}).get("lr") != 0.0
    if config.lr == 0 and trains:  # (training-free methods keep lr 0; they are refused elsewhere for training)
        raise InputError(f"{origin.get('lr', 'config field lr')}: must be a finite learning rate > 0 to train "
                         f"{config.epochs} epochs, got 0")
    from ..case_options import parse_modality

    parse_modality(config.modality)


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True
