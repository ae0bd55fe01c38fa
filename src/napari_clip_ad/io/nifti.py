"""Safe NIfTI reading and the canonical orientation used everywhere in the package.

Canonical orientation: arrays are indexed ``[z, y, x]`` with axis codes ``("S", "P", "L")``:
axis 0 runs inferior to superior (so ``volume[k]`` is an axial slice, ``k = 0`` the lowest),
axis 1 anterior to posterior (row 0 is anterior: the top of the screen), axis 2 from the patient's
right to left (radiological view: the patient's right on the left of the screen). For BraTS files
(stored L, P, S) this is a pure transpose. The source affine and header are kept in
:class:`Geometry` so every output saves back aligned with the input file.
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.imageglobals import LoggingOutputSuppressor
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform
from nibabel.spatialimages import HeaderDataError

from ..atomic import atomic_path
from ..errors import InputError
from .header import DeclaredImage, check_affine, inspect_header, read_provenance

CANONICAL_AXCODES: tuple[str, str, str] = ("S", "P", "L")


@dataclass
class Geometry:
    """Where a canonical array sits in the world, and how to put it back into its source file layout.

    Attributes:
        affine: The source file's affine (voxel -> world mm, RAS).
        header: The source file's NIfTI header.
        source_shape: The source file's 3D shape.
        transform: nibabel orientation transform from source axes to canonical axes.
        spacing: Voxel size in mm, in canonical axis order (z, y, x).
    """

    affine: np.ndarray
    header: nib.Nifti1Header
    source_shape: tuple[int, int, int]
    transform: np.ndarray
    spacing: tuple[float, float, float]

    @classmethod
    def from_image(cls, img: nib.Nifti1Image) -> Geometry:
        """Geometry of a 3D (or the first three axes of a 4D) NIfTI image."""
        affine = np.asarray(img.affine, dtype=np.float64)
        check_affine(affine, img.get_filename() or "image")  # read_nifti checked files already; arrays built in memory
        transform = ornt_transform(io_orientation(affine), axcodes2ornt(CANONICAL_AXCODES))
        zooms = [float(z) for z in img.header.get_zooms()[:3]]
        spacing = [0.0, 0.0, 0.0]
        for src_axis, (dst_axis, _flip) in enumerate(transform):
            spacing[int(dst_axis)] = zooms[src_axis]
        return cls(affine, img.header.copy(), tuple(int(s) for s in img.shape[:3]), transform, tuple(spacing))

    @property
    def shape(self) -> tuple[int, int, int]:
        """Canonical (z, y, x) shape."""
        shape = [0, 0, 0]
        for src_axis, (dst_axis, _flip) in enumerate(self.transform):
            shape[int(dst_axis)] = self.source_shape[src_axis]
        return tuple(shape)

    @property
    def canonical_affine(self) -> np.ndarray:
        """Affine mapping canonical voxel indices (z, y, x) to world mm."""
        return self.affine @ inv_ornt_aff(self.transform, self.source_shape)

    def to_canonical(self, data: np.ndarray) -> np.ndarray:
        """Reorient a source-layout 3D array to canonical (a view where possible)."""
        return apply_orientation(data, self.transform)

    def to_source(self, data: np.ndarray) -> np.ndarray:
        """Reorient a canonical 3D array back to the source file layout."""
        if tuple(data.shape) != self.shape:
            raise InputError(f"array shape {tuple(data.shape)} does not match the case's canonical shape {self.shape}")
        back = ornt_transform(axcodes2ornt(CANONICAL_AXCODES), io_orientation(self.affine))
        return apply_orientation(data, back)

    def same_grid(self, other: Geometry, atol: float = 1e-3) -> bool:
        """True when both describe the same voxel grid (shape and affine)."""
        return self.source_shape == other.source_shape and np.allclose(self.affine, other.affine, atol=atol)


def nifti_files(folder: Path) -> list[Path]:
    """NIfTI files directly in ``folder``, sorted."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith((".nii.gz", ".nii")))


