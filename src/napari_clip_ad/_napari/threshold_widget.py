"""The "Threshold and metrics" dock widget: re-threshold an anomaly map live, with metrics and CSV export."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import ComboBox, Container, FileEdit, FloatSlider, Label, PushButton
from napari.layers import Image, Labels
from napari.utils.notifications import show_error, show_info
from superqt.utils import qthrottled

from ..errors import ClipAdError, InputError
from ..metrics import dice
from .layers import MAP_KIND, MASK_KIND, mask_kwargs, threshold_mask
from .thresholds import Numbers, f1max_threshold, numbers_at, otsu_threshold, write_numbers_csv

if TYPE_CHECKING:  # pragma: no cover
    import napari

THROTTLE_MS = 60


class ThresholdWidget(Container):
    """Slider over the anomaly map's threshold; the mask layer and the numbers follow it."""

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__(labels=True)
        self.viewer = napari_viewer
        self.anomaly_map = ComboBox(label="anomaly map", choices=self._map_choices)
        self.ground_truth = ComboBox(label="ground truth", choices=self._labels_choices, nullable=True)
        self.threshold = FloatSlider(label="threshold", min=0.0, max=1.0, step=0.01, value=0.5)
        self.f1max_button = PushButton(text="F1-max threshold (needs ground truth)")
        self.otsu_button = PushButton(text="Otsu threshold")
        self.volume_numbers = Label(value="")
        self.slice_numbers = Label(value="")
        self.csv_file = FileEdit(label="CSV file", mode="w", filter="*.csv", nullable=True)
        self.export_button = PushButton(text="Export CSV")
        self.extend([self.anomaly_map, self.ground_truth, self.threshold, self.f1max_button, self.otsu_button,
                     self.volume_numbers, self.slice_numbers, self.csv_file, self.export_button])
        self.numbers: Numbers | None = None
        self._exact: float | None = None
        self._apply_soon = qthrottled(self.apply, timeout=THROTTLE_MS)
        self._slice_soon = qthrottled(self.update_slice_numbers, timeout=THROTTLE_MS)
        self.threshold.changed.connect(self._apply_soon)
        self.anomaly_map.changed.connect(self._on_map_changed)
        self.ground_truth.changed.connect(self._on_ground_truth_changed)
        self.f1max_button.changed.connect(self.use_f1max_threshold)
        self.otsu_button.changed.connect(self.use_otsu_threshold)
        self.export_button.changed.connect(self.export_csv)
        napari_viewer.layers.events.inserted.connect(self._on_layer_inserted)
        napari_viewer.layers.events.removed.connect(self.reset_choices)
        napari_viewer.dims.events.current_step.connect(self._slice_soon)
        self.native.destroyed.connect(self._disconnect)
        self._on_map_changed()

    def _disconnect(self, *_: Any) -> None:
        """Stop listening to the viewer once the widget is gone (pending updates are dropped)."""
        self._apply_soon.cancel()
        self._slice_soon.cancel()
        self.viewer.layers.events.inserted.disconnect(self._on_layer_inserted)
        self.viewer.layers.events.removed.disconnect(self.reset_choices)
        self.viewer.dims.events.current_step.disconnect(self._slice_soon)

    # --- choices -----------------------------------------------------------------------------
    def _map_choices(self, _widget: Any = None) -> list[tuple[str, Any]]:
        return [(layer.name, layer) for layer in self.viewer.layers
                if isinstance(layer, Image) and layer.metadata.get("kind") == MAP_KIND]

    def _labels_choices(self, _widget: Any = None) -> list[tuple[str, Any]]:
        return [(layer.name, layer) for layer in self.viewer.layers
                if isinstance(layer, Labels) and layer.metadata.get("kind") != MASK_KIND]

    def _on_layer_inserted(self, event: Any) -> None:
        self.reset_choices()
        layer = event.value
        if isinstance(layer, Image) and layer.metadata.get("kind") == MAP_KIND:
            self.anomaly_map.value = layer  # follow the newest result

    def _on_map_changed(self, *_: Any) -> None:
        layer = self.anomaly_map.value
        if layer is not None:
            wanted = layer.metadata.get("ground_truth_layer")
            match = next((lab for _, lab in self._labels_choices() if lab.name == wanted), None)
            if match is not None:
                self.ground_truth.value = match
        self._on_ground_truth_changed()
        self.apply()

    def _on_ground_truth_changed(self, *_: Any) -> None:
        self.f1max_button.enabled = self.ground_truth.value is not None
        if self.anomaly_map.value is not None:
            self.update_numbers()

    @property
    def current_threshold(self) -> float:
        """The threshold in use: the slider's value, or the exact value a button set (the slider keeps 6 decimals)."""
        value = float(self.threshold.value)
        if self._exact is not None and abs(self._exact - value) <= 1e-6:
            return self._exact
        return value

    def set_threshold(self, value: float) -> None:
        """Move the slider to ``value`` and use it exactly."""
        self._exact = float(value)
        self.threshold.value = self._exact
        self._apply_soon()

    def flush(self) -> None:
        """Apply pending (throttled) slider and slice updates now."""
        self._apply_soon.flush()
        self._slice_soon.flush()

    # --- thresholding ------------------------------------------------------------------------
    def mask_layer(self) -> Labels | None:
        """The mask layer of the chosen map (made when missing, e.g. after the user deleted it)."""
        map_layer = self.anomaly_map.value
        if map_layer is None:
            return None
        link = map_layer.metadata.get("link")
        for layer in self.viewer.layers:
            if isinstance(layer, Labels) and layer.metadata.get("kind") == MASK_KIND and layer.metadata.get("link") == link:
                return layer
        meta = {k: v for k, v in map_layer.metadata.items() if k != "kind"}
        data = threshold_mask(np.asarray(map_layer.data), self.current_threshold)
        return self.viewer.add_labels(data, **mask_kwargs(f"{map_layer.name} mask", meta, map_layer.scale,
                                                          map_layer.translate))

    def apply(self, *_: Any) -> None:
        """Threshold the chosen map into its mask layer (in place) and refresh the numbers."""
        mask = self.mask_layer()
        if mask is None:
            self.volume_numbers.value, self.slice_numbers.value = "No anomaly map: run 'Detect anomalies' first", ""
            self.numbers = None
            return
        map_layer, threshold = self.anomaly_map.value, self.current_threshold
        anomaly_map = np.asarray(map_layer.data)
        data = mask.data
        if isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.shape == anomaly_map.shape:
            threshold_mask(anomaly_map, threshold, out=data)
            mask.refresh()
        else:
            mask.data = threshold_mask(anomaly_map, threshold)
        map_layer.metadata["threshold"] = threshold
        mask.metadata["threshold"] = threshold
        self.update_numbers()

    def _ground_truth_array(self) -> np.ndarray | None:
        gt, map_layer = self.ground_truth.value, self.anomaly_map.value
        if gt is None or map_layer is None:
            return None
        data = np.asarray(gt.data)
        if data.shape != map_layer.data.shape:
            raise InputError(f"ground truth {gt.name!r} has shape {data.shape} but the map has {map_layer.data.shape}; "
                             "choose the segmentation of the analysed volume")
        return data > 0

    def _slice_index(self) -> int | None:
        map_layer = self.anomaly_map.value
        if map_layer is None:
            return None
        point = self.viewer.dims.point[-map_layer.ndim:]
        return int(np.round(map_layer.world_to_data(point)[0]))

    def update_numbers(self) -> None:
        """Recompute the volume metrics and the slice Dice at the current threshold."""
        mask = self.mask_layer()
        if mask is None:
            return
        try:
            gt = self._ground_truth_array()
        except ClipAdError as exc:
            self.volume_numbers.value, self.numbers = f"Error: {exc}", None
            return
        self.numbers = numbers_at(np.asarray(mask.data), self.current_threshold, gt, self._slice_index())
        self.volume_numbers.value = volume_text(self.numbers)
        self.slice_numbers.value = slice_text(self.numbers)

    def update_slice_numbers(self, *_: Any) -> None:
        """Refresh the 2D Dice of the slice on screen (after the viewer moved)."""
        mask = self.mask_layer() if self.anomaly_map.value is not None else None
        if mask is None or self.numbers is None:
            return
        gt = self._ground_truth_array() if self.numbers.dice is not None else None
        index = self._slice_index()
        if gt is not None and index is not None and 0 <= index < gt.shape[0]:
            self.numbers.slice_index, self.numbers.slice_dice = index, dice(np.asarray(mask.data)[index], gt[index])
        else:
            self.numbers.slice_index, self.numbers.slice_dice = index, None
        self.slice_numbers.value = slice_text(self.numbers)

    # --- buttons -----------------------------------------------------------------------------
    def use_f1max_threshold(self, *_: Any) -> None:
        """Move the slider to the threshold of the best volume Dice against the ground truth."""
        try:
            gt = self._ground_truth_array()
            if gt is None:
                raise InputError("F1-max needs a ground truth: choose a segmentation layer first")
            self.set_threshold(f1max_threshold(np.asarray(self.anomaly_map.value.data), gt))
        except ClipAdError as exc:
            show_error(str(exc))

    def use_otsu_threshold(self, *_: Any) -> None:
        """Move the slider to Otsu's threshold of the map's scored voxels."""
        if self.anomaly_map.value is None:
            show_error("no anomaly map: run 'Detect anomalies' first")
            return
        self.set_threshold(otsu_threshold(np.asarray(self.anomaly_map.value.data)))

    def export_csv(self, *_: Any) -> None:
        """Write the numbers shown to the chosen CSV file."""
        if self.numbers is None or self.csv_file.value is None:
            show_error("nothing to export: choose an anomaly map and a CSV file first")
            return
        context = {"anomaly_map": self.anomaly_map.value.name,
                   "ground_truth": "" if self.ground_truth.value is None else self.ground_truth.value.name}
        try:
            path = write_numbers_csv(self.csv_file.value, self.numbers, context)
        except (ClipAdError, OSError) as exc:
            show_error(f"{self.csv_file.value}: cannot write the CSV ({exc}); choose a writable file")
            return
        show_info(f"metrics written to {path}")


def volume_text(numbers: Numbers) -> str:
    """One line of volume metrics (or the predicted size without ground truth)."""
    if numbers.dice is None:
        return f"threshold {numbers.threshold:.3f}: {numbers.predicted_voxels} voxels flagged (choose a ground truth for metrics)"
    return (f"threshold {numbers.threshold:.3f}: Dice {numbers.dice:.4f}, sensitivity {numbers.sensitivity:.4f}, "
            f"specificity {numbers.specificity:.4f}, PPV {numbers.ppv:.4f}")


def slice_text(numbers: Numbers) -> str:
    """The 2D Dice of the slice on screen."""
    if numbers.slice_dice is None:
        return "" if numbers.slice_index is None else f"slice {numbers.slice_index}: no ground truth"
    return f"slice {numbers.slice_index}: 2D Dice {numbers.slice_dice:.4f}"
