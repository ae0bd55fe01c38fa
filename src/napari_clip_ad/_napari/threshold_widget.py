"""The "Threshold and metrics" dock widget: re-threshold an anomaly map live, with metrics, overlay and plot."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    FloatSlider,
    Label,
    PushButton,
)
from napari.layers import Image, Labels
from napari.utils.colormaps import DirectLabelColormap
from napari.utils.notifications import show_error, show_info
from superqt.utils import qdebounced, qthrottled

from ..errors import ClipAdError, InputError
from ..postprocess3d import remove_small_components
from .coalesce import Coalescer
from .dice_plot import DicePlot
from .layers import MAP_KIND, MASK_KIND, mask_kwargs, threshold_mask
from .status import wrapping
from .thresholds import (
    OVERLAY_COLORS,
    MapScores,
    Numbers,
    error_overlay,
    f1max_threshold,
    map_scores,
    numbers_at,
    otsu_threshold,
    slice_dices,
    write_numbers_csv,
)

if TYPE_CHECKING:  # pragma: no cover
    import napari

THROTTLE_MS = 60
"""Slice-number updates while the viewer's slider moves (not the threshold: that one is coalesced)."""
PLOT_SETTLE_MS = 150
"""The per-slice Dice plot is redrawn once the threshold rests this long (a matplotlib draw costs ~0.1-0.5 s)."""
SETTLE_MS = 250
"""During a drag only what is on screen follows the threshold (2D: the viewed slice of mask and overlay and its
Dice; 3D: the map's live view, see LIVE_3D_RENDERING); the whole-volume mask, overlay, metrics and plot follow once it rests this long."""
SETTLE_3D_MS = SETTLE_MS
LIVE_3D_RENDERING = "mip"
LIVE_3D_WINDOW = 1e-3
"""In 3D the map is drawn as a MIP with contrast limits [threshold, threshold + this]: bright where a voxel on the ray
is at or above the threshold, i.e. the projection of the mask, changed by a uniform (no upload)."""
OVERLAY_KIND = "error_overlay"
AXIS_NAMES = ("axial", "coronal", "sagittal")


def overlay_colormap() -> DirectLabelColormap:
    """TP green, FP red, FN blue (the study's Fig. 5); everything else transparent."""
    return DirectLabelColormap(color_dict={**OVERLAY_COLORS, None: (0.0, 0.0, 0.0, 0.0)})


