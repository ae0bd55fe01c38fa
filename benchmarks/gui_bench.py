"""Threshold-change cost in the napari plugin, 2D and 3D, on a full 240x240x155 real case (headless).

Run: ``xvfb-run -a .venv/bin/python benchmarks/gui_bench.py [--repeats 5]``. No network, no model: the map
is the case's normalised T2-FLAIR (any [0, 1] map costs the same). Per display mode it reports, in one run:

* ``old update``: what the previous widget did per threshold change (mask in place + volume metrics);
* ``new update``: :meth:`ThresholdWidget.apply` now (mask, error overlay, metrics, cached map scores,
  per-slice Dice plot, layer refreshes), all before drawing;
* ``plain frame``: one rendered frame of the same layers with nothing changed (``viewer.screenshot``);
* ``change + frame``: a threshold change followed by its one frame (the screenshot renders it; Qt events
  are processed only afterwards, so napari's own redraw is not counted twice).

Item 4's rule: ``change + frame`` <= ``plain frame`` + 0.3 s, and 2D updates within 0.2 s.
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

    from napari_clip_ad._napari.layers import map_kwargs, threshold_mask
    from napari_clip_ad._napari.thresholds import numbers_at

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
    gt = seg.data > 0
    thresholds = iter(np.linspace(0.2, 0.8, 1000))

    def settle() -> None:
        for _ in range(3):
            QApplication.processEvents()

    def old_update() -> None:
        t = float(next(thresholds))
        threshold_mask(anomaly, t, out=mask.data)
        mask.refresh()
        numbers_at(mask.data, t, gt, 77)

    def new_update() -> None:
        widget._exact = float(next(thresholds))
        widget.threshold.value = widget._exact
        widget.flush()

    def frame() -> None:
        viewer.screenshot(canvas_only=True, flash=False)

    def change_and_frame() -> None:
        new_update()
        frame()  # the one frame showing the change (no event processing first, which would draw another)

    print(f"case {args.case.name}, map {anomaly.shape}, repeats {args.repeats}")
    print("| display | old update (s) | new update (s) | plain frame (s) | change + frame (s) | change + frame - plain (s) |")
    print("|---|---|---|---|---|---|")
    for ndisplay in (2, 3):
        viewer.dims.ndisplay = ndisplay
        viewer.dims.set_point(0, t2f.data_to_world((77, 0, 0))[0])
        settle()
        frame()  # first frame uploads the textures; not counted
        repeats = args.repeats if ndisplay == 2 else max(2, args.repeats // 2)
        old = _median_seconds(old_update, repeats)
        new = _median_seconds(new_update, repeats)
        settle()
        plain = _median_seconds(frame, repeats)
        changed = _median_seconds(change_and_frame, repeats)
        print(f"| {ndisplay}D | {old:.3f} | {new:.3f} | {plain:.3f} | {changed:.3f} | {changed - plain:+.3f} |")
    viewer.close()
    del map_layer
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
