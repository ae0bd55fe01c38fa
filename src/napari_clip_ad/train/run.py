"""One call from a cohort folder to a trained run folder: split, slices, training, checkpoints."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import write_json
from ..distributed import init_distributed, rank_device
from ..errors import InputError
from ..io import Split, case_id_of, find_cases, load_split, patient_id, save_split, split_cases
from ..methods import resolve_device
from .config import TrainConfig
from .data import load_slices
from .loop import Trainer, build_trainable, modalities_of


def validation_split(train_ids: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Hold out ``fraction`` of the training patients (at least one) for validation: (fit, val) ids."""
    patients = sorted({patient_id(i) for i in train_ids})
    if len(patients) < 2:
        raise InputError(f"the training split has {len(patients)} patient(s); training needs at least 2 (one for validation)")
    order = np.random.default_rng([seed, 1]).permutation(len(patients))
    n_val = min(len(patients) - 1, max(1, int(round(fraction * len(patients)))))
    held = {patients[i] for i in order[:n_val]}
    return [i for i in train_ids if patient_id(i) not in held], [i for i in train_ids if patient_id(i) in held]


def resolve_split(config: TrainConfig, cases: list[Path], run_dir: Path, split_file: Path | None, resume: bool) -> Split:
    """The given split, the run's saved one (resume), or a new seeded patient-level split saved in run_dir."""
    saved = run_dir / "split.json"
    if split_file is not None:
        split = load_split(split_file)
    elif resume and saved.is_file():
        split = load_split(saved)
    else:
        split = split_cases(cases, test_fraction=config.test_fraction, seed=config.seed)
    known = {case_id_of(p) for p in cases}
    missing = sorted(set(split.train) - known)
    if missing:
        raise InputError(f"{split_file or saved}: training cases {missing[:3]} are not in the data folder; use the matching --data")
    return split


def _check_resume(run_dir: Path, config: TrainConfig) -> None:
    saved = run_dir / "config.json"
    if not saved.is_file():
        raise InputError(f"{saved}: not found; --resume needs a run folder written by 'napari-clip-ad train'")
    try:
        before = json.loads(saved.read_text(encoding="utf-8"))
        if not isinstance(before, dict):
            raise ValueError("not a JSON object")
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"{saved}: damaged ({str(exc).splitlines()[0][:120]}); the run's settings are lost: restore "
                         "the file, or start again with --overwrite") from None
    loose = {"stop_after_epoch", "device", "epochs", "cache_memory_gb"}
    changed = sorted(k for k, v in config.to_dict().items() if k not in loose and before.get(k) != v)
    if changed:
        raise InputError(f"{saved}: --resume with different settings {changed}; use the run's settings or a new --out")


RUN_FILES = ("config.json", "split.json", "validation.json", "metrics.jsonl", "checkpoints", "feature_cache")
"""What a training run writes into its folder (removed by ``--overwrite`` once the new run's inputs are checked)."""


def holds_run(run_dir: Path) -> bool:
    """True when ``run_dir`` already holds (part of) a training run."""
    return any((run_dir / name).exists() for name in ("config.json", "metrics.jsonl", "checkpoints"))


def _clear_run(run_dir: Path) -> None:
    for name in RUN_FILES:
        path = run_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def run_training(
    config: TrainConfig,
    data_dir: str | Path,
    run_dir: str | Path,
    split_file: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    overwrite: bool = False,
) -> list[dict[str, Any]]:
    """Train ``config`` on the cohort in ``data_dir``; write everything into ``run_dir``.

    Writes config.json, split.json, metrics.jsonl, checkpoints/{last,best}.safetensors (+ .json) and
    checkpoints/train_state.safetensors (+ .json). Returns the metrics of the epochs run here.

    Everything the run needs (config, split, data, method and weights) is checked before the folder is
    touched; the folder is locked for the run; a folder holding a run is only replaced with
    ``overwrite`` (``resume`` continues it).

    Raises:
        InputError: Bad data, split or config, a damaged run folder on resume, a run folder in the way.
        OutputBusy: Another live process writes ``run_dir``.
    """
    from ..outputs import check_output_folder, rank_output_lock

    run_dir = Path(run_dir)
    check_output_folder(run_dir)
    if resume and overwrite:
        raise InputError("--resume and --overwrite contradict each other; give one")
    device = resolve_device(config.device)
    distributed = init_distributed(device)
    device = rank_device(device, distributed)
    cases = find_cases(data_dir)
    with rank_output_lock(run_dir, "train", distributed, device=device):
        if resume:
            _check_resume(run_dir, config)
        elif holds_run(run_dir) and not overwrite:
            raise InputError(f"--out {run_dir}: already holds a training run (config.json, metrics.jsonl or checkpoints/); "
                             "continue it with --resume, replace it with --overwrite, or give a new --out")
        split = resolve_split(config, cases, run_dir, Path(split_file) if split_file else None, resume)
        fit_ids, val_ids = validation_split(split.train, config.val_fraction, config.seed)
        by_id = {case_id_of(p): p for p in cases}
        modalities = modalities_of(config)
        train = load_slices([by_id[i] for i in fit_ids], modalities, config.max_slices_per_case, config.balance, config.seed)
        val = load_slices([by_id[i] for i in val_ids], modalities, config.max_slices_per_case, False, config.seed)
        method = build_trainable(config, device)
        trainer = Trainer(config, method, train, val, run_dir, distributed, progress=progress)
        if resume:
            trainer.resume()  # reads and checks every state file before anything is written
        if distributed.main:
            if overwrite and not resume:
                _clear_run(run_dir)
            save_split(split, run_dir / "split.json")
            write_json(run_dir / "config.json", config.to_dict())
            write_json(run_dir / "validation.json", {"fit": fit_ids, "val": val_ids, "split": asdict(split),
                                                           "world_size": distributed.world})
        distributed.barrier()
        return trainer.fit()
