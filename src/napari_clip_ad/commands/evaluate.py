"""``napari-clip-ad evaluate``: score anomaly maps of a cohort against its ground truth.

Maps are ``<case_id>_anomaly.nii.gz`` files saved on each case's grid (e.g. with
:func:`napari_clip_ad.io.save_volume`). Writes ``per_case.csv`` and ``summary.json`` (see
``docs/metrics.md`` for every column, key and convention), only once every case has been scored.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ..atomic import write_json, write_text
from ..errors import InputError
from ..io import Case, Geometry, case_id_of, find_cases, load_case, read_nifti
from ..metrics import PixelAccumulator, check_scores, distance_profile, size_dice_spearman, slice_dice, slice_positions, volume_metrics

MAP_SUFFIXES = ("_anomaly.nii.gz", "_anomaly.nii")
PREFERRED_MODALITIES = ("t2w", "t2f", "t1c", "t1n")
"""Only one image is loaded per case (for its grid and brain mask): the first of these that loads."""
METRIC_NAMES = ("dice", "sensitivity", "specificity", "ppv")
CSV_COLUMNS = ("case_id", *METRIC_NAMES, "tumour_voxels", "predicted_voxels", "slice_dice_mean", "n_lesion_slices", "map")
DISTANCE_BINS = 10


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``evaluate`` command."""
    parser = subparsers.add_parser(
        "evaluate",
        help="score anomaly maps against a cohort's segmentations (Dice, sensitivity, ..., AUROC, F1-max)",
        description="Score <case_id>_anomaly.nii.gz maps (values in [0, 1]) against the whole-tumour "
        "masks of the cases in --data. Writes per_case.csv and summary.json to --out.",
    )
    parser.add_argument("--maps", required=True, type=Path, metavar="MAPS_DIR", help="folder of <case_id>_anomaly.nii.gz maps")
    parser.add_argument("--data", required=True, type=Path, metavar="COHORT_DIR", help="cohort folder (case folders with segmentations)")
    parser.add_argument("--threshold", default="0.5", metavar="0.5|f1max",
                        help="a number in [0, 1] (voxels >= it are tumour), or 'f1max' for the pooled F1-max threshold (default 0.5)")
    parser.add_argument("--region", choices=("all", "brain"), default="all",
                        help="voxels scored: all voxels (as the reference code does) or the brain mask only (default all)")
    parser.add_argument("--out", required=True, type=Path, metavar="OUT_DIR", help="output folder for per_case.csv and summary.json")
    parser.set_defaults(func=run)


@dataclass
class _Pair:
    case_id: str
    map_path: Path
    case_path: Path


@dataclass
class _Loaded:
    scores: np.ndarray
    tumour: np.ndarray
    brain: np.ndarray
    region: np.ndarray | None


@dataclass
class _Results:
    rows: list[dict[str, Any]] = field(default_factory=list)
    slice_distance: list[np.ndarray] = field(default_factory=list)
    slice_dice: list[np.ndarray] = field(default_factory=list)
    slice_size: list[np.ndarray] = field(default_factory=list)


def run(args: argparse.Namespace) -> int:
    """Evaluate every map; returns 0 (user errors raise :class:`InputError`)."""
    threshold_rule = _parse_threshold(args.threshold)
    if args.out.exists() and not args.out.is_dir():
        raise InputError(f"{args.out}: exists and is not a folder; give a folder for --out")
    pairs = _match_maps(args.maps, args.data)
    pooled = PixelAccumulator()
    if threshold_rule == "f1max":
        for pair in _progress(pairs, "pooling (F1-max threshold)"):
            loaded = _load(pair, args.region)
            pooled.update(loaded.scores, loaded.tumour, loaded.region, source=str(pair.map_path))
        threshold = pooled.f1max_threshold()
        if math.isnan(threshold):
            raise InputError(f"{args.data}: no tumour voxel in any segmentation; the F1-max threshold is undefined, give a number to --threshold")
    else:
        threshold = float(threshold_rule)
    results = _Results()
    for pair in _progress(pairs, "evaluating"):
        loaded = _load(pair, args.region)
        if threshold_rule != "f1max":
            pooled.update(loaded.scores, loaded.tumour, loaded.region, source=str(pair.map_path))
        _score_case(pair, loaded, threshold, results)
    summary = _summary(results, pooled, threshold, threshold_rule, args.region)
    write_text(args.out / "per_case.csv", _csv(results.rows))
    write_json(args.out / "summary.json", summary)
    print(f"evaluated {len(pairs)} cases: dice {summary['dice_mean']:.4f}, AUROC {_fmt(summary['auroc'])}, "
          f"F1-max {_fmt(summary['f1max'])} -> {args.out}")
    return 0


def _parse_threshold(text: str) -> str | float:
    if text.strip().lower() == "f1max":
        return "f1max"
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 1.0:
        raise InputError(f"--threshold {text!r}: give a number in [0, 1] or 'f1max'")
    return value


