"""Threshold-change cost in the napari plugin, 2D and 3D, old path vs new, on a full 240x240x155 real case (headless).

Run: ``xvfb-run -a .venv/bin/python benchmarks/gui_bench.py [--repeats 5]``. No network, no model: the map
is the case's normalised T2-FLAIR (any [0, 1] map costs the same). Per display mode and path it reports, in one run:

* ``update``: the work before drawing, per threshold step of a drag;
* ``plain frame``: one rendered frame of the layers that path shows, nothing changed (``viewer.screenshot``);
* ``change + frame``: one step followed by its one frame (the screenshot renders it; Qt events are processed
  only afterwards, so napari's own redraw is not counted twice).

Paths: 2D old = the whole volume per step (mask, error overlay, metrics: ``ThresholdWidget.apply``, as the
throttled slider did); 2D new = the viewed slice of mask and overlay and its Dice (``preview_slice``, the
coalesced draw of a drag), the whole volume once the drag rests (``settle``, once per drag, plot included).
3D old = the map as a maximum-intensity projection with mask and overlay shown, ``apply`` per step; 3D iso =
the map's iso-surface at the threshold (the previous default); 3D new = the map's MIP with contrast limits at
the threshold (the projection of the mask), mask and overlay hidden; both change a uniform per step and
``apply`` once settled.
``drag``: 30 value changes queued before the event loop turns (a fast drag), then the loop runs until the
view has settled: how many slice draws and whole-volume updates it made, and the time to the settled view.

Item 4's rules: ``change + frame`` <= ``plain frame`` + 0.3 s, and 2D changes shown within 0.2 s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
CASE = Path(__file__).resolve().parents[2] / "shared" / "data" / "brats2023" / "BraTS-GLI-00002-000"


def _median_seconds(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    """Measure and print one table (seconds, medians)."""
    import napari
    import numpy as np
    from qtpy.QtWidgets import QApplication

    from napari_clip_ad._napari.layers import map_kwargs
    from napari_clip_ad._napari.threshold_widget import LIVE_3D_RENDERING, SETTLE_MS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", type=Path, default=CASE)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    viewer = napari.Viewer(show=True)
    viewer.window.resize(1200, 800)
    layers = viewer.open(str(args.case), plugin="napari-clip-ad")
    t2f = next(layer for layer in layers if layer.name.endswith(" t2f"))
    seg = next(layer for layer in layers if layer.name.endswith(" seg"))
    for layer in layers:
        layer.visible = layer in (t2f,)
    volume = np.asarray(t2f.data)
    anomaly = (volume / volume.max()).astype(np.float32)
    meta = {"case_id": t2f.metadata["case_id"], "link": "bench", "brain_mask": t2f.metadata["brain_mask"],
            "ground_truth_layer": seg.name}
    map_layer = viewer.add_image(anomaly, **map_kwargs("bench anomaly", meta, t2f.scale, t2f.translate))
    _, widget = viewer.window.add_plugin_dock_widget("napari-clip-ad", "Threshold and metrics")
    widget.flush()
    mask = widget.mask_layer()
    thresholds = iter(np.linspace(0.2, 0.8, 1000))

    def settle() -> None:
        for _ in range(3):
            QApplication.processEvents()

    def step() -> float:
        return float(next(thresholds))

    def set_value(value: float) -> None:
        """The slider moves (signals blocked: each path below does its own work for the step)."""
        widget._exact = value
        with widget.threshold.changed.blocked():
            widget.threshold.value = value

    def old_update() -> None:
        set_value(step())
        widget.apply()

    def new_update_2d() -> None:
        value = step()
        set_value(value)
        widget.preview_slice(value)

    def settle_update() -> None:
        set_value(step())
        widget.apply()
        widget._plot_soon.flush()

    def new_update_3d() -> None:
        set_value(step())
        widget._show_3d_threshold()  # what a slider step does in 3D (the whole volume follows once settled)

    def iso_update_3d() -> None:
        value = step()
        set_value(value)
        map_layer.iso_threshold = value

    def frame() -> None:
        viewer.screenshot(canvas_only=True, flash=False)

    def with_frame(update):
        def run() -> None:
            update()
            frame()  # the one frame showing the change (no event processing first, which would draw another)
        return run

    def show_3d(path: str) -> None:
        map_layer.rendering = {"old": "mip", "new": LIVE_3D_RENDERING, "iso": "iso"}[path]
        map_layer.contrast_limits = (0.0, 1.0)
        map_layer.iso_threshold = widget.current_threshold
        if path == "new":
            widget._show_3d_threshold()
        mask.visible = overlay.visible = path == "old"
        settle()
        frame()  # uploads what changed; not counted

    def drag() -> tuple[int, int, float]:
        from qtpy.QtCore import QTimer

        drawn, applied = widget._draw.calls, widget.applied
        values = [step() for _ in range(30)]
        for value in values:
            QTimer.singleShot(0, lambda v=value: setattr(widget.threshold, "value", v))
        start = time.perf_counter()
        while widget.applied == applied:  # until the whole volume has followed the last value
            QApplication.processEvents()
            time.sleep(0.005)
        elapsed = time.perf_counter() - start
        assert abs(widget.current_threshold - values[-1]) < 1e-6
        return widget._draw.calls - drawn, widget.applied - applied, elapsed

    rows = []
    viewer.dims.ndisplay = 2
    viewer.dims.set_point(0, t2f.data_to_world((77, 0, 0))[0])
    settle()
    frame()  # first frame uploads the textures; not counted
    overlay = widget.overlay_layer(create=False)
    plain = _median_seconds(frame, args.repeats)
    for path, update in (("old (whole volume per step)", old_update), ("new (viewed slice per step)", new_update_2d),
                         ("new: settle (once per drag)", settle_update)):
        cost = _median_seconds(update, args.repeats)
        changed = _median_seconds(with_frame(update), args.repeats)
        rows.append(("2D", path, cost, plain, changed))
    draws, applies, drag_time = drag()
    viewer.dims.ndisplay = 3
    repeats = max(2, args.repeats // 2)
    for path, shown, update in (("old (map MIP + mask + overlay, apply per step)", "old", old_update),
                                ("iso-surface of the map (the previous default), apply once settled", "iso", iso_update_3d),
                                ("new (map MIP at contrast limits [t, t + 0.001], apply once settled)", "new",
                                 new_update_3d)):
        show_3d(shown)
        cost = _median_seconds(update, repeats)
        plain3 = _median_seconds(frame, repeats)
        changed = _median_seconds(with_frame(update), repeats)
        rows.append(("3D", path, cost, plain3, changed))

    print(f"case {args.case.name}, map {anomaly.shape}, repeats {args.repeats} (3D: {repeats})")
    print("| display | path | update (s) | plain frame (s) | change + frame (s) | change + frame - plain (s) |")
    print("|---|---|---|---|---|---|")
    for display, path, cost, plain_frame, changed in rows:
        print(f"| {display} | {path} | {cost:.3f} | {plain_frame:.3f} | {changed:.3f} | {changed - plain_frame:+.3f} |")
    print(f"2D drag of 30 queued steps: {draws} slice draw(s), {applies} whole-volume update(s), "
          f"settled after {drag_time:.3f} s (settle delay {SETTLE_MS} ms included)")
    viewer.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
