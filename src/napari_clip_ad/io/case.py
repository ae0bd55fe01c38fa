"""One MRI case (modalities, labels, brain mask) in canonical orientation, from any known layout."""

from __future__ import annotations

import glob
import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError
from .layouts import LAYOUTS, MODALITIES, NIFTI_EXTENSIONS, Layout, expected_names
from .nifti import Geometry, check_finite, labels_from, read_nifti, save_nifti, strip_nifti_ext
from .voxels import intensity_float32


@dataclass
class Case:
    """A loaded case. Every array is canonical ``[z, y, x]`` (see :mod:`napari_clip_ad.io.nifti`).

    Attributes:
        case_id: The case folder's name (or the Decathlon file's stem).
        path: What was loaded (folder, or 4D file).
        layout: Name of the layout it was read with.
        images: Modality (``t1n``, ``t1c``, ``t2w``, ``t2f``) -> float32 volume.
        seg: int16 labels, or None when the case has none.
        brain_mask: bool volume: the provided mask, else the nonzero voxels of the loaded images.
        geometry: Affine, header and orientation of the source files.
        files: What each part was read from.
    """

    case_id: str
    path: Path
    layout: str
    images: dict[str, np.ndarray]
    seg: np.ndarray | None
    brain_mask: np.ndarray
    geometry: Geometry
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Canonical shape (z, y, x)."""
        return self.geometry.shape

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm, canonical order (z, y, x)."""
        return self.geometry.spacing

    @property
    def whole_tumour(self) -> np.ndarray | None:
        """Whole-tumour mask: any label > 0 (1/2/3, and 4 in the old scheme); None without labels."""
        return None if self.seg is None else self.seg > 0

    def image(self, modality: str) -> np.ndarray:
        """The volume of one modality, with a clear error when it is missing."""
        if modality not in MODALITIES:
            raise InputError(f"unknown modality {modality!r}; use one of {', '.join(MODALITIES)} (FLAIR = t2f)")
        if modality not in self.images:
            have = ", ".join(self.images) or "none"
            raise InputError(f"{self.path}: case {self.case_id} has no {modality} image (it has: {have})")
        return self.images[modality]


def _visible_files(folder: Path, pattern: str) -> list[Path]:
    """Files matching a glob, skipping hidden ones (``._x.nii.gz`` AppleDouble files from macOS archives).

    Broken symbolic links are kept, so that reading one says so instead of "missing modality".
    """
    return [p for p in folder.glob(pattern) if (p.is_file() or _broken_link(p)) and not p.name.startswith(".")]


def _broken_link(path: Path) -> bool:
    return path.is_symlink() and not path.exists()


class _NotACase(InputError):
    """Raised by :func:`_resolve` for a folder that holds no case (as opposed to a case that is broken).

    ``reason`` is the loader's precise word when there is one (a folder with only a segmentation).
    """

    def __init__(self, message: str, reason: bool = False) -> None:
        super().__init__(message)
        self.reason = reason


def _match(folder: Path, patterns: tuple[str, ...], case_id: str) -> Path | None:
    for pattern in patterns:
        stem = pattern.replace("{id}", glob.escape(case_id))
        hits = sorted({p for ext in NIFTI_EXTENSIONS for p in _visible_files(folder, stem + ext)})
        if len(hits) > 1:
            names = ", ".join(p.name for p in hits)
            raise InputError(f"{folder}: pattern {stem!r} matches several files ({names}); keep one per case")
        if hits:
            return hits[0]
    return None


@dataclass
class _Found:
    layout: Layout
    root: Path
    case_id: str
    files: dict[str, Path]


def _resolve(path: Path) -> _Found:
    """Find the layout and files of a case folder (or of a Decathlon 4D file)."""
    if path.is_file():
        case_id = strip_nifti_ext(path.name)
        root = path.parent.parent
        for layout in LAYOUTS:
            if any(_same_file(_match(root, (p,), case_id), path) for p in layout.stacked):
                return _found_in(layout, root, case_id)
        raise InputError(f"{path}: a single file is not a case; give its case folder ({expected_names()})")
    if not path.is_dir():
        if path.is_symlink():
            raise InputError(f"{path}: broken symbolic link (its target {os.readlink(path)} does not exist); "
                             "restore the target or remove the link")
        raise InputError(f"{path}: no such case folder")
    candidates = [_found_in(layout, path, path.name) for layout in LAYOUTS]
    best = max(candidates, key=_n_modalities, default=None)  # the first of the best, in LAYOUTS order
    if best is None or _n_modalities(best) == 0:
        seg = next((found.files["seg"] for found in candidates if "seg" in found.files), None)
        if seg is not None:
            raise _NotACase(f"{path}: only a segmentation ({seg.name}) and no image; a case needs at least one modality file",
                            reason=True)
        raise _NotACase(f"{path}: no recognisable modality file; expected one of: {expected_names()}")
    return best


