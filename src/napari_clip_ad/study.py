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
from .engine.pipeline import ReferencePool, run_case, write_case_outputs
from .errors import InputError, WeightsError
from .io import case_id_of, find_cases, load_case, load_split, save_split, split_cases

STUDY_METHODS = ("vand", "anomalyclip", "anovl", "adaclip")
"""The published study's methods (the default grid); ``--methods`` adds others, e.g. ``mvfa`` and ``aaclip``."""
BASELINE_METHOD, BASELINE_SETUP = "intensity", "baseline"
"""The model-free reference every method is read against (robust z-score inside the brain)."""
TRAINFREE_SETUP = "trainfree"
"""Training-free methods that use the cohort (cross-subject mode): references from the training split."""
CROSS_SUBJECT = ("anomalydino", "musc")
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
    baseline: bool = True
    """Run the model-free ``intensity`` baseline first (its row leads table 1); ``--no-baseline`` turns it off."""
    k_shots: Sequence[int] = (0,)
    """Few-shot dimension: 0 = zero-shot; K > 0 adds ``<setup>+<K>shot`` cells for methods with a few-shot mode."""
    references: str = "auto"
    """Where K > 0 cells draw normal references: 'auto' (the training split) or a folder."""
    prompts: str | None = None
    """Prompt set for the methods that take one (None: the official 'industrial' words)."""
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr)


def cells(settings: StudySettings) -> list[tuple[str, str]]:
    """The (method, setup) pairs to run: every method x setup, training-free methods industrial only.

    With ``k_shots`` beyond 0, methods that have a few-shot mode get ``<setup>+<K>shot`` cells too (they
    share the zero-shot cell's training); the ``intensity`` baseline leads unless switched off.
    """
    from .train.config import SETUPS

    for setup in settings.setups:
        if setup not in (*SETUPS, TRAINFREE_SETUP):
            raise InputError(f"unknown setup {setup!r}; use some of {', '.join((*SETUPS, TRAINFREE_SETUP))}")
    from .methods import method_class

    def runs_in(method: str, setup: str) -> bool:
        if method in CROSS_SUBJECT:
            return setup == TRAINFREE_SETUP
        if setup in ("industrial", "finetune") and not has_released_weights(method):
            return False  # trainable, but no released weights (AA-CLIP): nothing to evaluate or fine-tune
        return setup != TRAINFREE_SETUP and (setup == "industrial" or method not in TRAINING_FREE)

    grid = [(m, s if k == 0 or s == TRAINFREE_SETUP else f"{s}+{k}shot") for m in settings.methods if m != BASELINE_METHOD
            for s in settings.setups if runs_in(m, s)
            for k in settings.k_shots if k == 0 or (method_class(m).supports_references and s != TRAINFREE_SETUP)]
    grid = list(dict.fromkeys(grid))
    return ([(BASELINE_METHOD, BASELINE_SETUP)] if settings.baseline or BASELINE_METHOD in settings.methods else []) + grid


def has_released_weights(method: str) -> bool:
    """False for a trainable method whose authors released no weights (its industrial/finetune cells are skipped)."""
    from .train.config import STUDY_DEFAULTS

    study = STUDY_DEFAULTS.get(method)
    return study is None or method in TRAINING_FREE or study.get("released") is not None or not study.get("lr")


def grid_notes(settings: StudySettings) -> list[str]:
    """Why asked-for cells are not in the grid (no few-shot mode, no released weights), one line each."""
    from .methods import method_class

    notes = []
    shots = [k for k in settings.k_shots if k > 0]
    for method in dict.fromkeys(settings.methods):
        if method == BASELINE_METHOD or method in CROSS_SUBJECT:
            continue
        if shots and not method_class(method).supports_references:
            notes.append(f"{method} has no few-shot mode in its official code: no +{'/+'.join(map(str, shots))}shot cells")
        skipped = [s for s in settings.setups if s in ("industrial", "finetune") and not has_released_weights(method)]
        if skipped:
            notes.append(f"{method}: the authors released no weights: no {'/'.join(skipped)} cells (train it: brats, pmc)")
    return notes


