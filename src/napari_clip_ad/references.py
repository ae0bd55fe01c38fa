"""Normal reference slices for few-shot methods (``--references PATH|auto`` with ``--k-shot K``).

- ``auto``: K tumour-free brain slices drawn (seeded) from given training cases, never from the
  analysed case nor from another time point of its patient (``exclude_case_id``).
- ``PATH``: a folder of normal cases (any layout :func:`napari_clip_ad.io.find_cases` knows; tumour-free
  brain slices are drawn as for ``auto``; cases without labels count as normal), or a folder of 2D
  images (PNG/JPEG; the first K in name order, or K drawn seeded when there are more).

The slices are preprocessed exactly like the engine's input (:func:`napari_clip_ad.engine.preprocess_slices`:
per-slice min-max scaling, 3 channels, bicubic resize, CLIP normalisation), with the same modality /
three-modality composite channels as :func:`napari_clip_ad.engine.run_volume`. Feed the result to
``method.set_references(references.images)`` and record ``references.provenance`` in the outputs.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .engine.preprocess import axis_index, preprocess_slices, slices_along
from .engine.run import _volume_and_brain, parse_modality  # the engine's own channel logic
from .errors import InputError
from .io import case_id_of, find_cases, load_case, patient_id
from .methods import AnomalyMethod

AUTO = "auto"
"""``--references auto``: draw from the training cases."""
DEFAULT_K_SHOT = 4
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg")
MIN_BRAIN_FRACTION = 0.5
"""A reference slice holds at least this fraction of the brain area of the case's largest brain slice."""


@dataclass
class References:
    """Preprocessed reference slices and where they come from.

    Attributes:
        images: (K, 3, image_size, image_size) float32, exactly like the engine's ``predict`` input.
        provenance: ``source`` ("auto" or the folder), ``k_shot``, ``seed``, ``modality``, ``axis``,
            ``excluded_case``, and ``references``: one ``{"case_id", "slice"}`` or ``{"file"}`` per image.
    """

    images: torch.Tensor
    provenance: dict[str, Any] = field(default_factory=dict)


def _same_patient(case_id: str, exclude_case_id: str | None) -> bool:
    return exclude_case_id is not None and (case_id == exclude_case_id or patient_id(case_id) == patient_id(exclude_case_id))


def _names_patient(file_name: str, exclude_case_id: str | None) -> bool:
    """True when a file name mentions the excluded case or its patient (e.g. ``BraTS-GLI-00002-000_s70.png``)."""
    if exclude_case_id is None:
        return False
    return any(re.search(re.escape(i) + r"(?!\d)", file_name) for i in {exclude_case_id, patient_id(exclude_case_id)})


def _normal_slices(brain: np.ndarray, tumour: np.ndarray | None, axis: int, min_brain_fraction: float) -> np.ndarray:
    """Indices of slices along ``axis`` with enough brain and no tumour voxel."""
    area = slices_along(brain, axis).reshape(brain.shape[axis], -1).sum(axis=1)
    ok = (area > 0) & (area >= min_brain_fraction * area.max())
    if tumour is not None:
        ok &= ~slices_along(tumour, axis).reshape(brain.shape[axis], -1).any(axis=1)
    return np.flatnonzero(ok)


def _preprocess(raw: np.ndarray, method: AnomalyMethod) -> torch.Tensor:
    """One raw (H, W) or (3, H, W) slice -> (1, 3, S, S) as the engine preprocesses it (per slice)."""
    tensor = torch.from_numpy(np.ascontiguousarray(raw, dtype=np.float32))[None]
    return preprocess_slices(tensor, method.image_size, method.backbone.mean, method.backbone.std)


