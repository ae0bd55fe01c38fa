"""``napari-clip-ad evaluate``: outputs equal the metric functions; user errors exit 2 with one line."""

from __future__ import annotations

import csv
import gzip
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from napari_clip_ad.cli import main
from napari_clip_ad.io import find_cases, load_case, save_volume
from napari_clip_ad.metrics import PixelAccumulator, slice_dice, volume_metrics

LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def smooth_map(tumour: np.ndarray, brain: np.ndarray, seed: int) -> np.ndarray:
    """A realistic anomaly map: the smoothed tumour mask plus noise inside the brain, in [0, 1]."""
    rng = np.random.default_rng(seed)
    noisy = 0.75 * tumour + 0.3 * rng.random(tumour.shape, dtype=np.float32) * brain
    return np.clip(ndimage.gaussian_filter(noisy.astype(np.float32), 1.5), 0, 1).astype(np.float32)


def write_case(root: Path, case_id: str, seed: int, with_seg: bool = True) -> Path:
    """A tiny BraTS-2023-layout case (t2w + seg) with a blob of tumour."""
    folder = root / case_id
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    shape = (14, 12, 10)  # source x, y, z
    image = np.zeros(shape, np.float32)
    image[2:12, 2:10, 1:9] = rng.uniform(100, 200, (10, 8, 8))
    nib.save(nib.Nifti1Image(image, LPS), folder / f"{case_id}-t2w.nii.gz")
    if with_seg:
        seg = np.zeros(shape, np.int16)
        seg[4 + seed % 3: 9, 4:8, 2 + seed % 2: 6] = 2
        seg[6:8, 5:7, 3:5] = 3
        nib.save(nib.Nifti1Image(seg, LPS), folder / f"{case_id}-seg.nii.gz")
    return folder


@pytest.fixture()
def tiny(tmp_path):
    """Three tiny cases with matching maps: returns (data_dir, maps_dir, out_dir)."""
    data, maps = tmp_path / "data", tmp_path / "maps"
    for seed, case_id in enumerate(("BraTS-GLI-90001-000", "BraTS-GLI-90002-000", "BraTS-GLI-90003-000")):
        case = load_case(write_case(data, case_id, seed))
        save_volume(smooth_map(case.whole_tumour, case.brain_mask, seed), case, maps / f"{case_id}_anomaly.nii.gz")
    return data, maps, tmp_path / "out"


def evaluate(data: Path, maps: Path, out: Path, *extra: str) -> int:
    return main(["evaluate", "--maps", str(maps), "--data", str(data), "--out", str(out), *extra])


