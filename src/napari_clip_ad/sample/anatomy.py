"""Healthy anatomy of the synthetic case: nilearn's MNI152 template on the BraTS grid, four contrasts.

The MNI152 2009 template, its grey/white-matter probability maps and its brain mask ship inside
nilearn's wheel (no network). They are resampled once per process (:func:`tissue_maps`) onto the
BraTS 2023 grid (240 x 240 x 155, 1 mm, SRI24-like affine), in the package's canonical ``[z, y, x]``
orientation, by an axis-aligned scale and shift that puts the template brain where real BraTS brains
sit. Each contrast is then a partial-volume mixture of per-tissue intensities.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import nibabel as nib
import numpy as np
from scipy import ndimage

BRATS_AFFINE = np.array(
    [[-1.0, 0.0, 0.0, 0.0], [0.0, -1.0, 0.0, 239.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]]
)
"""Affine of the BraTS 2023 files (SRI24 space, stored L, P, S), as read from the real cases."""

BRATS_SOURCE_SHAPE: tuple[int, int, int] = (240, 240, 155)
"""Shape of a BraTS 2023 file in its stored axis order (i: left, j: posterior, k: superior)."""

CANONICAL_SHAPE: tuple[int, int, int] = (155, 240, 240)
"""The same grid in the package's canonical ``[z, y, x]`` order."""

# MNI voxel -> BraTS voxel placement. The brain is shrunk by SCALE (MNI152 is an average of 152
# larger-than-SRI24 brains) and centred where the brain-mask bounding boxes of the two real BraTS 2023
# cases in shared/data are (i 51-193, j 34-211, k 5-145): the MNI mask's left-right and
# anterior-posterior centres go to the BraTS centres, and its top (MNI z voxel 154) to slice k 144.
_SCALE = 0.94
_BRATS_CENTRE_I, _BRATS_CENTRE_J, _BRATS_TOP_K = 121.0, 123.5, 144.0
_MNI_CENTRE_X, _MNI_CENTRE_Y, _MNI_TOP_Z = 98.0, 117.0, 154.0

TISSUES: tuple[str, ...] = ("csf", "gm", "wm", "edema", "rim", "core")
"""Tissue classes with an intensity in every contrast (the last three are lesion compartments)."""

# Relative intensities per contrast, BraTS-like: T1 WM > GM > CSF; T2 CSF > GM > WM; FLAIR CSF dark,
# GM > WM, edema brightest; t1c = t1n plus enhancement of the tumour rim; necrosis dark on T1,
# bright on T2. Columns follow TISSUES.
CONTRAST_TABLE: dict[str, tuple[float, ...]] = {
    #      csf   gm    wm    edema rim   core
    "t1n": (0.30, 0.68, 1.00, 0.62, 0.74, 0.40),
    "t1c": (0.32, 0.70, 1.00, 0.64, 1.65, 0.42),
    "t2w": (1.00, 0.55, 0.38, 0.86, 0.62, 0.92),
    "t2f": (0.14, 0.72, 0.55, 1.00, 0.78, 0.50),
}

CONTRAST_SCALE: dict[str, float] = {"t1n": 700.0, "t1c": 900.0, "t2w": 1500.0, "t2f": 600.0}
"""Scanner-like units of each contrast (BraTS files hold int16 values of a few hundred to thousands)."""


@dataclass(frozen=True)
class TissueMaps:
    """Healthy tissue on the BraTS grid, canonical ``[z, y, x]``, read-only arrays.

    Attributes:
        brain: Brain mask (skull-stripped region).
        gm: Grey-matter fraction, 0 outside the brain.
        wm: White-matter fraction, 0 outside the brain.
        csf: CSF fraction (the rest of the brain), 0 outside the brain.
        depth: Distance in mm from each brain voxel to the nearest non-brain voxel.
    """

    brain: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    depth: np.ndarray


def brats_header() -> nib.Nifti1Header:
    """A NIfTI header like the BraTS 2023 files': BraTS grid, 1 mm, scanner qform."""
    img = nib.Nifti1Image(np.broadcast_to(np.int16(0), BRATS_SOURCE_SHAPE), BRATS_AFFINE)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(BRATS_AFFINE, code=1)
    img.set_sform(BRATS_AFFINE, code=1)
    return img.header