def strip_nifti_ext(name: str) -> str:
    """File name without ``.nii.gz`` / ``.nii``."""
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


_GZIP_MAGIC = b"\x1f\x8b"
_MAX_HEADER_BYTES = 540  # a NIfTI-2 header; NIfTI-1 needs 348
_TRAILING_SLACK = 1 << 16  # bytes tolerated past the declared end of the voxels (padding)
_MAX_DEFLATE_RATIO = 1032  # deflate inflates one input byte to at most ~1032 output bytes
_HEADER_SIZES: dict[int, type[nib.Nifti1Image]] = {348: nib.Nifti1Image, 540: nib.Nifti2Image}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _image_class(blob: bytes) -> type[nib.Nifti1Image] | None:
    """NIfTI-1 or NIfTI-2 from the header-size field (either byte order), None if neither."""
    if len(blob) < 4:
        return None
    for order in ("<", ">"):
        found = _HEADER_SIZES.get(struct.unpack(order + "i", blob[:4])[0])
        if found is not None:
            return found
    return None


def _read_validated(path: Path) -> tuple[bytes, DeclaredImage]:
    """The uncompressed bytes of a NIfTI file, read only once its header passed :func:`inspect_header`.

    A ``.nii.gz`` is inflated only after its header (the first bytes of the stream) has been checked, and
    never beyond the size the header declares, so a small file claiming gigabytes is refused before any
    large allocation. The whole gzip stream is checked (CRC and length): nibabel alone stops reading where
    the voxels end and never checks the CRC, so a corrupt stream could load as silent garbage.
    """
    try:
        with open(path, "rb") as handle:
            head = handle.read(_MAX_HEADER_BYTES)
            if not head:
                raise InputError(f"{path}: empty file; re-download or re-export it")
            if head[:2] == _GZIP_MAGIC:
                handle.seek(0)
                return _gunzip_validated(handle.read(), path)
            image_class = _image_class(head)
            if image_class is None:
                if path.name.endswith(".gz"):
                    raise InputError(f"{path}: not gzip-compressed data, so not a .nii.gz volume; give a NIfTI file")
                raise InputError(f"{path}: not a NIfTI file (no NIfTI header); give a .nii.gz or .nii volume")
            declared = inspect_header(head, image_class, path)  # uncompressed NIfTI (possibly misnamed .nii.gz)
            size = os.fstat(handle.fileno()).st_size
            if size < declared.file_bytes:
                raise InputError(f"{path}: truncated: the header declares {declared.file_bytes} bytes and the file holds "
                                 f"{size}; re-download or re-export it")
            return head + handle.read(declared.file_bytes - len(head)), declared
    except OSError as exc:
        raise InputError(f"{path}: cannot read the file ({_first_line(exc)}); check it exists and is readable") from None


def _gunzip_validated(raw: bytes, path: Path) -> tuple[bytes, DeclaredImage]:
    try:
        head = zlib.decompressobj(wbits=31).decompress(raw, _MAX_HEADER_BYTES)
    except zlib.error as exc:
        raise InputError(f"{path}: corrupt gzip data ({_first_line(exc)}); re-download or re-export it") from None
    image_class = _image_class(head)
    if image_class is None:
        if len(head) < 4:
            _inflate(raw, path, limit=_TRAILING_SLACK)  # says truncated or corrupt where that is the reason
        raise InputError(f"{path}: not a NIfTI file (no NIfTI header); give a .nii.gz or .nii volume")
    if len(head) < image_class.header_class.sizeof_hdr:
        _inflate(raw, path, limit=_TRAILING_SLACK)
    declared = inspect_header(head, image_class, path)
    limit = declared.file_bytes + _TRAILING_SLACK
    blob = b""
    # One zlib call into one buffer is about 15% faster than the bounded inflate, but unbounded: take it only
    # when even the most a stream this size could inflate to (deflate's ratio) fits the limit or half the free
    # memory, so that a stream lying about its size is refused below without exhausting memory.
    worst = len(raw) * _MAX_DEFLATE_RATIO
    if worst <= limit or worst <= (declared.free_memory or 0) // 2:
        try:
            blob = zlib.decompress(raw, wbits=31, bufsize=declared.file_bytes)
        except zlib.error:
            blob = b""  # _inflate says what is wrong
    if len(blob) < declared.file_bytes or len(blob) > limit:  # several members (bgzip, concatenated), or broken
        blob = _inflate(raw, path, limit=limit)
    if len(blob) < declared.file_bytes:
        raise InputError(f"{path}: truncated: the header declares {declared.file_bytes} bytes and the gzip data holds "
                         f"{len(blob)}; re-download or re-export it")
    return blob, declared