def read_rows(out: Path) -> list[dict[str, str]]:
    with open(out / "per_case.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def expected_case(case_path: Path, map_path: Path, threshold: float, region: str):
    case = load_case(case_path, modalities=["t2w"])
    scores = case.geometry.to_canonical(np.asarray(nib.load(map_path).dataobj, dtype=np.float32))
    mask = case.brain_mask if region == "brain" else None
    return scores, case, volume_metrics(scores >= threshold, case.whole_tumour, mask), mask


@pytest.fixture(scope="module")
def real_maps(shared_data, tmp_path_factory):
    """Maps for the real BraTS 2023 cases, written with save_volume."""
    maps = tmp_path_factory.mktemp("real_maps")
    for seed, path in enumerate(find_cases(shared_data / "brats2023")):
        case = load_case(path, modalities=["t2w"])
        save_volume(smooth_map(case.whole_tumour, case.brain_mask, seed), case, maps / f"{case.case_id}_anomaly.nii.gz")
    return shared_data / "brats2023", maps


def test_real_cases_per_case_csv_and_summary_equal_metric_functions(real_maps, tmp_path, capsys):
    data, maps = real_maps
    assert evaluate(data, maps, tmp_path / "out", "--threshold", "0.5") == 0
    rows = read_rows(tmp_path / "out")
    assert list(rows[0])[:5] == ["case_id", "dice", "sensitivity", "specificity", "ppv"]
    assert [r["case_id"] for r in rows] == ["BraTS-GLI-00002-000", "BraTS-GLI-00012-000"]
    pooled = PixelAccumulator()
    for row in rows:
        scores, case, expected, _ = expected_case(data / row["case_id"], maps / row["map"], 0.5, "all")
        pooled.update(scores, case.whole_tumour)
        for key, value in expected.items():
            assert float(row[key]) == pytest.approx(value, abs=1e-12), key
        assert 0.3 < expected["dice"] < 1.0  # the synthetic map is realistic, not perfect
        slices = slice_dice(scores >= 0.5, case.whole_tumour)
        assert float(row["slice_dice_mean"]) == pytest.approx(slices.dice.mean())
        assert int(row["n_lesion_slices"]) == slices.lesion_slices().index.size
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    dices = [float(r["dice"]) for r in rows]
    assert summary["dice_mean"] == pytest.approx(np.mean(dices))
    assert summary["dice_sd"] == pytest.approx(np.std(dices, ddof=1))
    assert summary["auroc"] == pytest.approx(pooled.auroc(), abs=1e-12)
    assert summary["f1max"] == pytest.approx(pooled.f1max(), abs=1e-12)
    assert (summary["threshold"], summary["region"], summary["n_cases"]) == (0.5, "all", 2)
    assert sum(summary["distance_profile"]["n_lesion_slices"]) == sum(int(r["n_lesion_slices"]) for r in rows)
    assert "evaluated 2 cases" in capsys.readouterr().out


@pytest.mark.parametrize("region", ["all", "brain"])
def test_f1max_threshold_is_the_pooled_one(tiny, region):
    data, maps, out = tiny
    assert evaluate(data, maps, out, "--threshold", "f1max", "--region", region) == 0
    summary = json.loads((out / "summary.json").read_text())
    pooled = PixelAccumulator()
    loaded = []
    for path in find_cases(data):
        case = load_case(path)
        scores = case.geometry.to_canonical(np.asarray(nib.load(maps / f"{case.case_id}_anomaly.nii.gz").dataobj))
        mask = case.brain_mask if region == "brain" else None
        pooled.update(scores, case.whole_tumour, mask)
        loaded.append((scores, case.whole_tumour, mask))
    assert summary["threshold"] == pooled.f1max_threshold() and summary["threshold_rule"] == "f1max"
    assert summary["region"] == region and summary["auroc"] == pytest.approx(pooled.auroc(), abs=1e-12)
    for row, (scores, tumour, mask) in zip(read_rows(out), loaded, strict=True):
        expected = volume_metrics(scores >= summary["threshold"], tumour, mask)
        assert float(row["dice"]) == pytest.approx(expected["dice"], abs=1e-12)
        assert float(row["specificity"]) == pytest.approx(expected["specificity"], abs=1e-12)


def test_one_case_gives_null_sd(tiny):
    data, maps, out = tiny
    for extra in sorted(maps.iterdir())[1:]:
        extra.unlink()
    assert evaluate(data, maps, out) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_cases"] == 1 and summary["dice_sd"] is None and summary["ppv_sd"] is None


def assert_one_line_error(capsys, out: Path, must_name: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    assert must_name in err
    assert not out.exists() or not any(out.rglob("*"))
    return err


def save_map(maps: Path, case_id: str, array: np.ndarray, data: Path) -> None:
    save_volume(array, load_case(data / case_id), maps / f"{case_id}_anomaly.nii.gz")


def test_map_without_case(tiny, capsys):
    data, maps, out = tiny
    (maps / "BraTS-GLI-90001-000_anomaly.nii.gz").rename(maps / "BraTS-GLI-12345-000_anomaly.nii.gz")
    assert evaluate(data, maps, out) == 2
    assert_one_line_error(capsys, out, "BraTS-GLI-12345-000_anomaly.nii.gz")


def test_case_without_segmentation(tiny, capsys):
    data, maps, out = tiny
    (data / "BraTS-GLI-90002-000" / "BraTS-GLI-90002-000-seg.nii.gz").unlink()
    assert evaluate(data, maps, out) == 2
    assert_one_line_error(capsys, out, "BraTS-GLI-90002-000")


@pytest.mark.parametrize(("value", "message"), [(1.5, "outside [0, 1]"), (np.nan, "NaN")])
def test_map_values_out_of_range_or_nan(tiny, capsys, value, message):
    data, maps, out = tiny
    bad = np.full(load_case(data / "BraTS-GLI-90003-000").shape, 0.2, np.float32)
    bad[3, 3, 3] = value
    save_map(maps, "BraTS-GLI-90003-000", bad, data)
    assert evaluate(data, maps, out) == 2
    err = assert_one_line_error(capsys, out, "BraTS-GLI-90003-000_anomaly.nii.gz")
    assert message in err


def test_nan_message_names_the_problem(tiny, capsys):
    data, maps, out = tiny
    bad = np.full(load_case(data / "BraTS-GLI-90001-000").shape, np.nan, np.float32)
    save_map(maps, "BraTS-GLI-90001-000", bad, data)
    assert evaluate(data, maps, out, "--threshold", "f1max") == 2
    err = capsys.readouterr().err
    assert "BraTS-GLI-90001-000_anomaly.nii.gz" in err and "NaN" in err and err.count("\n") == 1


def test_map_on_another_grid(tiny, capsys):
    data, maps, out = tiny
    nib.save(nib.Nifti1Image(np.zeros((14, 12, 9), np.float32), LPS), maps / "BraTS-GLI-90002-000_anomaly.nii.gz")
    assert evaluate(data, maps, out) == 2
    assert_one_line_error(capsys, out, "BraTS-GLI-90002-000_anomaly.nii.gz")


def test_corrupt_map(tiny, capsys):
    data, maps, out = tiny
    path = maps / "BraTS-GLI-90002-000_anomaly.nii.gz"
    path.write_bytes(gzip.compress(b"not a nifti")[:15])
    assert evaluate(data, maps, out) == 2
    assert_one_line_error(capsys, out, path.name)


@pytest.mark.parametrize("missing", ["maps", "data"])
def test_missing_folders(tiny, capsys, missing):
    data, maps, out = tiny
    gone = data.parent / "nowhere"
    args = (gone, maps) if missing == "data" else (data, gone)
    assert evaluate(*args, out) == 2
    assert_one_line_error(capsys, out, "nowhere")


def test_bad_threshold(tiny, capsys):
    data, maps, out = tiny
    assert evaluate(data, maps, out, "--threshold", "1.5") == 2
    assert_one_line_error(capsys, out, "--threshold")


def test_console_script_error_has_no_traceback(tiny):
    data, maps, out = tiny
    (maps / "BraTS-GLI-90001-000_anomaly.nii.gz").write_bytes(b"garbage")
    result = subprocess.run(
        [sys.executable, "-m", "napari_clip_ad.cli", "evaluate", "--maps", str(maps), "--data", str(data), "--out", str(out)],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "BraTS-GLI-90001-000_anomaly.nii.gz" in result.stderr
    assert "Traceback" not in result.stderr and not out.exists()
