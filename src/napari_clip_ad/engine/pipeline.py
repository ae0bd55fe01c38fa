"""One case pipeline for every front end: case (or arrays) + options -> map, mask, provenance.

``napari-clip-ad infer``, the study and the napari widget all call :func:`run_case` with a
:class:`CaseOptions`; the CLI flags and the widget's "Advanced" controls are generated from the same
:data:`OPTION_SPECS`, so an option added here exists everywhere with one name and one default.

Order of the steps: run the method along each view (:func:`~napari_clip_ad.engine.run_volume`), fuse the
views, smooth in 3D (mm), zero outside the brain, threshold, drop small 26-connected components.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..case_options import OPTION_SPECS, CaseOptions, OptionSpec, add_case_arguments, options_from_args
from ..errors import InputError
from ..io import MODALITIES, Case
from ..io.nifti import Geometry
from ..io.voxels import intensity_float32, mask_array
from ..methods import AnomalyMethod
from .run import ProgressCallback, VolumeResult
from .views import run_views, threshold_mask


@dataclass
class CaseResult:
    """What the pipeline gives for one case.

    Attributes:
        anomaly_map: float32 [0, 1] map aligned with the case (canonical [z, y, x]).
        mask: uint8 mask at ``options.threshold`` after the minimum-component cleaning.
        info: Provenance: method, backbone, options, slices analysed, device...
        views: The single-view results (per-slice scores along each view).
        options: The options used.
    """

    anomaly_map: np.ndarray
    mask: np.ndarray
    info: dict[str, Any]
    views: list[VolumeResult] = field(default_factory=list)
    options: CaseOptions = field(default_factory=CaseOptions)

    def mask_at(self, threshold: float) -> np.ndarray:
        """The mask at another threshold, cleaned like :attr:`mask`."""
        return threshold_mask(self.anomaly_map, threshold, self.options.min_component)


class ReferencePool:
    """Few-shot references for the cases of one run: per slicing view, never from the analysed patient.

    Wraps :class:`napari_clip_ad.references.CohortReferences` (one draw per view, redrawn only for a case
    whose patient it contains).

    Args:
        options: The run's options (``references``, ``k_shot``, ``reference_seed``, ``modality``).
        method: The built method (image size, normalisation).
        training_cases: Case folders to draw from with ``auto`` (the cohort for ``infer``, the training
            split for the study); ignored for a folder source.
    """

    def __init__(self, options: CaseOptions, method: AnomalyMethod, training_cases: Sequence[str | Path] = ()) -> None:
        if cross_subject(method):
            self.options, self.method, self.training_cases = options, method, list(training_cases)
            self._per_view, self._subjects = {}, None
            return
        if not method.supports_references:  # refused before any reference is drawn
            raise InputError(f"method {method.name!r} has no few-shot mode with normal references; "
                             "drop --references (or use --k-shot 0)")
        self.options, self.method, self.training_cases = options, method, list(training_cases)
        self._per_view: dict[str, Any] = {}

    def for_case(self, case_id: str, view: str) -> Any:
        """The :class:`~napari_clip_ad.references.References` for ``case_id`` along ``view``."""
        from ..references import CohortReferences

        if view not in self._per_view:
            self._per_view[view] = CohortReferences(
                self.options.references, self.method, k_shot=self.options.k_shot or DEFAULT_K_SHOT, modality=self.options.modalities,
                axis=view, training_cases=self.training_cases, seed=self.options.reference_seed)
        return self._per_view[view].for_case(case_id)


    def subjects(self) -> list[Any]:
        """The pool of cross-subject mode: every reference case as a Subject (lesions kept out where labelled)."""
        from ..crosssubject import subject_from_case
        from ..io import find_cases, load_case

        if self._subjects is None:
            source = self.options.references
            if str(source) == "auto":
                paths = self.training_cases
            else:
                folder = Path(str(source)).expanduser()
                if not folder.is_dir():
                    raise InputError(f"--references {source}: no such folder; give 'auto' or a folder of other subjects' cases")
                paths = find_cases(folder)
            modality = self.options.modalities[0]
            self._subjects = [subject_from_case(load_case(p, modalities=[modality]), modality) for p in paths]
        return self._subjects


DEFAULT_K_SHOT = 4
"""Few-shot references per view when ``--k-shot`` is not given."""


def build_pipeline_method(name: str, backbone: str | None, options: CaseOptions, image_size: int | None = None,
                          **kwargs: Any) -> AnomalyMethod:
    """``build_method`` with the pipeline's defaults: in cross-subject mode (anomalydino/musc with references) the
    documented blocks and size of :func:`napari_clip_ad.crosssubject.method_defaults` unless given; else 240 px."""
    from ..crosssubject import CROSS_SUBJECT_METHODS, method_defaults
    from ..methods import build_method

    if name.lower() in CROSS_SUBJECT_METHODS and options.few_shot and "layers" not in kwargs:
        probe = build_method(name, backbone, image_size=224 if image_size is None else image_size, **{k: v for k, v in kwargs.items() if k == "device"})
        blocks = getattr(probe.clip, "blocks", None)
        n_blocks = len(blocks) if blocks is not None else len(probe.clip.visual.transformer.resblocks)
        defaults = method_defaults(name.lower(), n_blocks)
        size = defaults.pop("image_size", None)
        return build_method(name, probe.backbone, image_size=size or 224 if image_size is None else image_size,
                            **{**defaults, **kwargs})
    return build_method(name, backbone, image_size=240 if image_size is None else image_size, **kwargs)


def feature_cache_dir() -> Path | None:
    """Folder of cached per-subject features of cross-subject mode (``NAPARI_CLIP_AD_FEATURE_CACHE``; ``off`` disables)."""
    import os

    root = os.environ.get("NAPARI_CLIP_AD_FEATURE_CACHE")
    if root is not None and root.strip().lower() in ("off", "0", "false", "no", ""):
        return None
    if root:
        return Path(root).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache"))) / "napari-clip-ad" / "subject-features"


def cross_subject(method: AnomalyMethod) -> bool:
    """True for the training-free methods whose references run in cross-subject volume mode (anomalydino, musc)."""
    from ..crosssubject import CROSS_SUBJECT_METHODS

    return method.name in CROSS_SUBJECT_METHODS


def _run_cross_subject(case: Case, method: AnomalyMethod, options: CaseOptions, pool: ReferencePool) -> tuple[np.ndarray, dict[str, Any], list[VolumeResult]]:
    """Cross-subject scoring of one case against other subjects at matched levels (never its own patient)."""
    from ..crosssubject import DEFAULT_SETTINGS, score_volume, subject_from_case
    from ..io import patient_id
    from ..postprocess3d import restrict_to_brain, smooth3d

    if options.views != ("axial",) or len(options.modalities) != 1:
        raise InputError(f"{method.name} cross-subject mode runs on axial slices of one modality; drop --views / the composite")
    target = subject_from_case(case, options.modalities[0], with_lesion=False)
    others = [s for s in pool.subjects() if patient_id(s.case_id) != patient_id(case.case_id)]
    settings = DEFAULT_SETTINGS if options.k_shot is None else replace(DEFAULT_SETTINGS, k=options.k_shot)
    if options.sigma is not None:
        settings = replace(settings, sigma=options.sigma)
    result = score_volume(method, target, others, settings, cache_dir=feature_cache_dir())
    anomaly_map = result.anomaly_map
    if options.smooth3d_mm > 0:
        anomaly_map = smooth3d(anomaly_map, options.smooth3d_mm, case.spacing)
    if options.restrict_to_brain:
        anomaly_map = restrict_to_brain(anomaly_map, case.brain_mask)
    info = {**result.info, "modality": options.modality, "axis": "axial", **options.post.describe()}
    return anomaly_map, info, [result]


def run_case(
    case: Case,
    method: AnomalyMethod,
    options: CaseOptions | None = None,
    progress_for: Callable[[str], ProgressCallback | None] | None = None,
    cancel: Callable[[], bool] | None = None,
    references: ReferencePool | None = None,
) -> CaseResult:
    """Run ``method`` on one case with every option; the only path from a case to a map and mask.

    Args:
        case: A loaded case (:func:`~napari_clip_ad.io.load_case`) or one made by :func:`case_from_arrays`.
        method: A built method.
        options: The pipeline options (defaults: the study's axial, single-modality setup).
        progress_for: Gives the progress callback of one view (by name), or None.
        cancel: Checked between batches; raising :class:`~napari_clip_ad.errors.Cancelled` when True.
        references: Where few-shot references come from when ``options`` asks for them (a
            :class:`ReferencePool`; None = one built from ``options`` alone, which suits a folder source).

    Returns:
        The map, the mask and their provenance.
    """
    options = options or CaseOptions()
    used: dict[str, Any] = {}
    if options.few_shot and references is None:
        references = ReferencePool(options, method)

    def before_view(view: str) -> None:
        if options.few_shot:
            drawn = references.for_case(case.case_id, view)
            method.set_references(drawn.images)  # methods without a few-shot mode refuse in one line
            used[view] = drawn.provenance
        else:
            method.set_references(None)

    if options.few_shot and cross_subject(method):
        anomaly_map, info, results = _run_cross_subject(case, method, options, references)
        anomaly_map = np.asarray(anomaly_map, dtype=np.float32)
        mask = threshold_mask(anomaly_map, options.threshold, options.min_component)
        return CaseResult(anomaly_map, mask, {**info, **options.describe(), "case_id": case.case_id}, results, options)
    try:
        anomaly_map, info, results = run_views(case, method, options.post, modality=options.modalities,
                                               batch_size=options.batch_size, sigma=options.sigma, precision=options.precision,
                                               progress_for=progress_for, cancel=cancel, before_view=before_view)
    finally:
        if options.few_shot:
            method.set_references(None)  # a method object never carries one case's references into the next
    anomaly_map = np.asarray(anomaly_map, dtype=np.float32)
    mask = threshold_mask(anomaly_map, options.threshold, options.min_component)
    info = {**info, **options.describe(), "sigma": info.get("sigma"), "case_id": case.case_id}
    if used:
        info["references_used"] = used
    return CaseResult(anomaly_map, mask, info, results, options)


CASE_OUTPUT_SUFFIXES = ("_anomaly.nii.gz", "_mask.nii.gz", "_scores.json", "_metrics.json")
"""The files :func:`write_case_outputs` writes beside each other for one case."""


def write_case_outputs(result: CaseResult, case: Case, stem: str | Path) -> list[Path]:
    """Write one case's outputs as ``infer`` and the study do (atomically), and return their paths.

    ``<stem>_anomaly.nii.gz`` (float32 map), ``<stem>_mask.nii.gz`` (uint8), ``<stem>_scores.json`` (per-slice
    image scores of the axial view, for slice-level detection) and, when the case has a ground truth,
    ``<stem>_metrics.json`` (per-volume metrics at the options' threshold plus the run's provenance).
    """
    from ..atomic import write_json
    from ..io import save_volume
    from ..io.slice_scores import write_axial_scores
    from ..metrics import volume_metrics

    from ..io.header import MAP_PROVENANCE, MASK_PROVENANCE, provenance_text

    # The header says what the file is, so a reader recognises the map under any name (napari's reader does).
    fields = {"thr": repr(float(result.options.threshold)), "minc": int(result.options.min_component),
              "case": case.case_id, "method": result.info.get("method")}
    written = [save_volume(result.anomaly_map, case, f"{stem}_anomaly.nii.gz", provenance_text(MAP_PROVENANCE, **fields)),
               save_volume(result.mask, case, f"{stem}_mask.nii.gz", provenance_text(MASK_PROVENANCE, **fields))]
    written += write_axial_scores(stem, case.case_id, result.options.views, result.views)
    if case.whole_tumour is not None:
        metrics = volume_metrics(result.mask.astype(bool), case.whole_tumour)
        write_json(f"{stem}_metrics.json", {"case_id": case.case_id, "threshold": result.options.threshold, **metrics, **result.info})
        written.append(Path(f"{stem}_metrics.json"))
    return written


def case_from_arrays(
    images: dict[str, np.ndarray],
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    brain_mask: np.ndarray | None = None,
    case_id: str = "volume",
    seg: np.ndarray | None = None,
    affine: np.ndarray | None = None,
) -> Case:
    """A :class:`~napari_clip_ad.io.Case` from canonical [z, y, x] arrays (e.g. napari layers).

    Args:
        images: Modality -> 3D array, all of one shape.
        spacing: Voxel size in mm (z, y, x), used by the 3D smoothing.
        brain_mask: Brain voxels; None = the voxels non-zero in any image.
        case_id: Name recorded in provenance.
        seg: Optional labels (whole tumour = label > 0).
        affine: Canonical voxel -> world affine; None = diagonal from ``spacing``.
    """
    import nibabel as nib

    if not images:
        raise InputError("no image given: pass at least one modality volume")
    unknown = [m for m in images if m not in MODALITIES]
    if unknown:
        raise InputError(f"unknown modality {unknown[0]!r}; use one of {', '.join(MODALITIES)} (FLAIR = t2f)")
    arrays = {m: np.asarray(v) for m, v in images.items()}
    shapes = {a.shape for a in arrays.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 3:
        raise InputError(f"the modality volumes must be 3D arrays of one shape [z, y, x], got {sorted(map(str, shapes))}")
    shape = next(iter(shapes))
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise InputError(f"voxel spacing must be three positive finite mm values (z, y, x), got {spacing}")
    floats = {m: intensity_float32(a, f"{m} volume") for m, a in arrays.items()}  # real, finite after the cast
    if brain_mask is None:
        brain = np.zeros(shape, dtype=bool)
        for array in floats.values():
            brain |= array != 0
    else:
        brain = mask_array(brain_mask, "brain mask")
        if brain.shape != shape:
            raise InputError(f"brain mask shape {brain.shape} differs from the volume shape {shape}")
    if seg is not None and np.asarray(seg).shape != shape:
        raise InputError(f"ground-truth shape {np.asarray(seg).shape} differs from the volume shape {shape}")
    canonical = np.diag([*spacing, 1.0]) if affine is None else np.asarray(affine, dtype=np.float64)
    # Source grid = canonical grid (z, y, x as stored): identity orientation transform.
    transform = np.array([[0, 1], [1, 1], [2, 1]], dtype=float)
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_zooms(spacing)
    geometry = Geometry(canonical, header, tuple(int(s) for s in shape), transform, spacing)
    return Case(case_id=case_id, path=Path(case_id), layout="arrays", images=floats,
                seg=None if seg is None else np.asarray(seg).astype(np.int16), brain_mask=brain, geometry=geometry)


__all__ = ["OPTION_SPECS", "CaseOptions", "CaseResult", "OptionSpec", "ReferencePool", "add_case_arguments", "case_from_arrays",
           "options_from_args", "run_case", "write_case_outputs"]
