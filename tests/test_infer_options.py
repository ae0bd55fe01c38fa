"""``napari-clip-ad infer`` options beyond the study: each changes what it should and nothing else.

Runs the VAND method on the tiny random-weights backbone over crops of the real BraTS 2023 cases
(so the maps are meaningless; the global seed is set before every build so they are reproducible), and checks every option against the same steps
done directly with :func:`run_volume` and :mod:`napari_clip_ad.postprocess3d`.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from napari_clip_ad.cli import main
from napari_clip_ad.engine import run_volume
from napari_clip_ad.io import find_cases, load_case
from napari_clip_ad.methods import build_method
from napari_clip_ad.postprocess3d import smooth3d

CASES = ("BraTS-GLI-00002-000", "BraTS-GLI-00012-000")
BATCH = "32"
BASE = ["--method", "vand", "--backbone", "tiny-test", "--device", "cpu", "--batch-size", BATCH]
COHORT_CROP = (slice(144, 240), slice(44, 140), slice(75, 99))
"""Source (x, y, z) crop: 96 x 96 x 24 voxels with tumour, brain and background."""
VIEWS_CROP = (slice(160, 192), slice(70, 102), slice(75, 91))
"""A smaller crop (32 x 32 x 16) for the three-view runs."""


def infer(path: Path, out: Path, *extra: str) -> Path:
    """Run the CLI in-process; seeding first makes VAND's randomly initialised adapters the same in every run."""
    torch.manual_seed(0)
    assert main(["infer", str(path), *BASE, "--out", str(out), *extra]) == 0
    return out


@pytest.fixture(scope="module")
def cohort(crop_real_cohort, tmp_path_factory) -> Path:
    return crop_real_cohort(tmp_path_factory.mktemp("work") / "cohort", COHORT_CROP)


@pytest.fixture(scope="module")
def method():
    torch.manual_seed(0)
    return build_method("vand", "tiny-test", weights=None, image_size=240, device="cpu")


@pytest.fixture(scope="module")
def default_run(cohort) -> Path:
    return infer(cohort, cohort.parent / "default")


def canonical(cohort: Path, out: Path, case_id: str, kind: str = "anomaly") -> np.ndarray:
    """A written map or mask, canonical [z, y, x] (as the direct computations are)."""
    case = load_case(cohort / case_id)
    return np.asarray(case.geometry.to_canonical(np.asanyarray(nib.load(out / f"{case_id}_{kind}.nii.gz").dataobj)))


def test_default_is_the_axial_run_and_records_options(cohort, default_run, method):
    for case_id in CASES:
        case = load_case(cohort / case_id)
        direct = run_volume(case, method, modality="t2w", axis="axial", batch_size=int(BATCH)).anomaly_map
        written = canonical(cohort, default_run, case_id)
        np.testing.assert_array_equal(written, direct)
        np.testing.assert_array_equal(canonical(cohort, default_run, case_id, "mask"), (direct >= 0.5).astype(np.uint8))
        metrics = json.loads((default_run / f"{case_id}_metrics.json").read_text())
        assert metrics["axis"] == "axial" and metrics["views"] == "axial" and metrics["fuse"] is None
        assert metrics["restrict_to_brain"] is False and metrics["smooth3d_mm"] == 0.0 and metrics["min_component"] == 0
    info = json.loads((default_run / "infer.json").read_text())
    assert (info["views"], info["restrict_to_brain"], info["smooth3d_mm"], info["min_component"]) == ("axial", False, 0.0, 0)


def test_restrict_to_brain_zeroes_outside_only(cohort, default_run):
    out = infer(cohort, cohort.parent / "brain", "--restrict-to-brain")
    for case_id in CASES:
        brain = load_case(cohort / case_id).brain_mask
        plain, restricted = canonical(cohort, default_run, case_id), canonical(cohort, out, case_id)
        assert (~brain).any() and plain[~brain].max() > 0  # the crop has scored background to remove
        assert not restricted[~brain].any()
        np.testing.assert_array_equal(restricted[brain], plain[brain])
        np.testing.assert_array_equal(canonical(cohort, out, case_id, "mask"), (restricted >= 0.5).astype(np.uint8))
        assert json.loads((out / f"{case_id}_metrics.json").read_text())["restrict_to_brain"] is True
    assert json.loads((out / "infer.json").read_text())["restrict_to_brain"] is True