def _draw_from_cases(
    cases: Sequence[str | Path], k_shot: int, method: AnomalyMethod, modalities: list[str], axis: int, seed: int,
    exclude_case_id: str | None, require_labels: bool, min_brain_fraction: float,
) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """K tumour-free slices: cases in seeded order, one random eligible slice per case, round-robin."""
    usable = sorted((Path(c) for c in cases if not _same_patient(case_id_of(c), exclude_case_id)), key=case_id_of)
    if not usable:
        raise InputError(f"no reference case left: every given case is the analysed case {exclude_case_id!r} or its patient; give other normal cases")
    rng = np.random.default_rng(seed)
    order = [usable[i] for i in rng.permutation(len(usable))]
    pools: list[tuple[str, np.ndarray, list[int]]] = []  # case id, slice stack, slices not drawn yet (seeded order)
    for path in order:
        if len(pools) >= k_shot:
            break
        case = load_case(path, modalities=modalities)
        if _same_patient(case.case_id, exclude_case_id):  # a file whose name differs from its case id
            continue
        if require_labels and case.seg is None:
            continue  # 'auto' needs labels to know a slice is tumour-free
        volume, brain = _volume_and_brain(case, modalities, None)
        eligible = _normal_slices(brain, case.whole_tumour, axis, min_brain_fraction)
        if len(eligible):
            stack = np.moveaxis(volume, axis + 1, 0) if volume.ndim == 4 else slices_along(volume, axis)
            pools.append((case.case_id, stack, [int(i) for i in rng.permutation(eligible)]))
    images, drawn = [], []
    while len(drawn) < k_shot and any(p[2] for p in pools):
        for case_id, stack, remaining in pools:
            if remaining and len(drawn) < k_shot:
                index = remaining.pop(0)
                images.append(_preprocess(stack[index], method))
                drawn.append({"case_id": case_id, "slice": index})
    if len(drawn) < k_shot:
        why = "with segmentation labels " if require_labels else ""
        raise InputError(
            f"only {len(drawn)} tumour-free brain slices found in {len(pools)} reference case(s) {why}but --k-shot is {k_shot}; "
            "give more normal cases or a smaller --k-shot"
        )
    return images, drawn


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)


