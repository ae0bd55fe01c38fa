"""The study grid: split, train where a setup needs it, infer on the test split, report; resumable.

Each cell (method x setup) lives in ``STUDY_DIR/cells/<method>-<setup>/`` with ``train/`` (a training
run), ``maps/`` (an inference run: maps, masks, per-case metrics, ``infer.json``) and ``done.json``
written last; a rerun skips cells whose ``done.json`` exists and resumes unfinished training.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any


from .atomic import write_json
from .case_options import CaseOptions, PostOptions
from .engine.pipeline import run_case
from .errors import InputError, WeightsError
from .io import case_id_of, find_cases, load_case, load_split, save_split, save_volume, split_cases
from .metrics import volume_metrics

STUDY_METHODS = ("vand", "anomalyclip", "anovl", "adaclip")
TRAINING_FREE = ("anovl", "winclip")
"""Methods evaluated in the industrial setup only (the study: 'AnoVL was only evaluated on industrial')."""


@dataclass
class StudySettings:
    """What the study command was asked for (the configs' values where these are None)."""

    data: Path
    out: Path
    methods: Sequence[str] = STUDY_METHODS
    setups: Sequence[str] = ("industrial", "finetune", "brats", "pmc")
    backbone: str | None = None
    epochs: int | None = None
    device: str | None = None
    seed: int = 0
    max_slices_per_case: int | None = None
    batch_size: int | None = None
    threshold: float = 0.5
    modality: str = "t2w"
    post: PostOptions = field(default_factory=PostOptions)
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr)


def cells(settings: StudySettings) -> list[tuple[str, str]]:
    """The (method, setup) pairs to run: every method x setup, training-free methods industrial only."""
    from .train.config import SETUPS

    for setup in settings.setups:
        if setup not in SETUPS:
            raise InputError(f"unknown setup {setup!r}; use some of {', '.join(SETUPS)}")
    return [(m, s) for m in settings.methods for s in settings.setups if s == "industrial" or m not in TRAINING_FREE]


def study_split(settings: StudySettings) -> tuple[list[Path], Any]:
    """The cohort's cases and the saved 70/30 patient split (made once, then reused)."""
    cases = find_cases(settings.data)
    path = settings.out / "split.json"
    if path.is_file():
        split = load_split(path)
        missing = sorted(set(split.train + split.test) - {case_id_of(c) for c in cases})
        if missing:
            raise InputError(f"{path}: split names cases not in {settings.data} ({missing[:3]}); use a new --out")
    else:
        split = split_cases(cases, test_fraction=0.3, seed=settings.seed)
        save_split(split, path)
    if not split.test:
        raise InputError(f"{settings.data}: too few patients for a test split ({len(cases)} cases); add cases")
    return cases, split


def _config(settings: StudySettings, method: str, setup: str):
    from .train import resolve_config

    config = resolve_config(method, setup, None, backbone=settings.backbone, epochs=settings.epochs,
                            device=settings.device, seed=settings.seed, modality=settings.modality,
                            max_slices_per_case=settings.max_slices_per_case)
    return config


def _released_or_none(config, settings: StudySettings) -> tuple[Any, str]:
    """Keep the released starting weights when they are usable; otherwise say why and drop them."""
    from .methods.checkpoints import resolve_weights

    if not config.weights:
        return config, ""
    try:
        resolve_weights(config.weights)
        return config, ""
    except WeightsError as exc:
        from .backbones import is_random_backbone
        from .train.config import STUDY_DEFAULTS

        # With a real backbone (None: the method's default, a real one) a study would silently report untrained parts.
        if config.backbone is None or not is_random_backbone(config.backbone):
            raise WeightsError(f"{config.method}/{config.setup} starts from released weights: {exc}") from None
        note = f"released weights unavailable ({exc}); {config.method}/{config.setup} runs with untrained (seeded random) parts"
        return replace(config, weights=None, layers=STUDY_DEFAULTS.get(config.method, {}).get("layers")), note


