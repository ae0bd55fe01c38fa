"""The "Detect anomalies" dock widget: run a method over a 3D image layer in a background thread."""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import ComboBox, Container, FileEdit, Label, ProgressBar, PushButton, SpinBox
from napari.layers import Image, Labels
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info
from superqt.utils import ensure_main_thread

from ..backbones import BACKBONES
from ..engine import AXES, default_batch_size, run_volume
from ..engine.run import VolumeResult
from ..errors import Cancelled, ClipAdError, InputError
from ..io import MODALITIES
from ..methods import AnomalyMethod, build_method, list_methods, method_class, resolve_device
from ..methods.released import RELEASED
from .gl_safety import keep_triton_out
from .layers import MAP_KIND, MASK_KIND, map_kwargs, mask_kwargs, stored_geometry, threshold_mask
from .provenance import available_devices, has_accelerator, run_metadata, sha256_of

if TYPE_CHECKING:  # pragma: no cover
    import napari

NO_WEIGHTS = "none (backbone only)"
FILE_CHOICE = "file..."
DEFAULT_THRESHOLD = 0.5
CPU_NOTE = "No GPU found: running on the CPU (large backbones take seconds per slice)"


@dataclass
class Job:
    """Everything a run needs, read from the widget on the main thread."""

    volume: np.ndarray
    brain_mask: np.ndarray | None
    modality: str
    method: str
    backbone: str
    weights: str | None
    device: str
    batch_size: int
    axis: str


@dataclass
class Outcome:
    """What the worker hands back: a result, a readable error, or a cancellation."""

    result: VolumeResult | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    cancelled: bool = False


