"""Synthetic brain metastases: enhancing rim, necrotic core and vasogenic edema, with irregular shapes.

Each lesion is built in its own small crop: a randomly oriented ellipsoid whose radius is perturbed
by seeded smooth noise (lobulated outline), a necrotic core where the lesion is deeper than a noisy
rim thickness (so the core is always wrapped in enhancing rim), and edema spreading a noisy distance
outside the lesion, mostly into white matter (vasogenic edema spares the cortex). Labels follow
BraTS 2023: 1 NETC (necrotic core), 2 SNFH (edema), 3 ET (enhancing rim).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .anatomy import TissueMaps

NETC, SNFH, ET = 1, 2, 3
"""BraTS 2023 labels: necrotic core, surrounding FLAIR hyperintensity (edema), enhancing tumour."""

_NOISE_CLIP = 2.5  # smooth noise is clipped to this many standard deviations


@dataclass(frozen=True)
class LesionSpec:
    """Where and how large one metastasis is.

    Attributes:
        centre: Canonical voxel (z, y, x).
        radius: Mean radius of the enhancing lesion in mm.
        edema_reach: How far edema spreads beyond the lesion, in mm.
        rim: Mean thickness of the enhancing rim in mm (the core is what lies deeper).
    """

    centre: tuple[int, int, int]
    radius: float
    edema_reach: float
    rim: float

    @property
    def tumour_reach(self) -> float:
        """Typical largest distance from the centre to the lesion's outline, in mm."""
        return self.radius * 1.25 * (1.0 + 0.2 * 1.5)

    @property
    def spacing(self) -> float:
        """Typical largest distance from the centre to the edge of its edema, in mm."""
        return self.tumour_reach + self.edema_reach * (1.0 + 0.35 * 1.5) + 1.0

    @property
    def extent(self) -> float:
        """Largest distance from the centre any of its labels can reach, in mm (noise at its clip)."""
        return self.radius * 1.25 * (1.0 + 0.2 * _NOISE_CLIP) + self.edema_reach * (1.0 + 0.35 * _NOISE_CLIP) + 2.0


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Zero-mean, unit-std Gaussian-smoothed noise, clipped to +-_NOISE_CLIP."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="reflect")
    field -= field.mean()
    field /= max(float(field.std()), 1e-6)
    return np.clip(field, -_NOISE_CLIP, _NOISE_CLIP)


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    return q * np.sign(np.diag(r))


def draw_specs(rng: np.random.Generator, maps: TissueMaps, n_lesions: int) -> list[LesionSpec]:
    """Choose lesion sizes and non-overlapping positions inside the brain.

    The first lesion is large (about 1.5-2 cm radius, necrotic), the second small (a few mm); the
    rest span the range log-uniformly. About 40 % (at least one) sit near the brain surface.
    """
    radii = np.exp(rng.uniform(np.log(3.0), np.log(14.0), size=n_lesions))
    radii[0] = rng.uniform(14.0, 20.0)
    if n_lesions > 1:
        radii[1] = rng.uniform(2.5, 4.0)
    peripheral = rng.random(n_lesions) < 0.4
    peripheral[min(1, n_lesions - 1)] = True
    tissue = (maps.gm + maps.wm) > 0.6
    specs: list[LesionSpec] = []
    for radius, near_surface in zip(radii, peripheral):
        # Small metastases carry little edema; large ones up to about their own radius.
        reach = float(radius * rng.uniform(0.3, 1.1) * np.clip((radius - 2.0) / 8.0, 0.15, 1.0) + rng.uniform(0.5, 2.0))
        spec = _place(rng, maps, tissue, specs, radius, reach, float(rng.uniform(1.8, 3.5)), near_surface)
        if spec is not None:
            specs.append(spec)
    return specs