def run_cell(settings: StudySettings, method: str, setup: str, cases: list[Path], split: Any) -> dict[str, Any]:
    """Train (if the setup needs it) and infer one cell; returns what ``done.json`` records."""
    from .methods import build_method
    from .train import run_training

    cell = settings.out / "cells" / f"{method}-{setup}"
    config, note = _released_or_none(_config(settings, method, setup), settings)
    if note:
        settings.log(f"note: {note}")
    weights = config.weights
    trained = setup in ("finetune", "brats", "pmc") and config.epochs > 0
    if trained:
        train_dir = cell / "train"
        resume = (train_dir / "checkpoints" / "last.safetensors").is_file()
        # A cell's folder without a checkpoint is an unfinished start of this study: start it again.
        run_training(config, settings.data, train_dir, split_file=settings.out / "split.json", resume=resume,
                     overwrite=not resume, progress=False)
        best = train_dir / "checkpoints" / "best.safetensors"
        weights = str(best if best.is_file() else train_dir / "checkpoints" / "last.safetensors")
    method_obj = build_method(method, config.backbone, weights=weights, image_size=config.image_size,
                              device=settings.device or "auto", init_seed=config.seed, **config.method_options())
    base = {**method_obj.describe(), "weights": weights, "trained": trained, "note": note, "config": config.to_dict()}
    # Runs of another modality than the study's t2w carry it in their label, so a report over two studies
    # (e.g. t2w and the t1c+t2w+t2f composite) shows them side by side instead of colliding.
    label = setup if config.modality == "t2w" else f"{setup}+{config.modality}"
    variants = [("maps", label, PostOptions())]
    if settings.post != PostOptions():
        variants.append((f"maps-{variant_tag(settings.post)}", f"{label}+{variant_tag(settings.post)}", settings.post))
    for folder, label, post in variants:
        _infer_split(settings, method_obj, config.modality, post, cases, split.test, cell / folder, {**base, "setup": label})
    record = {**base, "setup": setup, "runs": [folder for folder, _, _ in variants]}
    write_json(cell / "done.json", record)
    return record


def variant_tag(post: PostOptions) -> str:
    """Short label of non-default post-processing, e.g. ``views-all_brain_smooth2mm``."""
    parts = []
    if post.views != ("axial",):
        parts.append("views-" + ("all" if len(post.views) == 3 else "+".join(post.views)) + ("" if post.fuse == "mean" else f"-{post.fuse}"))
    if post.restrict_to_brain:
        parts.append("brain")
    if post.smooth3d_mm:
        parts.append(f"smooth{post.smooth3d_mm:g}mm")
    if post.min_component:
        parts.append(f"mincomp{post.min_component}")
    return "_".join(parts)


def _infer_split(settings: StudySettings, method_obj, modality: str, post: PostOptions, cases: list[Path],
                 test_ids: list[str], maps_dir: Path, record: dict[str, Any]) -> None:
    """Maps, masks and per-case metrics of the test cases, plus ``infer.json`` (what ``report`` reads)."""
    options = CaseOptions(modality=modality, views=post.views, fuse=post.fuse, restrict_to_brain=post.restrict_to_brain,
                          smooth3d_mm=post.smooth3d_mm, min_component=post.min_component, threshold=settings.threshold,
                          batch_size=settings.batch_size)
    modalities = options.modalities
    by_id = {case_id_of(p): p for p in cases}
    for case_id in test_ids:
        case = load_case(by_id[case_id], modalities=options.modalities_to_load)
        result = run_case(case, method_obj, options)
        save_volume(result.anomaly_map, case, maps_dir / f"{case_id}_anomaly.nii.gz")
        save_volume(result.mask, case, maps_dir / f"{case_id}_mask.nii.gz")
        if case.whole_tumour is not None:
            write_json(maps_dir / f"{case_id}_metrics.json",
                       {"case_id": case_id, "threshold": settings.threshold,
                        **volume_metrics(result.mask.astype(bool), case.whole_tumour), **result.info})
    write_json(maps_dir / "infer.json", {**record, "modality": "+".join(modalities), "axis": "+".join(post.views),
                                         **post.describe(), "threshold": settings.threshold, "cases": list(test_ids)})


def run_study(settings: StudySettings) -> list[Path]:
    """Run (or resume) the whole grid, then write the report; returns the cells' map folders."""
    from .outputs import output_lock

    grid = cells(settings)
    from .methods import resolve_device

    for method, setup in grid:  # every flag checked (seed, epochs, device...) before anything is written
        resolve_device(_config(settings, method, setup).device)
    post = settings.post
    CaseOptions(modality=settings.modality, views=post.views, fuse=post.fuse, restrict_to_brain=post.restrict_to_brain,
                smooth3d_mm=post.smooth3d_mm, min_component=post.min_component, threshold=settings.threshold,
                batch_size=settings.batch_size)  # the inference flags too (the same check _infer_split makes)
    with output_lock(settings.out, "study"):
        return _run_grid(settings, grid)


def _run_grid(settings: StudySettings, grid: list[tuple[str, str]]) -> list[Path]:
    cases, split = study_split(settings)
    write_json(settings.out / "study.json", {"data": str(settings.data), "cells": [f"{m}-{s}" for m, s in grid],
                                             "train_cases": split.train, "test_cases": split.test})
    runs = []
    for index, (method, setup) in enumerate(grid, start=1):
        cell = settings.out / "cells" / f"{method}-{setup}"
        if (cell / "done.json").is_file():
            settings.log(f"[{index}/{len(grid)}] {method}/{setup}: done earlier, skipped")
        else:
            settings.log(f"[{index}/{len(grid)}] {method}/{setup}: running")
            run_cell(settings, method, setup, cases, split)
        runs.extend(cell / folder for folder in _read_runs(cell))
    return runs


def _read_runs(cell: Path) -> list[str]:
    import json

    return list(json.loads((cell / "done.json").read_text()).get("runs", ["maps"]))
