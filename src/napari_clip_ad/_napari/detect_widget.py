"""The "Detect anomalies" dock widget: run the case pipeline (:func:`run_case`) on image layers in a worker."""

from __future__ import annotations

import itertools
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from magicgui.widgets import (
    ComboBox,
    Container,
    FileEdit,
    Label,
    ProgressBar,
    PushButton,
)
from napari.layers import Image, Labels
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info, show_warning
from superqt.utils import ensure_main_thread

from ..backbones import BACKBONES
from ..backbones.availability import backbone_availability, weights_availability
from ..case_options import CaseOptions
from ..engine import default_batch_size
from ..engine.pipeline import CaseResult, case_from_arrays, run_case
from ..errors import Cancelled, ClipAdError, InputError
from ..gui_settings import load_settings, save_settings
from ..io import MODALITIES, Case
from ..engine.pipeline import build_pipeline_method
from ..methods import AnomalyMethod, list_methods, method_class
from ..methods.released import RELEASED
from .advanced import CHOOSE_MODALITY, AdvancedOptions
from .gl_safety import keep_triton_out
from .layers import MAP_KIND, MASK_KIND, map_kwargs, mask_kwargs, stored_geometry
from .provenance import (
    auto_device,
    available_devices,
    has_accelerator,
    run_metadata,
    sha256_of,
)
from .status import wrapping

if TYPE_CHECKING:  # pragma: no cover
    import napari

NO_WEIGHTS = "none (backbone only)"
FILE_CHOICE = "file..."
RANDOM_BACKBONE = "tiny-test"
DEFAULT_THRESHOLD = 0.5
CPU_NOTE = "No GPU found: running on the CPU (large backbones take seconds per slice)"
SETTINGS = "detect"


@dataclass
class Job:
    """Everything a run needs, read from the widget on the main thread."""

    case: Case
    options: CaseOptions
    method: str
    backbone: str
    weights: str | None
    device: str


@dataclass
class Outcome:
    """What the worker hands back: a result, a readable error, or a cancellation."""

    result: CaseResult | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    cancelled: bool = False


def sibling_layers(viewer: Any, layer: Any) -> dict[str, Any]:
    """Modality -> image layer of the same case as ``layer`` (same ``case_id`` metadata and shape)."""
    modality = layer.metadata.get("modality")
    if modality not in MODALITIES:
        return {}
    case_id = layer.metadata.get("case_id")
    found = {modality: layer}
    if case_id is None:
        return found
    for other in viewer.layers:
        meta = other.metadata
        if (isinstance(other, Image) and other is not layer and meta.get("case_id") == case_id
                and meta.get("modality") in MODALITIES and meta.get("modality") not in found
                and other.data.shape == layer.data.shape and meta.get("kind") != MAP_KIND):
            found[meta["modality"]] = other
    return found


def modality_choices(modalities: list[str]) -> list[str]:
    """The single modalities (canonical order) and, with three or more, every three-modality composite."""
    ordered = [m for m in MODALITIES if m in modalities]
    composites = ["+".join(c) for c in itertools.combinations(ordered, 3)] if len(ordered) >= 3 else []
    return ordered + composites


