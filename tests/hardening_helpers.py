"""Shared helpers of the hardening tests: a tiny real cohort, in-process CLI runs, folder snapshots."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import pytest

from napari_clip_ad.cli import main

CROP = (slice(80, 160), slice(80, 160), slice(74, 78))
"""A 80 x 80 x 4 crop of the real cases (brain and tumour in every slice): seconds per run on tiny-test."""

SOURCES = {"BraTS-GLI-00002-000": "BraTS-GLI-00002-000", "BraTS-GLI-00012-000": "BraTS-GLI-00012-000",
           "BraTS-GLI-00102-000": "BraTS-GLI-00002-000", "BraTS-GLI-00112-000": "BraTS-GLI-00012-000"}
"""Four patients (two copies of each real case under new ids): enough for a train / validation / test split."""

INFER = ["--method", "vand", "--backbone", "tiny-test", "--device", "cpu", "--image-size", "56", "--batch-size", "4"]
TRAIN = ["--method", "vand", "--setup", "brats", "--backbone", "tiny-test", "--device", "cpu", "--epochs", "2",
         "--batch-size", "2", "--max-slices-per-case", "2", "--seed", "1"]
TRAIN_CONFIG = '{"image_size": 56, "views": 1, "augment": false}'


def make_cohort(shared_data: Path, root: Path, n_cases: int = 4) -> Path:
    """Write ``n_cases`` cropped real cases (t2w, t2f, seg) under ``root``."""
    for case_id, source in list(SOURCES.items())[:n_cases]:
        (root / case_id).mkdir(parents=True)
        for part in ("t2w", "t2f", "seg"):
            image = nib.load(shared_data / "brats2023" / source / f"{source}-{part}.nii.gz").slicer[CROP]
            nib.save(image, root / case_id / f"{case_id}-{part}.nii.gz")
    return root


def run_cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, list[str]]:
    """Run the CLI in-process; returns (status, stderr lines that are errors or traceback parts).

    Progress bars, ``note:`` lines and the study's progress log are left out; any other line that looks
    like an exception (``Traceback``, ``SomethingError: ...``) is kept so the one-line check sees it.
    """
    capsys.readouterr()
    try:
        status = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse usage errors
        status = exc.code
    err = capsys.readouterr().err
    return status, [line for line in err.splitlines() if line.startswith("error") or _EXCEPTION.search(line)]


_EXCEPTION = re.compile(r"Traceback|^\s*File \"|^\w+(Error|Exception)\b")


def assert_one_line(status: int, lines: list[str], needle: str, code: int = 2) -> str:
    """Exit ``code``, exactly one ``error:`` line containing ``needle``, no traceback."""
    assert status == code, (status, lines)
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ") and needle in lines[0], lines
    assert "Traceback" not in lines[0]
    return lines[0]


def snapshot(folder: Path) -> dict[str, str]:
    """Relative path -> content hash of every file under ``folder`` ({} when it does not exist)."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def cli_command() -> list[str]:
    """The CLI as a subprocess (this interpreter, sources of this checkout first)."""
    return [sys.executable, "-m", "napari_clip_ad.cli"]


def subprocess_env() -> dict[str, str]:
    """Environment for CLI subprocesses: this checkout's sources, one thread, offline hub."""
    src = str(Path(__file__).resolve().parents[1] / "src")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def can_mount_tmpfs() -> str | None:
    """None when this process may mount a tmpfs (root on Linux with mount), else the reason it cannot."""
    if sys.platform != "linux" or os.geteuid() != 0 or shutil.which("mount") is None:
        return "mounting a small filesystem needs root on Linux"
    return None


class Tmpfs:
    """A small tmpfs mounted at ``path`` (context manager); ``read_only`` mounts it read-only."""

    def __init__(self, path: Path, size_kb: int = 512, read_only: bool = False) -> None:
        self.path, self.size_kb, self.read_only = path, size_kb, read_only

    def __enter__(self) -> Path:
        self.path.mkdir(parents=True, exist_ok=True)
        options = f"size={self.size_kb}k" + (",ro" if self.read_only else "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(self.path)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()[:80]})")
        return self.path

    def remount(self, read_only: bool) -> None:
        """Switch between read-only and read-write, keeping the files."""
        subprocess.run(["mount", "-o", f"remount,{'ro' if read_only else 'rw'}", str(self.path)], check=True)

    def __exit__(self, *exc: object) -> None:
        subprocess.run(["umount", "-l", str(self.path)], check=False)