def _inflate(raw: bytes, path: Path, limit: int) -> bytes:
    """Every gzip member of ``raw`` (bgzip and ``cat a.gz b.gz`` files have several), at most ``limit`` bytes."""
    parts: list[bytes] = []
    total, data = 0, raw
    inflater = zlib.decompressobj(wbits=31)
    while True:
        try:
            chunk = inflater.decompress(data, limit + 1 - total)
        except zlib.error as exc:
            raise InputError(f"{path}: corrupt gzip data ({_first_line(exc)}); re-download or re-export it") from None
        if chunk:
            parts.append(chunk)
            total += len(chunk)
        if total > limit:
            raise InputError(f"{path}: the gzip data holds more than the {limit - _TRAILING_SLACK} bytes its NIfTI "
                             "header declares; the file is corrupt, re-export it")
        if inflater.eof:
            data = inflater.unused_data
            if data[:2] != _GZIP_MAGIC:
                break  # trailing bytes that start no member are ignored, as zlib and nibabel do
            inflater = zlib.decompressobj(wbits=31)
            continue
        data = inflater.unconsumed_tail
        if not data and not chunk:
            raise InputError(f"{path}: truncated gzip data (the file ends early); re-download or re-export it")
    return parts[0] if len(parts) == 1 else b"".join(parts)


def read_nifti(path: Path, ndim: int | None = 3) -> tuple[np.ndarray, nib.Nifti1Image]:
    """Read a NIfTI file fully, turning every way it can be broken into one clear :class:`InputError`.

    The header is checked before any voxel is read (:func:`~napari_clip_ad.io.header.inspect_header`:
    size against a limit and the memory available, voxel type, voxel size, affine).

    Args:
        path: The file (``.nii.gz`` or ``.nii``, NIfTI-1 or NIfTI-2).
        ndim: Required number of dimensions (trailing axes of length 1 are dropped), or None.

    Returns:
        The data array (source layout) and the image (for affine and header).
    """
    path = Path(path)
    if not path.is_file():
        if path.is_symlink():
            raise InputError(f"{path}: broken symbolic link (its target {os.readlink(path)} does not exist); "
                             "restore the target or remove the link")
        raise InputError(f"{path}: file not found")
    blob, declared = _read_validated(path)
    try:
        with LoggingOutputSuppressor():  # header fixes nibabel logs are either refused above or harmless
            img = declared.image_class.from_bytes(blob)
            data = np.asanyarray(img.dataobj)
    except (ImageFileError, HeaderDataError, ValueError, OSError, EOFError) as exc:
        raise InputError(f"{path}: not a readable NIfTI file ({_first_line(exc)}); re-export it") from None
    except MemoryError:
        raise InputError(f"{path}: not enough memory to read {declared.file_bytes} bytes of NIfTI data; "
                         "free memory or use a smaller image") from None
    if ndim is not None:
        while data.ndim > ndim and data.shape[-1] == 1:
            data = data[..., 0]
        if data.ndim != ndim:
            shape = tuple(data.shape)
            raise InputError(f"{path}: expected a {ndim}D volume, got shape {shape}; give one {ndim}D volume per file")
    return data, img