class DetectWidget(Container):
    """Pick an image layer, a method, backbone, weights, device and options; Run adds an anomaly map and a mask."""

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__(labels=True)
        keep_triton_out()
        self.viewer = napari_viewer
        self.image = ComboBox(label="image", choices=self._image_choices,
                              tooltip="the 3D image layer to analyse (its case's other modalities are found for composites)")
        self.ground_truth = ComboBox(label="ground truth", choices=self._labels_choices, nullable=True,
                                     tooltip="optional segmentation of the same case, for the metrics")
        methods = list_methods()
        self.method = ComboBox(label="method", choices=methods, value="vand" if "vand" in methods else methods[0],
                               tooltip="the anomaly-detection method (as --method)")
        self.backbone = ComboBox(label="backbone", choices=self._backbone_choices(),
                                 tooltip="CLIP backbone (as --backbone); 'tiny-test' has random weights: its maps mean nothing")
        self.backbone_file = FileEdit(label="backbone file", mode="r", nullable=True,
                                      filter="*.pt *.pth *.bin *.safetensors *.ckpt", tooltip="a local CLIP checkpoint")
        self.weights = ComboBox(label="weights", choices=self._weights_choices,
                                tooltip="the method's trained weights (as --weights); see 'napari-clip-ad weights list'")
        self.weights_file = FileEdit(label="weights file", mode="r", nullable=True, filter="*.pth *.pt *.safetensors",
                                     tooltip="a local weights file of the chosen method")
        self.availability = wrapping(Label(value="", tooltip="whether the files are here (checked without network)"))
        self.use_random = PushButton(text="Use the tiny random backbone (random weights)",
                                     tooltip="runs offline at once; results come from random weights and mean nothing")
        devices = ["auto", *available_devices()]
        self.device = ComboBox(label="device", choices=devices, value="auto",
                               tooltip=f"auto = CUDA, then Apple MPS, then the CPU (here: {auto_device()})")
        self.cpu_note = Label(value=CPU_NOTE, visible=not has_accelerator())
        self.advanced = AdvancedOptions(batch_default=default_batch_size(torch.device(auto_device())))
        self.modality = self.advanced["modality"]
        self.batch_size = self.advanced["batch_size"]
        self.progress = ProgressBar(label="progress", min=0, max=1, value=0, tooltip="slices analysed (all views)")
        self.run_button = PushButton(text="Run", tooltip="run the method in the background; click again to cancel")
        self.status = wrapping(Label(value=""))
        self.extend([self.image, self.ground_truth, self.method, self.backbone, self.backbone_file, self.weights,
                     self.weights_file, self.availability, self.use_random, self.device, self.cpu_note, self.advanced,
                     self.progress, self.run_button, self.status])
        self._worker: Any = None
        self._cancel = threading.Event()
        self._cached: tuple[tuple, AnomalyMethod] | None = None
        self._source: Any = None
        self._gt: Any = None
        self._user_backbone = False
        self._restoring = False
        self._restore()
        self.method.changed.connect(self._on_method_changed)
        self.backbone.changed.connect(self._on_backbone_changed)
        self.weights.changed.connect(self._sync_file_fields)
        self.backbone_file.changed.connect(self._sync_file_fields)
        self.weights_file.changed.connect(self._sync_file_fields)
        self.use_random.changed.connect(self.choose_random_backbone)
        self.image.changed.connect(self._on_image_changed)
        self.ground_truth.changed.connect(self._check_ground_truth)
        self.run_button.changed.connect(self._on_run_clicked)
        for widget in (self.method, self.backbone, self.weights, self.device, *self.advanced.controls.values()):
            widget.changed.connect(self._remember)
        for event in (napari_viewer.layers.events.inserted, napari_viewer.layers.events.removed):
            event.connect(self._on_layers_changed)
        self.native.destroyed.connect(self._disconnect)
        self._sync_file_fields()
        self._on_image_changed()

    def _disconnect(self, *_: Any) -> None:
        """Stop listening to the viewer and stop a run once the widget is gone."""
        self._cancel.set()
        for event in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed):
            event.disconnect(self._on_layers_changed)

    # --- remembered choices -------------------------------------------------------------------
    def _restore(self) -> None:
        saved = load_settings(SETTINGS)
        self._restoring = True
        try:
            if saved.get("method") in self.method.choices:
                self.method.value = saved["method"]
            self.weights.reset_choices()
            self._set_backbone(method_class(self.method.value).default_backbone)
            if saved.get("backbone") in self.backbone.choices:
                self._set_backbone(saved["backbone"])
                self._user_backbone = bool(saved.get("user_backbone", False))
            if saved.get("weights") in self.weights.choices:
                self.weights.value = saved["weights"]
            if saved.get("device") in self.device.choices:
                self.device.value = saved["device"]
            self.advanced.restore(saved.get("advanced", {}))
        finally:
            self._restoring = False

    def _remember(self, *_: Any) -> None:
        if self._restoring:
            return
        save_settings(SETTINGS, {"method": self.method.value, "backbone": self.backbone.value,
                                 "user_backbone": self._user_backbone, "weights": self.weights.value,
                                 "device": self.device.value, "advanced": self.advanced.remembered()})

    # --- choices -----------------------------------------------------------------------------
    def _image_choices(self, _widget: Any = None) -> list[tuple[str, Any]]:
        return [(layer.name, layer) for layer in self.viewer.layers
                if isinstance(layer, Image) and layer.metadata.get("kind") != MAP_KIND and layer.ndim == 3]

    def _labels_choices(self, _widget: Any = None) -> list[tuple[str, Any]]:
        return [(layer.name, layer) for layer in self.viewer.layers
                if isinstance(layer, Labels) and layer.metadata.get("kind") not in (MASK_KIND, "error_overlay")]

    @staticmethod
    def _backbone_choices() -> list[tuple[str, str]]:
        return [(f"{name} (random weights)" if spec.random_weights else name, name) for name, spec in BACKBONES.items()] \
            + [(FILE_CHOICE, FILE_CHOICE)]

    def _weights_choices(self, _widget: Any = None) -> list[str]:
        released = [name for name, w in RELEASED.items() if w.method == self.method.value]
        return [NO_WEIGHTS, *released, FILE_CHOICE]

    def _on_layers_changed(self, *_: Any) -> None:
        previous, modality = self.image.value, self.modality.value
        self.reset_choices()
        layer = self.image.value
        if layer is None or layer is not previous:
            self._on_image_changed()
            return
        siblings = sibling_layers(self.viewer, layer)  # the case's other modalities may have come or gone
        if siblings:
            choices = modality_choices(list(siblings))
            self.advanced.set_modalities(choices, modality if modality in choices else layer.metadata["modality"])

    def _on_image_changed(self, *_: Any) -> None:
        """Offer the layer's case modalities and composites; ask when the layer does not say what it is."""
        layer = self.image.value
        if layer is None:
            self.advanced.set_modalities([CHOOSE_MODALITY, *MODALITIES], CHOOSE_MODALITY)
            return
        siblings = sibling_layers(self.viewer, layer)
        if siblings:
            self.advanced.set_modalities(modality_choices(list(siblings)), layer.metadata["modality"])
        else:
            self.advanced.set_modalities([CHOOSE_MODALITY, *MODALITIES], CHOOSE_MODALITY)
            self.advanced.set_expanded(True)
            self.status.value = f"{layer.name!r} does not say its modality: choose it under Advanced > modality"
        self._preselect_ground_truth(layer)

    def _preselect_ground_truth(self, layer: Any) -> None:
        case_id = layer.metadata.get("case_id")
        if case_id is None or self.ground_truth.value is not None:
            return
        match = next((lab for _, lab in self._labels_choices() if lab.metadata.get("case_id") == case_id
                      and lab.data.shape == layer.data.shape), None)
        if match is not None:
            self.ground_truth.value = match

    def _check_ground_truth(self, *_: Any) -> None:
        """Warn when the ground truth belongs to another case than the image (same shape is not enough)."""
        layer, gt = self.image.value, self.ground_truth.value
        if layer is None or gt is None:
            return
        ours, theirs = layer.metadata.get("case_id"), gt.metadata.get("case_id")
        if ours is not None and theirs is not None and ours != theirs:
            message = f"ground truth {gt.name!r} is of case {theirs}, the image of case {ours}: metrics would be meaningless"
            show_warning(message)
            self.status.value = f"Warning: {message}"

    def _set_backbone(self, name: str) -> None:
        self._restoring, was = True, self._restoring
        try:
            if name in self.backbone.choices:
                self.backbone.value = name
        finally:
            self._restoring = was

    def _on_backbone_changed(self, *_: Any) -> None:
        if not self._restoring:
            self._user_backbone = True
        self._sync_file_fields()

    def _on_method_changed(self, *_: Any) -> None:
        """New method: its weights; the user's backbone is kept (the method's default only if none was chosen)."""
        self.weights.reset_choices()
        self.weights.value = NO_WEIGHTS
        if not self._user_backbone:
            self._set_backbone(method_class(self.method.value).default_backbone)
        self._sync_file_fields()

    def choose_random_backbone(self, *_: Any) -> None:
        """One click to a run that needs no download: the tiny random backbone, no method weights."""
        self.backbone.value = RANDOM_BACKBONE
        self.weights.value = NO_WEIGHTS
        self._remember()

    def _sync_file_fields(self, *_: Any) -> None:
        self.backbone_file.visible = self.backbone.value == FILE_CHOICE
        self.weights_file.visible = self.weights.value == FILE_CHOICE
        self.update_availability()

    def update_availability(self) -> None:
        """Say whether the chosen backbone and weights are here (local files only, no network)."""
        backbone = str(self.backbone_file.value or "") if self.backbone.value == FILE_CHOICE else self.backbone.value
        weights = None if self.weights.value == NO_WEIGHTS else (
            str(self.weights_file.value or "") if self.weights.value == FILE_CHOICE else self.weights.value)
        checks = [backbone_availability(backbone or "(no file chosen)"), weights_availability(weights)]
        missing = [c.message for c in checks if not c.available]
        self.available = not missing
        if missing:
            self.availability.value = "Missing: " + "; ".join(missing)
        else:
            random = " (random weights: results mean nothing)" if checks[0].random else ""
            self.availability.value = f"Ready offline{random}"
        self.use_random.visible = bool(missing)

    # --- run ---------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        """True while a run is in progress."""
        return self._worker is not None

    def _job(self) -> Job:
        layer = self.image.value
        if layer is None:
            raise InputError("no image layer to analyse: open a case (File > Open Folder) or the sample data first")
        if np.asarray(layer.data).ndim != 3:
            raise InputError(f"layer {layer.name!r} has shape {layer.data.shape}; choose a 3D volume [z, y, x]")
        options = self.advanced.options()
        siblings = sibling_layers(self.viewer, layer) or {options.modalities[0]: layer}
        missing = [m for m in options.modalities if m not in siblings]
        if missing:
            raise InputError(f"modality {options.modality}: no {', '.join(missing)} layer of this case is open; "
                             "open the whole case folder or choose a single modality")
        images = {m: np.asarray(siblings[m].data) for m in options.modalities_to_load}
        brain = layer.metadata.get("brain_mask")
        # The reader's brain mask when it came from a file; else (as load_case does) the voxels non-zero in
        # the modalities used, so the widget and 'infer' skip the same slices.
        if not (isinstance(brain, np.ndarray) and brain.shape == layer.data.shape
                and layer.metadata.get("brain_mask_from", "file") == "file"):
            brain = None
        case = case_from_arrays(images, spacing=tuple(layer.scale), brain_mask=brain,
                                case_id=str(layer.metadata.get("case_id", layer.name)))
        device = auto_device() if self.device.value == "auto" else self.device.value
        return Job(case=case, options=options, method=self.method.value,
                   backbone=self._chosen_file(self.backbone.value, self.backbone_file, "backbone"),
                   weights=self._chosen_weights(), device=device)

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
        self._remember()
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
        """Worker thread: build (or reuse) the method and run the case pipeline; never touches layers."""
        try:
            method = self._method_for(job)
            if cancel.is_set():
                return Outcome(cancelled=True)
            views = job.options.views
            done_by_view: dict[str, int] = {}
            total_by_view: dict[str, int] = {}

            def progress_for(view: str):
                def progress(done: int, total: int) -> None:
                    done_by_view[view], total_by_view[view] = done, total
                    # Views not started yet are counted as this one's size until they report theirs.
                    overall = sum(total_by_view.values()) + total * (len(views) - len(total_by_view))
                    self._report_progress(sum(done_by_view.values()), overall, views.index(view) + 1, len(views))

                return progress

            result = run_case(job.case, method, job.options, progress_for=progress_for, cancel=cancel.is_set)
            sha = sha256_of(getattr(method, "weights_source", None))
            return Outcome(result=result, metadata=run_metadata(method, result.info, sha))
        except Cancelled:
            return Outcome(cancelled=True)
        except ClipAdError as exc:
            return Outcome(error=str(exc))

    def _method_for(self, job: Job) -> AnomalyMethod:
        key = (job.method, job.backbone, job.weights, job.device, job.options.few_shot)
        if self._cached is None or self._cached[0] != key:
            self._cached = None  # free the previous model before building the next
            self._cached = (key, build_pipeline_method(job.method, job.backbone, job.options, weights=job.weights,
                                                       device=job.device))
        return self._cached[1]

    @ensure_main_thread
    def _report_progress(self, done: int, total: int, view: int = 1, n_views: int = 1) -> None:
        if self.running:
            self.progress.max = max(total, 1)
            self.progress.value = done
            which = f" (view {view} of {n_views})" if n_views > 1 else ""
            self.status.value = f"Slices analysed: {done} / {total}{which}"

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
        anomaly_map, options = result.anomaly_map, result.options
        link = uuid.uuid4().hex
        meta: dict[str, Any] = {**outcome.metadata, "source_layer": source.name, "link": link,
                                "threshold": float(options.threshold), "options": options.to_json(),
                                "min_component": int(options.min_component),
                                "case_id": source.metadata.get("case_id", source.name),
                                "ground_truth_layer": None if self._gt is None else self._gt.name}
        brain = result_brain(source, anomaly_map.shape)
        if brain is not None:
            meta["brain_mask"] = brain
        geometry = stored_geometry(source.metadata, anomaly_map.shape)
        if geometry is not None:
            meta["geometry"] = geometry
        scale, translate = tuple(source.scale), tuple(source.translate)
        label = f"{outcome.metadata['method']}, {outcome.metadata['backbone']}"
        views = "+".join(options.views)
        extra = "" if (options.modality, views) == (source.metadata.get("modality"), "axial") else f", {options.modality}, {views}"
        # The mask goes in first so that whoever reacts to the new map finds its mask; then it moves on top.
        mask = self.viewer.add_labels(result.mask, **mask_kwargs(f"{source.name} anomaly mask", meta, scale, translate))
        map_layer = self.viewer.add_image(anomaly_map, **map_kwargs(f"{source.name} anomaly ({label}{extra})", meta,
                                                                     scale, translate))
        _show_colorbar(map_layer)
        self.viewer.layers.move(self.viewer.layers.index(mask), len(self.viewer.layers))
        info = result.info
        self.status.value = (f"Done: {info['slices_analysed']} of {info['slices_total']} slices on {info['device']}"
                             + (" (random weights: the map means nothing)" if outcome.metadata["random_weights"] else ""))
        show_info(f"anomaly map added for {source.name}")


def result_brain(source: Any, shape: tuple[int, ...]) -> np.ndarray | None:
    """The brain mask the metrics' "in brain only" uses: the source layer's, if it fits."""
    brain = source.metadata.get("brain_mask")
    return brain if isinstance(brain, np.ndarray) and brain.shape == tuple(shape) else None


def _show_colorbar(layer: Any) -> None:
    """Show napari's colorbar of the map layer where this napari has one."""
    colorbar = getattr(layer, "colorbar", None)
    if colorbar is not None and hasattr(colorbar, "visible"):
        colorbar.visible = True


def current_threshold(viewer: Any) -> float:
    """The threshold last used on an anomaly map of this viewer (0.5 before any)."""
    for layer in reversed(list(viewer.layers)):
        if layer.metadata.get("kind") == MAP_KIND and "threshold" in layer.metadata:
            return float(layer.metadata["threshold"])
    return DEFAULT_THRESHOLD