def _to_brats_grid(mni_volume: np.ndarray) -> np.ndarray:
    """Resample an MNI152 1 mm volume (indexed x, y, z RAS) onto the canonical BraTS grid (linear)."""
    zyx = np.ascontiguousarray(np.asarray(mni_volume, dtype=np.float32).transpose(2, 1, 0))
    inv = 1.0 / _SCALE
    # input (z, y, x) = matrix * output (k, j, i) + offset; j and i run opposite to MNI y and x.
    matrix = np.array([inv, -inv, -inv])
    offset = np.array(
        [_MNI_TOP_Z - _BRATS_TOP_K * inv, _MNI_CENTRE_Y + _BRATS_CENTRE_J * inv, _MNI_CENTRE_X + _BRATS_CENTRE_I * inv]
    )
    return ndimage.affine_transform(zyx, matrix, offset=offset, output_shape=CANONICAL_SHAPE, order=1, cval=0.0)


def _read_only(*arrays: np.ndarray) -> None:
    for array in arrays:
        array.setflags(write=False)


@lru_cache(maxsize=1)
def tissue_maps() -> TissueMaps:
    """Grey matter, white matter, CSF and brain mask of MNI152 on the BraTS grid (cached per process)."""
    from nilearn import datasets

    brain = _to_brats_grid(datasets.load_mni152_brain_mask(resolution=1).get_fdata()) > 0.5
    gm = _to_brats_grid(datasets.load_mni152_gm_template(resolution=1).get_fdata())
    wm = _to_brats_grid(datasets.load_mni152_wm_template(resolution=1).get_fdata())
    gm = np.clip(gm, 0.0, 1.0) * brain
    wm = np.clip(wm, 0.0, 1.0) * brain
    total = gm + wm
    over = total > 1.0
    gm[over] /= total[over]
    wm[over] /= total[over]
    csf = ((1.0 - gm - wm) * brain).astype(np.float32)
    depth = ndimage.distance_transform_edt(brain).astype(np.float32)
    maps = TissueMaps(brain, gm.astype(np.float32), wm.astype(np.float32), csf, depth)
    _read_only(maps.brain, maps.gm, maps.wm, maps.csf, maps.depth)
    return maps


def healthy_contrast(maps: TissueMaps, contrast: str, voxels: np.ndarray) -> np.ndarray:
    """Relative intensity of healthy tissue (partial-volume mixture) at flat brain-voxel indices."""
    csf, gm, wm = CONTRAST_TABLE[contrast][:3]
    return csf * maps.csf.ravel()[voxels] + gm * maps.gm.ravel()[voxels] + wm * maps.wm.ravel()[voxels]


def bias_field(rng: np.random.Generator, coords: np.ndarray, strength: float = 0.08) -> np.ndarray:
    """A smooth multiplicative bias field (exp of a random quadratic polynomial) at voxel coordinates.

    Args:
        rng: Random source.
        coords: ``(3, n)`` canonical voxel coordinates.
        strength: Typical relative amplitude (0.08: about +-8 %).
    """
    centred = (coords - np.array(CANONICAL_SHAPE)[:, None] / 2.0) / (np.array(CANONICAL_SHAPE)[:, None] / 2.0)
    linear = rng.normal(0.0, strength, size=3) @ centred
    quad_terms = np.stack([centred[0] ** 2, centred[1] ** 2, centred[2] ** 2, centred[0] * centred[1], centred[1] * centred[2]])
    quadratic = rng.normal(0.0, strength / 2.0, size=5) @ quad_terms
    return np.exp(linear + quadratic).astype(np.float32)


def rician(rng: np.random.Generator, signal: np.ndarray, sigma: float) -> np.ndarray:
    """Magnitude-image noise: |signal + complex Gaussian noise of std ``sigma``|."""
    real = signal + rng.normal(0.0, sigma, size=signal.shape).astype(np.float32)
    imag = rng.normal(0.0, sigma, size=signal.shape).astype(np.float32)
    return np.hypot(real, imag)
