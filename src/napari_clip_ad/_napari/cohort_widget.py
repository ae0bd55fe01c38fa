"""The "Cohort" dock widget: run a method over every case of a cohort folder, then score it as ``evaluate`` does.

Per case it calls :func:`~napari_clip_ad.engine.pipeline.run_case` and writes what ``napari-clip-ad infer``
writes (:mod:`napari_clip_ad.engine.outputs`); then it scores the maps with the ``evaluate`` command's
function (``per_case.csv``, ``summary.json`` in the same folder). The table shows the per-case rows;
clicking one opens that case with its map, mask and error overlay.
"""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    Label,
    ProgressBar,
    PushButton,
    Table,
)
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info
from superqt.utils import ensure_main_thread

from ..atomic import write_text
from ..backbones import BACKBONES
from ..case_options import CaseOptions
from ..errors import Cancelled, ClipAdError, InputError
from ..io import MODALITIES, case_id_of, find_cases
from ..methods import list_methods, method_class
from ..methods.released import RELEASED
from .advanced import AdvancedOptions
from .detect_widget import NO_WEIGHTS, modality_choices
from .gl_safety import keep_triton_out
from .provenance import auto_device, available_devices
from .status import wrapping

if TYPE_CHECKING:  # pragma: no cover
    import napari

TABLE_COLUMNS = ("case_id", "dice", "sensitivity", "specificity", "ppv")
LESION_COLUMN = "lesion_dice"


@dataclass
class CohortJob:
    """What a cohort run needs, read on the main thread."""

    cases: list[Path]
    root: Path
    out: Path
    method: str
    backbone: str
    weights: str | None
    device: str
    options: CaseOptions
    lesionwise: bool


