"""The two dock widgets in a real viewer: a real run of the tiny random backbone on a cropped real case."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from napari_clip_ad import __version__
from napari_clip_ad.metrics import dice, volume_metrics
from napari_clip_ad._napari.detect_widget import CPU_NOTE
from napari_clip_ad._napari.thresholds import f1max_threshold, otsu_threshold

pytestmark = pytest.mark.gui

PLUGIN = "napari-clip-ad"


def _docked(viewer: Any, name: str) -> Any:
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, name)
    return widget


def _prepare(viewer: Any, add_cropped_case: Any, batch_size: int = 4) -> tuple[Any, Any, Any]:
    image, seg = add_cropped_case(viewer)
    detect = _docked(viewer, "Detect anomalies")
    detect.image.value = image
    detect.ground_truth.value = seg
    detect.method.value = "vand"
    detect.backbone.value = "tiny-test"
    detect.device.value = "cpu"
    detect.batch_size.value = batch_size
    return detect, image, seg


def _settle(widget: Any, threshold: float) -> None:
    """Let the (throttled) threshold widget apply what is pending; it must then show ``threshold``."""
    widget.flush()
    assert widget.numbers.threshold == threshold


def test_detect_then_threshold_on_a_real_case(make_napari_viewer, qtbot, add_cropped_case, wait_until_idle,
                                              tmp_path: Path) -> None:
    viewer = make_napari_viewer(show=True)
    detect, image, seg = _prepare(viewer, add_cropped_case)
    threshold_widget = _docked(viewer, "Threshold and metrics")
    before = len(viewer.layers)
    detect.run_button.native.click()
    assert detect.running and detect.run_button.text == "Cancel"
    wait_until_idle(detect)
    assert detect.run_button.text == "Run"
    assert (detect.progress.value, detect.progress.max) == (12, 12)

    # Two layers, aligned with the source.
    assert len(viewer.layers) == before + 3  # map, mask and (with the ground truth) the error overlay
    anomaly = next(layer for layer in viewer.layers if layer.metadata.get("kind") == "anomaly_map")
    mask = next(layer for layer in viewer.layers if layer.metadata.get("kind") == "anomaly_mask")
    assert anomaly.data.shape == image.data.shape == mask.data.shape
    for layer in (anomaly, mask):
        np.testing.assert_array_equal(layer.scale, image.scale)
        np.testing.assert_array_equal(layer.translate, image.translate)
    assert anomaly.data.dtype == np.float32 and 0.0 <= anomaly.data.min() and anomaly.data.max() <= 1.0
    assert anomaly.colormap.name == "inferno" and tuple(anomaly.contrast_limits) == (0.0, 1.0)
    assert anomaly.blending == "additive" and anomaly.colorbar.visible
    meta = anomaly.metadata
    assert meta["method"] == "vand" and meta["backbone"] == "tiny-test (random weights)" and meta["random_weights"]
    assert meta["weights_sha256"] is None and meta["napari_clip_ad_version"] == __version__
    assert mask.data.dtype == np.uint8
    np.testing.assert_array_equal(mask.data, anomaly.data >= 0.5)

    # The threshold widget follows the new map and its ground truth.
    assert threshold_widget.anomaly_map.value is anomaly or threshold_widget.anomaly_map.value.name == anomaly.name
    assert threshold_widget.ground_truth.value.name == seg.name
    gt = seg.data > 0
    for threshold in (0.3, 0.62):
        threshold_widget.threshold.value = threshold
        _settle(threshold_widget, threshold)
        assert mask in viewer.layers and len(viewer.layers) == before + 3  # updated in place, no new layer
        np.testing.assert_array_equal(mask.data, anomaly.data >= np.float32(threshold))
        expected = volume_metrics(anomaly.data >= np.float32(threshold), gt)
        numbers = threshold_widget.numbers
        assert (numbers.dice, numbers.sensitivity, numbers.specificity, numbers.ppv) == (
            expected["dice"], expected["sensitivity"], expected["specificity"], expected["ppv"])
        assert f"Dice {expected['dice']:.4f}" in threshold_widget.volume_numbers.value
        assert f"PPV {expected['ppv']:.4f}" in threshold_widget.volume_numbers.value

    # 2D Dice of the slice on screen follows the viewer.
    for world_z in (73, 78):  # the crop's slices 3 and 8
        viewer.dims.set_point(0, world_z)
        threshold_widget.flush()
        k = world_z - 70
        assert threshold_widget.numbers.slice_index == k
        assert threshold_widget.numbers.slice_dice == dice(mask.data[k], gt[k])
        assert f"slice {k}: 2D Dice" in threshold_widget.slice_numbers.value

    threshold_widget.f1max_button.native.click()
    best = f1max_threshold(anomaly.data, gt)
    _settle(threshold_widget, best)
    assert threshold_widget.numbers.dice >= volume_metrics(anomaly.data >= np.float32(0.62), gt)["dice"]
    threshold_widget.otsu_button.native.click()
    _settle(threshold_widget, otsu_threshold(anomaly.data))

    threshold_widget.csv_file.value = tmp_path / "numbers.csv"
    threshold_widget.export_button.native.click()
    row, = csv.DictReader((tmp_path / "numbers.csv").open())
    assert float(row["dice"]) == threshold_widget.numbers.dice and row["ground_truth"] == seg.name

    # What the user sees is not blank: the map (inferno) shows over the MRI.
    viewer.dims.set_point(0, 76)
    viewer.reset_view()
    qtbot.wait(50)
    shot = viewer.screenshot(canvas_only=True, flash=False)
    assert shot.std() > 10
    rgb = shot[..., :3].astype(int)
    assert np.count_nonzero((rgb[..., 0] - rgb[..., 2]) > 40) > 100  # inferno's reds and oranges are on screen


def test_cancel_leaves_no_partial_layer(make_napari_viewer, qtbot, add_cropped_case, wait_until_idle) -> None:
    viewer = make_napari_viewer()
    detect, _, _ = _prepare(viewer, add_cropped_case, batch_size=1)
    before = [layer.name for layer in viewer.layers]
    detect.run_button.native.click()
    while detect.progress.value < 1:  # the first batch is through: the run is under way
        qtbot.wait(10)
    detect.run_button.native.click()
    wait_until_idle(detect)
    assert [layer.name for layer in viewer.layers] == before
    assert detect.status.value.startswith("Cancelled") and detect.run_button.text == "Run"
    assert detect.progress.value < 12


def test_a_bad_weights_file_is_one_readable_notification(make_napari_viewer, add_cropped_case, wait_until_idle,
                                                         tmp_path: Path) -> None:
    from napari.utils.notifications import NotificationSeverity, notification_manager

    viewer = make_napari_viewer()
    detect, _, _ = _prepare(viewer, add_cropped_case)
    bad = tmp_path / "weights.pth"
    bad.write_bytes(b"not a checkpoint")
    detect.weights.value = "file..."
    detect.weights_file.value = bad
    before = [layer.name for layer in viewer.layers]
    seen = len(notification_manager.records)
    detect.run_button.native.click()
    wait_until_idle(detect)
    errors = [n for n in notification_manager.records[seen:] if n.severity == NotificationSeverity.ERROR]
    assert len(errors) == 1
    assert str(bad) in errors[0].message and "\n" not in errors[0].message
    assert [layer.name for layer in viewer.layers] == before and detect.run_button.text == "Run"


def test_devices_offered_are_the_ones_available(make_napari_viewer) -> None:
    viewer = make_napari_viewer()
    _, detect = viewer.window.add_plugin_dock_widget(PLUGIN, "Detect anomalies")
    if torch.cuda.is_available():
        assert "cuda" in detect.device.choices and not detect.cpu_note.visible
    else:
        assert detect.device.choices == ("auto", "cpu")
        assert detect.cpu_note.value == CPU_NOTE and not detect.cpu_note.native.isHidden()
    assert set(detect.backbone.choices) >= {"tiny-test", "openai-vit-l-14-336"}
    assert "vand-mvtec" in detect.weights.choices and "anomalyclip-mvtec" not in detect.weights.choices