def _match_maps(maps_dir: Path, data_dir: Path) -> list[_Pair]:
    if not maps_dir.is_dir():
        raise InputError(f"{maps_dir}: no such maps folder; give the folder holding <case_id>_anomaly.nii.gz files")
    if not data_dir.is_dir():
        raise InputError(f"{data_dir}: no such cohort folder; give the folder holding the case folders")
    cases = {case_id_of(path): path for path in find_cases(data_dir)}
    pairs = []
    for map_path in sorted(maps_dir.iterdir()):
        suffix = next((s for s in MAP_SUFFIXES if map_path.name.endswith(s)), None)
        if suffix is None or not map_path.is_file():
            continue
        case_id = map_path.name[: -len(suffix)]
        if case_id not in cases:
            raise InputError(f"{map_path}: no case {case_id!r} in {data_dir}; remove the map or add the case")
        pairs.append(_Pair(case_id, map_path, cases[case_id]))
    if not pairs:
        raise InputError(f"{maps_dir}: no <case_id>_anomaly.nii.gz map found; run inference first or check the folder")
    return pairs


def _load_case(path: Path) -> Case:
    errors: list[InputError] = []
    for modality in PREFERRED_MODALITIES:
        try:
            return load_case(path, modalities=[modality])
        except InputError as exc:
            errors.append(exc)
    # Show a real fault (corrupt file, bad labels) rather than "modality not found".
    raise next((e for e in errors if "none of the requested modalities" not in str(e)), errors[0])


def _load(pair: _Pair, region: str) -> _Loaded:
    case = _load_case(pair.case_path)
    if case.seg is None:
        raise InputError(f"{pair.case_path}: case {pair.case_id} has no segmentation; evaluation needs ground truth")
    data, img = read_nifti(pair.map_path)
    if not Geometry.from_image(img).same_grid(case.geometry):
        raise InputError(f"{pair.map_path}: shape {tuple(img.shape)} or affine differs from case {pair.case_id}'s "
                         f"grid {case.geometry.source_shape}; save maps with save_volume(map, like=case, path)")
    scores = np.ascontiguousarray(case.geometry.to_canonical(np.asarray(data, dtype=np.float32)))
    check_scores(scores, str(pair.map_path))
    if not case.brain_mask.any():
        raise InputError(f"{pair.case_path}: brain mask of case {pair.case_id} is empty (all-zero image); check the case files")
    brain = case.brain_mask
    return _Loaded(scores, case.whole_tumour, brain, brain if region == "brain" else None)


def _score_case(pair: _Pair, loaded: _Loaded, threshold: float, results: _Results) -> None:
    predicted = loaded.scores >= threshold
    row: dict[str, Any] = {"case_id": pair.case_id, **volume_metrics(predicted, loaded.tumour, loaded.region)}
    slices = slice_dice(predicted, loaded.tumour, loaded.region)
    row["slice_dice_mean"] = float(slices.dice.mean()) if slices.dice.size else math.nan
    lesion = slices.lesion_slices()
    row["n_lesion_slices"] = int(lesion.index.size)
    row["map"] = pair.map_path.name
    results.rows.append(row)
    results.slice_distance.append(slice_positions(loaded.brain)[lesion.index])
    results.slice_dice.append(lesion.dice)
    results.slice_size.append(lesion.lesion_voxels)


def _summary(results: _Results, pooled: PixelAccumulator, threshold: float, rule: str | float, region: str) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for name in METRIC_NAMES:
        values = np.array([row[name] for row in results.rows], dtype=np.float64)
        summary[f"{name}_mean"] = float(values.mean())
        summary[f"{name}_sd"] = float(values.std(ddof=1)) if values.size > 1 else None
    summary.update(
        auroc=pooled.auroc(), f1max=pooled.f1max(), f1max_threshold=pooled.f1max_threshold(),
        pooled_exact=pooled.is_exact, pooled_voxels=pooled.n_voxels,
        threshold=threshold, threshold_rule="f1max" if rule == "f1max" else "fixed",
        region=region, n_cases=len(results.rows),
    )
    distances, dices, sizes = (np.concatenate(parts) for parts in
                               (results.slice_distance, results.slice_dice, results.slice_size))
    rho, p = size_dice_spearman(sizes, dices)
    summary["slice_size_dice_spearman"] = {"rho": rho, "p": p, "n_slices": int(dices.size)}
    case_sizes = [row["tumour_voxels"] for row in results.rows]
    rho, p = size_dice_spearman(case_sizes, [row["dice"] for row in results.rows])
    summary["case_size_dice_spearman"] = {"rho": rho, "p": p, "n_cases": len(case_sizes)}
    profile = distance_profile(distances, dices, bins=DISTANCE_BINS)
    summary["distance_profile"] = {"edges": np.round(profile.edges, 12).tolist(), "mean_dice": profile.mean_dice.tolist(),
                                   "n_lesion_slices": profile.n_slices.tolist()}
    return _nan_to_none(summary)


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: repr(v) if isinstance(v, float) else v for k, v in row.items()})
    return buffer.getvalue()


def _progress(pairs: list[_Pair], what: str) -> tqdm:
    # disable=None: a bar only on a terminal, so piped stderr keeps just the one-line errors.
    return tqdm(pairs, desc=what, unit="case", file=sys.stderr, disable=None, leave=False)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
