"""The 4-cell smoke study: one local process vs a Slurm job array (``--emit-sbatch`` + ``submit.sh``).

Needs a running Slurm (``SLURM_CI_DIR=/tmp/s .ci/slurm_up.sh``; ``export SLURM_CONF=/tmp/s/etc/slurm.conf``).
Cells: intensity baseline, vand/anovl/winclip industrial, tiny random backbone (random weights), synthetic
cohort of 4 cases cropped to 48 x 48 x 8. Prints one JSON: wall times, their ratio, and the scheduling
overhead per task (array wall time minus the sum of the cells' own run times, over the number of tasks; with
2 tasks at once on 2 fake GPUs the overlap makes this a lower bound of Slurm's per-task cost).

Usage:
    python benchmarks/cluster_bench.py
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib

from napari_clip_ad.cli import main as cli
from napari_clip_ad.sample import write_cohort

SRC = Path(__file__).resolve().parents[1] / "src"


def _cohort(root: Path) -> Path:
    crop = root / "cohort"
    for case in write_cohort(root / "full", n_cases=4, seed=3):
        (crop / case.name).mkdir(parents=True)
        for path in sorted(case.glob("*.nii.gz")):
            nib.save(nib.load(path).slicer[96:144, 96:144, 58:66], crop / case.name / path.name)
    return crop


def main() -> None:
    """Print one JSON report."""
    root = Path(tempfile.mkdtemp(prefix="cluster-bench-"))
    data = _cohort(root)
    flags = ["--data", str(data), "--methods", "vand", "anovl", "winclip", "--setups", "industrial", "--backbone", "tiny-test",
             "--device", "cpu", "--batch-size", "8"]
    start = time.perf_counter()
    assert cli(["study", *flags, "--out", str(root / "local")]) == 0
    local_s = time.perf_counter() - start
    assert cli(["study", *flags, "--out", str(root / "slurm"), "--mem", "2G", "--emit-sbatch", str(root / "jobs")]) == 0
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    out = subprocess.run(["bash", str(root / "jobs" / "submit.sh")], env=env, capture_output=True, text=True, check=True).stdout
    array, report = re.search(r"array job (\d+) .* report: job (\d+)", out).groups()
    while subprocess.run(["squeue", "-h", "-j", f"{array},{report}"], check=False, capture_output=True, text=True).stdout.strip():
        time.sleep(0.5)
    slurm_s = time.perf_counter() - start
    sacct = subprocess.run(["sacct", "-n", "-X", "-P", "-j", array, "-o", "ElapsedRaw"], check=False, capture_output=True, text=True).stdout
    task_s = [int(x) for x in sacct.split()]
    same = (root / "local" / "report" / "table1.csv").read_text() == (root / "slurm" / "report" / "table1.csv").read_text()
    print(json.dumps({"cells": 4, "local_s": round(local_s, 1), "slurm_s": round(slurm_s, 1),
                      "slurm_over_local": round(slurm_s / local_s, 2), "task_elapsed_s": task_s,
                      "overhead_per_task_s": round((slurm_s - sum(task_s) / 2) / len(task_s), 1) if task_s else None,
                      "table1_identical": same, "cpus": os.cpu_count(), "python": sys.version.split()[0]}, indent=2))


if __name__ == "__main__":
    main()
