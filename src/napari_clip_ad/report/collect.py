"""Score a folder of anomaly maps against a cohort: shared by ``evaluate`` and ``report``.

Maps are ``<case_id>_anomaly.nii.gz`` files saved on each case's grid (e.g. with
:func:`napari_clip_ad.io.save_volume`), matched to the cohort's cases by id. Conventions (empty
masks, thresholds, regions) are in ``docs/metrics.md``.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ..errors import InputError
from ..outputs import is_temporary
from ..io import Case, Geometry, case_id_of, find_cases, load_case, read_nifti
from ..io.slice_scores import SCORES_SUFFIX, read_axial_scores
from ..metrics import (
    SLICE_SCORE_SOURCES,
    PixelAccumulator,
    SliceDetection,
    SliceDice,
    brain_slices,
    check_scores,
    map_max_scores,
    distance_profile,
    size_dice_spearman,
    slice_dice,
    slice_labels,
    slice_positions,
    volume_metrics,
)
from ..postprocess3d import remove_small_components, restrict_to_brain
from .lesionwise import LesionWiseResult, lesion_wise_dice

MAP_SUFFIXES = ("_anomaly.nii.gz", "_anomaly.nii")
PREFERRED_MODALITIES = ("t2w", "t2f", "t1c", "t1n")
"""Only one image is loaded per case (for its grid and brain mask): the first of these that loads."""
METRIC_NAMES = ("dice", "sensitivity", "specificity", "ppv")
DISTANCE_BINS = 10
LESION_COLUMNS = ("lesion_dice", "lesion_tp", "lesion_fn", "lesion_fp")
"""Extra ``per_case.csv`` columns with ``--lesionwise``."""
LITERATURE_NAMES = ("pixel_ap", "aupro", "slice_auroc", "slice_ap")
"""Threshold-free metrics of the anomaly-detection literature, per case and pooled (after the study's)."""
AUPRO_REGIONS = "3d"
"""Volumes are scored with 3D (26-connected) ground-truth regions for AUPRO."""


@dataclass(frozen=True)
class ScoringOptions:
    """Scoring beyond the study (defaults: none; see ``docs/beyond_the_study.md``).

    Attributes:
        restrict_to_brain: Zero every map outside its case's brain mask before anything is scored.
        min_component: Drop 26-connected components under this many voxels from the thresholded mask.
        lesionwise: Also score BraTS-MET 2023 lesion-wise Dice (:func:`~napari_clip_ad.report.lesion_wise_dice`).
        slice_score: Slice detection score: ``'image'`` the method's image score from ``<case_id>_scores.json``
            (the map maximum where that file is missing), ``'max'`` always the map maximum.
    """

    restrict_to_brain: bool = False
    min_component: int = 0
    lesionwise: bool = False
    slice_score: str = "image"

    def __post_init__(self) -> None:
        if self.min_component < 0:
            raise InputError(f"--min-component {self.min_component}: give a size in voxels >= 0 (0 = keep all)")
        if self.slice_score not in SLICE_SCORE_SOURCES:
            raise InputError(f"--slice-score {self.slice_score!r}: use one of {', '.join(SLICE_SCORE_SOURCES)}")


@dataclass(frozen=True)
class MapPair:
    """A map file and the cohort case it belongs to."""

    case_id: str
    map_path: Path
    case_path: Path


@dataclass(frozen=True)
class LoadedPair:
    """Scores and masks of one case, canonical ``[z, y, x]``."""

    scores: np.ndarray
    tumour: np.ndarray
    brain: np.ndarray
    region: np.ndarray | None
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    image_scores: np.ndarray | None = None
    """The method's image score per axial slice (``<case_id>_scores.json``), when the run wrote them."""


@dataclass(frozen=True)
class CaseScore:
    """Scores of one case at the run's threshold.

    Attributes:
        case_id: Case id.
        map_name: File name of the map.
        metrics: :func:`~napari_clip_ad.metrics.volume_metrics` of the thresholded map.
        slices: 2D Dice of the slices with lesion in the ground truth or the prediction.
        positions: Normalised distance from the brain centre of each of those slices.
        lesion: Lesion-wise Dice, when asked for.
        literature: The case's :data:`LITERATURE_NAMES` (pixel AP and AUPRO of its voxels, slice AUROC/AP).
        slice_source: ``'image score'`` or ``'map max'``: what scored its slices.
    """

    case_id: str
    map_name: str
    metrics: dict[str, float | int]
    slices: SliceDice
    positions: np.ndarray
    lesion: LesionWiseResult | None = None
    literature: dict[str, float] = field(default_factory=dict)
    slice_source: str = "map max"

    @property
    def lesion_mask(self) -> np.ndarray:
        """Which of :attr:`slices` hold lesion in the ground truth."""
        return self.slices.lesion_voxels > 0

    def row(self) -> dict[str, Any]:
        """The case's ``per_case.csv`` row (see ``docs/metrics.md``)."""
        dices = self.slices.dice
        row = {"case_id": self.case_id, **self.metrics,
               "slice_dice_mean": float(dices.mean()) if dices.size else math.nan,
               "n_lesion_slices": int(np.count_nonzero(self.lesion_mask)), "map": self.map_name}
        if self.lesion is not None:
            row.update(lesion_dice=self.lesion.dice, lesion_tp=self.lesion.n_tp, lesion_fn=self.lesion.n_fn,
                       lesion_fp=self.lesion.n_fp)
        row.update(self.literature, slice_score=self.slice_source)
        return row


@dataclass
class RunScores:
    """Every case of one folder of maps, with the pooled voxels and the threshold used."""

    cases: list[CaseScore] = field(default_factory=list)
    pooled: PixelAccumulator = field(default_factory=PixelAccumulator)
    threshold: float = math.nan
    threshold_rule: str = "fixed"
    region: str = "all"
    options: ScoringOptions = field(default_factory=ScoringOptions)
    slices_detected: SliceDetection = field(default_factory=SliceDetection)


def parse_threshold(text: str) -> str | float:
    """``'f1max'`` or a number in [0, 1]; raises :class:`InputError` otherwise."""
    if text.strip().lower() == "f1max":
        return "f1max"
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 1.0:
        raise InputError(f"--threshold {text!r}: give a number in [0, 1] or 'f1max'")
    return value


def match_maps(maps_dir: Path, data_dir: Path) -> list[MapPair]:
    """Pair every ``<case_id>_anomaly.nii[.gz]`` in ``maps_dir`` with its case in ``data_dir``."""
    return match_cohort(maps_dir, data_dir)[0]


def match_cohort(maps_dir: Path, data_dir: Path) -> tuple[list[MapPair], list[str]]:
    """:func:`match_maps`, and the ids of the cohort's cases that have no map (sorted)."""
    if not maps_dir.is_dir():
        raise InputError(f"{maps_dir}: no such maps folder; give the folder holding <case_id>_anomaly.nii.gz files")
    if not data_dir.is_dir():
        raise InputError(f"{data_dir}: no such cohort folder; give the folder holding the case folders")
    cases = {case_id_of(path): path for path in find_cases(data_dir)}
    pairs = []
    for map_path in sorted(maps_dir.iterdir()):
        suffix = next((s for s in MAP_SUFFIXES if map_path.name.endswith(s)), None)
        if suffix is None or not map_path.is_file() or is_temporary(map_path):
            continue  # .tmp-<pid>-* files are another run's (or a killed run's) unfinished writes
        case_id = map_path.name[: -len(suffix)]
        if case_id not in cases:
            raise InputError(f"{map_path}: no case {case_id!r} in {data_dir}; remove the map or add the case")
        pairs.append(MapPair(case_id, map_path, cases[case_id]))
    if not pairs:
        raise InputError(f"{maps_dir}: no <case_id>_anomaly.nii.gz map found; run inference first or check the folder")
    matched = {pair.case_id for pair in pairs}
    return pairs, sorted(case_id for case_id in cases if case_id not in matched)


def load_case_for_scoring(path: Path) -> Case:
    """Load a case with one image (the first of :data:`PREFERRED_MODALITIES` present) and its labels."""
    errors: list[InputError] = []
    for modality in PREFERRED_MODALITIES:
        try:
            return load_case(path, modalities=[modality])
        except InputError as exc:
            errors.append(exc)
    # Show a real fault (corrupt file, bad labels) rather than "modality not found".
    raise next((e for e in errors if "none of the requested modalities" not in str(e)), errors[0])


def load_pair(pair: MapPair, region: str, restrict: bool = False) -> LoadedPair:
    """Read a map and its case; checks grid, score range, segmentation and brain mask.

    With ``restrict`` the map is zeroed outside the brain mask (after the range check).
    """
    case = load_case_for_scoring(pair.case_path)
    if case.seg is None:
        raise InputError(f"{pair.case_path}: case {pair.case_id} has no segmentation; evaluation needs ground truth")
    data, img = read_nifti(pair.map_path)
    if not Geometry.from_image(img).same_grid(case.geometry):
        raise InputError(f"{pair.map_path}: shape {tuple(img.shape)} or affine differs from case {pair.case_id}'s "
                         f"grid {case.geometry.source_shape}; save maps with save_volume(map, like=case, path)")
    scores = np.ascontiguousarray(case.geometry.to_canonical(np.asarray(data, dtype=np.float32)))
    check_scores(scores, str(pair.map_path))
    if not case.brain_mask.any():
        raise InputError(f"{pair.case_path}: case {pair.case_id}: brain mask is empty (all-zero image or mask), so nothing "
                         "can be scored; check the case files or the mask")
    brain = case.brain_mask
    if restrict:
        scores = restrict_to_brain(scores, brain)
    image_scores = read_axial_scores(pair.map_path.parent / f"{pair.case_id}{SCORES_SUFFIX}", scores.shape[0])
    return LoadedPair(scores, case.whole_tumour, brain, brain if region == "brain" else None, case.spacing,
                      image_scores)


def detect_slices(loaded: LoadedPair, slice_score: str = "image") -> tuple[SliceDetection, str]:
    """Slice-level detection data of one case: its brain slices' scores and labels, and the score used."""
    keep = brain_slices(loaded.brain)
    if slice_score == "image" and loaded.image_scores is not None:
        scores, source = loaded.image_scores, "image score"
    else:
        scores, source = map_max_scores(loaded.scores, loaded.region), "map max"
    detection = SliceDetection()
    detection.update(scores[keep], slice_labels(loaded.tumour, loaded.region)[keep])
    return detection, source


def score_case(pair: MapPair, loaded: LoadedPair, threshold: float, options: ScoringOptions | None = None,
               pixels: PixelAccumulator | None = None, detection: tuple[SliceDetection, str] | None = None) -> CaseScore:
    """Volume metrics and slice Dice of one case at ``threshold`` (voxels ``>=`` it are tumour).

    ``options.min_component`` cleans the thresholded mask; ``options.lesionwise`` adds lesion-wise
    Dice (on the mask and tumour inside the region, when one is given). ``pixels`` (the case's
    voxels pooled) and ``detection`` (:func:`detect_slices`) are computed when not given.
    """
    options = options or ScoringOptions()
    if pixels is None:
        pixels = PixelAccumulator()
        pixels.update(loaded.scores, loaded.tumour, loaded.region, source=str(pair.map_path), regions=AUPRO_REGIONS)
    slices_detected, slice_source = detection or detect_slices(loaded, options.slice_score)
    slice_auroc, slice_ap = slices_detected.auroc_ap()
    literature = {"pixel_ap": pixels.average_precision(), "aupro": pixels.aupro(),
                  "slice_auroc": slice_auroc, "slice_ap": slice_ap}
    predicted = loaded.scores >= threshold
    if options.min_component > 0:
        predicted = remove_small_components(predicted, min_voxels=options.min_component)
    slices = slice_dice(predicted, loaded.tumour, loaded.region)
    positions = slice_positions(loaded.brain)[slices.index]
    lesion = None
    if options.lesionwise:
        pred, gt = predicted, loaded.tumour
        if loaded.region is not None:
            pred, gt = pred & loaded.region, gt & loaded.region
        lesion = lesion_wise_dice(pred, gt, spacing=loaded.spacing)
    return CaseScore(pair.case_id, pair.map_path.name, volume_metrics(predicted, loaded.tumour, loaded.region),
                     slices, positions, lesion, literature, slice_source)


def score_maps(pairs: list[MapPair], threshold_rule: str | float, region: str, data_dir: Path,
               what: str = "", options: ScoringOptions | None = None) -> RunScores:
    """Score every pair; with ``'f1max'`` the threshold is the pooled F1-max one (a first pass pools).

    ``options`` (default: none) restricts maps to the brain before pooling and scoring, and cleans
    masks or adds lesion-wise Dice per case (pooled AUROC / F1-max use the scores, not the masks).

    Raises:
        InputError: Bad map or case, or no tumour voxel at all under ``'f1max'``.
    """
    options = options or ScoringOptions()
    run = RunScores(threshold_rule="f1max" if threshold_rule == "f1max" else "fixed", region=region, options=options)
    if threshold_rule == "f1max":
        for pair in _progress(pairs, f"{what}pooling (F1-max threshold)"):
            loaded = load_pair(pair, region, options.restrict_to_brain)
            run.pooled.update(loaded.scores, loaded.tumour, loaded.region, source=str(pair.map_path),
                              regions=AUPRO_REGIONS)
        run.threshold = run.pooled.f1max_threshold()
        if math.isnan(run.threshold):
            raise InputError(f"{data_dir}: no tumour voxel in any segmentation; "
                             "the F1-max threshold is undefined, give a number to --threshold")
    else:
        run.threshold = float(threshold_rule)
    for pair in _progress(pairs, f"{what}evaluating"):
        loaded = load_pair(pair, region, options.restrict_to_brain)
        pixels = PixelAccumulator(run.pooled.bins, run.pooled.exact_limit)
        pixels.update(loaded.scores, loaded.tumour, loaded.region, source=str(pair.map_path), regions=AUPRO_REGIONS)
        if threshold_rule != "f1max":
            run.pooled.merge(pixels)
        detection = detect_slices(loaded, options.slice_score)
        run.slices_detected.merge(detection[0])
        run.cases.append(score_case(pair, loaded, run.threshold, options, pixels, detection))
    return run


def lesion_slices(run: RunScores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pooled ``(distances, dices, lesion_voxels)`` of every slice with ground-truth lesion."""
    keep = [case.lesion_mask for case in run.cases]
    return (np.concatenate([c.positions[k] for c, k in zip(run.cases, keep)]),
            np.concatenate([c.slices.dice[k] for c, k in zip(run.cases, keep)]),
            np.concatenate([c.slices.lesion_voxels[k] for c, k in zip(run.cases, keep)]))


def summarise(run: RunScores) -> dict[str, Any]:
    """The ``summary.json`` of a run (NaN written as ``None``; see ``docs/metrics.md``)."""
    summary: dict[str, Any] = {}
    for name in METRIC_NAMES:
        values = np.array([case.metrics[name] for case in run.cases], dtype=np.float64)
        summary[f"{name}_mean"] = float(values.mean())
        summary[f"{name}_sd"] = float(values.std(ddof=1)) if values.size > 1 else None
    pooled = run.pooled
    summary.update(
        auroc=pooled.auroc(), f1max=pooled.f1max(), f1max_threshold=pooled.f1max_threshold(),
        pooled_exact=pooled.is_exact, pooled_voxels=pooled.n_voxels,
        threshold=run.threshold, threshold_rule=run.threshold_rule,
        region=run.region, n_cases=len(run.cases),
        restrict_to_brain=run.options.restrict_to_brain, min_component=run.options.min_component,
        lesionwise=run.options.lesionwise,
    )
    summary.update(literature_summary(run))
    if run.options.lesionwise:
        values = np.array([case.lesion.dice for case in run.cases], dtype=np.float64)
        summary["lesion_dice_mean"] = float(values.mean())
        summary["lesion_dice_sd"] = float(values.std(ddof=1)) if values.size > 1 else None
        summary["lesion_counts"] = {key: int(sum(getattr(case.lesion, f"n_{key}") for case in run.cases))
                                    for key in ("tp", "fn", "fp", "ignored")}
    distances, dices, sizes = lesion_slices(run)
    rho, p = size_dice_spearman(sizes, dices)
    summary["slice_size_dice_spearman"] = {"rho": rho, "p": p, "n_slices": int(dices.size)}
    case_sizes = [case.metrics["tumour_voxels"] for case in run.cases]
    rho, p = size_dice_spearman(case_sizes, [case.metrics["dice"] for case in run.cases])
    summary["case_size_dice_spearman"] = {"rho": rho, "p": p, "n_cases": len(case_sizes)}
    profile = distance_profile(distances, dices, bins=DISTANCE_BINS)
    summary["distance_profile"] = {"edges": np.round(profile.edges, 12).tolist(), "mean_dice": profile.mean_dice.tolist(),
                                   "n_lesion_slices": profile.n_slices.tolist()}
    return nan_to_none(summary)


def literature_summary(run: RunScores) -> dict[str, Any]:
    """Pooled pixel AP, AUPRO (3D regions), Dice at the F1-max threshold and slice-level AUROC / AP of a run.

    ``slice_score`` says what scored the slices: ``'image score'`` (every case had ``_scores.json``),
    ``'map max'`` (none had, or ``--slice-score max``), or ``'mixed'``; ``slice_score_cases`` counts each.
    """
    pooled, detected = run.pooled, run.slices_detected
    slice_auroc, slice_ap = detected.auroc_ap()
    sources = [case.slice_source for case in run.cases]
    counts = {name: sources.count(name) for name in ("image score", "map max")}
    used = [name for name, n in counts.items() if n]
    return {
        "pixel_ap": pooled.average_precision(), "aupro": pooled.aupro(), "slice_auroc": slice_auroc, "slice_ap": slice_ap,
        # Dice of all pooled voxels at the pooled F1-max threshold is F1 there: equal to f1max by definition.
        "dice_f1max": pooled.f1max(),
        "auroc_bound": pooled.auroc_bound(), "pixel_ap_bound": pooled.average_precision_bound(),
        "aupro_bound": pooled.aupro_bound(), "aupro_regions": AUPRO_REGIONS, "aupro_fpr_limit": 0.3,
        "n_regions": pooled.n_regions,
        "slice_score": used[0] if len(used) == 1 else ("mixed" if used else None), "slice_score_cases": counts,
        "slices_scored": detected.n_slices, "slices_with_lesion": detected.n_positive,
    }


def nan_to_none(value: Any) -> Any:
    """Replace NaN floats (also nested in dicts and lists) by ``None`` for JSON."""
    if isinstance(value, dict):
        return {k: nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [nan_to_none(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _progress(pairs: Iterable[MapPair], what: str) -> tqdm:
    # disable=None: a bar only on a terminal, so piped stderr keeps just the one-line errors.
    return tqdm(pairs, desc=what, unit="case", file=sys.stderr, disable=None, leave=False)


RANDOM_WEIGHTS_LABEL = "random weights"
RUN_OPTION_KEYS = ("modality", "views", "fuse", "restrict_to_brain", "smooth3d_mm", "min_component")
"""``infer.json`` keys shown with each run (missing ones are empty)."""


@dataclass(frozen=True)
class RunInfo:
    """One inference run (a method in a setup): its folder and provenance from ``infer.json``."""

    path: Path
    method: str
    setup: str
    backbone: str
    random_weights: bool
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """``method / setup`` for labels."""
        return f"{self.method} / {self.setup}"


def read_run(path: Path, setup: str | None = None) -> RunInfo:
    """Read a run folder's ``infer.json``; the setup comes from it, else ``setup``, else ``<method>-<setup>`` names.

    Raises:
        InputError: Not a folder, unreadable ``infer.json``, or no way to tell the method or setup.
    """
    import json

    if not path.is_dir():
        raise InputError(f"{path}: no such run folder; give folders written by 'napari-clip-ad infer'")
    info: dict[str, Any] = {}
    meta = path / "infer.json"
    if meta.is_file():
        try:
            info = json.loads(meta.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InputError(f"{meta}: not readable JSON ({exc}); rerun inference or fix the file") from None
        if not isinstance(info, dict):
            raise InputError(f"{meta}: expected a JSON object; rerun inference or fix the file")
    name = path.resolve().name
    method = str(info.get("method") or name.split("-", 1)[0])
    chosen = info.get("setup") or setup
    if not chosen and name.lower().startswith(method.lower() + "-") and len(name) > len(method) + 1:
        chosen = name[len(method) + 1:]
    if not chosen:
        raise InputError(f"{path}: cannot tell the run's setup (no 'setup' in infer.json, folder not named "
                         f"<method>-<setup>); give --setup or rename the folder, e.g. {method}-industrial")
    backbone = str(info.get("backbone") or "unknown")
    random_weights = bool(info.get("random_weights")) or RANDOM_WEIGHTS_LABEL in backbone.lower()
    options = {key: info.get(key) for key in RUN_OPTION_KEYS}
    if options["views"] is None and info.get("axis"):
        options["views"] = info["axis"]  # runs written before --views
    return RunInfo(path, method, str(chosen), backbone, random_weights, options)
