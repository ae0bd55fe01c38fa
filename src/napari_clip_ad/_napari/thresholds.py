"""Thresholds (Otsu, F1-max) and the numbers the threshold widget shows, from napari_clip_ad.metrics."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..atomic import write_text
from ..metrics import PixelAccumulator, dice, volume_metrics

OTSU_BINS = 256


def otsu_threshold(anomaly_map: np.ndarray, bins: int = OTSU_BINS) -> float:
    """Otsu's threshold of the scored voxels of a [0, 1] map (voxels at exactly 0 are left out).

    Exact zeros are the slices the engine skipped (no brain); including them would split
    "skipped" from "scored" instead of normal from abnormal tissue.

    Returns:
        The threshold (voxels ``>=`` it are positive), on a ``1/bins`` grid; 0.5 for a map with
        fewer than two distinct scored levels.
    """
    values = anomaly_map[anomaly_map > 0]
    counts, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    total = counts.sum()
    if total == 0:
        return 0.5
    centres = (edges[:-1] + edges[1:]) / 2
    # Splitting after bin k: class "low" holds bins 0..k, class "high" the rest.
    weight_low = np.cumsum(counts)[:-1].astype(np.float64)
    weight_high = total - weight_low
    sum_low = np.cumsum(counts * centres)[:-1]
    sum_high = float(np.dot(counts, centres)) - sum_low
    mean_low = np.divide(sum_low, weight_low, out=np.zeros_like(sum_low), where=weight_low > 0)
    mean_high = np.divide(sum_high, weight_high, out=np.zeros_like(sum_high), where=weight_high > 0)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    if not np.any(between > 0):
        return 0.5
    best = int(np.argmax(between))
    return float(edges[best + 1])


def f1max_threshold(anomaly_map: np.ndarray, ground_truth: np.ndarray) -> float:
    """The threshold of the best voxel F1 over the whole volume (= the best volume Dice).

    Computed by :class:`napari_clip_ad.metrics.PixelAccumulator`, as the evaluate command does.
    """
    accumulator = PixelAccumulator()
    accumulator.update(anomaly_map, ground_truth, source="anomaly map layer")
    threshold = accumulator.f1max_threshold()
    return 1.0 if np.isnan(threshold) else float(np.clip(threshold, 0.0, 1.0))


@dataclass
class Numbers:
    """What the threshold widget shows at one threshold."""

    threshold: float
    dice: float | None = None
    sensitivity: float | None = None
    specificity: float | None = None
    ppv: float | None = None
    tumour_voxels: int | None = None
    predicted_voxels: int = 0
    slice_index: int | None = None
    slice_dice: float | None = None

    def row(self) -> dict[str, object]:
        """Column -> value, for CSV export."""
        return {k: ("" if v is None else v) for k, v in self.__dict__.items()}


def numbers_at(mask: np.ndarray, threshold: float, ground_truth: np.ndarray | None, slice_index: int | None,
               region: np.ndarray | None = None, axis: int = 0) -> Numbers:
    """Volume metrics of ``mask`` against the ground truth (in ``region`` when given) and one slice's 2D Dice.

    The slice is ``slice_index`` along ``axis`` of the map's own grid (None or outside the grid: no slice Dice).
    """
    if ground_truth is None:
        return Numbers(threshold, predicted_voxels=int(np.count_nonzero(mask)), slice_index=slice_index)
    gt = np.asarray(ground_truth) > 0
    values = volume_metrics(mask, gt, region)
    slice_dice = None
    if slice_index is not None and 0 <= slice_index < mask.shape[axis]:
        cut = (slice(None),) * axis + (slice_index,)
        slice_dice = dice(mask[cut], gt[cut], None if region is None else region[cut])
    return Numbers(threshold, values["dice"], values["sensitivity"], values["specificity"], values["ppv"],
                   int(values["tumour_voxels"]), int(values["predicted_voxels"]), slice_index, slice_dice)


def write_numbers_csv(path: str | Path, numbers: Numbers, context: dict[str, str]) -> Path:
    """Write one header row and one value row (layer names first), atomically."""
    row = {**context, **numbers.row()}
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(row), lineterminator="\n")
    writer.writeheader()
    writer.writerow(row)
    path = Path(path)
    write_text(path, buffer.getvalue())
    return path


TP, FP, FN = 1, 2, 3
"""Error-overlay values (the study's Fig. 5 colours: TP green, FP red, FN blue)."""
OVERLAY_COLORS = {0: (0.0, 0.0, 0.0, 0.0), TP: (0.0, 0.8, 0.0, 1.0), FP: (0.9, 0.0, 0.0, 1.0), FN: (0.1, 0.3, 1.0, 1.0)}


def error_overlay(mask: np.ndarray, ground_truth: np.ndarray, region: np.ndarray | None = None,
                  out: np.ndarray | None = None) -> np.ndarray:
    """uint8 map of 1 = TP, 2 = FP, 3 = FN (0 = TN or outside ``region``) of ``mask`` against the ground truth."""
    pred = np.asarray(mask, dtype=bool)
    gt = np.asarray(ground_truth, dtype=bool)
    if out is None:
        out = np.zeros(pred.shape, dtype=np.uint8)
    # c = 2 * pred + gt is 3 = TP, 2 = FP, 1 = FN, 0 = TN; (4 - c) % 4 turns that into 1, 2, 3, 0 in place.
    np.multiply(pred.view(np.uint8), 2, out=out)
    np.add(out, gt.view(np.uint8), out=out)
    np.subtract(4, out, out=out)
    np.remainder(out, 4, out=out)
    if region is not None:
        out[~np.asarray(region, dtype=bool)] = 0
    return out


def slice_dices(mask: np.ndarray, ground_truth: np.ndarray, axis: int = 0,
                region: np.ndarray | None = None) -> np.ndarray:
    """2D Dice of every slice along ``axis`` (NaN where prediction and ground truth are both empty)."""
    pred = np.asarray(mask, dtype=bool)
    gt = np.asarray(ground_truth, dtype=bool)
    if region is not None:
        pred, gt = pred & region, gt & region
    other = tuple(i for i in range(pred.ndim) if i != axis)
    tp = np.count_nonzero(pred & gt, axis=other)
    total = np.count_nonzero(pred, axis=other) + np.count_nonzero(gt, axis=other)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, 2.0 * tp / np.maximum(total, 1), np.nan)