def _same_file(found: Path | None, path: Path) -> bool:
    return found is not None and found.resolve() == path.resolve()


def _n_modalities(found: _Found) -> int:
    if "stacked" in found.files:
        return len(found.layout.channels)
    return sum(m in found.files for m in MODALITIES)


def _found_in(layout: Layout, root: Path, case_id: str) -> _Found:
    files: dict[str, Path] = {}
    for modality, patterns in layout.modalities.items():
        hit = _match(root, patterns, case_id)
        if hit is not None:
            files[modality] = hit
    if layout.stacked:
        hit = _match(root, layout.stacked, case_id)
        if hit is not None:
            files["stacked"] = hit
    for part, patterns in (("seg", layout.seg), ("brain_mask", layout.brain_mask)):
        hit = _match(root, patterns, case_id) if patterns else None
        if hit is not None:
            files[part] = hit
    return _Found(layout, root, case_id, files)


def load_case(path: str | Path, modalities: tuple[str, ...] | list[str] | None = None) -> Case:
    """Load a case folder in any known layout (or a Decathlon 4D image file).

    Args:
        path: Case folder (its name is the case id), or ``imagesTr/<id>.nii.gz`` of a Decathlon set.
        modalities: Load only these (BraTS 2023 names); all available when None.

    Returns:
        The case, canonical orientation, with its source geometry.

    Raises:
        InputError: Missing folder, no modality, unreadable or corrupt file, wrong dimensions, images
            or labels on different grids, NaN/inf voxels, unknown label values.
    """
    path = Path(path)
    for modality in modalities or ():
        if modality not in MODALITIES:
            raise InputError(f"unknown modality {modality!r}; use one of {', '.join(MODALITIES)} (FLAIR = t2f)")
    found = _resolve(path)
    wanted = list(modalities) if modalities else list(MODALITIES)
    images: dict[str, np.ndarray] = {}
    files: dict[str, Path] = {}
    geometry: Geometry | None = None
    if "stacked" in found.files:
        stacked = found.files["stacked"]
        data, img = read_nifti(stacked, ndim=4)
        geometry = Geometry.from_image(img)
        for modality in wanted:
            channel = found.layout.channels.get(modality)
            if channel is not None and channel < data.shape[3]:
                images[modality] = _canonical_float32(data[..., channel], geometry, stacked)
                files[modality] = stacked
    else:
        for modality in wanted:
            if modality not in found.files:
                continue
            data, img = read_nifti(found.files[modality])
            here = Geometry.from_image(img)
            if geometry is None:
                geometry = here
            else:
                _check_grid(found.files[modality], here, geometry, "image")
            images[modality] = _canonical_float32(data, geometry, found.files[modality])
            files[modality] = found.files[modality]
    if geometry is None or not images:
        have = ", ".join(m for m in MODALITIES if m in found.files) or "none"
        raise InputError(f"{path}: none of the requested modalities {wanted} found (available: {have})")
    seg = _load_labels(found, geometry, files)
    brain = _load_brain_mask(found, geometry, files, images)
    return Case(found.case_id, path, found.layout.name, images, seg, brain, geometry, files)


def _canonical_float32(data: np.ndarray, geometry: Geometry, path: Path) -> np.ndarray:
    """Source-layout volume -> contiguous canonical float32 in one pass, finite after the cast."""
    out = np.empty(geometry.shape, dtype=np.float32)
    return intensity_float32(geometry.to_canonical(data), path, out=out)


def _check_grid(part_path: Path, here: Geometry, geometry: Geometry, what: str) -> None:
    """Refuse a file whose voxel grid (shape, then affine) differs from the case's first image."""
    if here.source_shape != geometry.source_shape:
        raise InputError(
            f"{part_path}: {what} shape {here.source_shape} differs from the case image shape {geometry.source_shape}; "
            "it must share the image grid"
        )
    if not here.same_grid(geometry):
        diff = float(np.abs(here.affine - geometry.affine).max())
        raise InputError(
            f"{part_path}: {what} affine differs from the case image affine (by up to {diff:.3g}); "
            "it must share the image grid (resample or copy the image header)"
        )


def _aligned(part_path: Path, geometry: Geometry, what: str) -> np.ndarray:
    data, img = read_nifti(part_path)
    _check_grid(part_path, Geometry.from_image(img), geometry, what)
    return data


def _load_labels(found: _Found, geometry: Geometry, files: dict[str, Path]) -> np.ndarray | None:
    seg_path = found.files.get("seg")
    if seg_path is None:
        return None
    labels = labels_from(_aligned(seg_path, geometry, "segmentation"), seg_path, found.layout.label_values)
    files["seg"] = seg_path
    return np.ascontiguousarray(geometry.to_canonical(labels))


