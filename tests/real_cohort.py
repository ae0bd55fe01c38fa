"""A small cohort cut from the two real BraTS 2023 cases, for training tests (a few slices, 160 x 160 crops)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

SOURCES = ("BraTS-GLI-00002-000", "BraTS-GLI-00012-000")


def write_cropped_cohort(shared_data: Path, root: Path, *, offsets: int, step: int, shift: int, first_id: int) -> Path:
    """Write ``offsets`` cases per real case: every ``step``-th brain slice from ``shift * offset``, t2f + seg.

    Case ids are ``BraTS-GLI-<first_id + 10 * source + offset>-000``; returns ``root``.
    """
    for number, source in enumerate(SOURCES):
        folder = shared_data / "brats2023" / source
        loaded = {kind: nib.load(folder / f"{source}-{kind}.nii.gz") for kind in ("t2f", "seg")}
        t2f = np.asarray(loaded["t2f"].dataobj)
        brain = np.flatnonzero(t2f.reshape(-1, t2f.shape[2]).any(axis=0))
        for offset in range(offsets):
            case_id = f"BraTS-GLI-{first_id + 10 * number + offset:05d}-000"
            z = np.arange(brain[0] + shift * offset, brain[-1], step)
            (root / case_id).mkdir()
            for kind, image in loaded.items():
                data = np.asarray(image.dataobj)[40:200, 30:190][:, :, z]
                nib.save(nib.Nifti1Image(data, image.affine), root / case_id / f"{case_id}-{kind}.nii.gz")
    return root
