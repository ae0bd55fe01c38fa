"""Thresholds and numbers of the threshold widget, checked against napari_clip_ad.metrics and brute force."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from napari_clip_ad.metrics import dice, volume_metrics
from napari_clip_ad._napari.layers import threshold_mask
from napari_clip_ad._napari.thresholds import f1max_threshold, numbers_at, otsu_threshold, write_numbers_csv


def _bimodal(rng: np.random.Generator) -> np.ndarray:
    low = rng.normal(0.2, 0.05, 6000)
    high = rng.normal(0.75, 0.05, 2000)
    return np.clip(np.concatenate([low, high]), 0.001, 1.0).astype(np.float32)


def test_otsu_splits_two_modes_and_maximises_between_class_variance() -> None:
    values = _bimodal(np.random.default_rng(0))
    threshold = otsu_threshold(values)
    assert 0.35 < threshold < 0.6
    # Brute force over the same 256-bin grid: no other split has a larger between-class variance.
    def between(t: float) -> float:
        low, high = values[values < t], values[values >= t]
        return low.size * high.size * (low.mean() - high.mean()) ** 2 if low.size and high.size else 0.0

    edges = np.arange(1, 256) / 256
    best = max(between(t) for t in edges)
    assert between(threshold) >= 0.999 * best


def test_otsu_ignores_unscored_zeros_and_handles_flat_maps() -> None:
    values = _bimodal(np.random.default_rng(1))
    with_skipped = np.concatenate([values, np.zeros(50_000, np.float32)])
    assert otsu_threshold(with_skipped) == otsu_threshold(values)
    assert otsu_threshold(np.zeros((4, 4), np.float32)) == 0.5
    assert otsu_threshold(np.full((4, 4), 0.3, np.float32)) == 0.5


def test_f1max_threshold_gives_the_best_volume_dice() -> None:
    rng = np.random.default_rng(2)
    gt = np.zeros((6, 20, 20), bool)
    gt[2:4, 5:12, 6:14] = True
    anomaly_map = np.clip(0.6 * gt + rng.uniform(0, 0.5, gt.shape), 0, 1).astype(np.float32)
    threshold = f1max_threshold(anomaly_map, gt)
    best = max(dice(anomaly_map >= t, gt) for t in np.unique(anomaly_map))
    assert dice(anomaly_map >= threshold, gt) == pytest.approx(best, abs=1e-12)


def test_numbers_are_exactly_the_package_metrics() -> None:
    rng = np.random.default_rng(3)
    gt = rng.random((5, 16, 16)) > 0.8
    mask = threshold_mask(rng.random((5, 16, 16)).astype(np.float32), 0.6)
    numbers = numbers_at(mask, 0.6, gt.astype(np.int16) * 2, slice_index=3)
    expected = volume_metrics(mask.astype(bool), gt)
    assert (numbers.dice, numbers.sensitivity, numbers.specificity, numbers.ppv) == (
        expected["dice"], expected["sensitivity"], expected["specificity"], expected["ppv"])
    assert numbers.slice_dice == dice(mask[3], gt[3])
    assert numbers_at(mask, 0.6, gt, slice_index=99).slice_dice is None
    without_gt = numbers_at(mask, 0.6, None, slice_index=0)
    assert without_gt.dice is None and without_gt.predicted_voxels == int(mask.sum())


def test_threshold_mask_follows_the_ge_convention() -> None:
    anomaly_map = np.array([0.0, 0.49, 0.5, 0.51, 1.0], np.float32)
    np.testing.assert_array_equal(threshold_mask(anomaly_map, 0.5), [0, 0, 1, 1, 1])
    assert threshold_mask(anomaly_map, 0.5).dtype == np.uint8


def test_csv_export_holds_one_row_of_numbers(tmp_path: Path) -> None:
    gt = np.zeros((2, 4, 4), bool)
    gt[0, :2] = True
    mask = gt.astype(np.uint8)
    mask[1, 0, 0] = 1
    numbers = numbers_at(mask, 0.42, gt, slice_index=0)
    path = write_numbers_csv(tmp_path / "m.csv", numbers, {"anomaly_map": "map", "ground_truth": "seg"})
    rows = list(csv.DictReader(path.open()))
    assert len(rows) == 1
    row = rows[0]
    assert row["anomaly_map"] == "map" and row["ground_truth"] == "seg"
    assert float(row["threshold"]) == 0.42 and float(row["dice"]) == numbers.dice and float(row["slice_dice"]) == 1.0
    assert int(row["tumour_voxels"]) == 8 and int(row["predicted_voxels"]) == 9
