"""``napari-clip-ad report``: tables and figure data equal the metric functions and ``evaluate``."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from test_evaluate_cli import smooth_map, write_case

from napari_clip_ad.cli import main
from napari_clip_ad.io import find_cases, load_case, save_volume
from napari_clip_ad.metrics import (
    PixelAccumulator,
    SliceDetection,
    brain_slices,
    map_max_scores,
    slice_labels,
    distance_profile,
    size_dice_spearman,
    slice_dice,
    slice_positions,
    volume_metrics,
)

STUDY_TABLE1 = ["method", "setup", "dice_mean", "dice_sd", "sensitivity_mean", "sensitivity_sd", "specificity_mean",
                "specificity_sd", "ppv_mean", "ppv_sd", "auroc", "f1max"]
TABLE1 = [*STUDY_TABLE1, "pixel_ap", "aupro", "slice_auroc", "slice_ap"]
"""The study's 12 columns first and unchanged, then the literature's metrics."""


def shifted_map(tumour: np.ndarray) -> np.ndarray:
    """A second kind of map: the tumour moved 3 voxels up and 2 across, with a soft rim."""
    moved = np.roll(tumour, (3, 2), axis=(0, 2)).astype(np.float32)
    return np.clip(0.8 * moved + 0.3 * np.roll(tumour, 6, axis=1), 0, 1).astype(np.float32)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def num(text: str) -> float:
    return float("nan") if text == "" else float(text)


@pytest.fixture(scope="module")
def real_runs(shared_data, tmp_path_factory):
    """Two runs on the real BraTS 2023 cases, the report on them, and the expected per-case data."""
    root = tmp_path_factory.mktemp("report")
    vand, ada = root / "vand-industrial", root / "adaclip-run"
    expected: dict[str, list] = {"vand": [], "adaclip": []}
    for seed, path in enumerate(find_cases(shared_data / "brats2023")):
        case = load_case(path, modalities=["t2w"])
        maps = {"vand": smooth_map(case.whole_tumour, case.brain_mask, seed), "adaclip": shifted_map(case.whole_tumour)}
        save_volume(maps["vand"], case, vand / f"{case.case_id}_anomaly.nii.gz")
        save_volume(maps["adaclip"], case, ada / f"{case.case_id}_anomaly.nii.gz")
        for method, scores in maps.items():
            expected[method].append((case, scores))
    (vand / "infer.json").write_text(json.dumps({"method": "vand", "backbone": "ViT-L-14-336 (openai)", "random_weights": False}))
    (ada / "infer.json").write_text(json.dumps({"method": "adaclip", "setup": "brats", "backbone": "tiny-test (random weights)"}))
    out = root / "out"
    assert main(["report", str(vand), str(ada), "--data", str(shared_data / "brats2023"), "--out", str(out)]) == 0
    return root, out, expected


def test_table1_equals_metric_functions_and_evaluate(real_runs, shared_data):
    root, out, expected = real_runs
    rows = read_csv(out / "table1.csv")
    assert list(rows[0]) == TABLE1
    assert [(r["method"], r["setup"]) for r in rows] == [("vand", "industrial"), ("adaclip", "brats")]
    for row, (method, run_dir) in zip(rows, (("vand", "vand-industrial"), ("adaclip", "adaclip-run"))):
        per_case = [volume_metrics(scores >= 0.5, case.whole_tumour) for case, scores in expected[method]]
        pooled, detection = PixelAccumulator(), SliceDetection()
        for case, scores in expected[method]:
            pooled.update(scores, case.whole_tumour)
            keep = brain_slices(case.brain_mask)  # no _scores.json beside these maps: slices scored by map max
            detection.update(map_max_scores(scores)[keep], slice_labels(case.whole_tumour)[keep])
        for name in ("dice", "sensitivity", "specificity", "ppv"):
            values = np.array([m[name] for m in per_case])
            assert float(row[f"{name}_mean"]) == pytest.approx(values.mean(), abs=1e-12)
            assert float(row[f"{name}_sd"]) == pytest.approx(values.std(ddof=1), abs=1e-12)
        assert float(row["auroc"]) == pytest.approx(pooled.auroc(), abs=1e-12)
        assert float(row["f1max"]) == pytest.approx(pooled.f1max(), abs=1e-12)
        assert float(row["pixel_ap"]) == pytest.approx(pooled.average_precision(), abs=1e-12)
        assert float(row["aupro"]) == pytest.approx(pooled.aupro(), abs=1e-12)
        slice_auroc, slice_ap = detection.auroc_ap()
        assert float(row["slice_auroc"]) == pytest.approx(slice_auroc, abs=1e-12)
        assert float(row["slice_ap"]) == pytest.approx(slice_ap, abs=1e-12)
        assert main(["evaluate", "--maps", str(root / run_dir), "--data", str(shared_data / "brats2023"),
                     "--out", str(root / f"eval-{method}")]) == 0
        summary = json.loads((root / f"eval-{method}" / "summary.json").read_text())
        for column in TABLE1[2:]:
            assert float(row[column]) == summary[column]
        assert summary["slice_score"] == "map max" and summary["aupro_regions"] == "3d"
        # Binned (17.9 M voxels): the bounds are reported and small.
        assert 0 < summary["auroc_bound"] < 1e-3 and 0 < summary["pixel_ap_bound"] < 0.05 and 0 <= summary["aupro_bound"] < 0.05
    assert "± " in (out / "table1.md").read_text()
    assert "Pixel AP" in (out / "report.md").read_text()


def test_figure_data_equal_direct_computation(real_runs):
    _, out, expected = real_runs
    fig1, fig2, fig3 = (read_csv(out / f"fig{i}.csv") for i in (1, 2, 3))
    table3 = {r["method"]: r for r in read_csv(out / "table3.csv")}
    for method, cases in expected.items():
        distances, lesion_dices, lesion_sizes, dices_3d, sizes_3d = [], [], [], [], []
        for case, scores in cases:
            predicted = scores >= 0.5
            dice_3d = volume_metrics(predicted, case.whole_tumour)["dice"]
            assert [float(r["dice"]) for r in fig1 if r["method"] == method and r["case_id"] == case.case_id] == [dice_3d]
            slices = slice_dice(predicted, case.whole_tumour)
            mine = [r for r in fig2 if r["method"] == method and r["case_id"] == case.case_id]
            assert [int(r["slice"]) for r in mine] == slices.index.tolist()
            np.testing.assert_allclose([float(r["slice_dice"]) for r in mine], slices.dice, atol=1e-12)
            assert {float(r["dice_3d"]) for r in mine} == {dice_3d}
            lesion = slices.lesion_slices()
            distances.append(slice_positions(case.brain_mask)[lesion.index])
            lesion_dices.append(lesion.dice)
            lesion_sizes.append(lesion.lesion_voxels)
            dices_3d.append(dice_3d)
            sizes_3d.append(int(case.whole_tumour.sum()))
        profile = distance_profile(np.concatenate(distances), np.concatenate(lesion_dices), bins=10)
        mine = [r for r in fig3 if r["method"] == method]
        np.testing.assert_allclose([float(r["bin_low"]) for r in mine], profile.edges[:-1], atol=1e-12)
        np.testing.assert_allclose([num(r["mean_dice"]) for r in mine], profile.mean_dice, atol=1e-12)
        assert [int(r["n_lesion_slices"]) for r in mine] == profile.n_slices.tolist()
        rho, _ = size_dice_spearman(np.concatenate(lesion_sizes), np.concatenate(lesion_dices))
        assert num(table3[method]["slice_rho"]) == pytest.approx(rho, abs=1e-12, nan_ok=True)
        assert int(table3[method]["n_slices"]) == sum(d.size for d in lesion_dices)
        assert int(table3[method]["n_cases"]) == 2 and table3[method]["case_rho"] == ""  # < 3 cases: undefined


def test_report_links_everything_and_flags_random_weights(real_runs):
    _, out, _ = real_runs
    text = (out / "report.md").read_text()
    for name in ("table1.csv", "table1.md", "table3.csv", "fig1.png", "fig2.png", "fig3.png",
                 "fig1.csv", "fig2.csv", "fig3.csv", "runs.csv"):
        assert f"({name})" in text
        assert (out / name).is_file()
    for png in ("fig1.png", "fig2.png", "fig3.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "random weights" in text and "adaclip / brats (tiny-test (random weights))" in text
    assert "vand / industrial (" not in text
    assert not list(out.glob(".tmp-*"))


@pytest.fixture()
def tiny_runs(tmp_path):
    """Two tiny runs of three synthetic cases: (data_dir, [run dirs], out_dir)."""
    data = tmp_path / "data"
    runs = [tmp_path / "vand-industrial", tmp_path / "vand-pmc"]
    for seed, case_id in enumerate(("BraTS-GLI-90001-000", "BraTS-GLI-90002-000", "BraTS-GLI-90003-000")):
        case = load_case(write_case(data, case_id, seed))
        for k, run in enumerate(runs):
            save_volume(smooth_map(case.whole_tumour, case.brain_mask, seed + 10 * k), case, run / f"{case_id}_anomaly.nii.gz")
    return data, runs, tmp_path / "out"


def test_f1max_threshold_is_per_run(tiny_runs):
    data, runs, out = tiny_runs
    assert main(["report", *map(str, runs), "--data", str(data), "--out", str(out), "--threshold", "f1max"]) == 0
    rows = read_csv(out / "runs.csv")
    for row, run in zip(rows, runs):
        pooled = PixelAccumulator()
        for path in find_cases(data):
            case = load_case(path)
            raw = nib.load(run / f"{case.case_id}_anomaly.nii.gz").dataobj
            scores = case.geometry.to_canonical(np.asarray(raw, dtype=np.float32))
            pooled.update(scores, case.whole_tumour)
        assert float(row["threshold"]) == pooled.f1max_threshold()
        assert row["threshold_rule"] == "f1max"
    assert rows[0]["threshold"] != rows[1]["threshold"]


def test_setup_from_option_and_folder_name(tiny_runs, tmp_path, capsys):
    data, runs, out = tiny_runs
    odd = tmp_path / "myrun"
    runs[0].rename(odd)
    (odd / "infer.json").write_text(json.dumps({"method": "anomalyclip", "backbone": "x"}))
    assert main(["report", str(odd), str(runs[1]), "--data", str(data), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--setup" in err and not out.exists()
    assert main(["report", str(odd), str(runs[1]), "--data", str(data), "--out", str(out), "--setup", "finetune"]) == 0
    # An explicit --setup applies to every run whose infer.json has none (it wins over folder names).
    assert [(r["method"], r["setup"]) for r in read_csv(out / "table1.csv")] == [("anomalyclip", "finetune"), ("vand", "finetune")]
    assert main(["report", *map(str, runs[1:]), "--data", str(data), "--out", str(tmp_path / "out2")]) == 0
    assert [(r["method"], r["setup"]) for r in read_csv(tmp_path / "out2" / "table1.csv")] == [("vand", "pmc")]


def bad_report(capsys, *args: str) -> str:
    assert main(["report", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


def test_bad_input_exits_2_and_writes_nothing(tiny_runs, tmp_path, capsys):
    data, runs, out = tiny_runs
    assert "no RUN_DIR" in bad_report(capsys, "--data", str(data), "--out", str(out))
    empty = tmp_path / "vand-empty"
    empty.mkdir()
    assert "no <case_id>_anomaly" in bad_report(capsys, str(runs[0]), str(empty), "--data", str(data), "--out", str(out))
    stray = runs[1] / "BraTS-GLI-99999-000_anomaly.nii.gz"
    stray.write_bytes((runs[1] / "BraTS-GLI-90001-000_anomaly.nii.gz").read_bytes())
    assert "no case 'BraTS-GLI-99999-000'" in bad_report(capsys, str(runs[0]), str(runs[1]), "--data", str(data), "--out", str(out))
    assert "same method and setup" in bad_report(capsys, str(runs[0]), str(runs[0]), "--data", str(data), "--out", str(out))
    assert "no such run folder" in bad_report(capsys, str(tmp_path / "nope-x"), "--data", str(data), "--out", str(out))
    assert not out.exists()