def cell_id(entry: Sequence[Any]) -> str:
    """The stable ID (and folder name under ``cells/``) of one grid entry from :func:`cells`.

    ``<method>-<setup>``, then one part per further grid dimension: a k-shot count ``k`` adds
    ``-<k>shot`` when k > 0 (k = 0 adds nothing, so zero-shot IDs stay as they were); other values
    add ``-<value>``. ``study --list-cells``, ``--cell``, the folders and the sbatch scripts all use this.
    """
    method, setup, *rest = entry
    parts = [str(method), str(setup)]
    for value in rest:
        if isinstance(value, int) and not isinstance(value, bool):
            if value:
                parts.append(f"{value}shot")
        elif value not in (None, ""):
            parts.append(str(value))
    return "-".join(parts)


def cell_ids(settings: StudySettings) -> list[str]:
    """Every cell's ID in grid order (what ``study --list-cells`` prints)."""
    return [cell_id(entry) for entry in cells(settings)]


def find_cell(settings: StudySettings, wanted: str) -> tuple:
    """The grid entry whose ID is ``wanted``; an :class:`InputError` listing the IDs otherwise."""
    grid = cells(settings)
    for entry in grid:
        if cell_id(entry) == wanted:
            return entry
    raise InputError(f"--cell {wanted!r} is not in this study's grid; 'study --list-cells' prints them: "
                     f"{', '.join(cell_id(e) for e in grid)}")


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
    from .backbones import is_random_backbone
    from .train import resolve_config

    backbone = settings.backbone
    if setup == "biomedclip" and backbone is not None and is_random_backbone(backbone) and backbone != "tiny-biomedclip":
        # A smoke run's random backbone (tiny-test) stands for the setup's BiomedCLIP by its tiny random twin
        # (timm trunk + BERT text tower), so the cell runs the code path the real setup runs.
        backbone = "tiny-biomedclip"
    config = resolve_config(method, setup, None, backbone=backbone, epochs=settings.epochs,
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
    from .methods import build_method, method_class
    from .train import run_training
    from .train.config import FROM_SCRATCH_SETUPS

    cell = settings.out / "cells" / cell_id((method, setup))
    if method == BASELINE_METHOD:
        return _run_baseline_cell(settings, cell, cases, split)
    if setup == TRAINFREE_SETUP:
        return _run_trainfree_cell(settings, method, cell, cases, split)
    setup, _, shots = setup.partition("+")
    k_shot = int(shots.removesuffix("shot")) if shots else 0
    config, note = _released_or_none(_config(settings, method, setup), settings)
    if note:
        settings.log(f"note: {note}")
    weights = config.weights
    trained = setup in ("finetune", *FROM_SCRATCH_SETUPS) and config.epochs > 0
    if trained:
        train_dir = settings.out / "cells" / f"{method}-{setup}" / "train"  # shared by the setup's k-shot cells
        resume = (train_dir / "checkpoints" / "last.safetensors").is_file()
        # A cell's folder without a checkpoint is an unfinished start of this study: start it again.
        run_training(config, settings.data, train_dir, split_file=settings.out / "split.json", resume=resume,
                     overwrite=not resume, progress=False)
        best = train_dir / "checkpoints" / "best.safetensors"
        weights = str(best if best.is_file() else train_dir / "checkpoints" / "last.safetensors")
    prompts = {"prompts": settings.prompts} if settings.prompts and "prompts" in method_class(method).options else {}
    method_obj = build_method(method, config.backbone, weights=weights, image_size=config.image_size,
                              device=settings.device or "auto", init_seed=config.seed, **config.method_options(), **prompts)
    base = {**method_obj.describe(), "weights": weights, "trained": trained, "note": note, "config": config.to_dict()}
    # Runs of another modality than the study's t2w carry it in their label, so a report over two studies
    # (e.g. t2w and the t1c+t2w+t2f composite) shows them side by side instead of colliding.
    label = setup if config.modality == "t2w" else f"{setup}+{config.modality}"
    if prompts and settings.prompts != "industrial":
        label += f"+{Path(settings.prompts).stem}"
    if k_shot:
        label += f"+{k_shot}shot"
        by_id = {case_id_of(p): p for p in cases}
        pool_options = CaseOptions(modality=config.modality, references=settings.references, k_shot=k_shot,
                                   reference_seed=settings.seed)
        base["references"] = ReferencePool(pool_options, method_obj, [by_id[i] for i in split.train])
    variants = [("maps", label, PostOptions())]
    if settings.post != PostOptions():
        variants.append((f"maps-{variant_tag(settings.post)}", f"{label}+{variant_tag(settings.post)}", settings.post))
    pool = base.pop("references", None)
    for folder, label, post in variants:
        _infer_split(settings, method_obj, config.modality, post, cases, split.test, cell / folder, {**base, "setup": label},
                     references=pool)
    record = {**base, "setup": setup, "k_shot": k_shot, "runs": [folder for folder, _, _ in variants]}
    write_json(cell / "done.json", record)
    return record


def _run_trainfree_cell(settings: StudySettings, method: str, cell: Path, cases: list[Path], split: Any) -> dict[str, Any]:
    """A training-free method in cross-subject mode: each test case against the training split's subjects."""
    from .backbones import is_random_backbone
    from .crosssubject import method_defaults
    from .methods import build_method, method_class

    backbone, note = settings.backbone, ""
    if backbone is not None and method_class(method).default_backbone.startswith("dinov2") and not backbone.startswith(("dinov2", "tiny-dinov2")):
        if not is_random_backbone(backbone):
            raise InputError(f"{method}/{TRAINFREE_SETUP} needs a DINOv2 backbone, not {backbone!r}; drop --backbone or give a dinov2-* one")
        backbone, note = "tiny-dinov2", f"{method} needs a DINOv2 backbone: random tiny-dinov2 instead of {settings.backbone}"
        settings.log(f"note: {note}")
    probe = build_method(method, backbone, image_size=224, device=settings.device or "auto", init_seed=settings.seed)
    n_blocks = len(getattr(probe.clip, "blocks", None) or probe.clip.visual.transformer.resblocks)
    method_obj = build_method(method, backbone, device=settings.device or "auto", init_seed=settings.seed,
                              **method_defaults(method, n_blocks))
    base = {**method_obj.describe(), "weights": None, "trained": False, "note": note, "config": {"modality": settings.modality}}
    modality = settings.modality if "+" not in settings.modality else settings.modality.split("+")[0]
    label = TRAINFREE_SETUP if modality == "t2w" else f"{TRAINFREE_SETUP}+{modality}"
    by_id = {case_id_of(p): p for p in cases}
    pool = ReferencePool(CaseOptions(modality=modality, references=settings.references, reference_seed=settings.seed),
                         method_obj, [by_id[i] for i in split.train])
    _infer_split(settings, method_obj, modality, PostOptions(), cases, split.test, cell / "maps", {**base, "setup": label},
                 references=pool)
    record = {**base, "setup": TRAINFREE_SETUP, "runs": ["maps"]}
    write_json(cell / "done.json", record)
    return record


def _run_baseline_cell(settings: StudySettings, cell: Path, cases: list[Path], split: Any) -> dict[str, Any]:
    """The ``intensity`` baseline on the test split (no training, no model), with the study's variants."""
    from .methods import build_method

    method_obj = build_method(BASELINE_METHOD)
    base = {**method_obj.describe(), "weights": None, "trained": False, "note": "", "config": {"modality": settings.modality}}
    label = BASELINE_SETUP if settings.modality == "t2w" else f"{BASELINE_SETUP}+{settings.modality}"
    variants = [("maps", label, PostOptions())]
    if settings.post != PostOptions():
        variants.append((f"maps-{variant_tag(settings.post)}", f"{label}+{variant_tag(settings.post)}", settings.post))
    for folder, run_label, post in variants:
        _infer_split(settings, method_obj, settings.modality, post, cases, split.test, cell / folder, {**base, "setup": run_label})
    record = {**base, "setup": BASELINE_SETUP, "runs": [folder for folder, _, _ in variants]}
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
                 test_ids: list[str], maps_dir: Path, record: dict[str, Any], references: ReferencePool | None = None) -> None:
    """Maps, masks and per-case metrics of the test cases, plus ``infer.json`` (what ``report`` reads)."""
    shots = {} if references is None else {"references": references.options.references, "k_shot": references.options.k_shot,
                                           "reference_seed": references.options.reference_seed}
    options = CaseOptions(modality=modality, views=post.views, fuse=post.fuse, restrict_to_brain=post.restrict_to_brain,
                          smooth3d_mm=post.smooth3d_mm, min_component=post.min_component, threshold=settings.threshold,
                          batch_size=settings.batch_size, **shots)
    by_id = {case_id_of(p): p for p in cases}
    for case_id in test_ids:
        case = load_case(by_id[case_id], modalities=options.modalities_to_load)
        result = run_case(case, method_obj, options, references=references)
        write_case_outputs(result, case, maps_dir / case_id)
    write_json(maps_dir / "infer.json", {**record, **options.describe(), "cases": list(test_ids)})


