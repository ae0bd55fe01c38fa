"""Write synthetic cases as BraTS 2023 case folders that :func:`~napari_clip_ad.io.load_case` reads."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..io import Case, save_volume
from ..io.layouts import MODALITIES
from .phantom import sample_case, synthetic_case_id


def write_case(case: Case, out_dir: str | Path, on_written: Callable[[Path], None] | None = None) -> list[Path]:
    """Write a case as ``out_dir/<id>/<id>-{t1n,t1c,t2w,t2f,seg}.nii.gz`` (int16 images, uint8 labels).

    Args:
        case: The case (images must hold integer values, as :func:`sample_case` makes them).
        out_dir: Cohort folder; the case folder is created inside it.
        on_written: Called with each file's path once it is in place.

    Returns:
        The files written, each atomically.
    """
    folder = Path(out_dir) / case.case_id
    parts: list[tuple[str, np.ndarray]] = [(m, case.images[m].astype(np.int16)) for m in MODALITIES if m in case.images]
    if case.seg is not None:
        parts.append(("seg", case.seg.astype(np.uint8)))
    written = []
    for name, array in parts:
        path = save_volume(array, case, folder / f"{case.case_id}-{name}.nii.gz")
        written.append(path)
        if on_written is not None:
            on_written(path)
    return written


def write_cohort(
    out_dir: str | Path,
    n_cases: int = 3,
    seed: int = 0,
    overwrite: bool = False,
    on_written: Callable[[Path], None] | None = None,
) -> list[Path]:
    """Write ``n_cases`` synthetic cases (case ``i`` uses seed ``seed + i``) as BraTS 2023 folders.

    Args:
        out_dir: Cohort folder (created if missing; other content in it is left alone).
        n_cases: How many cases.
        seed: Seed of the first case.
        overwrite: Replace the files of case folders that already exist.
        on_written: Called with each file's path once it is in place.

    Returns:
        The case folders, in order.

    Raises:
        InputError: Bad count or seed, ``out_dir`` is a file, or a case folder exists without ``overwrite``.
    """
    out_dir = Path(out_dir)
    if n_cases < 1:
        raise InputError(f"--n-cases must be at least 1, got {n_cases}")
    if seed < 0 or seed + n_cases - 1 > 99999:
        raise InputError(f"seeds {seed}..{seed + n_cases - 1} do not fit the 5-digit case id; use seeds in 0..99999")
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir}: exists and is not a folder; give a folder for the cohort")
    folders = [out_dir / synthetic_case_id(seed + i) for i in range(n_cases)]
    existing = [f for f in folders if f.exists()]
    if existing and not overwrite:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise InputError(f"{existing[0]}: case folder already exists{more}; pass --overwrite to replace it or choose another folder")
    for i in range(n_cases):
        write_case(sample_case(seed + i), out_dir, on_written)
    return folders
