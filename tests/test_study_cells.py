"""``study --list-cells / --cell ID / --report-only``: cells run one at a time fill one folder like a whole run."""

from __future__ import annotations

import csv
import json
import io
from pathlib import Path

import nibabel as nib
import pytest

from napari_clip_ad.cli import main
from napari_clip_ad.sample import write_cohort
from napari_clip_ad.study import cell_id

TIMING = ("seconds", "time", "runtime", "wall")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """Four synthetic cases cropped to 48 x 48 x 8 voxels (one test case after the 70/30 split)."""
    full = tmp_path_factory.mktemp("full")
    crop = tmp_path_factory.mktemp("cohort")
    for case in write_cohort(full, n_cases=4, seed=3):
        (crop / case.name).mkdir()
        for path in sorted(case.glob("*.nii.gz")):
            nib.save(nib.load(path).slicer[96:144, 96:144, 58:66], crop / case.name / path.name)
    return crop


def study_args(cohort: Path, out: Path) -> list[str]:
    """A three-cell grid (baseline, vand/industrial, anovl/industrial) with the tiny random backbone."""
    return ["study", "--data", str(cohort), "--out", str(out), "--methods", "vand", "anovl", "--setups", "industrial",
            "--backbone", "tiny-test", "--epochs", "1", "--device", "cpu", "--max-slices-per-case", "2", "--batch-size", "8"]


def table_without_timing(path: Path) -> list[dict[str, str]]:
    rows = list(csv.DictReader(io.StringIO(path.read_text())))
    return [{k: v for k, v in row.items() if not any(t in k for t in TIMING)} for row in rows]


def test_cell_ids_are_stable_and_extend_with_more_dimensions():
    assert cell_id(("vand", "brats")) == "vand-brats"
    assert cell_id(("vand", "brats", 0)) == "vand-brats"  # k = 0: the zero-shot ID is unchanged
    assert cell_id(("vand", "brats", 4)) == "vand-brats-4shot"


def test_cells_one_by_one_then_report_equal_a_whole_run(cohort, tmp_path, capsys):
    whole, split_up = tmp_path / "whole", tmp_path / "cells"
    assert main(study_args(cohort, whole)) == 0
    capsys.readouterr()
    assert main([*study_args(cohort, split_up), "--list-cells"]) == 0
    ids = capsys.readouterr().out.split()
    assert ids == ["intensity-baseline", "vand-industrial", "anovl-industrial"]
    assert not (split_up / "cells").exists()  # listing runs nothing
    for name in reversed(ids[1:]):  # any order
        assert main([*study_args(cohort, split_up), "--cell", name]) == 0
        assert (split_up / "cells" / name / "done.json").is_file()
    assert not (split_up / "cells" / "intensity-baseline").exists()  # exactly one cell per call
    assert not (split_up / "report").exists()
    # The report from what is finished says which cell is missing, and exits 1.
    capsys.readouterr()
    assert main([*study_args(cohort, split_up), "--report-only"]) == 1
    err = capsys.readouterr().err
    assert "missing: cell intensity-baseline not finished" in err and "vand-industrial" not in err
    rows = table_without_timing(split_up / "report" / "table1.csv")
    assert [(r["method"], r["setup"]) for r in rows] == [("vand", "industrial"), ("anovl", "industrial")]
    # A finished cell is not run again; the last one completes the study.
    before = (split_up / "cells" / "vand-industrial" / "done.json").stat().st_mtime_ns
    assert main([*study_args(cohort, split_up), "--cell", "vand-industrial"]) == 0
    assert "done earlier, skipped" in capsys.readouterr().err
    assert (split_up / "cells" / "vand-industrial" / "done.json").stat().st_mtime_ns == before
    assert main([*study_args(cohort, split_up), "--cell", "intensity-baseline"]) == 0
    assert main([*study_args(cohort, split_up), "--report-only"]) == 0
    assert table_without_timing(split_up / "report" / "table1.csv") == table_without_timing(whole / "report" / "table1.csv")
    for name in ids:
        maps = sorted((whole / "cells" / name / "maps").glob("*_anomaly.nii.gz"))
        assert maps and all(m.read_bytes() == (split_up / "cells" / name / "maps" / m.name).read_bytes() for m in maps)