def check_settings(settings: StudySettings, grid: Sequence[tuple]) -> None:
    """Every flag checked (seed, epochs, device, inference options) before anything is written."""
    from .methods import resolve_device

    resolve_device(settings.device or "auto")
    for method, setup in grid:
        if method != BASELINE_METHOD and setup != TRAINFREE_SETUP:
            resolve_device(_config(settings, method, setup.partition("+")[0]).device)
    post = settings.post
    CaseOptions(modality=settings.modality, views=post.views, fuse=post.fuse, restrict_to_brain=post.restrict_to_brain,
                smooth3d_mm=post.smooth3d_mm, min_component=post.min_component, threshold=settings.threshold,
                batch_size=settings.batch_size)  # the inference flags too (the same check _infer_split makes)


def prepare_study(settings: StudySettings) -> tuple[list[Path], Any, list[tuple]]:
    """The cases, the saved split and the grid; writes ``study.json`` (same content from every process)."""
    grid = cells(settings)
    check_settings(settings, grid)
    for note in grid_notes(settings):
        settings.log(f"note: {note}")
    settings.out.mkdir(parents=True, exist_ok=True)
    cases, split = study_split(settings)
    write_json(settings.out / "study.json", {"data": str(settings.data), "cells": [cell_id(e) for e in grid],
                                             "train_cases": split.train, "test_cases": split.test})
    return cases, split, grid