class DetectWidget(Container):
    """Pick a 3D image layer, a method, backbone, weights and device; Run adds an anomaly map and a mask."""

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__(labels=True)
        keep_triton_out()
        self.viewer = napari_viewer
        self.image = ComboBox(label="image", choices=self._image_choices)
        self.ground_truth = ComboBox(label="ground truth", choices=self._labels_choices, nullable=True)
        methods = list_methods()
        self.method = ComboBox(label="method", choices=methods, value="vand" if "vand" in methods else methods[0])
        self.backbone = ComboBox(label="backbone", choices=[*BACKBONES, FILE_CHOICE])
        self.backbone_file = FileEdit(label="backbone file", mode="r", nullable=True,
                                      filter="*.pt *.pth *.bin *.safetensors *.ckpt")
        self.weights = ComboBox(label="weights", choices=self._weights_choices)
        self.weights_file = FileEdit(label="weights file", mode="r", nullable=True, filter="*.pth *.pt *.safetensors")
        devices = available_devices()
        self.device = ComboBox(label="device", choices=devices, value=devices[0])
        self.cpu_note = Label(value=CPU_NOTE, visible=not has_accelerator())
        self.batch_size = SpinBox(label="batch size", min=1, max=512, value=default_batch_size(resolve_device("auto")))
        self.axis = ComboBox(label="slicing axis", choices=list(AXES), value="axial")
        self.progress = ProgressBar(label="progress", min=0, max=1, value=0)
        self.run_button = PushButton(text="Run")
        self.status = Label(value="")
        self.extend([self.image, self.ground_truth, self.method, self.backbone, self.backbone_file, self.weights,
                     self.weights_file, self.device, self.cpu_note, self.batch_size, self.axis, self.progress,
                     self.run_button, self.status])
        self._worker: Any = None
        self._cancel = threading.Event()
        self._cached: tuple[tuple, AnomalyMethod] | None = None
        self._source: Any = None
        self._gt: Any = None
        self.method.changed.connect(self._on_method_changed)
        self.backbone.changed.connect(self._sync_file_fields)
        self.weights.changed.connect(self._sync_file_fields)
        self.run_button.changed.connect(self._on_run_clicked)
        for event in (napari_viewer.layers.events.inserted, napari_viewer.layers.events.removed):
            event.connect(self.reset_choices)
        self.native.destroyed.connect(self._disconnect)
        self._on_method_changed()

    def _disconnect(self, *_: Any) -> None:
        """Stop listening to the viewer and stop a run once the widget is gone."""
        self._cancel.set()
        for event in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed):
            event.disconnect(self.reset_choices)

    # --- choices -----------------------------------------------------------------------------
    def _image_choices(self, _widget: Any = None) -> list[tuple[str, Any]]:
        return [(layer.name, layer) for layer in self.viewer.layers
                if isinstance(layer, Image) and layer.metadata.get("kind") != MAP_KIND and layer.ndim == 3]

    def _labels_choices(self, _widget: Any = None) -> list[tuple[str, Any]]:
        return [(layer.name, layer) for layer in self.viewer.layers
                if isinstance(layer, Labels) and layer.metadata.get("kind") != MASK_KIND]

    def _weights_choices(self, _widget: Any = None) -> list[str]:
        released = [name for name, w in RELEASED.items() if w.method == self.method.value]
        return [NO_WEIGHTS, *released, FILE_CHOICE]

    def _on_method_changed(self, *_: Any) -> None:
        self.weights.reset_choices()
        self.weights.value = NO_WEIGHTS
        default = method_class(self.method.value).default_backbone
        if default in BACKBONES:
            self.backbone.value = default
        self._sync_file_fields()

    def _sync_file_fields(self, *_: Any) -> None:
        self.backbone_file.visible = self.backbone.value == FILE_CHOICE
        self.weights_file.visible = self.weights.value == FILE_CHOICE

    # --- run ---------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        """True while a run is in progress."""
        return self._worker is not None

    def _job(self) -> Job:
        layer = self.image.value
        if layer is None:
            raise InputError("no image layer to analyse: open a case (File > Open Folder) or the sample data first")
        volume = np.asarray(layer.data)
        if volume.ndim != 3:
            raise InputError(f"layer {layer.name!r} has shape {volume.shape}; choose a 3D volume [z, y, x]")
        brain = layer.metadata.get("brain_mask")
        if not isinstance(brain, np.ndarray) or brain.shape != volume.shape:
            brain = None
        modality = layer.metadata.get("modality")
        return Job(volume=volume, brain_mask=brain, modality=modality if modality in MODALITIES else "t2w",
                   method=self.method.value, backbone=self._chosen_file(self.backbone.value, self.backbone_file, "backbone"),
                   weights=self._chosen_weights(), device=self.device.value, batch_size=int(self.batch_size.value),
                   axis=self.axis.value)

    @staticmethod
    def _chosen_file(choice: str, file_edit: FileEdit, what: str) -> str:
        if choice != FILE_CHOICE:
            return choice
        if file_edit.value is None or not Path(file_edit.value).is_file():
            raise InputError(f"{what} file {file_edit.value or '(none)'} not found; choose an existing file")
        return str(file_edit.value)

    def _chosen_weights(self) -> str | None:
        if self.weights.value == NO_WEIGHTS:
            return None
        return self._chosen_file(self.weights.value, self.weights_file, "weights")

    def _on_run_clicked(self, *_: Any) -> None:
        if self.running:
            self._cancel.set()
            self.status.value = "Cancelling after the current batch..."
            return
        try:
            job = self._job()
        except ClipAdError as exc:
            show_error(str(exc))
            self.status.value = f"Error: {exc}"
            return
        keep_triton_out()  # before the worker imports open_clip (the viewer's GL may load Mesa's LLVM first)
        self._cancel = threading.Event()
        self._source = self.image.value
        self._gt = self.ground_truth.value
        self.progress.max, self.progress.value = 1, 0
        self.status.value = "Loading the method..."
        self.run_button.text = "Cancel"
        self._worker = create_worker(self._analyse, job, self._cancel,
                                     _connect={"returned": self._on_returned, "errored": self._on_crashed,
                                               "finished": self._on_finished})

    def _analyse(self, job: Job, cancel: threading.Event) -> Outcome:
        """Worker thread: build (or reuse) the method and run the engine; never touches layers."""
        try:
            method = self._method_for(job)
            if cancel.is_set():
                return Outcome(cancelled=True)
            result = run_volume(job.volume, method, modality=job.modality, axis=job.axis, batch_size=job.batch_size,
                                brain_mask=job.brain_mask, progress=self._report_progress, cancel=cancel.is_set)
            sha = sha256_of(getattr(method, "weights_source", None))
            return Outcome(result=result, metadata=run_metadata(method, result.info, sha))
        except Cancelled:
            return Outcome(cancelled=True)
        except ClipAdError as exc:
            return Outcome(error=str(exc))

    def _method_for(self, job: Job) -> AnomalyMethod:
        key = (job.method, job.backbone, job.weights, job.device)
        if self._cached is None or self._cached[0] != key:
            self._cached = None  # free the previous model before building the next
            self._cached = (key, build_method(job.method, job.backbone, weights=job.weights, device=job.device))
        return self._cached[1]

    @ensure_main_thread
    def _report_progress(self, done: int, total: int) -> None:
        if self.running:
            self.progress.max = max(total, 1)
            self.progress.value = done
            self.status.value = f"Slices analysed: {done} / {total}"

    def _on_returned(self, outcome: Outcome) -> None:
        if outcome.cancelled or self._cancel.is_set():
            self.progress.value = 0
            self.status.value = "Cancelled: no layer added"
            return
        if outcome.error is not None:
            show_error(outcome.error)
            self.status.value = f"Error: {outcome.error}"
            return
        self._add_result_layers(outcome)

    def _on_crashed(self, exc: Exception) -> None:
        # napari already shows the exception (with its traceback) as a notification.
        self.status.value = f"Failed: {type(exc).__name__}: {exc}"

    def _on_finished(self) -> None:
        self._worker = None
        self.run_button.text = "Run"

    # --- results -----------------------------------------------------------------------------
    def _add_result_layers(self, outcome: Outcome) -> None:
        source, result = self._source, outcome.result
        anomaly_map = result.anomaly_map
        threshold = current_threshold(self.viewer)
        link = uuid.uuid4().hex
        meta: dict[str, Any] = {**outcome.metadata, "source_layer": source.name, "link": link, "threshold": threshold,
                                "ground_truth_layer": None if self._gt is None else self._gt.name}
        geometry = stored_geometry(source.metadata, anomaly_map.shape)
        if geometry is not None:
            meta["geometry"] = geometry
        scale, translate = tuple(source.scale), tuple(source.translate)
        label = f"{outcome.metadata['method']}, {outcome.metadata['backbone']}"
        # The mask goes in first so that whoever reacts to the new map finds its mask; then it moves on top.
        mask = self.viewer.add_labels(threshold_mask(anomaly_map, threshold),
                                      **mask_kwargs(f"{source.name} anomaly mask", meta, scale, translate))
        self.viewer.add_image(anomaly_map, **map_kwargs(f"{source.name} anomaly ({label})", meta, scale, translate))
        self.viewer.layers.move(self.viewer.layers.index(mask), len(self.viewer.layers))
        info = result.info
        self.status.value = (f"Done: {info['slices_analysed']} of {info['slices_total']} slices on {info['device']}"
                             + (" (random weights: the map means nothing)" if outcome.metadata["random_weights"] else ""))
        show_info(f"anomaly map added for {source.name}")


def current_threshold(viewer: Any) -> float:
    """The threshold last used on an anomaly map of this viewer (0.5 before any)."""
    for layer in reversed(list(viewer.layers)):
        if layer.metadata.get("kind") == MAP_KIND and "threshold" in layer.metadata:
            return float(layer.metadata["threshold"])
    return DEFAULT_THRESHOLD