def test_unknown_cell_lists_the_ids(cohort, tmp_path, capsys):
    assert main([*study_args(cohort, tmp_path / "s"), "--cell", "vand-brats"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'study --list-cells'" in err[0] and "vand-industrial" in err[0]


def test_a_running_cell_is_not_run_twice(cohort, tmp_path, capsys):
    from filelock import FileLock

    out = tmp_path / "locked"
    lock = FileLock(str(out / "cells" / "intensity-baseline" / ".lock"))
    (out / "cells" / "intensity-baseline").mkdir(parents=True)
    with lock:  # another process (here: this one, through another lock object) runs the cell
        assert main([*study_args(cohort, out), "--cell", "intensity-baseline"]) == 2
    assert "being run by another process" in capsys.readouterr().err
    assert not (out / "cells" / "intensity-baseline" / "done.json").exists()


def test_report_only_with_nothing_finished_is_one_line(cohort, tmp_path, capsys):
    assert main([*study_args(cohort, tmp_path / "empty"), "--report-only"]) == 2
    assert "no finished cells to report yet (3 missing)" in capsys.readouterr().err


def test_emit_sbatch_writes_an_array_whose_task_runs_its_cell(cohort, tmp_path, capsys):
    import os
    import subprocess

    out, scripts = tmp_path / "out", tmp_path / "sbatch"
    args = [*study_args(cohort, out), "--partition", "gpu", "--time", "0-02:00:00", "--mem", "16G", "--gpus-per-task", "1",
            "--account", "lab", "--qos", "normal", "--slurm-arg", "constraint=a100", "--array-limit", "2"]
    assert main([*args, "--emit-sbatch", str(scripts)]) == 0
    assert not out.exists()  # emitting runs nothing
    cells = (scripts / "cells.sbatch").read_text()
    for line in ("#SBATCH --array=0-2%2", "#SBATCH --partition=gpu", "#SBATCH --time=0-02:00:00", "#SBATCH --mem=16G",
                 "#SBATCH --gpus-per-task=1", "#SBATCH --account=lab", "#SBATCH --qos=normal", "#SBATCH --constraint=a100",
                 "#SBATCH --requeue", "#SBATCH --open-mode=append", "CELLS=(intensity-baseline vand-industrial anovl-industrial)",
                 f"#SBATCH --output={scripts}/logs/cell_%A_%a.out"):
        assert line in cells.splitlines(), line
    report = (scripts / "report.sbatch").read_text()
    assert "--report-only" in report and "--gpus-per-task" not in report and "#SBATCH --account=lab" in report
    assert "--dependency=afterany:" in (scripts / "submit.sh").read_text()
    for text in (cells, report):
        command = next(line for line in text.splitlines() if "napari_clip_ad.cli study" in line)
        assert f"--out {out}" in command and "--backbone tiny-test" in command
        assert "--partition" not in command and "--emit-sbatch" not in command  # Slurm flags stay in #SBATCH lines
    # Array task 1 (as Slurm would start it) runs exactly the second cell.
    env = {**os.environ, "SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_JOB_ID": "77",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(["bash", str(scripts / "cells.sbatch")], env=env, check=False, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "cell vand-industrial: array task 77_1" in done.stdout
    assert sorted(p.name for p in (out / "cells").iterdir()) == ["vand-industrial"]
    assert (out / "cells" / "vand-industrial" / "done.json").is_file()
    assert (scripts / "cells.txt").read_text().split() == ["intensity-baseline", "vand-industrial", "anovl-industrial"]
    # The task recorded its array for 'study --status' (task i: line i of cells.txt, its own log).
    record = json.loads((out / "slurm" / "jobs.json").read_text())["submissions"]
    assert len(record) == 1 and record[0]["array"] == "77" and record[0]["cells"]["vand-industrial"] == \
        {"job": "77_1", "log": str(scripts / "logs" / "cell_77_1.out")}


def test_bad_slurm_arg_is_one_line(cohort, tmp_path, capsys):
    assert main([*study_args(cohort, tmp_path / "o"), "--slurm-arg", "no value here", "--emit-sbatch", str(tmp_path / "s")]) == 2
    assert "--slurm-arg 'no value here': write KEY=VALUE" in capsys.readouterr().err