def run_one_cell(settings: StudySettings, entry: tuple, cases: list[Path], split: Any, tag: str = "") -> bool:
    """Run one grid entry unless it is done, holding its lock; returns whether it ran now.

    Raises:
        InputError: Another process holds the cell's lock (it is running that cell now).
    """
    from .worklock import hold_lock

    name, cell = cell_id(entry), settings.out / "cells" / cell_id(entry)
    label = f"{tag}{entry[0]}/{entry[1]}" if name == f"{entry[0]}-{entry[1]}" else f"{tag}{name}"
    if (cell / "done.json").is_file():
        settings.log(f"{label}: done earlier, skipped")
        return False
    with hold_lock(cell / ".lock", what=f"study cell {name}"):
        if (cell / "done.json").is_file():  # finished by another process while we waited for nothing
            settings.log(f"{label}: done earlier, skipped")
            return False
        settings.log(f"{label}: running")
        run_cell(settings, *entry, cases, split)
    return True


def finished_runs(settings: StudySettings, grid: Sequence[tuple]) -> tuple[list[Path], list[str]]:
    """The map folders of the finished cells (grid order) and the IDs of the cells not finished."""
    runs, missing = [], []
    for entry in grid:
        cell = settings.out / "cells" / cell_id(entry)
        if (cell / "done.json").is_file():
            runs.extend(cell / folder for folder in _read_runs(cell))
        else:
            missing.append(cell_id(entry))
    return runs, missing


def run_study(settings: StudySettings, only: str | None = None) -> list[Path]:
    """Run (or resume) the whole grid, or only the cell with ID ``only``; returns the finished cells' map folders."""
    cases, split, grid = prepare_study(settings)
    if only is not None:
        run_one_cell(settings, find_cell(settings, only), cases, split)
        return finished_runs(settings, [find_cell(settings, only)])[0]
    for index, entry in enumerate(grid, start=1):
        run_one_cell(settings, entry, cases, split, tag=f"[{index}/{len(grid)}] ")
    return finished_runs(settings, grid)[0]


def _read_runs(cell: Path) -> list[str]:
    import json

    return list(json.loads((cell / "done.json").read_text()).get("runs", ["maps"]))