def test_smooth3d_is_a_gaussian_in_mm(cohort, default_run):
    out = infer(cohort, cohort.parent / "smooth", "--smooth3d", "2.5")
    for case_id in CASES:
        case = load_case(cohort / case_id)
        expected = smooth3d(canonical(cohort, default_run, case_id), 2.5, case.spacing)
        smoothed = canonical(cohort, out, case_id)
        np.testing.assert_allclose(smoothed, expected, atol=1e-6)
        assert not np.allclose(smoothed, canonical(cohort, default_run, case_id), atol=1e-3)
        assert json.loads((out / f"{case_id}_metrics.json").read_text())["smooth3d_mm"] == 2.5


def test_min_component_removes_exactly_the_small_components(cohort, default_run):
    case_id = CASES[0]
    plain = canonical(cohort, default_run, case_id)
    threshold = float(np.quantile(plain[plain > 0], 0.9))
    labels, n = ndimage.label(plain >= threshold, structure=np.ones((3, 3, 3), bool))
    sizes = np.bincount(labels.ravel())[1:]
    min_size = int(np.median(sizes)) + 1
    assert n > 2 and (sizes < min_size).any() and (sizes >= min_size).any()
    out = infer(cohort / case_id, cohort.parent / "components", "--threshold", repr(threshold), "--min-component", str(min_size))
    mask = canonical(cohort, out, case_id, "mask").astype(bool)
    expected = np.isin(labels, 1 + np.flatnonzero(sizes >= min_size))
    np.testing.assert_array_equal(mask, expected)
    np.testing.assert_array_equal(canonical(cohort, out, case_id), plain)  # the map itself is untouched
    metrics = json.loads((out / f"{case_id}_metrics.json").read_text())
    assert metrics["min_component"] == min_size
    assert metrics["predicted_voxels"] == int(expected.sum()) < int(np.count_nonzero(labels))


@pytest.fixture(scope="module")
def views_cohort(crop_real_cohort, tmp_path_factory) -> Path:
    return crop_real_cohort(tmp_path_factory.mktemp("views") / "cohort", VIEWS_CROP, CASES[:1])


@pytest.fixture(scope="module")
def single_views(views_cohort, method) -> dict[str, np.ndarray]:
    case = load_case(views_cohort / CASES[0])
    return {axis: run_volume(case, method, modality="t2w", axis=axis, batch_size=int(BATCH)).anomaly_map
            for axis in ("axial", "coronal", "sagittal")}


@pytest.fixture(scope="module")
def view_run(views_cohort):
    """``view_run(name, *options)``: the infer run of the views cohort with those options (run once)."""
    done: dict[str, Path] = {}

    def run(name: str, *options: str) -> Path:
        if name not in done:
            done[name] = infer(views_cohort, views_cohort.parent / name, *options)
        return done[name]

    return run


@pytest.mark.parametrize("fuse", ["mean", "max"])
def test_views_all_fuses_the_three_single_view_runs(views_cohort, view_run, single_views, fuse):
    out = view_run(f"all-{fuse}", "--views", "all", "--fuse", fuse)
    maps = list(single_views.values())
    expected = (maps[0] + maps[1] + maps[2]) / 3 if fuse == "mean" else np.maximum(np.maximum(maps[0], maps[1]), maps[2])
    fused = canonical(views_cohort, out, CASES[0])
    np.testing.assert_allclose(fused, expected, atol=1e-6)
    for single in maps:
        assert np.abs(fused - single).max() > 1e-3
    info = json.loads((out / "infer.json").read_text())
    assert (info["views"], info["axis"], info["fuse"]) == ("axial+coronal+sagittal", "axial+coronal+sagittal", fuse)
    metrics = json.loads((out / f"{CASES[0]}_metrics.json").read_text())
    assert metrics["views"] == "axial+coronal+sagittal" and metrics["fuse"] == fuse


def test_single_view_option_equals_that_axis(views_cohort, view_run, single_views):
    out = view_run("coronal", "--views", "coronal")
    np.testing.assert_array_equal(canonical(views_cohort, out, CASES[0]), single_views["coronal"])
    assert json.loads((out / "infer.json").read_text())["views"] == "coronal"


