"""Make the screenshots of docs/gui.md headless: ``xvfb-run -a .venv/bin/python docs/make_screenshots.py``.

Drives the plugin as a user would: opens a case with the plugin's reader, docks both widgets, runs
"Detect anomalies" and picks the F1-max threshold, then saves three PNGs to ``docs/images``:
``gui_2d_overlay.png`` (axial slice with map and mask), ``gui_3d.png`` (3D rendering) and
``gui_widgets.png`` (the whole window with the two widgets docked), ``gui_error_overlay.png`` (TP/FP/FN),
``gui_threshold_plot.png`` (metrics and the per-slice Dice plot), ``gui_advanced.png`` (the detect widget's
Advanced options) and ``gui_cohort.png`` (the Cohort widget's table on crops of the real cases).

Without real CLIP weights (offline) it uses the ``tiny-test`` random backbone: the pictures show the
interface, not the method's accuracy. Pass ``--backbone`` and ``--weights`` to use real ones.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if "NAPARI_CLIP_AD_KEEP_SETTINGS" not in os.environ:  # the widgets remember choices: keep the user's own untouched
    import tempfile

    os.environ["XDG_CONFIG_HOME"] = tempfile.mkdtemp(prefix="napari-clip-ad-config-")

HERE = Path(__file__).resolve().parent
REAL_CASE = HERE.parents[1] / "shared" / "data" / "brats2023" / "BraTS-GLI-00002-000"


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", type=Path, default=REAL_CASE if REAL_CASE.is_dir() else None,
                   help="case folder (default: the real BraTS case beside the checkout, else the synthetic sample)")
    p.add_argument("--modality", default="t2f")
    p.add_argument("--method", default="vand")
    p.add_argument("--backbone", default="tiny-test")
    p.add_argument("--weights", default=None, help="released weights name or file")
    p.add_argument("--out", type=Path, default=HERE / "images")
    return p.parse_args()


def main() -> int:
    """Open, run, threshold and save the three screenshots."""
    import napari
    from qtpy.QtWidgets import QApplication

    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    viewer = napari.Viewer(show=True, title="napari-clip-ad")
    viewer.window.resize(1500, 950)
    if args.case is None:
        viewer.open_sample("napari-clip-ad", "synthetic-case")
    else:
        viewer.open(str(args.case), plugin="napari-clip-ad")
    image = next(layer for layer in viewer.layers if layer.name.endswith(f" {args.modality}"))
    seg = next((layer for layer in viewer.layers if layer.name.endswith(" seg")), None)
    for layer in viewer.layers:
        layer.visible = layer is image
    _, detect = viewer.window.add_plugin_dock_widget("napari-clip-ad", "Detect anomalies")
    _, threshold = viewer.window.add_plugin_dock_widget("napari-clip-ad", "Threshold and metrics")
    detect.image.value = image
    detect.ground_truth.value = seg
    detect.method.value = args.method
    detect.backbone.value = args.backbone
    if args.weights:
        detect.weights.value = "file..." if Path(args.weights).is_file() else args.weights
        detect.weights_file.value = Path(args.weights) if Path(args.weights).is_file() else None
    detect.run_button.native.click()
    while detect.running:
        QApplication.processEvents()
    QApplication.processEvents()
    print(detect.status.value)
    if seg is not None:
        threshold.f1max_button.native.click()
    else:
        threshold.otsu_button.native.click()
    threshold.flush()
    print(threshold.volume_numbers.value)

    z = _slice_with_most_lesion(seg.data if seg is not None else threshold.mask_layer().data)
    viewer.dims.set_point(0, image.data_to_world((z, 0, 0))[0])
    threshold.flush()
    viewer.reset_view()
    _save(viewer, args.out / "gui_2d_overlay.png", canvas_only=True)
    _save(viewer, args.out / "gui_widgets.png", canvas_only=False)
    _grab(threshold.native, args.out / "gui_threshold_plot.png")  # metrics, map scores and the per-slice Dice plot
    for layer in viewer.layers:  # the error overlay alone over the MRI (TP green, FP red, FN blue)
        layer.visible = layer is image or layer.metadata.get("kind") == "error_overlay"
    _save(viewer, args.out / "gui_error_overlay.png", canvas_only=True)
    for layer in viewer.layers:
        layer.visible = layer is image or layer.metadata.get("kind") in ("anomaly_map", "anomaly_mask")
    detect.advanced.set_expanded(True)
    _grab(detect.native, args.out / "gui_advanced.png")

    viewer.dims.ndisplay = 3
    image.rendering = "mip"
    anomaly = threshold.anomaly_map.value
    anomaly.visible = False
    mask = threshold.mask_layer()
    mask.visible = True  # the threshold widget hides it in 3D (its live view is the map's MIP): show it here
    mask.rendering = "iso_categorical"
    mask.opacity = 0.7
    viewer.reset_view()  # (resets the camera angles too: set them after)
    viewer.camera.angles = (-60, 20, 150)
    _save(viewer, args.out / "gui_3d.png", canvas_only=True)
    if args.case is not None:
        _cohort_table(viewer, args)
    viewer.close()
    return 0


def _cohort_table(viewer, args: argparse.Namespace) -> None:
    """Run the Cohort widget on 16-slice crops of the real cases beside this one and grab its table."""
    import tempfile

    import nibabel as nib
    from qtpy.QtWidgets import QApplication

    root = Path(tempfile.mkdtemp(prefix="napari-clip-ad-cohort-"))
    for case in sorted(p for p in args.case.parent.iterdir() if p.is_dir()):
        (root / case.name).mkdir()
        for file in case.glob("*.nii.gz"):
            nib.save(nib.load(file).slicer[40:200, 30:210, 70:86], root / case.name / file.name)
    _, cohort = viewer.window.add_plugin_dock_widget("napari-clip-ad", "Cohort")
    cohort.cohort.value = root
    cohort.out.value = root / "results"
    cohort.backbone.value = args.backbone
    cohort.advanced["modality"].value = args.modality
    cohort.run_button.native.click()
    while cohort.running:
        QApplication.processEvents()
    QApplication.processEvents()
    print(cohort.status.value)
    _grab(cohort.native, args.out / "gui_cohort.png")


def _grab(widget, path: Path) -> None:
    """A PNG of one dock widget as it is drawn."""
    from qtpy.QtWidgets import QApplication

    for _ in range(5):
        QApplication.processEvents()
    widget.grab().save(str(path))
    print(path)


def _slice_with_most_lesion(labels) -> int:
    import numpy as np

    counts = np.count_nonzero(np.asarray(labels), axis=(1, 2))
    return int(np.argmax(counts))


def _save(viewer, path: Path, canvas_only: bool) -> None:
    from qtpy.QtWidgets import QApplication

    for _ in range(5):
        QApplication.processEvents()
    viewer.screenshot(str(path), canvas_only=canvas_only, flash=False)
    print(path)


if __name__ == "__main__":
    raise SystemExit(main())
