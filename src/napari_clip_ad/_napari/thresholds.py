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


def numbers_at(mask: np.ndarray, threshold: float, ground_truth: np.ndarray | None, slice_index: int | None) -> Numbers:
    """Volume metrics of ``mask`` against the ground truth and the 2D Dice of one axial slice."""
    if ground_truth is None:
        return Numbers(threshold, predicted_voxels=int(np.count_nonzero(mask)), slice_index=slice_index)
    gt = np.asarray(ground_truth) > 0
    values = volume_metrics(mask, gt)
    slice_dice = None
    if slice_index is not None and 0 <= slice_index < mask.shape[0]:
        slice_dice = dice(mask[slice_index], gt[slice_index])
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
