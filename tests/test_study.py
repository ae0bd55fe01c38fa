"""``napari-clip-ad study``: the whole grid on a small synthetic cohort with the tiny random backbone."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import pytest

from napari_clip_ad.cli import main
from napari_clip_ad.sample import write_cohort


@pytest.fixture(scope="module")
def small_cohort(tmp_path_factory) -> Path:
    """Four synthetic cases cropped around the brain centre (24 x 96 x 96 voxels) to keep the grid quick."""
    full = tmp_path_factory.mktemp("full")
    crop = tmp_path_factory.mktemp("cohort")
    for case in write_cohort(full, n_cases=4, seed=3):
        (crop / case.name).mkdir()
        for path in sorted(case.glob("*.nii.gz")):
            img = nib.load(path)
            nib.save(img.slicer[72:168, 72:168, 50:74], crop / case.name / path.name)
    return crop


@pytest.fixture(scope="module")
def study(small_cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    args = ["study", "--data", str(small_cohort), "--out", str(out), "--backbone", "tiny-test", "--epochs", "1",
            "--device", "cpu", "--max-slices-per-case", "4", "--batch-size", "24"]
    assert main(args) == 0
    return out, args


def test_grid_writes_every_table_and_figure(study):
    out, _ = study
    report = out / "report"
    for name in ("table1.md", "table1.csv", "fig1.png", "fig2.png", "fig3.png", "table3.csv", "report.md"):
        assert (report / name).is_file(), name
    with open(report / "table1.csv") as handle:
        rows = list(csv.DictReader(handle))
    cells = {(r["method"], r["setup"]) for r in rows}
    expected = {(m, s) for m in ("vand", "anomalyclip", "adaclip") for s in ("industrial", "finetune", "brats", "pmc")}
    assert cells == expected | {("anovl", "industrial"), ("intensity", "baseline")}
    assert (rows[0]["method"], rows[0]["setup"]) == ("intensity", "baseline")  # the reference row leads
    assert "random weights" in (report / "report.md").read_text()
    split = json.loads((out / "split.json").read_text())
    assert len(split["test"]) == 1 and len(split["train"]) == 3
    trained = json.loads((out / "cells" / "vand-brats" / "done.json").read_text())
    assert trained["trained"] and trained["weights"].endswith(".safetensors")
    assert (out / "cells" / "vand-brats" / "train" / "metrics.jsonl").is_file()


def test_rerun_skips_finished_cells(study, capsys):
    out, args = study
    before = {p: p.stat().st_mtime_ns for p in (out / "cells").rglob("*_anomaly.nii.gz")}
    capsys.readouterr()
    assert main(args) == 0
    err = capsys.readouterr().err
    assert err.count("done earlier, skipped") == 14
    assert {p: p.stat().st_mtime_ns for p in (out / "cells").rglob("*_anomaly.nii.gz")} == before


def test_report_numbers_equal_evaluate(study, small_cohort, tmp_path):
    out, _ = study
    with open(out / "report" / "table1.csv") as handle:
        rows = {(r["method"], r["setup"]): r for r in csv.DictReader(handle)}
    for cell in ("vand-brats", "anovl-industrial", "intensity-baseline"):
        assert main(["evaluate", "--maps", str(out / "cells" / cell / "maps"), "--data", str(small_cohort), "--out", str(tmp_path / cell)]) == 0
        summary = json.loads((tmp_path / cell / "summary.json").read_text())
        row = rows[tuple(cell.split("-"))]
        for key in ("dice_mean", "sensitivity_mean", "specificity_mean", "ppv_mean", "auroc", "f1max"):
            assert float(row[key]) == pytest.approx(summary[key], abs=1e-9), key


def test_real_backbone_without_released_weights_stops_with_the_fix(small_cohort, tmp_path, capsys, monkeypatch):
    """A real study must not quietly report untrained parts as the 'industrial' setup."""
    monkeypatch.setenv("NAPARI_CLIP_AD_CACHE", str(tmp_path / "empty-cache"))
    args = ["study", "--data", str(small_cohort), "--out", str(tmp_path / "study"), "--methods", "vand",
            "--setups", "industrial", "--device", "cpu"]  # the default backbone: OpenAI ViT-L/14@336
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: vand/industrial starts from released weights") and "weights fetch vand-mvtec" in err[-1]
    assert not (tmp_path / "study" / "cells" / "vand-industrial" / "done.json").exists()


def test_modality_composite_study_reports_beside_the_t2w_one(study, small_cohort, tmp_path):
    """A t1c+t2w+t2f study labels its runs so one report shows them beside the t2w study's runs."""
    out, _ = study
    composite = tmp_path / "composite"
    args = ["study", "--data", str(small_cohort), "--out", str(composite), "--methods", "vand", "--setups", "brats",
            "--backbone", "tiny-test", "--epochs", "1", "--device", "cpu", "--max-slices-per-case", "4",
            "--modality", "t1c+t2w+t2f", "--no-baseline"]
    assert main(args) == 0
    assert not (composite / "cells" / "intensity-baseline").exists()
    info = json.loads((composite / "cells" / "vand-brats" / "maps" / "infer.json").read_text())
    assert info["setup"] == "brats+t1c+t2w+t2f" and info["modality"] == "t1c+t2w+t2f"
    assert json.loads((composite / "cells" / "vand-brats" / "train" / "config.json").read_text())["modality"] == "t1c+t2w+t2f"
    runs = [str(out / "cells" / "vand-brats" / "maps"), str(composite / "cells" / "vand-brats" / "maps")]
    assert main(["report", *runs, "--data", str(small_cohort), "--out", str(tmp_path / "both")]) == 0
    with open(tmp_path / "both" / "table1.csv") as handle:
        setups = [(r["method"], r["setup"]) for r in csv.DictReader(handle)]
    assert setups == [("vand", "brats"), ("vand", "brats+t1c+t2w+t2f")]


