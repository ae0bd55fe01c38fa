"""The Cohort widget writes infer's files and evaluate's table; a row opens its case; the reader opens cohorts."""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from napari_clip_ad.cli import main

pytestmark = pytest.mark.gui

PLUGIN = "napari-clip-ad"
CASES = ("BraTS-GLI-00002-000", "BraTS-GLI-00012-000")


def test_cohort_widget_equals_infer_and_evaluate(make_napari_viewer, small_cohort, wait_until_idle, tmp_path) -> None:
    viewer = make_napari_viewer()
    viewer.open(str(small_cohort), plugin=PLUGIN)  # a cohort folder: its first case opens
    assert any(layer.name == f"{CASES[0]} t2w" for layer in viewer.layers)
    _, cohort = viewer.window.add_plugin_dock_widget(PLUGIN, "Cohort")
    assert Path(str(cohort.cohort.value)) == small_cohort  # filled in from the opened cohort
    cohort.out.value = tmp_path / "gui"
    cohort.backbone.value = "tiny-test"
    cohort.device.value = "cpu"
    cohort.advanced["modality"].value = "t2f"
    cohort.advanced["threshold"].value = 0.45
    cohort.run_button.native.click()
    wait_until_idle(cohort)
    assert cohort.status.value.startswith("Done"), cohort.status.value
    assert cohort.case_progress.value == cohort.case_progress.max == 2

    # Same files as infer, same table as evaluate.
    assert main(["infer", str(small_cohort), "--method", "vand", "--backbone", "tiny-test", "--device", "cpu",
                 "--modality", "t2f", "--threshold", "0.45", "--out", str(tmp_path / "cli")]) == 0
    for case_id in CASES:
        for part in ("anomaly", "mask"):
            gui = np.asarray(nib.load(tmp_path / "gui" / f"{case_id}_{part}.nii.gz").dataobj)
            cli = np.asarray(nib.load(tmp_path / "cli" / f"{case_id}_{part}.nii.gz").dataobj)
            assert np.array_equal(gui, cli)
    assert main(["evaluate", "--maps", str(tmp_path / "gui"), "--data", str(small_cohort), "--threshold", "0.45",
                 "--out", str(tmp_path / "eval")]) == 0
    expected = list(csv.DictReader((tmp_path / "eval" / "per_case.csv").open()))
    assert (tmp_path / "gui" / "per_case.csv").read_text() == (tmp_path / "eval" / "per_case.csv").read_text()
    table = cohort.table.data.to_list()
    assert [row[0] for row in table] == [row["case_id"] for row in expected]
    for row, want in zip(table, expected):
        assert [repr(v) for v in row[1:]] == [want[c] for c in ("dice", "sensitivity", "specificity", "ppv")]
    assert "AUROC" in cohort.pooled.value and "F1-max" in cohort.pooled.value

    cohort.csv_file.value = tmp_path / "export.csv"
    cohort.export_button.native.click()
    assert (tmp_path / "export.csv").read_text() == (tmp_path / "eval" / "per_case.csv").read_text()

    # A row click opens that case with its map, mask and error overlay.
    cohort.open_case(1)
    kinds = {layer.metadata.get("kind") for layer in viewer.layers if layer.metadata.get("case_id") == CASES[1]}
    assert {"anomaly_map", "anomaly_mask", "error_overlay"} <= kinds