def check_finite(data: np.ndarray, path: Path) -> None:
    """Refuse NaN or infinite voxels (they would silently poison every metric)."""
    if np.issubdtype(data.dtype, np.floating) and not np.isfinite(data).all():
        bad = int(np.count_nonzero(~np.isfinite(data)))
        raise InputError(f"{path}: {bad} NaN/inf voxels; fix or mask them before use (e.g. numpy.nan_to_num)")


def labels_from(data: np.ndarray, path: Path, allowed: tuple[int, ...]) -> np.ndarray:
    """Validate a label volume and return it as int16 (a few linear passes, no sort of the volume)."""
    check_finite(data, path)
    low, high = min(allowed), max(allowed)
    if data.min() < low or data.max() > high:
        outside = np.unique(data[(data < low) | (data > high)])
        raise InputError(f"{path}: unknown label values {_listed(outside)}; expected {list(allowed)} (BraTS labels)")
    labels = data.astype(np.int16)
    if np.issubdtype(data.dtype, np.floating) and not np.array_equal(labels, data):
        raise InputError(f"{path}: label volume has non-integer values; expected integer labels {list(allowed)}")
    gaps = [value for value in range(low, high + 1) if value not in allowed]
    unknown = [value for value in gaps if np.any(labels == value)]
    if unknown:
        raise InputError(f"{path}: unknown label values {unknown}; expected {list(allowed)} (BraTS labels)")
    return labels


def _listed(values: np.ndarray, most: int = 8) -> str:
    shown = [int(v) if float(v).is_integer() else float(v) for v in values[:most]]
    return str(shown) + (f" and {len(values) - most} more" if len(values) > most else "")


_SAVE_AS: dict[np.dtype, np.dtype] = {np.dtype(bool): np.dtype(np.uint8), np.dtype(np.float16): np.dtype(np.float32)}
"""dtypes NIfTI cannot hold, and what they are stored as."""


def save_nifti(data: np.ndarray, geometry: Geometry, path: str | Path, provenance: str | None = None) -> Path:
    """Write a canonical array as NIfTI in the source layout, with the source affine, atomically.

    Booleans are stored as uint8 and float16 as float32; other dtypes are kept. Nothing is left at
    ``path`` (or beside it) when writing fails. ``provenance`` (see :func:`.header.provenance_text`) goes
    into the header's ``descrip``; without it, a ``descrip`` of ours inherited from the source header is
    cleared (a file is marked as a map only when it is one).
    """
    path = Path(path)
    if not path.name.endswith((".nii.gz", ".nii")):
        raise InputError(f"{path}: output name must end in .nii.gz or .nii")
    data = np.asarray(data)
    if tuple(data.shape) != geometry.shape:
        raise InputError(
            f"{path}: array shape {tuple(data.shape)} does not match the case's canonical shape {geometry.shape}; "
            "save arrays of the case's (z, y, x) shape"
        )
    data = data.astype(_SAVE_AS.get(data.dtype, data.dtype), copy=False)
    source = np.ascontiguousarray(geometry.to_source(data))
    header = geometry.header.copy()
    try:
        header.set_data_dtype(source.dtype)
    except HeaderDataError:
        raise InputError(f"{path}: NIfTI cannot store dtype {source.dtype}; convert the array to a numeric dtype") from None
    img = nib.Nifti1Image(source, geometry.affine, header=header)
    img.set_qform(geometry.affine, code=int(geometry.header["qform_code"]) or 1)
    img.set_sform(geometry.affine, code=int(geometry.header["sform_code"]) or 1)
    # Scaling from the source header would distort floats and labels: store values as given.
    img.header.set_slope_inter(1.0, 0.0)
    if provenance is not None:
        img.header["descrip"] = provenance.encode("ascii", "replace")[:80]
    elif read_provenance(img.header) is not None:
        img.header["descrip"] = b""
    try:
        with atomic_path(path) as tmp:
            nib.save(img, str(tmp))
    except OSError as exc:
        reason = _first_line(exc)
        raise InputError(f"{path}: cannot write the file ({reason}); check the path is not a folder and is writable") from None
    return path