@dataclass
class MapScores:
    """Threshold-free scores of one map against its ground truth (computed once per map, ground truth, region)."""

    auroc: float
    f1max: float
    f1max_threshold: float
    ap: float | None = None
    aupro: float | None = None
    slice_auroc: float | None = None
    slice_ap: float | None = None


def map_scores(anomaly_map: np.ndarray, ground_truth: np.ndarray, region: np.ndarray | None = None) -> MapScores:
    """AUROC, pixel AP, AUPRO (3D regions), F1-max (+ threshold) and slice detection (map maximum per axial
    slice): :func:`napari_clip_ad.metrics.summary.map_metrics`, the definitions ``evaluate`` uses."""
    from ..metrics.summary import map_metrics

    m = map_metrics(anomaly_map, ground_truth, brain=region, region="all" if region is None else "brain")

    def value(key: str) -> float | None:
        v = m.get(key)
        return None if v is None or not np.isfinite(v) else float(v)

    return MapScores(m["auroc"], m["f1max"], m["f1max_threshold"], value("pixel_ap"), value("aupro"),
                     value("slice_auroc"), value("slice_ap"))


def average_precision_of(accumulator: PixelAccumulator) -> float | None:
    """Pixel AP of the pooled voxels (scikit-learn's step-wise definition; see docs/metrics.md)."""
    value = accumulator.average_precision()
    return None if value is None else float(value)
