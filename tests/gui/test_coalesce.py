"""A threshold drag is coalesced: only its latest value is drawn, the whole volume follows once it rests."""

from __future__ import annotations

import numpy as np
import pytest
from test_threshold_features import _case_with_map, _docked, _mask, _overlay

from napari_clip_ad._napari.coalesce import Coalescer
from napari_clip_ad._napari.thresholds import error_overlay


def test_many_requests_before_the_loop_turns_give_one_call_with_the_last_value():
    scheduled, done = [], []
    coalescer = Coalescer(done.append, schedule=scheduled.append)
    for value in range(100):
        coalescer.request(value)
    assert len(scheduled) == 1 and done == [] and coalescer.pending  # one call scheduled, nothing drawn yet
    scheduled.pop()()  # the event loop turns
    assert done == [99] and coalescer.calls == 1 and not coalescer.pending
    coalescer.request(5)
    coalescer.request(6)
    coalescer.cancel()
    scheduled.pop()()
    assert done == [99]  # a cancelled value is never drawn
    coalescer.request(7)
    coalescer.flush()  # drawn at once; the scheduled call then finds nothing
    scheduled.pop()()
    assert done == [99, 7] and coalescer.calls == 2


@pytest.mark.gui
def test_a_2d_drag_draws_only_its_last_value_then_settles_once(make_napari_viewer, small_cohort, qtbot):
    from qtpy.QtWidgets import QApplication

    viewer = make_napari_viewer()
    _, seg, map_layer = _case_with_map(viewer, small_cohort)
    widget = _docked(viewer, "Threshold and metrics")
    widget.threshold.value = 0.5
    widget.flush()
    mask, overlay = _mask(viewer), _overlay(viewer)
    anomaly, gt = np.asarray(map_layer.data), seg.data > 0
    index = widget._slice_index()
    assert 0 <= index < anomaly.shape[0]
    before, drawn, applied = mask.data.copy(), widget._draw.calls, widget.applied
    values = np.linspace(0.5, 0.2, 40)
    for value in values:  # a drag's value changes, arriving before the event loop turns
        widget.threshold.value = float(value)
    assert widget._draw.calls == drawn and widget.applied == applied  # nothing materialised per step
    QApplication.processEvents()  # one turn of the loop: the coalesced draw
    last = float(values[-1])
    assert widget._draw.calls == drawn + 1  # one draw for 40 steps
    assert widget.applied == applied  # the whole volume waits for the drag to rest
    expected = anomaly >= np.float32(last)
    np.testing.assert_array_equal(mask.data[index], expected[index])  # the viewed slice shows the last value
    others = np.arange(anomaly.shape[0]) != index
    np.testing.assert_array_equal(mask.data[others], before[others])  # the rest not yet
    np.testing.assert_array_equal(overlay.data[index], error_overlay(expected[index], gt[index]))
    assert f"slice {index}:" in widget.slice_numbers.value
    qtbot.waitUntil(lambda: widget.applied == applied + 1, timeout=5000)  # settles by itself, once
    np.testing.assert_array_equal(mask.data, expected)
    np.testing.assert_array_equal(overlay.data, error_overlay(expected, gt))
    assert widget.numbers.threshold == pytest.approx(last) and "Dice" in widget.volume_numbers.value
    QApplication.processEvents()
    assert widget._draw.calls == drawn + 1 and widget.applied == applied + 1  # no stale frame left queued