class ThresholdWidget(Container):
    """Slider over the anomaly map's threshold; the mask, the error overlay, the numbers and the plot follow it."""

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__(labels=True)
        self.viewer = napari_viewer
        self.anomaly_map = ComboBox(label="anomaly map", choices=self._map_choices,
                                    tooltip="the anomaly map to threshold (the newest one is chosen when it appears)")
        self.ground_truth = ComboBox(label="ground truth", choices=self._labels_choices, nullable=True,
                                     tooltip="segmentation of the same case (label > 0 = lesion) for the metrics")
        self.in_brain = CheckBox(text="metrics in brain only", value=False,
                                 tooltip="count only the brain's voxels (the background otherwise inflates specificity)")
        self.threshold = FloatSlider(label="threshold", min=0.0, max=1.0, step=0.01, value=0.5,
                                     tooltip="voxels with map >= threshold are positive; the network does not run again")
        self.f1max_button = PushButton(text="F1-max threshold (needs ground truth)",
                                       tooltip="move to the threshold of the best voxel F1 (= best volume Dice)")
        self.otsu_button = PushButton(text="Otsu threshold", tooltip="Otsu's split of the scored voxels' histogram")
        self.show_overlay = CheckBox(text="error overlay (TP green, FP red, FN blue)", value=True,
                                     tooltip="a Labels layer of the mask against the ground truth, following the threshold")
        self.map_scores = wrapping(Label(value="", tooltip="threshold-free scores of the map, computed once per map"))
        self.volume_numbers = wrapping(Label(value="", tooltip="volume metrics at the current threshold"))
        self.slice_numbers = wrapping(Label(value="", tooltip="2D Dice of the slice on screen, in the map's own grid"))
        self.status = wrapping(Label(value=""))
        self.csv_file = FileEdit(label="CSV file", mode="w", filter="*.csv", nullable=True,
                                 tooltip="where Export CSV writes the numbers shown")
        self.export_button = PushButton(text="Export CSV", tooltip="write the numbers shown to the CSV file")
        self.extend([self.anomaly_map, self.ground_truth, self.in_brain, self.threshold, self.f1max_button,
                     self.otsu_button, self.show_overlay, self.map_scores, self.volume_numbers, self.slice_numbers,
                     self.status, self.csv_file, self.export_button])
        self.plot = DicePlot(self.go_to_slice)
        self.native.layout().addWidget(self.plot)
        self.numbers: Numbers | None = None
        self.scores: MapScores | None = None
        self._scores_key: tuple | None = None
        self._exact: float | None = None
        self._watched: set[int] = set()
        self._draw = Coalescer(self._show_threshold)  # a drag draws only its latest value
        self.applied = 0
        """Whole-volume updates done (:meth:`apply`), for tests and benchmarks."""
        self._apply_settled = qdebounced(self.apply, timeout=SETTLE_MS)
        self._slice_soon = qthrottled(self.update_slice_numbers, timeout=THROTTLE_MS)
        self._plot_soon = qdebounced(self._update_plot, timeout=PLOT_SETTLE_MS)
        self._plot_args: tuple | None = None
        self._saved_3d: dict[int, dict[str, Any]] = {}
        self.threshold.changed.connect(self._on_threshold_changed)
        self.anomaly_map.changed.connect(self._on_map_changed)
        self.ground_truth.changed.connect(self._on_ground_truth_changed)
        self.in_brain.changed.connect(self._on_ground_truth_changed)
        self.show_overlay.changed.connect(self._on_ground_truth_changed)
        self.f1max_button.changed.connect(self.use_f1max_threshold)
        self.otsu_button.changed.connect(self.use_otsu_threshold)
        self.export_button.changed.connect(self.export_csv)
        napari_viewer.layers.events.inserted.connect(self._on_layer_inserted)
        napari_viewer.layers.events.removed.connect(self.reset_choices)
        napari_viewer.dims.events.current_step.connect(self._slice_soon)
        napari_viewer.dims.events.order.connect(self._on_ground_truth_changed)
        napari_viewer.dims.events.ndisplay.connect(self._on_ndisplay)
        self.native.destroyed.connect(self._disconnect)
        self._on_map_changed()

    def _disconnect(self, *_: Any) -> None:
        """Stop listening to the viewer once the widget is gone (pending updates are dropped)."""
        self._draw.cancel()
        self._apply_settled.cancel()
        self._plot_soon.cancel()
        self._slice_soon.cancel()
        self.viewer.dims.events.ndisplay.disconnect(self._on_ndisplay)
        self.viewer.layers.events.inserted.disconnect(self._on_layer_inserted)
        self.viewer.layers.events.removed.disconnect(self.reset_choices)
        self.viewer.dims.events.current_step.disconnect(self._slice_soon)
        self.viewer.dims.events.order.disconnect(self._on_ground_truth_changed)

    # --- choices -----------------------------------------------------------------------------
    def _map_choices(self, _widget: Any = None) -> list[tuple[str, Any]]:
        return [(layer.name, layer) for layer in self.viewer.layers
                if isinstance(layer, Image) and layer.metadata.get("kind") == MAP_KIND]

    def _labels_choices(self, _widget: Any = None) -> list[tuple[str, Any]]:
        return [(layer.name, layer) for layer in self.viewer.layers
                if isinstance(layer, Labels) and layer.metadata.get("kind") not in (MASK_KIND, OVERLAY_KIND)]

    def _on_layer_inserted(self, event: Any) -> None:
        self.reset_choices()
        layer = event.value
        if isinstance(layer, Image) and layer.metadata.get("kind") == MAP_KIND:
            self.anomaly_map.value = layer  # follow the newest result
        elif self.ground_truth.value is None and self._same_case(layer):
            self.ground_truth.value = layer  # the map's own segmentation, opened after the map

    def _same_case(self, layer: Any) -> bool:
        """Whether ``layer`` is a segmentation of the chosen map's case on the map's grid."""
        map_layer = self.anomaly_map.value
        case_id = None if map_layer is None else map_layer.metadata.get("case_id")
        return (case_id is not None and isinstance(layer, Labels)
                and layer.metadata.get("kind") not in (MASK_KIND, OVERLAY_KIND)
                and layer.metadata.get("case_id") == case_id and layer.data.shape == map_layer.data.shape)

    def _on_map_changed(self, *_: Any) -> None:
        layer = self.anomaly_map.value
        if layer is not None:
            # The map's own threshold first: choosing the ground truth applies the current one (and records it).
            threshold = layer.metadata.get("threshold")
            if isinstance(threshold, float) and abs(threshold - float(self.threshold.value)) > 1e-9:
                self._exact = threshold
                self.threshold.value = threshold
            wanted = layer.metadata.get("ground_truth_layer")
            match = next((lab for _, lab in self._labels_choices() if lab.name == wanted), None)
            if match is None:
                match = next((lab for _, lab in self._labels_choices() if self._same_case(lab)), None)
            if match is not None:
                self.ground_truth.value = match
            brain = self._brain()
            self.in_brain.enabled = brain is not None
        self._on_ground_truth_changed()

    def _on_ground_truth_changed(self, *_: Any) -> None:
        self.f1max_button.enabled = self.ground_truth.value is not None
        if self.anomaly_map.value is not None:
            self.apply()
        else:
            self.volume_numbers.value = "No anomaly map: run 'Detect anomalies' first"

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
        self._on_threshold_changed()

    def flush(self) -> None:
        """Apply pending (coalesced or settling) slider and slice updates now."""
        self._draw.flush()
        self._apply_settled.flush()
        self._slice_soon.flush()
        self._plot_soon.flush()

    def _update_plot(self) -> None:
        if self._plot_args is not None:
            mask_data, gt, axis, region = self._plot_args
            self._plot_args = None
            index = None if self.numbers is None else self.numbers.slice_index
            self.plot.set_dices(slice_dices(mask_data, gt, axis, region), AXIS_NAMES[axis] if axis < 3 else str(axis),
                                index)

    # --- 3D: cheap frames while the threshold moves ---------------------------------------------
    @property
    def in_3d(self) -> bool:
        """True while the viewer renders in 3D."""
        return self.viewer.dims.ndisplay == 3

    def _on_threshold_changed(self, *_: Any) -> None:
        """3D: move the map's live view now (a uniform: no upload; Qt merges the repaints). 2D: draw the viewed
        slice at the latest value (coalesced: a drag never queues stale updates). Both: the whole volume once settled."""
        if self.in_3d:
            self._show_3d_threshold()
            self._apply_settled()
            return
        self._draw.request(self.current_threshold)

    def _show_3d_threshold(self) -> None:
        """The map's 3D view at the threshold: contrast limits [t, t + LIVE_3D_WINDOW] of its MIP (the projection
        of the mask) or, when the user chose the iso-surface rendering, its iso threshold."""
        map_layer = self.anomaly_map.value
        if map_layer is None or id(map_layer) not in self._saved_3d:
            return
        threshold = self.current_threshold
        if map_layer.rendering == "iso":
            map_layer.iso_threshold = threshold
        else:
            map_layer.contrast_limits = (threshold, threshold + LIVE_3D_WINDOW)

    def _show_threshold(self, threshold: float) -> None:
        """The coalesced 2D step: the viewed slice now, the whole volume once the threshold rests."""
        if self.in_3d:  # switched to 3D meanwhile: the map's live view shows it
            self._apply_settled()
            return
        if not self.preview_slice(threshold):
            self.apply()  # nothing to preview (no live mask yet, or the view lies outside the map): do it all now
            return
        self._apply_settled()

    def preview_slice(self, threshold: float) -> bool:
        """Threshold only the viewed slice into the mask and overlay layers and show its 2D Dice.

        The cheap part of a change (1/155 of the volume, two 2D texture uploads); the volume's metrics, the
        other slices, the minimum-component cleaning and the plot follow in :meth:`apply` once the drag rests.

        Returns:
            False when there is nothing to preview (no live mask, the view outside the map, or a mismatched
            ground truth: :meth:`apply` then reports it).
        """
        map_layer, mask = self.anomaly_map.value, self._linked(MASK_KIND)
        index, axis = self._slice_index(), self.slice_axis
        if map_layer is None or mask is None or index is None:
            return False
        data = mask.data
        anomaly_map = np.asarray(map_layer.data)
        if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.shape == anomaly_map.shape
                and 0 <= index < anomaly_map.shape[axis]):
            return False
        gt_layer = self.ground_truth.value
        if gt_layer is not None and tuple(gt_layer.data.shape) != anomaly_map.shape:
            return False  # apply() reports the mismatch
        cut = (slice(None),) * axis + (index,)
        gt = None if gt_layer is None else np.asarray(gt_layer.data[cut]) > 0  # this slice only
        threshold_mask(anomaly_map[cut], threshold, out=data[cut])
        mask.refresh(thumbnail=False, extent=False, highlight=False)
        region = self._region()
        region = None if region is None else region[cut]
        overlay = self._linked(OVERLAY_KIND)
        if gt is not None and overlay is not None and overlay.visible and overlay.data.shape == data.shape:
            error_overlay(data[cut], gt, region, out=overlay.data[cut])
            overlay.refresh(thumbnail=False, extent=False, highlight=False)
        from ..metrics import dice

        # A preview only: self.numbers (exported, plotted) keeps the last settled values until apply() runs.
        shown = Numbers(threshold, slice_index=index, slice_dice=None if gt is None else dice(data[cut], gt, region))
        self.slice_numbers.value = slice_text(shown, data.shape[axis])
        self.volume_numbers.value = f"threshold {threshold:.3f}: volume metrics follow when the slider rests..."
        return True

    def _on_ndisplay(self, *_: Any) -> None:
        """In 3D show the mask as a contrast-limit MIP of the map and hide the volume layers that would each cost a pass.

        Measured on llvmpipe (docs/benchmarks.md): a frame of the map's MIP alone costs ~1/3 of map MIP + mask +
        overlay and ~1/5 of the map's iso-surface. The user's rendering, contrast limits and visibilities come
        back in 2D; a user who picks the iso-surface rendering in 3D gets its threshold moved instead.
        """
        map_layer = self.anomaly_map.value
        if map_layer is None:
            return
        linked = [lay for lay in (self._linked(MASK_KIND), self._linked(OVERLAY_KIND)) if lay is not None]
        if self.in_3d:
            self._saved_3d = {id(lay): {"visible": lay.visible} for lay in linked}
            self._saved_3d[id(map_layer)] = {"rendering": map_layer.rendering,
                                             "contrast_limits": tuple(map_layer.contrast_limits)}
            map_layer.rendering = LIVE_3D_RENDERING
            self._show_3d_threshold()
            for layer in linked:
                layer.visible = False
        else:
            saved = self._saved_3d.get(id(map_layer), {})
            map_layer.rendering = saved.get("rendering", map_layer.rendering)
            if "contrast_limits" in saved:
                map_layer.contrast_limits = saved["contrast_limits"]
            for layer in linked:
                layer.visible = self._saved_3d.get(id(layer), {}).get("visible", layer.visible)
            self._saved_3d = {}

    # --- layers ------------------------------------------------------------------------------
    def _linked(self, kind: str) -> Labels | None:
        map_layer = self.anomaly_map.value
        link = map_layer.metadata.get("link") if map_layer is not None else None
        for layer in self.viewer.layers:
            meta = layer.metadata
            if (isinstance(layer, Labels) and meta.get("kind") == kind and meta.get("link") == link
                    and not meta.get("edited")):
                return layer
        return None

    def mask_layer(self) -> Labels | None:
        """The live (unedited) mask layer of the chosen map; made when missing or after a manual edit."""
        map_layer = self.anomaly_map.value
        if map_layer is None:
            return None
        layer = self._linked(MASK_KIND)
        if layer is None:
            meta = {k: v for k, v in map_layer.metadata.items() if k != "kind"}
            edited = any(lay.metadata.get("edited") and lay.metadata.get("link") == meta.get("link")
                         for lay in self.viewer.layers)
            name = f"{map_layer.name} mask" + (" (threshold)" if edited else "")
            layer = self.viewer.add_labels(self._mask_of(np.asarray(map_layer.data), self.current_threshold),
                                           **mask_kwargs(name, meta, map_layer.scale, map_layer.translate))
        self._watch(layer)
        return layer

    def _watch(self, mask: Labels) -> None:
        """Notice manual painting: from then on the threshold writes into a new layer, never over the edit."""
        if id(mask) in self._watched:
            return
        self._watched.add(id(mask))

        def edited(*_: Any, layer: Labels = mask) -> None:
            if not layer.metadata.get("edited"):
                layer.metadata["edited"] = True
                layer.name = f"{layer.name} (edited)"
                self.status.value = (f"{layer.name!r} was edited by hand: it is kept; the threshold now writes "
                                     "into a new mask layer")

        mask.events.paint.connect(edited)

    def overlay_layer(self, create: bool) -> Labels | None:
        """The error-overlay layer of the chosen map (made when ``create`` and missing)."""
        map_layer = self.anomaly_map.value
        layer = self._linked(OVERLAY_KIND)
        if layer is None and create and map_layer is not None:
            meta = {k: v for k, v in map_layer.metadata.items() if k != "kind"}
            layer = self.viewer.add_labels(np.zeros(map_layer.data.shape, dtype=np.uint8),
                                           name=f"{map_layer.name} errors (TP green, FP red, FN blue)",
                                           scale=map_layer.scale, translate=map_layer.translate, opacity=0.7,
                                           colormap=overlay_colormap(), metadata={**meta, "kind": OVERLAY_KIND},
                                           visible=not self.in_3d)
        return layer

    def _mask_of(self, anomaly_map: np.ndarray, threshold: float, out: np.ndarray | None = None) -> np.ndarray:
        """The mask at ``threshold``, cleaned of components under the run's ``min component`` (as infer)."""
        mask = threshold_mask(anomaly_map, threshold, out=out)
        minimum = int((self.anomaly_map.value.metadata if self.anomaly_map.value is not None else {}).get("min_component", 0))
        if minimum > 0:
            mask[...] = remove_small_components(mask.astype(bool), min_voxels=minimum)
        return mask

    # --- thresholding ------------------------------------------------------------------------
    def apply(self, *_: Any) -> None:
        """Threshold the chosen map into its live mask layer (in place) and refresh overlay, numbers and plot."""
        self.applied += 1
        mask = self.mask_layer()
        if mask is None:
            self.volume_numbers.value, self.slice_numbers.value = "No anomaly map: run 'Detect anomalies' first", ""
            self.numbers = None
            self.plot.clear_plot()
            return
        map_layer, threshold = self.anomaly_map.value, self.current_threshold
        anomaly_map = np.asarray(map_layer.data)
        data = mask.data
        if isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.shape == anomaly_map.shape:
            self._mask_of(anomaly_map, threshold, out=data)
            mask.refresh()
        else:
            mask.data = self._mask_of(anomaly_map, threshold)
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

    def _brain(self) -> np.ndarray | None:
        map_layer = self.anomaly_map.value
        brain = map_layer.metadata.get("brain_mask") if map_layer is not None else None
        return brain if isinstance(brain, np.ndarray) and brain.shape == map_layer.data.shape else None

    def _region(self) -> np.ndarray | None:
        return self._brain() if self.in_brain.value else None

    @property
    def slice_axis(self) -> int:
        """The data axis the viewer slices along (the slider's axis in 2D; axis 0 in 3D)."""
        not_displayed = list(self.viewer.dims.not_displayed)
        return int(not_displayed[-1]) if not_displayed else 0

    def _slice_index(self) -> int | None:
        """The viewed slice in the map's own grid (may lie outside it)."""
        map_layer = self.anomaly_map.value
        if map_layer is None:
            return None
        point = self.viewer.dims.point[-map_layer.ndim:]
        return int(np.round(map_layer.world_to_data(point)[self.slice_axis]))

    def _case_warning(self) -> str:
        gt, map_layer = self.ground_truth.value, self.anomaly_map.value
        ours = map_layer.metadata.get("case_id") if map_layer is not None else None
        theirs = gt.metadata.get("case_id") if gt is not None else None
        if ours is not None and theirs is not None and ours != theirs:
            return f"Warning: ground truth {gt.name!r} is of case {theirs}, the map of case {ours}. "
        return ""

    def _fail(self, message: str) -> None:
        """Show an error and clear every figure that would otherwise be stale."""
        self.volume_numbers.value, self.slice_numbers.value, self.map_scores.value = f"Error: {message}", "", ""
        self.numbers = self.scores = None
        self._plot_args = None
        self.plot.clear_plot("error: see the message above")
        overlay = self.overlay_layer(create=False)
        if overlay is not None:
            overlay.visible = False

    def update_numbers(self) -> None:
        """Recompute overlay, volume metrics, slice Dice and plot at the current threshold."""
        mask = self.mask_layer()
        if mask is None:
            return
        try:
            gt = self._ground_truth_array()
        except ClipAdError as exc:
            self._fail(str(exc))
            return
        region, axis = self._region(), self.slice_axis
        mask_data = np.asarray(mask.data)
        self.numbers = numbers_at(mask_data, self.current_threshold, gt, self._slice_index(), region, axis)
        self.volume_numbers.value = self._case_warning() + volume_text(self.numbers)
        self.slice_numbers.value = slice_text(self.numbers, mask_data.shape[axis])
        if gt is None:
            self.map_scores.value = ""
            self._plot_args = None
            self.plot.clear_plot("no ground truth")
            overlay = self.overlay_layer(create=False)
            if overlay is not None:
                overlay.visible = False
            return
        self._update_scores(gt, region)
        overlay = self.overlay_layer(create=bool(self.show_overlay.value))
        if overlay is not None:
            if isinstance(overlay.data, np.ndarray) and overlay.data.shape == mask_data.shape:
                error_overlay(mask_data, gt, region, out=overlay.data)
                overlay.refresh()
            else:
                overlay.data = error_overlay(mask_data, gt, region)
            if not self.in_3d:  # in 3D it stays hidden unless the user shows it (one more volume pass per frame)
                overlay.visible = bool(self.show_overlay.value)
        self._plot_args = (mask_data, gt, axis, region)
        self._plot_soon()

    def _update_scores(self, gt: np.ndarray, region: np.ndarray | None) -> None:
        """AUROC, AP, AUPRO, F1-max and slice detection of the map: computed once per (map, ground truth, region)."""
        map_layer = self.anomaly_map.value
        key = (id(map_layer), id(map_layer.data), id(self.ground_truth.value), region is not None)
        if key != self._scores_key:
            try:
                self.scores = map_scores(np.asarray(map_layer.data), gt, region)
            except (ClipAdError, ValueError) as exc:
                self.scores = None
                self.map_scores.value = f"Error: {exc}"
                return
            self._scores_key = key
        s = self.scores

        def fmt(v: float | None) -> str:
            return "n/a" if v is None else f"{v:.4f}"

        where = " in brain" if region is not None else ""
        self.map_scores.value = (f"map{where}: AUROC {s.auroc:.4f}, AP {fmt(s.ap)}, AUPRO {fmt(s.aupro)}, "
                                 f"F1-max {s.f1max:.4f} at threshold {s.f1max_threshold:.3f}; "
                                 f"slices (map max): AUROC {fmt(s.slice_auroc)}, AP {fmt(s.slice_ap)}")

    def update_slice_numbers(self, *_: Any) -> None:
        """Refresh the 2D Dice of the slice on screen and the plot's marker (after the viewer moved)."""
        if self.anomaly_map.value is None or self.numbers is None:
            return
        mask = self.mask_layer()
        try:
            gt = self._ground_truth_array() if self.numbers.dice is not None else None
        except ClipAdError as exc:
            self._fail(str(exc))
            return
        index, axis, region = self._slice_index(), self.slice_axis, self._region()
        mask_data = np.asarray(mask.data)
        if gt is not None and index is not None and 0 <= index < gt.shape[axis]:
            cut = (slice(None),) * axis + (index,)
            from ..metrics import dice

            self.numbers.slice_dice = dice(mask_data[cut], gt[cut], None if region is None else region[cut])
        else:
            self.numbers.slice_dice = None
        self.numbers.slice_index = index
        self.slice_numbers.value = slice_text(self.numbers, mask_data.shape[axis])
        self.plot.mark(index)

    def go_to_slice(self, index: int) -> None:
        """Move the viewer to slice ``index`` of the map's grid along the viewing axis (the plot's click)."""
        map_layer = self.anomaly_map.value
        if map_layer is None:
            return
        axis = self.slice_axis
        point = np.zeros(map_layer.ndim)
        point[axis] = index
        world = map_layer.data_to_world(point)
        self.viewer.dims.set_point(self.viewer.dims.ndim - map_layer.ndim + axis, float(world[axis]))
        self._slice_soon.flush()

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
        self.flush()  # a drag's last value, settled
        if self.numbers is None or self.csv_file.value is None:
            show_error("nothing to export: choose an anomaly map and a CSV file first")
            return
        context = {"anomaly_map": self.anomaly_map.value.name,
                   "ground_truth": "" if self.ground_truth.value is None else self.ground_truth.value.name,
                   "region": "brain" if self._region() is not None else "all"}
        if self.scores is not None and self.numbers.dice is not None:
            context.update({"auroc": repr(self.scores.auroc), "f1max": repr(self.scores.f1max),
                            "f1max_threshold": repr(self.scores.f1max_threshold),
                            "ap": "" if self.scores.ap is None else repr(self.scores.ap)})
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


def slice_text(numbers: Numbers, n_slices: int | None = None) -> str:
    """The 2D Dice of the slice on screen, numbered in the map's own grid."""
    index = numbers.slice_index
    if index is None:
        return ""
    if n_slices is not None and not 0 <= index < n_slices:
        return f"the viewed slice lies outside the map (its slices are 0-{n_slices - 1})"
    if numbers.slice_dice is None:
        return f"slice {index}: no ground truth"
    return f"slice {index}: 2D Dice {numbers.slice_dice:.4f}"