def test_k_shot_cells_use_training_references(tmp_path):
    """--k-shot 0,4: vand/brats gets a 4-shot cell beside the zero-shot one (shared training), anomalyclip none."""
    full, cohort = tmp_path / "full", tmp_path / "cohort"
    for case in write_cohort(full, n_cases=4, seed=3):  # low slices: tumour-free brain to draw references from
        (cohort / case.name).mkdir(parents=True)
        for path in sorted(case.glob("*.nii.gz")):
            nib.save(nib.load(path).slicer[72:168, 72:168, 8:40], cohort / case.name / path.name)
    out = tmp_path / "fewshot"
    args = ["study", "--data", str(cohort), "--out", str(out), "--methods", "vand", "anomalyclip", "--setups", "brats",
            "--backbone", "tiny-test", "--epochs", "1", "--device", "cpu", "--max-slices-per-case", "4",
            "--k-shot", "0,4", "--references", "auto", "--no-baseline"]
    assert main(args) == 0
    with open(out / "report" / "table1.csv") as handle:
        setups = {(r["method"], r["setup"]) for r in csv.DictReader(handle)}
    assert setups == {("vand", "brats"), ("vand", "brats+4shot"), ("anomalyclip", "brats")}
    assert not (out / "cells" / "vand-brats+4shot" / "train").exists()
    split = json.loads((out / "split.json").read_text())
    for path in (out / "cells" / "vand-brats+4shot" / "maps").glob("*_metrics.json"):
        used = json.loads(path.read_text())["references_used"]["axial"]["references"]
        assert len(used) == 4 and {r["case_id"] for r in used} <= set(split["train"])


def test_trainfree_cells_score_against_the_training_split(tmp_path):
    """--setups trainfree: anomalydino and musc in cross-subject mode, references = the training split's subjects."""
    full, cohort = tmp_path / "full", tmp_path / "cohort"
    for case in write_cohort(full, n_cases=4, seed=5):
        (cohort / case.name).mkdir(parents=True)
        for path in sorted(case.glob("*.nii.gz")):
            nib.save(nib.load(path).slicer[72:168, 72:168, 60:72], cohort / case.name / path.name)
    out = tmp_path / "trainfree"
    args = ["study", "--data", str(cohort), "--out", str(out), "--methods", "anomalydino", "musc", "--setups", "trainfree",
            "--backbone", "tiny-test", "--device", "cpu"]
    assert main(args) == 0
    with open(out / "report" / "table1.csv") as handle:
        rows = [(r["method"], r["setup"]) for r in csv.DictReader(handle)]
    assert rows[0] == ("intensity", "baseline") and set(rows[1:]) == {("anomalydino", "trainfree"), ("musc", "trainfree")}
    for name in ("fig1.png", "fig2.png", "fig3.png"):  # the figures beside table 1
        assert (out / "report" / name).stat().st_size > 0
    with open(out / "report" / "fig1.csv") as handle:
        assert {r["method"] for r in csv.DictReader(handle)} == {"intensity", "anomalydino", "musc"}
    split = json.loads((out / "split.json").read_text())
    info = json.loads(next((out / "cells" / "anomalydino-trainfree" / "maps").glob("*_metrics.json")).read_text())
    assert info["mode"] == "cross-subject" and set(info["pool"]) <= set(split["train"]) and info["case_id"] not in info["pool"]
    assert "tiny-dinov2" in json.loads((out / "cells" / "anomalydino-trainfree" / "done.json").read_text())["note"]