def _load_brain_mask(found: _Found, geometry: Geometry, files: dict[str, Path], images: dict[str, np.ndarray]) -> np.ndarray:
    mask_path = found.files.get("brain_mask")
    if mask_path is not None:
        data = _aligned(mask_path, geometry, "brain mask")
        check_finite(data, mask_path)
        files["brain_mask"] = mask_path
        return np.ascontiguousarray(geometry.to_canonical(np.asarray(data) > 0))
    brain = np.zeros(geometry.shape, dtype=bool)
    for volume in images.values():
        brain |= volume != 0
    return brain


def save_volume(array: np.ndarray, like: Case | Geometry, path: str | Path, provenance: str | None = None) -> Path:
    """Write a canonical array as NIfTI aligned with a case's source files (same affine, shape, axes).

    Args:
        array: Canonical ``[z, y, x]`` array of the case's shape; its dtype is kept (bool is stored
            as uint8, float16 as float32).
        like: The case (or geometry) it belongs to.
        path: Output ``.nii.gz`` / ``.nii`` path; written atomically (nothing is left on failure).
        provenance: Header ``descrip`` marking the file as ours (:func:`napari_clip_ad.io.header.provenance_text`).

    Returns:
        The path written.

    Raises:
        InputError: Wrong shape, a dtype NIfTI cannot hold, a bad name, or a path that cannot be written.
    """
    geometry = like.geometry if isinstance(like, Case) else like
    return save_nifti(array, geometry, path, provenance)


def case_id_of(path: str | Path) -> str:
    """The case id of a case folder (its name) or Decathlon file (its stem)."""
    path = Path(path)
    return strip_nifti_ext(path.name) if path.is_file() else path.name


def _stacked_files(folder: Path) -> list[Path]:
    """Decathlon-style 4D case files of a task folder (``imagesTr/*.nii.gz``), if it is one."""
    return [
        p
        for layout in LAYOUTS
        for pattern in layout.stacked
        for ext in NIFTI_EXTENSIONS
        for p in _visible_files(folder, pattern.replace("{id}", "*") + ext)
    ]


def _subfolders(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as exc:
        raise InputError(f"{folder}: cannot list the folder ({exc.strerror or type(exc).__name__}); check its permissions") from None


def find_cases(root: str | Path, max_depth: int = 3) -> list[Path]:
    """Case folders (and Decathlon 4D files) under ``root``, sorted by case id.

    A folder whose files match a layout but cannot be resolved (one modality matched by two files, a
    broken link) is returned as a case, so that loading it gives the precise reason. Folders and files
    reached twice (symbolic links, loops) are listed once, by their first path; two different cases
    with one id are refused (their outputs would overwrite each other).

    Args:
        root: A case folder, a cohort folder, or a Decathlon task folder.
        max_depth: How many folder levels to search below ``root``.

    Raises:
        InputError: ``root`` is missing or holds no case (with the loader's reason when a folder came
            close, e.g. only a segmentation), or two cases share an id.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: no such folder")
    found: dict[Path, Path] = {}  # resolved path -> path as first reached
    seen: set[Path] = set()
    reasons: list[InputError] = []
    frontier = [root]
    for _ in range(max_depth + 1):
        next_frontier = []
        for folder in frontier:
            real = folder.resolve()
            if real in seen:
                if real in found and folder.name == real.name != found[real].name:
                    found[real] = folder  # the folder's own name is its case id, rather than an alias's
                continue
            seen.add(real)
            stacked = _stacked_files(folder)
            if stacked:
                for path in stacked:
                    found.setdefault(path.resolve(), path)
                continue
            subfolders = _subfolders(folder)
            try:
                _resolve(folder)
                found.setdefault(real, folder)
                continue
            except _NotACase as exc:
                if exc.reason:
                    reasons.append(exc)
            except InputError as exc:  # files of a case, but broken: loading it says why
                if not subfolders:
                    found.setdefault(real, folder)
                    continue
                reasons.append(exc)
            next_frontier.extend(subfolders)
        frontier = next_frontier
    if not found:
        if len(reasons) == 1 and str(reasons[0]).startswith(f"{root}:"):
            raise InputError(str(reasons[0]))
        if reasons:
            more = f" ({len(reasons) - 1} more folders alike)" if len(reasons) > 1 else ""
            raise InputError(f"{root}: no case found; {reasons[0]}{more}")
        raise InputError(f"{root}: no case found; expected case folders in one of: {expected_names()}")
    cases = sorted(found.values(), key=lambda p: (case_id_of(p), str(p)))
    for first, second in itertools.pairwise(cases):
        if case_id_of(first) == case_id_of(second):
            raise InputError(f"{second}: case id {case_id_of(second)!r} also names {first}; "
                             "rename or remove one (their outputs would overwrite each other)")
    return cases
