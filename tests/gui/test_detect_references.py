"""The GUI runs the training-free methods with references from a chosen folder, as ``infer`` does (issue 18).

The detect widget's Advanced section takes ``--references`` as a folder of other subjects' cases; with
``anomalydino`` and ``musc`` that is cross-subject mode (each slice scored against the other subjects' slices
at the same level). The layers it adds must equal ``infer``'s files with the same folder, bitwise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from napari_clip_ad.cli import main
from napari_clip_ad.io import load_case

pytestmark = pytest.mark.gui

PLUGIN = "napari-clip-ad"
TARGET = "BraTS-GLI-00002-000"
OTHER = "BraTS-GLI-00012-000"
CROP = (slice(160, 192), slice(70, 102), slice(75, 87))
"""Source (x, y, z) crop: 32 x 32 x 12 voxels with tumour and brain (as tests/gui/conftest.py)."""


@pytest.fixture(scope="module")
def target_and_references(crop_real_cohort: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The target case in one folder, the other real case (its reference subject) in another."""
    root = tmp_path_factory.mktemp("gui_refs")
    targets = crop_real_cohort(root / "targets", CROP, cases=(TARGET,))
    references = crop_real_cohort(root / "references", CROP, cases=(OTHER,))
    return targets / TARGET, references


def _infer(case_dir: Path, out: Path, method: str, references: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    import json

    assert main(["infer", str(case_dir), "--method", method, "--backbone", "tiny-dinov2", "--device", "cpu",
                 "--modality", "t2f", "--references", str(references), "--out", str(out)]) == 0
    case = load_case(case_dir, modalities=["t2f"])
    arrays = tuple(case.geometry.to_canonical(np.asarray(nib.load(out / f"{TARGET}_{part}.nii.gz").dataobj))
                   for part in ("anomaly", "mask"))
    return (*arrays, json.loads((out / f"{TARGET}_scores.json").read_text()))


@pytest.mark.parametrize("method", ["anomalydino", "musc"])
def test_widget_references_folder_equals_infer(method, make_napari_viewer, target_and_references, wait_until_idle,
                                               tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("NAPARI_CLIP_AD_FEATURE_CACHE", str(tmp_path / "features"))
    case_dir, references = target_and_references
    viewer = make_napari_viewer()
    viewer.open(str(case_dir), plugin=PLUGIN)
    _, detect = viewer.window.add_plugin_dock_widget(PLUGIN, "Detect anomalies")
    detect.image.value = next(layer for layer in viewer.layers if layer.name == f"{TARGET} t2f")
    detect.method.value = method
    detect.backbone.value = "tiny-dinov2"
    detect.device.value = "cpu"
    detect.advanced.toggle.native.click()
    detect.advanced["modality"].value = "t2f"
    detect.advanced["references"].value = str(references)  # typed into the Advanced section, as a user would
    before = set(map(id, viewer.layers))
    detect.run_button.native.click()
    wait_until_idle(detect)
    new = [layer for layer in viewer.layers if id(layer) not in before]
    anomaly = next((layer for layer in new if layer.metadata.get("kind") == "anomaly_map"), None)
    assert anomaly is not None, f"no anomaly layer; status: {detect.status.value}"
    mask = next(layer for layer in new if layer.metadata.get("kind") == "anomaly_mask")

    assert detect.status.value.startswith("Done:"), detect.status.value
    info = anomaly.metadata["info"]
    assert info["mode"] == "cross-subject" and info["pool"] == [OTHER]  # the folder's subject, never the target
    assert info["references_per_slice"]["min"] >= 1
    assert float(anomaly.data.max()) > 0.0  # something was scored (random weights: the map means nothing)

    expected_map, expected_mask, scores = _infer(case_dir, tmp_path / "infer", method, references)
    assert np.array_equal(anomaly.data, expected_map) and np.array_equal(mask.data, expected_mask)
    assert scores["case_id"] == TARGET