def test_report_shows_the_options(views_cohort, view_run, tmp_path):
    runs = [view_run("all-mean", "--views", "all", "--fuse", "mean"), view_run("coronal", "--views", "coronal")]
    for run, setup in zip(runs, ("fused", "coronal")):
        info = json.loads((run / "infer.json").read_text())
        (run / "infer.json").write_text(json.dumps({**info, "setup": setup}))
    assert main(["report", *map(str, runs), "--data", str(views_cohort), "--out", str(tmp_path)]) == 0
    with open(tmp_path / "runs.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["views"], r["fuse"]) for r in rows] == [("axial+coronal+sagittal", "mean"), ("coronal", "")]
    report = (tmp_path / "report.md").read_text()
    assert "vand / fused: views axial+coronal+sagittal (mean)" in report and "vand / coronal: views coronal" in report


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--views", "all", "--axis", "coronal"], "disagree"),
        (["--smooth3d", "-1"], "--smooth3d"),
        (["--min-component", "-3"], "--min-component"),
    ],
)
def test_bad_options_exit_2_with_one_line(cohort, tmp_path, capsys, extra, message):
    assert main(["infer", str(cohort / CASES[0]), *BASE, "--out", str(tmp_path / "o"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not (tmp_path / "o").exists()


def test_cropped_cohort_keeps_world_positions(cohort, shared_data):
    """The crops are real sub-volumes: voxel (0, 0, 0) of a crop sits where it sat in the full case."""
    for path in find_cases(cohort):
        full = nib.load(shared_data / "brats2023" / path.name / f"{path.name}-t2w.nii.gz")
        crop = nib.load(path / f"{path.name}-t2w.nii.gz")
        start = [s.start for s in COHORT_CROP]
        np.testing.assert_allclose(crop.affine[:3, 3], (full.affine @ [*start, 1])[:3])
        np.testing.assert_array_equal(np.asanyarray(crop.dataobj), np.asanyarray(full.dataobj)[COHORT_CROP])


def test_torchrun_shards_cases_and_matches_one_process(cohort, default_run, tmp_path):
    """Two gloo ranks each take one case; the maps equal the one-process run; one infer.json lists both."""
    out = tmp_path / "sharded"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "--master_port", "29519",
               "-m", "napari_clip_ad.cli", "infer", str(cohort), *BASE, "--out", str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    info = json.loads((out / "infer.json").read_text())
    assert info["world_size"] == 2 and info["cases"] == list(CASES)
    for case_id in CASES:
        np.testing.assert_allclose(canonical(cohort, out, case_id), canonical(cohort, default_run, case_id), atol=1e-5)
        assert json.loads((out / f"{case_id}_metrics.json").read_text())["case_id"] == case_id


def test_report_scores_the_masks_the_run_cleaned(cohort, default_run, shared_data, tmp_path):
    """A run's --min-component is in its infer.json; report applies it, as evaluate --min-component does."""
    plain = canonical(cohort, default_run, CASES[0])
    labels, n = ndimage.label(plain >= 0.5, structure=np.ones((3, 3, 3), bool))
    sizes = np.bincount(labels.ravel())[1:]
    min_size = int(sizes.min()) + 1  # removes at least one component of the first case at threshold 0.5
    assert n >= 1
    out = infer(cohort, tmp_path / "vand-cleaned", "--min-component", str(min_size))
    assert main(["report", str(out), "--data", str(cohort), "--out", str(tmp_path / "report")]) == 0
    assert main(["evaluate", "--maps", str(out), "--data", str(cohort), "--min-component", str(min_size),
                 "--out", str(tmp_path / "eval")]) == 0
    with open(tmp_path / "report" / "table1.csv", newline="") as handle:
        (row,) = list(csv.DictReader(handle))
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert float(row["dice_mean"]) == pytest.approx(summary["dice_mean"], abs=1e-6)
    assert float(row["ppv_mean"]) == pytest.approx(summary["ppv_mean"], abs=1e-6)
    per_case = [json.loads((out / f"{c}_metrics.json").read_text())["dice"] for c in CASES]
    assert float(row["dice_mean"]) == pytest.approx(float(np.mean(per_case)), abs=1e-6)  # = the run's own masks
    assert main(["evaluate", "--maps", str(out), "--data", str(cohort), "--out", str(tmp_path / "uncleaned")]) == 0
    uncleaned = json.loads((tmp_path / "uncleaned" / "summary.json").read_text())
    assert (uncleaned["dice_mean"], uncleaned["ppv_mean"]) != (summary["dice_mean"], summary["ppv_mean"])