@dataclass
class CohortOutcome:
    """The worker's answer: per-case rows and the pooled summary, or an error, or a cancellation."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    cancelled: bool = False


def run_cohort(job: CohortJob, cancel: threading.Event, on_case: Any = None, on_slice: Any = None) -> CohortOutcome:
    """Run every case (``infer``'s files), then score them (``evaluate``'s files); library code, no Qt."""
    from ..commands.evaluate import evaluate_pairs
    from ..engine.outputs import write_case_outputs, write_run_summary
    from ..engine.overlap import CaseSteps, run_cases, without_images
    from ..engine.pipeline import ReferencePool, build_pipeline_method, run_case
    from ..io import load_case
    from ..report.collect import ScoringOptions, match_maps

    try:
        method = build_pipeline_method(job.method, job.backbone, job.options, weights=job.weights, device=job.device)
        # As infer: 'auto' references come from the cohort's other cases (never the analysed patient).
        pool = ReferencePool(job.options, method, training_cases=job.cases) if job.options.few_shot else None
        job.out.mkdir(parents=True, exist_ok=True)
        position = {str(path): k for k, path in enumerate(job.cases)}

        def compute(path: Path, case: Any) -> Any:
            if cancel.is_set():
                raise Cancelled("cancelled")
            if on_case:
                on_case(position[str(path)], len(job.cases), case_id_of(path))
            return run_case(case, method, job.options, progress_for=lambda view: on_slice, cancel=cancel.is_set,
                            references=pool)

        def write(path: Path, case: Any, result: Any) -> list[Path]:
            return write_case_outputs(case, result, job.out, case_id_of(path))

        # As infer: the next case loads and the previous one is written in background threads while one runs.
        run_cases(job.cases, CaseSteps(lambda path: load_case(path, modalities=job.options.modalities_to_load),
                                       compute, write, slim=without_images),
                  fatal=lambda outcome: True)
        write_run_summary(job.out, method.describe(), job.options, getattr(method, "weights_source", None),
                          [case_id_of(p) for p in job.cases])
        if on_case:
            on_case(len(job.cases), len(job.cases), "scoring")
        # The masks were already cleaned by the pipeline; evaluate cleans again with the same size (a no-op).
        options = ScoringOptions(restrict_to_brain=False, min_component=job.options.min_component,
                                 lesionwise=job.lesionwise)
        scores, summary = evaluate_pairs(match_maps(job.out, job.root), job.options.threshold, "all", job.root,
                                         options, job.out)
        return CohortOutcome(rows=[case.row() for case in scores.cases], summary=summary)
    except Cancelled:
        return CohortOutcome(cancelled=True)
    except ClipAdError as exc:
        return CohortOutcome(error=str(exc))


class CohortWidget(Container):
    """Pick a cohort folder, an output folder, the method and options; Run scores every case."""

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__(labels=True)
        self.viewer = napari_viewer
        root = next((layer.metadata["cohort_root"] for layer in napari_viewer.layers if "cohort_root" in layer.metadata), None)
        self.cohort = FileEdit(label="cohort folder", mode="d", value=root or "",
                               tooltip="a folder of cases in any layout the reader knows (see docs/io.md)")
        self.out = FileEdit(label="output folder", mode="d", value="",
                            tooltip="where the maps, masks, metrics, per_case.csv and summary.json go (as infer/evaluate)")
        methods = list_methods()
        self.method = ComboBox(label="method", choices=methods, value="vand" if "vand" in methods else methods[0],
                               tooltip="the anomaly-detection method (as --method)")
        self.backbone = ComboBox(label="backbone", choices=[(f"{n} (random weights)" if s.random_weights else n, n)
                                                            for n, s in BACKBONES.items()],
                                 tooltip="CLIP backbone (as --backbone); 'tiny-test' has random weights")
        self.weights = ComboBox(label="weights", choices=self._weights_choices, tooltip="the method's weights (as --weights)")
        self.device = ComboBox(label="device", choices=["auto", *available_devices()], value="auto",
                               tooltip="auto = CUDA, then Apple MPS, then the CPU")
        self.advanced = AdvancedOptions(batch_default=8)
        self.advanced.set_modalities(modality_choices(list(MODALITIES)), CaseOptions().modality)
        self.lesionwise = CheckBox(text="lesion-wise Dice", value=False, tooltip="as evaluate --lesionwise (BraTS-MET 2023)")
        self.case_progress = ProgressBar(label="cases", min=0, max=1, value=0, tooltip="cases done")
        self.slice_progress = ProgressBar(label="slices", min=0, max=1, value=0, tooltip="slices of the current case and view")
        self.run_button = PushButton(text="Run cohort", tooltip="run every case in the background; click again to cancel")
        self.status = wrapping(Label(value=""))
        self.pooled = wrapping(Label(value="", tooltip="pooled pixel AUROC and F1-max over every case (as evaluate)"))
        self.table = Table(value={c: [] for c in TABLE_COLUMNS},
                           tooltip="per-case metrics (evaluate's per_case.csv); click a row to open the case")
        self.csv_file = FileEdit(label="CSV file", mode="w", filter="*.csv", nullable=True, tooltip="where Export CSV writes")
        self.export_button = PushButton(text="Export CSV", tooltip="write the per-case table (per_case.csv's content)")
        self.extend([self.cohort, self.out, self.method, self.backbone, self.weights, self.device, self.advanced,
                     self.lesionwise, self.case_progress, self.slice_progress, self.run_button, self.status,
                     self.pooled, self.table, self.csv_file, self.export_button])
        self.backbone.value = method_class(self.method.value).default_backbone
        self.rows: list[dict[str, Any]] = []
        self._job: CohortJob | None = None
        self._worker: Any = None
        self._cancel = threading.Event()
        self.method.changed.connect(lambda *_: self.weights.reset_choices())
        self.run_button.changed.connect(self._on_run_clicked)
        self.export_button.changed.connect(self.export_csv)
        self.table.native.cellClicked.connect(lambda row, _col: self.open_case(row))

    def _weights_choices(self, _widget: Any = None) -> list[str]:
        return [NO_WEIGHTS, *[n for n, w in RELEASED.items() if w.method == self.method.value]]

    @property
    def running(self) -> bool:
        """True while a cohort run is in progress."""
        return self._worker is not None

    def _read_job(self) -> CohortJob:
        root = Path(str(self.cohort.value or ""))
        if not str(self.cohort.value or "") or not root.is_dir():
            raise InputError(f"cohort folder {root} not found; choose a folder of cases")
        out = Path(str(self.out.value or ""))
        if not str(self.out.value or "") or (out.exists() and not out.is_dir()):
            raise InputError("choose an output folder for the maps, masks and per_case.csv")
        cases = find_cases(root)
        options = self.advanced.options()
        device = auto_device() if self.device.value == "auto" else self.device.value
        weights = None if self.weights.value == NO_WEIGHTS else self.weights.value
        return CohortJob(cases, root, out, self.method.value, self.backbone.value, weights, device, options,
                         bool(self.lesionwise.value))

    def _on_run_clicked(self, *_: Any) -> None:
        if self.running:
            self._cancel.set()
            self.status.value = "Cancelling after the current batch..."
            return
        try:
            job = self._read_job()
        except ClipAdError as exc:
            show_error(str(exc))
            self.status.value = f"Error: {exc}"
            return
        keep_triton_out()
        self._job, self._cancel = job, threading.Event()
        self.case_progress.max, self.case_progress.value = len(job.cases), 0
        self.run_button.text = "Cancel"
        self.status.value = f"Running {len(job.cases)} cases..."
        self._worker = create_worker(run_cohort, job, self._cancel, self._on_case, self._on_slice,
                                     _connect={"returned": self._on_returned, "errored": self._on_crashed,
                                               "finished": self._on_finished})

    @ensure_main_thread
    def _on_case(self, done: int, total: int, case_id: str) -> None:
        self.case_progress.max, self.case_progress.value = max(total, 1), done
        self.status.value = f"Case {min(done + 1, total)} of {total}: {case_id}" if case_id != "scoring" else "Scoring..."

    @ensure_main_thread
    def _on_slice(self, done: int, total: int) -> None:
        self.slice_progress.max, self.slice_progress.value = max(total, 1), done

    def _on_returned(self, outcome: CohortOutcome) -> None:
        if outcome.cancelled or self._cancel.is_set():
            self.status.value = "Cancelled: the cases finished so far are written; no table"
            return
        if outcome.error is not None:
            show_error(outcome.error)
            self.status.value = f"Error: {outcome.error}"
            return
        self.rows = outcome.rows
        columns = list(TABLE_COLUMNS) + ([LESION_COLUMN] if self._job.lesionwise else [])
        self.table.value = {c: [row[c] for row in self.rows] for c in columns}  # column name -> values
        s = outcome.summary
        auroc = "n/a" if s.get("auroc") is None else f"{s['auroc']:.4f}"
        f1max = "n/a" if s.get("f1max") is None else f"{s['f1max']:.4f}"
        self.pooled.value = f"pooled over {len(self.rows)} cases: AUROC {auroc}, F1-max {f1max}"
        self.status.value = f"Done: files in {self._job.out}"
        show_info(f"cohort scored: {self._job.out / 'per_case.csv'}")

    def _on_crashed(self, exc: Exception) -> None:
        self.status.value = f"Failed: {type(exc).__name__}: {exc}"

    def _on_finished(self) -> None:
        self._worker = None
        self.run_button.text = "Run cohort"

    def export_csv(self, *_: Any) -> None:
        """Copy the run's ``per_case.csv`` to the chosen file."""
        if self._job is None or not self.rows or self.csv_file.value is None:
            show_error("nothing to export: run a cohort and choose a CSV file first")
            return
        try:
            write_text(Path(self.csv_file.value), (self._job.out / "per_case.csv").read_text())
        except OSError as exc:
            show_error(f"{self.csv_file.value}: cannot write the CSV ({exc}); choose a writable file")
            return
        show_info(f"per-case table written to {self.csv_file.value}")

    def open_case(self, row: int) -> None:
        """Open the case of table row ``row`` with its map and mask; the threshold widget adds the overlay."""
        if self._job is None or not 0 <= row < len(self.rows):
            return
        case_id = self.rows[row]["case_id"]
        path = next((p for p in self._job.cases if case_id_of(p) == case_id), None)
        if path is None:
            return
        case_layers = self.viewer.open(str(path), plugin="napari-clip-ad")
        map_layer = self.viewer.open(str(self._job.out / f"{case_id}_anomaly.nii.gz"), plugin="napari-clip-ad")[0]
        mask = self.viewer.open(str(self._job.out / f"{case_id}_mask.nii.gz"), plugin="napari-clip-ad")[0]
        link = uuid.uuid4().hex
        seg = next((layer for layer in case_layers if layer.metadata.get("kind") == "segmentation"), None)
        brain = next((layer.metadata.get("brain_mask") for layer in case_layers if "brain_mask" in layer.metadata), None)
        for layer in (map_layer, mask):
            layer.metadata.update({"link": link, "case_id": case_id, "threshold": self._job.options.threshold,
                                   "min_component": self._job.options.min_component,
                                   "ground_truth_layer": None if seg is None else seg.name})
            if brain is not None:
                layer.metadata["brain_mask"] = brain
        _, threshold = self.viewer.window.add_plugin_dock_widget("napari-clip-ad", "Threshold and metrics")
        threshold.anomaly_map.value = map_layer
        threshold.apply()
