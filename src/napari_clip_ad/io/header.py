"""Checks of a NIfTI header before any voxel is read: size and memory, voxel type, voxel size, affine.

A header is read with ``check=False`` (nibabel would otherwise "fix" a zero voxel size to 1 mm with
only a log line) and refused with one :class:`~napari_clip_ad.errors.InputError` line naming the file
when it cannot describe a usable MRI volume. The rules are listed in ``docs/errors.md`` (Inputs).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from ..errors import InputError

MAX_VOLUME_GB_ENV = "NAPARI_CLIP_AD_MAX_VOLUME_GB"
DEFAULT_MAX_VOLUME_GB = 1.0
"""Largest uncompressed NIfTI file read (GiB, header and voxels) unless ``NAPARI_CLIP_AD_MAX_VOLUME_GB`` says
otherwise. A BraTS volume is 17-35 MB, a Decathlon 4D case 140 MB, a 0.5 mm whole head about 330 MB."""

SPACING_RANGE_MM = (1e-3, 100.0)
"""Voxel sizes accepted (mm): outside this range a header is broken, not an MRI of a head."""

MIN_AXIS_ANGLE_DEG = 60.0
"""Voxel axes closer than this to each other (a strongly sheared or degenerate affine) are refused:
the slicing axes would be a guess. Milder shear is accepted: slices follow the voxel axes and outputs
keep the source affine, so they stay aligned."""

_GIB = float(1 << 30)


@dataclass(frozen=True)
class DeclaredImage:
    """What a NIfTI header declares, once it has passed :func:`inspect_header`.

    Attributes:
        image_class: ``nib.Nifti1Image`` or ``nib.Nifti2Image``.
        shape: The data shape (``dim[1:dim[0]+1]``).
        dtype: The stored voxel type.
        offset: Byte offset of the voxels in the (uncompressed) file.
        scaled: True when ``scl_slope``/``scl_inter`` turn the voxels into float64.
        free_memory: :func:`available_memory` when the header was checked (None: unknown).
    """

    image_class: type[nib.Nifti1Image]
    shape: tuple[int, ...]
    dtype: np.dtype
    offset: int
    scaled: bool
    free_memory: int | None = None

    @property
    def n_voxels(self) -> int:
        """Number of voxels (all channels)."""
        return math.prod(self.shape)

    @property
    def data_bytes(self) -> int:
        """Bytes of stored voxel data."""
        return self.n_voxels * self.dtype.itemsize

    @property
    def file_bytes(self) -> int:
        """Bytes of the whole uncompressed file: header, extensions and voxels."""
        return self.offset + self.data_bytes

    @property
    def memory_bytes(self) -> int:
        """Rough peak memory of reading it: file bytes, the voxel array (float64 when scaled), a float32 copy."""
        itemsize = 8 if self.scaled else self.dtype.itemsize
        return self.file_bytes + self.n_voxels * (itemsize + 4)


def max_volume_bytes() -> int:
    """The size limit in bytes (``NAPARI_CLIP_AD_MAX_VOLUME_GB``, default :data:`DEFAULT_MAX_VOLUME_GB`)."""
    text = os.environ.get(MAX_VOLUME_GB_ENV, "").strip()
    if not text:
        return int(DEFAULT_MAX_VOLUME_GB * _GIB)
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise InputError(f"{MAX_VOLUME_GB_ENV}={text!r}: give a positive size in GiB (default {DEFAULT_MAX_VOLUME_GB:g})")
    return int(value * _GIB)


def available_memory() -> int | None:
    """Bytes this process can still allocate: the least of free RAM, the cgroup limit and ``ulimit -v``; None if unknown."""
    limits: list[int] = []
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    limits.append(int(line.split()[1]) * 1024)
                    break
    except (OSError, ValueError, IndexError):
        pass
    try:
        cgroup_max = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if cgroup_max != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
            limits.append(max(int(cgroup_max) - used, 0))
    except (OSError, ValueError):
        pass
    try:
        import resource  # POSIX only

        soft, _hard = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY:
            with open("/proc/self/statm", encoding="ascii") as handle:
                virtual = int(handle.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
            limits.append(max(soft - virtual, 0))
    except (ImportError, OSError, ValueError, IndexError, AttributeError):
        pass
    return min(limits) if limits else None


def _size(n_bytes: float) -> str:
    return f"{n_bytes / _GIB:.2f} GiB" if n_bytes >= 0.1 * _GIB else f"{n_bytes / (1 << 20):.1f} MiB"


def _header(blob: bytes, image_class: type[nib.Nifti1Image], path: Path) -> nib.Nifti1Header:
    header_class = image_class.header_class
    if len(blob) < header_class.sizeof_hdr:
        raise InputError(f"{path}: truncated NIfTI header ({len(blob)} of {header_class.sizeof_hdr} bytes); re-export the file")
    try:
        return header_class(blob[: header_class.sizeof_hdr], check=False)
    except Exception as exc:  # noqa: BLE001 - any failure here means an unreadable header
        raise InputError(f"{path}: unreadable NIfTI header ({type(exc).__name__}); re-export the file") from None


def _shape(header: nib.Nifti1Header, path: Path) -> tuple[int, ...]:
    dim = [int(d) for d in header["dim"]]
    if not 1 <= dim[0] <= 7:
        raise InputError(f"{path}: header dim[0] = {dim[0]} is not a number of dimensions (1-7); the header is corrupt, re-export the file")
    shape = tuple(dim[1 : dim[0] + 1])
    if any(size < 1 for size in shape):
        raise InputError(f"{path}: header declares the shape {shape}, with an empty or negative axis; give a non-empty volume")
    return shape


def _dtype(header: nib.Nifti1Header, path: Path) -> np.dtype:
    codes = nib.nifti1.data_type_codes
    code = int(header["datatype"])
    if code not in codes.code:
        raise InputError(f"{path}: unknown NIfTI voxel type code {code}; the header is corrupt, re-export the file")
    label, dtype = codes.label[code], np.dtype(codes.dtype[code])
    if np.issubdtype(dtype, np.complexfloating) or label.startswith("complex"):
        raise InputError(f"{path}: complex ({label}) voxels; save the magnitude (numpy.abs) as a real-valued image")
    if label in ("RGB", "RGBA"):
        raise InputError(f"{path}: colour ({label}) voxels; convert the image to one grey-level channel")
    if dtype.kind not in "iuf" or dtype.itemsize == 0:
        raise InputError(f"{path}: voxel type {label} (NIfTI code {code}) cannot be read as intensities; save integers or floats")
    return dtype


def _spacing(header: nib.Nifti1Header, n_spatial: int, path: Path) -> None:
    zooms = [float(z) for z in header["pixdim"][1 : 1 + n_spatial]]
    low, high = SPACING_RANGE_MM
    if not all(math.isfinite(z) and low <= z <= high for z in zooms):
        shown = ", ".join(f"{z:g}" for z in zooms)
        raise InputError(f"{path}: voxel size ({shown}) mm in the header (pixdim) is not in [{low:g}, {high:g}] mm; "
                         "nothing is assumed: fix the header's voxel size (e.g. nibabel header.set_zooms) and save again")


def check_affine(affine: np.ndarray, where: str | Path) -> None:
    """Refuse an affine that cannot place a volume: non-finite, singular, absurd voxel size, axes too close.

    Args:
        affine: The 4x4 voxel-to-world affine.
        where: The file (or what the volume is) for the message.
    """
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise InputError(f"{where}: the voxel-to-world affine (sform/qform) has NaN or infinite entries; fix the header")
    columns = affine[:3, :3]
    norms = np.linalg.norm(columns, axis=0)
    low, high = SPACING_RANGE_MM
    if not np.all((norms >= low) & (norms <= high)):
        shown = ", ".join(f"{n:g}" for n in norms)
        raise InputError(f"{where}: the affine gives voxel sizes ({shown}) mm, not in [{low:g}, {high:g}] mm "
                         "(a singular or broken sform/qform); fix the header")
    unit = columns / norms
    cosines = np.abs(unit.T @ unit)[np.triu_indices(3, 1)]
    if cosines.max() > math.cos(math.radians(MIN_AXIS_ANGLE_DEG)):
        angle = math.degrees(math.acos(min(1.0, float(cosines.max()))))
        raise InputError(f"{where}: two voxel axes of the affine are only {angle:.0f} degrees apart (a degenerate or "
                         f"strongly sheared sform/qform; at least {MIN_AXIS_ANGLE_DEG:.0f} needed); fix or resample the image")


def _affine(header: nib.Nifti1Header, path: Path) -> None:
    try:
        affine = header.get_best_affine()
    except Exception:  # noqa: BLE001 - NaN quaternions make nibabel's decomposition fail in several ways
        raise InputError(f"{path}: the voxel-to-world affine (sform/qform) cannot be computed from the header "
                         "(NaN or invalid entries); fix the header") from None
    check_affine(affine, path)


def inspect_header(blob: bytes, image_class: type[nib.Nifti1Image], path: Path) -> DeclaredImage:
    """Validate a NIfTI header (the first bytes of the uncompressed file) before reading its voxels.

    Refuses: a corrupt dimension field, an empty axis, complex / RGB / unknown voxel types, a voxel size
    that is not finite or not in :data:`SPACING_RANGE_MM`, an affine :func:`check_affine` refuses, and a
    declared size above :func:`max_volume_bytes` or the memory available.
    """
    header = _header(blob, image_class, path)
    shape = _shape(header, path)
    dtype = _dtype(header, path)
    _spacing(header, min(len(shape), 3), path)
    _affine(header, path)
    slope, inter = (float(header["scl_slope"]), float(header["scl_inter"]))
    scaled = math.isfinite(slope) and slope != 0 and (slope != 1 or (math.isfinite(inter) and inter != 0))
    free = available_memory()
    offset = max(int(header["vox_offset"]), header.sizeof_hdr + 4)
    declared = DeclaredImage(image_class, shape, dtype, offset, scaled, free)
    limit = max_volume_bytes()
    what = f"{'x'.join(map(str, shape))} voxels of {dtype.name}"
    if declared.file_bytes > limit:
        raise InputError(f"{path}: the header declares {what} ({_size(declared.file_bytes)} uncompressed), above the "
                         f"{_size(limit)} limit; nothing was decompressed (raise {MAX_VOLUME_GB_ENV} if the file is genuine)")
    if free is not None and declared.memory_bytes > free:
        raise InputError(f"{path}: the header declares {what}; reading it needs about {_size(declared.memory_bytes)} "
                         f"of memory and only {_size(free)} is available; free memory or use a smaller image")
    return declared


# --- our provenance in the header of the files we write -------------------------------------------------
PROVENANCE_TAG = "napari-clip-ad"
"""First word of the ``descrip`` field of an anomaly map or mask this package wrote."""
MAP_PROVENANCE, MASK_PROVENANCE = "anomaly_map", "anomaly_mask"
_DESCRIP_BYTES = 80


def provenance_text(kind: str, **fields: object) -> str:
    """``descrip`` text marking a file as ours: ``napari-clip-ad <kind> key=value ...`` (at most 80 bytes).

    The package writes ``thr`` (threshold), ``minc`` (minimum component), ``case`` and ``method``.

    Fields whose value is None are left out; fields that do not fit are dropped from the end, so the kind
    (what the reader needs) always fits. Values must not contain spaces (they are replaced by '_').
    """
    text = f"{PROVENANCE_TAG} {kind}"
    for key, value in fields.items():
        if value is None:
            continue
        item = f" {key}={str(value).replace(' ', '_')}"
        if len((text + item).encode("ascii", "replace")) > _DESCRIP_BYTES:
            break
        text += item
    return text


def read_provenance(header: nib.Nifti1Header) -> dict[str, str] | None:
    """Our provenance in a header: ``{"kind": ..., key: value, ...}``, or None when the file is not marked as ours."""
    try:
        raw = header["descrip"].item()
    except (KeyError, ValueError, AttributeError):
        return None
    text = raw.decode("ascii", "replace") if isinstance(raw, bytes) else str(raw)
    words = text.strip("\x00 ").split()
    if len(words) < 2 or words[0] != PROVENANCE_TAG:
        return None
    record = {"kind": words[1]}
    for word in words[2:]:
        key, sep, value = word.partition("=")
        if sep:
            record[key] = value
    return record
