"""The detect widget runs the one case pipeline: its layers equal ``infer``'s files bitwise, options included."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from napari_clip_ad.case_options import OPTION_SPECS, CaseOptions
from napari_clip_ad.cli import main
from napari_clip_ad.io import load_case

pytestmark = pytest.mark.gui

PLUGIN = "napari-clip-ad"
CASE = "BraTS-GLI-00002-000"


def _docked(viewer: Any, name: str) -> Any:
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, name)
    return widget


def _infer(case_dir: Path, out: Path, flags: list[str]) -> tuple[np.ndarray, np.ndarray]:
    assert main(["infer", str(case_dir), "--method", "vand", "--backbone", "tiny-test", "--device", "cpu",
                 *flags, "--out", str(out)]) == 0
    case = load_case(case_dir, modalities=["t2w"])
    return tuple(case.geometry.to_canonical(np.asarray(nib.load(out / f"{CASE}_{part}.nii.gz").dataobj))
                 for part in ("anomaly", "mask"))


def _run(detect: Any, wait_until_idle: Any, **values: Any) -> tuple[Any, Any]:
    for name, value in values.items():
        detect.advanced[name].value = value
    before = set(map(id, detect.viewer.layers))
    detect.run_button.native.click()
    wait_until_idle(detect)
    new = [layer for layer in detect.viewer.layers if id(layer) not in before]
    anomaly = next(layer for layer in new if layer.metadata.get("kind") == "anomaly_map")
    mask = next(layer for layer in new if layer.metadata.get("kind") == "anomaly_mask")
    return anomaly, mask


def test_widget_layers_equal_infer_files(make_napari_viewer, small_cohort, wait_until_idle, tmp_path) -> None:
    viewer = make_napari_viewer()
    viewer.open(str(small_cohort / CASE), plugin=PLUGIN)
    detect = _docked(viewer, "Detect anomalies")
    t2w = next(layer for layer in viewer.layers if layer.name == f"{CASE} t2w")
    detect.image.value = t2w
    detect.backbone.value = "tiny-test"
    detect.device.value = "cpu"
    # The case's modalities and the three-modality composites are offered; the ground truth of the case is picked.
    assert {"t1n", "t1c", "t2w", "t2f", "t1c+t2w+t2f", "t1n+t1c+t2f"} <= set(detect.modality.choices)
    assert detect.modality.value == "t2w"
    assert detect.ground_truth.value is not None and detect.ground_truth.value.name == f"{CASE} seg"

    anomaly, mask = _run(detect, wait_until_idle)
    expected_map, expected_mask = _infer(small_cohort / CASE, tmp_path / "plain", [])
    assert np.array_equal(anomaly.data, expected_map) and np.array_equal(mask.data, expected_mask)

    options = {"modality": "t1c+t2w+t2f", "views": "all", "fuse": "max", "smooth3d_mm": 1.5,
               "restrict_to_brain": True, "min_component": 3, "threshold": 0.4}
    anomaly, mask = _run(detect, wait_until_idle, **options)
    expected_map, expected_mask = _infer(small_cohort / CASE, tmp_path / "all", [
        "--modality", "t1c+t2w+t2f", "--views", "all", "--fuse", "max", "--smooth3d", "1.5", "--restrict-to-brain",
        "--min-component", "3", "--threshold", "0.4"])
    assert np.array_equal(anomaly.data, expected_map) and np.array_equal(mask.data, expected_mask)
    assert anomaly.metadata["options"]["views"] == ["axial", "coronal", "sagittal"]
    assert anomaly.metadata["info"]["modality"] == "t1c+t2w+t2f"
    info = anomaly.metadata["info"]
    assert detect.progress.value == detect.progress.max == info["slices_analysed"] > 12


def test_advanced_section_mirrors_the_cli_flags(make_napari_viewer) -> None:
    viewer = make_napari_viewer()
    detect = _docked(viewer, "Detect anomalies")
    assert not detect.advanced.expanded
    detect.advanced.toggle.native.click()
    assert detect.advanced.expanded
    defaults = CaseOptions()
    for spec in OPTION_SPECS:
        control = detect.advanced[spec.name]
        assert control.label == spec.label and spec.help in control.tooltip and spec.flag in control.tooltip
    labels = [detect.advanced[s.name].label for s in OPTION_SPECS]
    assert {"modality", "views", "fuse", "sigma", "smooth 3D (mm)", "restrict to brain", "min component"} <= set(labels)
    assert detect.advanced["views"].value == "axial" and detect.advanced["fuse"].value == defaults.fuse
    assert detect.advanced["sigma"].value == "" and detect.advanced["threshold"].value == defaults.threshold
    assert detect.advanced["smooth3d_mm"].value == 0 and detect.advanced["min_component"].value == 0
    # Every control of the widget says what it does.
    for widget in (detect.image, detect.ground_truth, detect.method, detect.backbone, detect.weights, detect.device,
                   detect.run_button, detect.progress):
        assert widget.tooltip


def test_a_layer_without_metadata_asks_for_its_modality(make_napari_viewer, wait_until_idle) -> None:
    from napari.utils.notifications import NotificationSeverity, notification_manager

    viewer = make_napari_viewer()
    layer = viewer.add_image(np.random.default_rng(0).random((6, 24, 24), dtype=np.float32), name="plain")
    detect = _docked(viewer, "Detect anomalies")
    detect.image.value = layer
    detect.backbone.value = "tiny-test"
    assert detect.modality.value == "choose..." and detect.advanced.expanded
    seen = len(notification_manager.records)
    detect.run_button.native.click()
    assert not detect.running
    errors = [n for n in notification_manager.records[seen:] if n.severity == NotificationSeverity.ERROR]
    assert len(errors) == 1 and "modality" in errors[0].message
    assert not any(lay.metadata.get("kind") == "anomaly_map" for lay in viewer.layers)
    detect.modality.value = "t2f"
    detect.run_button.native.click()
    wait_until_idle(detect)
    anomaly = next(lay for lay in viewer.layers if lay.metadata.get("kind") == "anomaly_map")
    assert anomaly.metadata["info"]["modality"] == "t2f"
