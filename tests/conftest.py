"""Shared fixtures: the real BraTS cases beside the checkout, offline hub settings."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Text features are disk-cached per process tree; tests get their own empty cache, not the user's.
os.environ.setdefault("NAPARI_CLIP_AD_TEXT_CACHE", tempfile.mkdtemp(prefix="napari-clip-ad-text-"))

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Folder of real BraTS cases (../shared/data beside the checkout)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data not found at {SHARED_DATA}")
    return SHARED_DATA


REAL_CASES = ("BraTS-GLI-00002-000", "BraTS-GLI-00012-000")
"""The two real BraTS 2023 cases in ../shared/data/brats2023."""


@pytest.fixture(scope="session")
def crop_real_cohort(shared_data: Path) -> Callable[..., Path]:
    """A function writing cropped copies of the real BraTS 2023 cases (every modality and seg) under a root.

    ``crop`` is a source-array (x, y, z) tuple of slices; nibabel's slicer adjusts the affines, so the crops
    keep their world positions. Small crops keep the tests of slow methods fast.
    """

    def crop_cohort(root: Path, crop: tuple[slice, ...], cases: tuple[str, ...] = REAL_CASES) -> Path:
        for case_id in cases:
            (root / case_id).mkdir(parents=True)
            for part in ("t1n", "t1c", "t2w", "t2f", "seg"):
                name = f"{case_id}-{part}.nii.gz"
                nib.save(nib.load(shared_data / "brats2023" / case_id / name).slicer[crop], root / case_id / name)
        return root

    return crop_cohort
