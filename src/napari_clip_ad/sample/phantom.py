"""Assemble one synthetic BraTS-like case (four contrasts and labels) in memory."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from ..io import Case, Geometry
from ..io.layouts import MODALITIES
from .anatomy import (
    BRATS_AFFINE,
    BRATS_SOURCE_SHAPE,
    CANONICAL_SHAPE,
    CONTRAST_SCALE,
    CONTRAST_TABLE,
    TISSUES,
    bias_field,
    brats_header,
    healthy_contrast,
    rician,
    tissue_maps,
)
from .lesions import draw_specs, paint_lesion, soft_compartments

NOISE_SIGMA = 0.025
"""Rician noise level relative to white matter on T1 (SNR about 40)."""

TEXTURE_AMPLITUDE = 0.04
"""Relative amplitude of fine tissue texture (smoothed noise shared by all contrasts)."""


def synthetic_case_id(seed: int) -> str:
    """BraTS-2023-style id of the synthetic case of a seed: ``BraTS-SYN-<seed:05d>-000``."""
    if not 0 <= seed <= 99999:
        raise ValueError(f"seed must be in 0..99999 to fit the 5-digit case id, got {seed}")
    return f"BraTS-SYN-{seed:05d}-000"


def brats_geometry() -> Geometry:
    """Geometry of a BraTS 2023 file (240 x 240 x 155, 1 mm, the real BraTS affine)."""
    img = nib.Nifti1Image(np.broadcast_to(np.int16(0), BRATS_SOURCE_SHAPE), BRATS_AFFINE, header=brats_header())
    return Geometry.from_image(img)


def sample_case(seed: int = 0, n_lesions: int | None = None) -> Case:
    """A deterministic synthetic BraTS-like case with brain metastases, built in memory (no files).

    Args:
        seed: Everything random (lesion count, sizes, places, shapes, bias field, noise) follows it.
        n_lesions: Number of metastases to place; 3 to 6 (drawn from the seed) when None.

    Returns:
        A :class:`~napari_clip_ad.io.Case` exactly as :func:`~napari_clip_ad.io.load_case` would
        return it after the case is written: canonical ``[z, y, x]`` float32 images with integer
        values (stored as int16), int16 labels 1 NETC / 2 SNFH / 3 ET, zero outside the brain.
    """
    case_id = synthetic_case_id(seed)
    rng = np.random.default_rng(seed)
    maps = tissue_maps()
    count = int(rng.integers(3, 7)) if n_lesions is None else int(n_lesions)
    seg = np.zeros(CANONICAL_SHAPE, dtype=np.int16)
    for spec in draw_specs(rng, maps, count):
        paint_lesion(rng, spec, maps, seg)
    voxels = np.flatnonzero(maps.brain)
    fractions = {name: f.ravel()[voxels] for name, f in soft_compartments(seg).items()}
    healthy_share = 1.0 - fractions["edema"] - fractions["rim"] - fractions["core"]
    texture = 1.0 + TEXTURE_AMPLITUDE * _texture(rng).ravel()[voxels]
    coords = np.stack(np.unravel_index(voxels, CANONICAL_SHAPE)).astype(np.float32)
    images: dict[str, np.ndarray] = {}
    for contrast in MODALITIES:
        table = dict(zip(TISSUES, CONTRAST_TABLE[contrast]))
        signal = healthy_share * healthy_contrast(maps, contrast, voxels)
        for name in ("edema", "rim", "core"):
            signal += fractions[name] * table[name]
        signal *= texture * bias_field(rng, coords)
        noisy = rician(rng, signal.astype(np.float32), NOISE_SIGMA) * CONTRAST_SCALE[contrast]
        volume = np.zeros(CANONICAL_SHAPE, dtype=np.float32)
        volume.ravel()[voxels] = np.clip(np.rint(noisy), 1.0, np.iinfo(np.int16).max)
        images[contrast] = volume
    return Case(case_id, Path(case_id), "synthetic", images, seg, maps.brain.copy(), brats_geometry())


def _texture(rng: np.random.Generator) -> np.ndarray:
    from scipy import ndimage

    field = ndimage.gaussian_filter(rng.standard_normal(CANONICAL_SHAPE, dtype=np.float32), 1.2)
    return field / max(float(field.std()), 1e-6)
