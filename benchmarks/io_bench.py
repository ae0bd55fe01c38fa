"""Reading a real BraTS case: the checked reader (header first, bounded inflate) vs the previous one-call inflate.

Usage: ``python benchmarks/io_bench.py [CASE_FOLDER] [ROUNDS]``. Prints the median time per case of both
readers, interleaved round by round so load from other jobs falls on both alike, and their ratio.
"""

from __future__ import annotations

import statistics
import struct
import sys
import time
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from napari_clip_ad.io import read_nifti

DEFAULT_CASE = Path(__file__).resolve().parents[2] / "shared" / "data" / "brats2023" / "BraTS-GLI-00002-000"


def previous_reader(path: Path) -> np.ndarray:
    """The reader before the header checks: the whole stream in one zlib call sized from the gzip trailer."""
    raw = path.read_bytes()
    blob = zlib.decompress(raw, wbits=31, bufsize=max(struct.unpack("<I", raw[-4:])[0], 1 << 16))
    return np.asanyarray(nib.Nifti1Image.from_bytes(blob).dataobj)


def checked_reader(path: Path) -> np.ndarray:
    return read_nifti(path)[0]


def main() -> None:
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_CASE
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 7
    files = sorted(folder.glob("*.nii.gz"))
    if not files:
        sys.exit(f"{folder}: no .nii.gz file; give a case folder")
    for path in files:  # same voxels from both
        np.testing.assert_array_equal(previous_reader(path), checked_reader(path))
    times: dict[str, list[float]] = {"previous": [], "checked": []}
    for _ in range(rounds):
        for name, reader in (("previous", previous_reader), ("checked", checked_reader)):
            start = time.perf_counter()
            for path in files:
                reader(path)
            times[name].append(time.perf_counter() - start)
    previous, checked = (statistics.median(times[k]) for k in ("previous", "checked"))
    print(f"{folder.name}: {len(files)} files, median of {rounds} rounds: previous {previous:.3f} s, "
          f"checked {checked:.3f} s, ratio checked/previous {checked / previous:.2f}")


if __name__ == "__main__":
    main()
