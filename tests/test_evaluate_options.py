"""``napari-clip-ad evaluate`` / ``report`` options beyond the study, on the real BraTS 2023 cases.

Maps are built from each case's ground truth (a blurred, shifted tumour, scattered false-positive
blobs of several sizes inside the brain and scores outside it) and written with ``save_volume``;
every option's output is checked against the metric functions applied directly.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from napari_clip_ad.cli import main
from napari_clip_ad.io import find_cases, load_case, save_volume
from napari_clip_ad.metrics import PixelAccumulator, volume_metrics
from napari_clip_ad.report import lesion_wise_dice

BLOB_SIZES = (1, 2, 3, 4)
"""Edge lengths of the cubic false-positive blobs (1, 8, 27, 64 voxels)."""


def blob_map(case, seed: int) -> np.ndarray:
    """A [0, 1] map: the tumour blurred and shifted, cubes of 1-64 voxels in the brain, scores outside it."""
    rng = np.random.default_rng(seed)
    tumour, brain = case.whole_tumour, case.brain_mask
    scores = 0.9 * ndimage.gaussian_filter(np.roll(tumour, 2, axis=2).astype(np.float32), 1.0)
    candidates = np.argwhere(brain & ~ndimage.binary_dilation(tumour, iterations=8))
    for k, corner in enumerate(candidates[rng.choice(len(candidates), 24, replace=False)]):
        edge = BLOB_SIZES[k % len(BLOB_SIZES)]
        scores[tuple(slice(c, c + edge) for c in corner)] = rng.uniform(0.6, 1.0)
    outside = np.argwhere(~ndimage.binary_dilation(brain, iterations=3))
    for corner in outside[rng.choice(len(outside), 12, replace=False)]:
        scores[tuple(slice(c, c + 3) for c in corner)] = 0.7
    return np.clip(scores, 0, 1).astype(np.float32)


def read_csv(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as handle:
        return {row["case_id"]: row for row in csv.DictReader(handle)}


def evaluate(maps: Path, data: Path, out: Path, *extra: str) -> tuple[dict[str, dict[str, str]], dict]:
    assert main(["evaluate", "--maps", str(maps), "--data", str(data), "--out", str(out), *extra]) == 0
    return read_csv(out / "per_case.csv"), json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def cohort(shared_data):
    return shared_data / "brats2023"


@pytest.fixture(scope="module")
def scored_cases(cohort):
    """Each case as evaluate loads it (t2w only: its brain mask is t2w's nonzero voxels)."""
    return {path.name: load_case(path, modalities=["t2w"]) for path in find_cases(cohort)}


@pytest.fixture(scope="module")
def maps(scored_cases, tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    folder = tmp_path_factory.mktemp("run") / "vand-blobs"
    built = {}
    for seed, (case_id, case) in enumerate(scored_cases.items()):
        built[case_id] = blob_map(case, seed)
        save_volume(built[case_id], case, folder / f"{case_id}_anomaly.nii.gz")
    return folder, built


@pytest.fixture(scope="module")
def plain(maps, cohort, tmp_path_factory):
    return evaluate(maps[0], cohort, tmp_path_factory.mktemp("plain"))


@pytest.fixture(scope="module")
def lesionwise(maps, cohort, tmp_path_factory):
    return evaluate(maps[0], cohort, tmp_path_factory.mktemp("lesionwise"), "--lesionwise")


def test_lesionwise_equals_lesion_wise_dice(maps, scored_cases, plain, lesionwise):
    rows, summary = lesionwise
    plain_rows, plain_summary = plain
    expected = []
    for case_id, case in scored_cases.items():
        result = lesion_wise_dice(maps[1][case_id] >= 0.5, case.whole_tumour, spacing=case.spacing)
        row = rows[case_id]
        assert float(row["lesion_dice"]) == pytest.approx(result.dice, abs=1e-12)
        assert (int(row["lesion_tp"]), int(row["lesion_fn"]), int(row["lesion_fp"])) == (result.n_tp, result.n_fn, result.n_fp)
        assert result.n_fp >= 24 and float(row["lesion_dice"]) < float(row["dice"])  # the blobs are false positives
        assert {k: v for k, v in row.items() if not k.startswith("lesion_")} == plain_rows[case_id]
        expected.append(result.dice)
    assert summary["lesion_dice_mean"] == pytest.approx(np.mean(expected), abs=1e-12)
    assert summary["lesion_dice_sd"] == pytest.approx(np.std(expected, ddof=1), abs=1e-12)
    assert summary["lesionwise"] is True and plain_summary["lesionwise"] is False
    assert "lesion_dice_mean" not in plain_summary and "lesion_dice" not in next(iter(plain_rows.values()))
    assert {k: v for k, v in summary.items() if not k.startswith("lesion_")} == {**plain_summary, "lesionwise": True}


def test_restrict_to_brain_equals_maps_zeroed_outside(maps, scored_cases, cohort, plain, tmp_path):
    zeroed = tmp_path / "zeroed"
    for case_id, case in scored_cases.items():
        save_volume(np.where(case.brain_mask, maps[1][case_id], 0).astype(np.float32), case, zeroed / f"{case_id}_anomaly.nii.gz")
    rows, summary = evaluate(maps[0], cohort, tmp_path / "restricted", "--restrict-to-brain")
    expected_rows, expected_summary = evaluate(zeroed, cohort, tmp_path / "expected")
    assert rows == expected_rows
    assert summary == {**expected_summary, "restrict_to_brain": True}
    plain_rows, plain_summary = plain
    for case_id in scored_cases:
        assert int(rows[case_id]["predicted_voxels"]) < int(plain_rows[case_id]["predicted_voxels"])
        assert float(rows[case_id]["ppv"]) > float(plain_rows[case_id]["ppv"])
    assert summary["auroc"] != plain_summary["auroc"]


def test_min_component_drops_small_components_from_the_mask(maps, scored_cases, cohort, plain, tmp_path):
    rows, summary = evaluate(maps[0], cohort, tmp_path, "--min-component", "27")
    plain_rows, plain_summary = plain
    for case_id, case in scored_cases.items():
        labels, _ = ndimage.label(maps[1][case_id] >= 0.5, structure=np.ones((3, 3, 3), bool))
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        kept = sizes[labels] >= 27
        metrics = volume_metrics(kept, case.whole_tumour)
        for key in ("dice", "sensitivity", "specificity", "ppv", "predicted_voxels"):
            assert float(rows[case_id][key]) == pytest.approx(metrics[key], abs=1e-12)
        assert int(rows[case_id]["predicted_voxels"]) < int(plain_rows[case_id]["predicted_voxels"])
    # The pooled scores are not masks: AUROC and F1-max do not change.
    assert (summary["auroc"], summary["f1max"]) == (plain_summary["auroc"], plain_summary["f1max"])
    assert summary["min_component"] == 27 and plain_summary["min_component"] == 0


def test_bad_min_component_exits_2(maps, cohort, tmp_path, capsys):
    assert main(["evaluate", "--maps", str(maps[0]), "--data", str(cohort), "--out", str(tmp_path / "o"),
                 "--min-component", "-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--min-component" in err and "\n" not in err and not (tmp_path / "o").exists()


def test_report_lesionwise_columns_follow_table1(maps, cohort, lesionwise, tmp_path):
    assert main(["report", str(maps[0]), "--data", str(cohort), "--out", str(tmp_path), "--lesionwise"]) == 0
    with open(tmp_path / "table1.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
    assert reader.fieldnames == ["method", "setup", "dice_mean", "dice_sd", "sensitivity_mean", "sensitivity_sd",
                                 "specificity_mean", "specificity_sd", "ppv_mean", "ppv_sd", "auroc", "f1max",
                                 "pixel_ap", "aupro", "slice_auroc", "slice_ap",
                                 "lesion_dice_mean", "lesion_dice_sd"]
    _, summary = lesionwise
    assert (rows[0]["method"], rows[0]["setup"]) == ("vand", "blobs")
    for key in ("lesion_dice_mean", "lesion_dice_sd", "dice_mean", "auroc"):
        assert float(rows[0][key]) == pytest.approx(summary[key], abs=1e-12)
    assert "Lesion-wise Dice" in (tmp_path / "report.md").read_text()
    pooled = PixelAccumulator()
    for path in find_cases(cohort):
        case = load_case(path, modalities=["t2w"])
        pooled.update(maps[1][case.case_id], case.whole_tumour)
    assert float(rows[0]["auroc"]) == pytest.approx(pooled.auroc(), abs=1e-9)


def test_report_without_lesionwise_keeps_the_twelve_columns_first(maps, cohort, tmp_path):
    assert main(["report", str(maps[0]), "--data", str(cohort), "--out", str(tmp_path)]) == 0
    header = (tmp_path / "table1.csv").read_text().splitlines()[0]
    assert header == ("method,setup,dice_mean,dice_sd,sensitivity_mean,sensitivity_sd,specificity_mean,"
                      "specificity_sd,ppv_mean,ppv_sd,auroc,f1max,pixel_ap,aupro,slice_auroc,slice_ap")
    assert "Lesion-wise" not in (tmp_path / "report.md").read_text()