def _place(
    rng: np.random.Generator,
    maps: TissueMaps,
    tissue: np.ndarray,
    placed: list[LesionSpec],
    radius: float,
    reach: float,
    rim: float,
    near_surface: bool,
) -> LesionSpec | None:
    """A lesion centre in brain tissue, clear of the lesions already placed (shrinking it if crowded)."""
    for _attempt in range(4):
        probe = LesionSpec((0, 0, 0), radius, reach, rim)
        inner = probe.tumour_reach + 1.0
        depth_ok = maps.depth >= inner
        if near_surface:
            depth_ok &= maps.depth <= inner + 4.0
        candidates = np.flatnonzero(depth_ok & tissue)
        if candidates.size:
            for pick in rng.choice(candidates, size=min(300, candidates.size), replace=False):
                centre = tuple(int(c) for c in np.unravel_index(pick, maps.brain.shape))
                spec = LesionSpec(centre, radius, reach, rim)  # type: ignore[arg-type]
                if all(np.linalg.norm(np.subtract(centre, s.centre)) > spec.spacing + s.spacing for s in placed):
                    return spec
        radius, reach = radius * 0.75, reach * 0.75
    return None


def _crop(spec: LesionSpec, shape: tuple[int, ...]) -> tuple[slice, ...]:
    half = int(np.ceil(spec.extent)) + 2
    return tuple(slice(max(c - half, 0), min(c + half + 1, n)) for c, n in zip(spec.centre, shape))


def paint_lesion(rng: np.random.Generator, spec: LesionSpec, maps: TissueMaps, seg: np.ndarray) -> None:
    """Write one lesion's labels into ``seg`` (in place; tumour labels win over edema)."""
    box = _crop(spec, seg.shape)
    brain = maps.brain[box]
    shape = brain.shape
    grid = np.stack(np.meshgrid(*(np.arange(s.start, s.stop) for s in box), indexing="ij")).astype(np.float32)
    offset = grid - np.array(spec.centre, dtype=np.float32)[:, None, None, None]
    axes = rng.uniform(0.8, 1.25, size=3).astype(np.float32)
    local = np.einsum("ij,j...->i...", _random_rotation(rng).astype(np.float32), offset) / axes[:, None, None, None]
    lobes = _smooth_noise(rng, shape, sigma=max(spec.radius / 2.5, 1.0))
    radial = np.sqrt((local**2).sum(axis=0)) / (spec.radius * (1.0 + 0.2 * lobes))
    tumour = (radial < 1.0) & brain
    inside = ndimage.distance_transform_edt(tumour)
    rim = np.maximum(spec.rim * (1.0 + 0.3 * _smooth_noise(rng, shape, sigma=2.0)), 1.5)
    core = tumour & (inside > rim)
    outside = ndimage.distance_transform_edt(~tumour)
    spread = spec.edema_reach * (1.0 + 0.35 * _smooth_noise(rng, shape, sigma=3.0))
    white = (maps.wm[box] + 0.3 * maps.gm[box]) > 0.45
    edema = brain & ~tumour & (outside <= spread) & (white | (outside <= 1.5))
    pieces, _ = ndimage.label(edema | tumour)
    edema &= np.isin(pieces, np.unique(pieces[tumour]))  # drop edema islands cut off by cortex
    view = seg[box]
    view[edema & (view == 0)] = SNFH
    view[tumour & ~core] = ET
    view[core] = NETC


def soft_compartments(seg: np.ndarray, sigma: float = 0.6) -> dict[str, np.ndarray]:
    """Partial-volume fractions of edema, rim and core (smoothed label indicators, summing to <= 1)."""
    fractions = {
        name: ndimage.gaussian_filter((seg == value).astype(np.float32), sigma)
        for name, value in (("edema", SNFH), ("rim", ET), ("core", NETC))
    }
    total = fractions["edema"] + fractions["rim"] + fractions["core"]
    scale = np.where(total > 1.0, 1.0 / np.maximum(total, 1e-6), 1.0).astype(np.float32)
    return {name: f * scale for name, f in fractions.items()}