def _read_image(path: Path, n_channels: int) -> np.ndarray:
    """A 2D image as (H, W) grey (one modality) or (3, H, W) RGB (three-modality composite), float32."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("L" if n_channels == 1 else "RGB"), dtype=np.float32)
    except (OSError, UnidentifiedImageError) as exc:
        raise InputError(f"reference image {path}: cannot be read ({exc.__class__.__name__}); give PNG or JPEG files") from None
    return array if n_channels == 1 else np.moveaxis(array, -1, 0)


def _draw_from_images(
    files: list[Path], k_shot: int, method: AnomalyMethod, n_channels: int, seed: int, exclude_case_id: str | None,
) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    usable = [p for p in files if not _names_patient(p.name, exclude_case_id)]
    if len(usable) < k_shot:
        raise InputError(
            f"{files[0].parent}: {len(usable)} usable reference image(s) (files naming the analysed case are left out) "
            f"but --k-shot is {k_shot}; add images or lower --k-shot"
        )
    if len(usable) > k_shot:
        usable = [usable[i] for i in sorted(np.random.default_rng(seed).choice(len(usable), k_shot, replace=False))]
    images = [_preprocess(_read_image(p, n_channels), method) for p in usable]
    return images, [{"file": p.name} for p in usable]


def load_references(
    source: str | Path,
    method: AnomalyMethod,
    k_shot: int = DEFAULT_K_SHOT,
    modality: str | Sequence[str] = "t2w",
    axis: str | int = "axial",
    training_cases: Sequence[str | Path] | None = None,
    exclude_case_id: str | None = None,
    seed: int = 0,
    min_brain_fraction: float = MIN_BRAIN_FRACTION,
) -> References:
    """K normal reference slices, preprocessed for ``method`` like the engine does.

    Args:
        source: "auto" (draw from ``training_cases``) or a folder of normal cases or of 2D images.
        method: The built method (its image size and the backbone's mean/std are used).
        k_shot: Number of references K (>= 1; k-shot 0 is zero-shot: call no references).
        modality: As for ``run_volume``: one modality, or three joined by '+' as the channels.
        axis: Slicing axis of the references (use the analysis axis).
        training_cases: Case paths to draw from with "auto" (e.g. the training split's cases, or the
            other cases of the cohort).
        exclude_case_id: The analysed case: neither it nor another time point of its patient is used
            (image files whose name mentions it are left out too).
        seed: Seed of the draw.
        min_brain_fraction: Minimum brain area of a slice relative to the case's largest brain slice.

    Raises:
        InputError: k_shot < 1, no such folder, nothing usable, fewer than K normal slices (one line).
    """
    if isinstance(k_shot, bool) or not isinstance(k_shot, (int, np.integer)) or k_shot < 1:
        raise InputError(f"--k-shot {k_shot!r}: give K >= 1 reference slices (k-shot 0 is zero-shot: drop --references)")
    k_shot = int(k_shot)
    modalities = parse_modality(modality)
    ax = axis_index(axis)
    axis_name = ["axial", "coronal", "sagittal"][ax]
    provenance: dict[str, Any] = {
        "source": AUTO if str(source) == AUTO else str(source), "k_shot": k_shot, "seed": int(seed),
        "modality": "+".join(modalities), "axis": axis_name, "excluded_case": exclude_case_id,
    }
    if str(source) == AUTO:
        if not training_cases:
            raise InputError("--references auto needs training cases to draw normal slices from; give a cohort, a split or a references folder")
        images, drawn = _draw_from_cases(
            training_cases, k_shot, method, modalities, ax, seed, exclude_case_id, True, min_brain_fraction)
    else:
        folder = Path(source).expanduser()
        if not folder.is_dir():
            raise InputError(f"--references {source}: no such folder; give 'auto', a folder of normal cases or of PNG/JPEG slices")
        files = _image_files(folder)
        if files:
            images, drawn = _draw_from_images(files, k_shot, method, len(modalities), seed, exclude_case_id)
            provenance["orientation"] = "as stored in the image files (not reoriented)"
        else:
            try:
                cases = find_cases(folder)
            except InputError:
                raise InputError(
                    f"--references {folder}: holds neither case folders nor PNG/JPEG images; give normal cases or 2D slices"
                ) from None
            images, drawn = _draw_from_cases(
                cases, k_shot, method, modalities, ax, seed, exclude_case_id, False, min_brain_fraction)
    provenance["references"] = drawn
    return References(torch.cat(images), provenance)


class CohortReferences:
    """References for every case of a cohort run, each drawn without the analysed case's patient.

    Draws once without exclusion and reuses that draw for every analysed case whose patient is not
    among its references; only cases whose patient it contains get their own draw (with
    ``exclude_case_id``). So a cohort costs at most K + 1 draws, and the guarantee of
    :func:`load_references` holds for each case. Draws are cached per excluded patient.

    Args:
        source, method, k_shot, modality, axis, training_cases, seed, min_brain_fraction: As for
            :func:`load_references`.
    """

    def __init__(
        self,
        source: str | Path,
        method: AnomalyMethod,
        k_shot: int = DEFAULT_K_SHOT,
        modality: str | Sequence[str] = "t2w",
        axis: str | int = "axial",
        training_cases: Sequence[str | Path] | None = None,
        seed: int = 0,
        min_brain_fraction: float = MIN_BRAIN_FRACTION,
    ) -> None:
        self._kwargs: dict[str, Any] = {
            "source": source, "method": method, "k_shot": k_shot, "modality": modality, "axis": axis,
            "training_cases": training_cases, "seed": seed, "min_brain_fraction": min_brain_fraction,
        }
        self._cache: dict[str | None, References] = {}

    def _draw(self, exclude_case_id: str | None) -> References:
        key = None if exclude_case_id is None else patient_id(exclude_case_id)
        if key not in self._cache:
            self._cache[key] = load_references(exclude_case_id=exclude_case_id, **self._kwargs)
        return self._cache[key]

    def for_case(self, case_id: str) -> References:
        """The references to use when analysing ``case_id`` (never from its patient)."""
        shared = self._draw(None)
        used = [d.get("case_id") or d.get("file", "") for d in shared.provenance["references"]]
        if any(_same_patient(u, case_id) or _names_patient(u, case_id) for u in used):
            shared = self._draw(case_id)
        return References(shared.images, {**shared.provenance, "excluded_case": case_id})
