"""Threshold widget: error overlay, map scores, in-brain metrics, manual edits, slice numbering, plot, fixes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from napari_clip_ad._napari.layers import map_kwargs
from napari_clip_ad._napari.thresholds import FN, FP, TP
from napari_clip_ad.metrics import PixelAccumulator, confusion, dice, volume_metrics

pytestmark = pytest.mark.gui

PLUGIN = "napari-clip-ad"
CASE = "BraTS-GLI-00002-000"
OTHER = "BraTS-GLI-00012-000"


def _docked(viewer: Any, name: str) -> Any:
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, name)
    return widget


def _case_with_map(viewer: Any, small_cohort: Path) -> tuple[Any, Any, Any]:
    """Open the cropped real case and add a smooth map of it as the detect widget would (with its brain mask)."""
    viewer.open(str(small_cohort / CASE), plugin=PLUGIN)
    t2f = next(layer for layer in viewer.layers if layer.name == f"{CASE} t2f")
    seg = next(layer for layer in viewer.layers if layer.name == f"{CASE} seg")
    volume = np.asarray(t2f.data)
    anomaly = (volume / volume.max()).astype(np.float32)
    meta = {"case_id": CASE, "link": "test-link", "brain_mask": t2f.metadata["brain_mask"], "geometry": t2f.metadata["geometry"]}
    map_layer = viewer.add_image(anomaly, **map_kwargs("t2f anomaly (test)", meta, t2f.scale, t2f.translate))
    return t2f, seg, map_layer


def _mask(viewer: Any) -> Any:
    return next(layer for layer in viewer.layers if layer.metadata.get("kind") == "anomaly_mask"
                and not layer.metadata.get("edited"))


def _overlay(viewer: Any) -> Any:
    return next(layer for layer in viewer.layers if layer.metadata.get("kind") == "error_overlay")


def test_overlay_scores_region_and_plot(make_napari_viewer, small_cohort, qtbot) -> None:
    viewer = make_napari_viewer()
    t2f, seg, map_layer = _case_with_map(viewer, small_cohort)
    widget = _docked(viewer, "Threshold and metrics")
    assert widget.anomaly_map.value is map_layer and widget.ground_truth.value is seg  # same case id pre-selected
    gt, brain = seg.data > 0, t2f.metadata["brain_mask"]
    for threshold, in_brain in ((0.3, False), (0.55, True)):
        widget.in_brain.value = in_brain
        widget.threshold.value = threshold
        widget.flush()
        mask, overlay = _mask(viewer), _overlay(viewer)
        region = brain if in_brain else None
        c = confusion(mask.data, gt, region)
        values = overlay.data
        assert (np.count_nonzero(values == TP), np.count_nonzero(values == FP), np.count_nonzero(values == FN)) == (c.tp, c.fp, c.fn)
        np.testing.assert_array_equal(values == TP, (mask.data > 0) & gt & (True if region is None else region))
        expected = volume_metrics(mask.data, gt, region)
        assert widget.numbers.specificity == expected["specificity"] and widget.numbers.dice == expected["dice"]
        accumulator = PixelAccumulator()
        accumulator.update(map_layer.data, gt, mask=region)
        assert widget.scores.auroc == accumulator.auroc() and widget.scores.f1max == accumulator.f1max()
        assert f"AUROC {accumulator.auroc():.4f}" in widget.map_scores.value and "F1-max" in widget.map_scores.value
        assert widget.scores.ap == accumulator.average_precision() and widget.scores.aupro == accumulator.aupro()
        for label in ("AP", "AUPRO", "slices (map max): AUROC"):
            assert label in widget.map_scores.value, label
    colors = overlay.colormap.color_dict
    assert tuple(np.round(colors[TP][:3], 1)) == (0.0, 0.8, 0.0) and colors[FP][0] > 0.8 and colors[FN][2] > 0.8

    # The plot holds one 2D Dice per slice of the map's grid; a click on a slice moves the viewer there.
    mask = _mask(viewer)
    assert widget.plot.dices.size == map_layer.data.shape[0]
    k = int(np.nanargmax(widget.plot.dices))
    assert widget.plot.dices[k] == dice(mask.data[k], gt[k], brain[k])
    widget.go_to_slice(k)
    assert widget.numbers.slice_index == k and f"slice {k}:" in widget.slice_numbers.value
    assert widget.plot.current == k

    # A viewed slice outside the map's grid is said as such (no negative slice numbers).
    viewer.add_image(np.zeros((40, 4, 4), np.float32), translate=(t2f.translate[0] - 20, 0, 0), scale=t2f.scale)
    viewer.dims.set_point(0, t2f.translate[0] - 15 * t2f.scale[0])
    widget.flush()
    assert "outside the map" in widget.slice_numbers.value and "-" not in widget.slice_numbers.value.split("(")[0]


def test_manual_edit_survives_a_threshold_move(make_napari_viewer, small_cohort) -> None:
    viewer = make_napari_viewer()
    _, _, map_layer = _case_with_map(viewer, small_cohort)
    widget = _docked(viewer, "Threshold and metrics")
    widget.threshold.value = 0.9
    widget.flush()
    mask = _mask(viewer)
    mask.paint((5, 3, 3), 7, refresh=True)  # a hand edit, as the brush does
    painted = mask.data.copy()
    assert painted[5, 3, 3] == 7 and mask.metadata.get("edited")
    widget.threshold.value = 0.2
    widget.flush()
    np.testing.assert_array_equal(mask.data, painted)  # untouched
    live = _mask(viewer)
    assert live is not mask and "edited by hand" in widget.status.value
    np.testing.assert_array_equal(live.data, map_layer.data >= np.float32(0.2))


def test_other_case_warns_wrong_shape_clears_and_status_wraps(make_napari_viewer, small_cohort, qtbot) -> None:
    viewer = make_napari_viewer(show=True)
    _case_with_map(viewer, small_cohort)
    widget = _docked(viewer, "Threshold and metrics")
    widget.flush()
    assert widget.numbers.slice_index is not None and "2D Dice" in widget.slice_numbers.value
    other = viewer.open(str(small_cohort / OTHER / f"{OTHER}-seg.nii.gz"), plugin=PLUGIN)[0]
    other.metadata["case_id"] = OTHER
    widget.ground_truth.value = other
    widget.flush()
    assert "Warning" in widget.volume_numbers.value and OTHER in widget.volume_numbers.value

    dock = widget.native.parent()
    while dock is not None and type(dock).__name__ != "QtViewerDockWidget":
        dock = dock.parent()
    qtbot.wait(50)
    width_before = dock.width()
    long_name = "wrong shape " + "x" * 400
    viewer.add_labels(np.zeros((3, 4, 5), np.uint8), name=long_name)
    widget.ground_truth.value = viewer.layers[long_name]
    widget.flush()
    qtbot.wait(50)
    assert widget.volume_numbers.value.startswith("Error:") and long_name in widget.volume_numbers.value
    assert widget.slice_numbers.value == "" and widget.plot.dices.size == 0  # no stale slice figure under the error
    assert dock.width() <= width_before


def test_saving_two_layers_writes_two_aligned_files(make_napari_viewer, small_cohort, tmp_path) -> None:
    viewer = make_napari_viewer()
    _, _, map_layer = _case_with_map(viewer, small_cohort)
    widget = _docked(viewer, "Threshold and metrics")
    widget.flush()
    mask = _mask(viewer)
    viewer.layers.selection = {map_layer, mask}
    written = viewer.layers.save(str(tmp_path / "results"), selected=True, plugin=PLUGIN)
    assert sorted(Path(p).name for p in written) == sorted([f"{map_layer.name}.nii.gz", f"{mask.name}.nii.gz"])
    source = nib.load(small_cohort / CASE / f"{CASE}-t2f.nii.gz")
    for path in written:
        img = nib.load(path)
        np.testing.assert_allclose(img.affine, source.affine)
        assert img.shape == source.shape
    reopened = viewer.open(str(tmp_path / "results" / f"{map_layer.name}.nii.gz"), plugin=PLUGIN)[0]
    assert reopened.metadata["kind"] == "anomaly_map"
    np.testing.assert_array_equal(reopened.data, map_layer.data)


def test_3d_drag_moves_the_live_view_and_materialises_once_settled(make_napari_viewer, small_cohort) -> None:
    from napari_clip_ad._napari.threshold_widget import LIVE_3D_WINDOW

    viewer = make_napari_viewer()
    _, _, map_layer = _case_with_map(viewer, small_cohort)
    widget = _docked(viewer, "Threshold and metrics")
    widget.threshold.value = 0.5
    widget.flush()
    mask, overlay = _mask(viewer), _overlay(viewer)
    rendering, limits = map_layer.rendering, tuple(map_layer.contrast_limits)
    viewer.dims.ndisplay = 3
    # One volume pass per frame: the map's MIP with contrast limits at the threshold stands for the mask
    # (the projection of map >= threshold); mask and overlay hidden.
    assert map_layer.rendering == "mip"
    assert tuple(map_layer.contrast_limits) == pytest.approx((0.5, 0.5 + LIVE_3D_WINDOW))
    assert not mask.visible and not overlay.visible
    before = mask.data.copy()
    for value in (0.45, 0.4, 0.35):  # a drag
        widget.threshold.value = value
        assert tuple(map_layer.contrast_limits) == pytest.approx((value, value + LIVE_3D_WINDOW))  # shown at once
    np.testing.assert_array_equal(mask.data, before)  # not materialised during the drag
    widget.flush()  # the drag has settled
    np.testing.assert_array_equal(mask.data, map_layer.data >= np.float32(0.35))
    assert widget.numbers.threshold == 0.35
    map_layer.rendering = "iso"  # the user's choice in 3D: its threshold follows instead
    widget.threshold.value = 1.0
    assert map_layer.iso_threshold == 1.0
    viewer.dims.ndisplay = 2
    assert map_layer.rendering == rendering and tuple(map_layer.contrast_limits) == pytest.approx(limits)
    assert mask.visible and overlay.visible
