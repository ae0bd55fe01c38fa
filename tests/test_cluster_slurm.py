"""The study through a real Slurm (``study --emit-sbatch`` + ``sbatch``): same report as a local run.

Needs a running Slurm whose clients are on PATH (``.ci/run`` starts a single-node one with ``.ci/slurm_up.sh``
and exports ``SLURM_CONF``); skipped with the reason elsewhere.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from test_study_cells import cohort, study_args, table_without_timing  # noqa: F401  (cohort is a fixture)

from napari_clip_ad.cli import main

SRC = Path(__file__).resolve().parents[1] / "src"


def _slurm_reason() -> str | None:
    if shutil.which("sbatch") is None:
        return "no sbatch on PATH (start a single-node Slurm with .ci/slurm_up.sh, or run .ci/run)"
    try:
        up = subprocess.run(["sinfo", "-h", "-o", "%a"], check=False, capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer within 15 s (slurmctld not running?)"
    if up.returncode != 0 or "up" not in up.stdout:
        return f"no Slurm partition up (sinfo: {(up.stderr or up.stdout).strip()[:200]})"
    return None


pytestmark = pytest.mark.skipif(_slurm_reason() is not None, reason=str(_slurm_reason()))


def _wait_gone(job_ids: list[str], limit_s: float = 420) -> None:
    """Wait until Slurm no longer lists the jobs (pending or running); fail the test past ``limit_s``."""
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        listed = subprocess.run(["squeue", "-h", "-o", "%i", "-j", ",".join(job_ids)], check=False, capture_output=True, text=True)
        if listed.returncode == 0 and not listed.stdout.strip():
            return
        time.sleep(1)
    subprocess.run(["scancel", *job_ids], check=False)
    pytest.fail(f"Slurm jobs {job_ids} still queued after {limit_s} s")


def test_emitted_array_on_slurm_gives_the_local_report(cohort, tmp_path):  # noqa: F811
    local, cluster, scripts = tmp_path / "local", tmp_path / "cluster", tmp_path / "jobs"
    assert main(study_args(cohort, local)) == 0
    assert main([*study_args(cohort, cluster), "--gpus-per-task", "1", "--mem", "2G", "--time", "10",
                 "--emit-sbatch", str(scripts)]) == 0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}
    submitted = subprocess.run(["bash", str(scripts / "submit.sh")], env=env, check=False, capture_output=True, text=True, timeout=60)
    assert submitted.returncode == 0, submitted.stderr
    array, report = re.search(r"array job (\d+) .* report: job (\d+)", submitted.stdout).groups()
    _wait_gone([array, report])
    logs = sorted((scripts / "logs").glob(f"cell_{array}_*.out"))
    assert len(logs) == 3, [p.name for p in logs]
    devices = {re.search(r"CUDA_VISIBLE_DEVICES=(\S*)", p.read_text()).group(1) for p in logs}
    assert devices == {"0", "1"}, devices  # the first two tasks run side by side, each on its own (fake) GPU
    assert table_without_timing(cluster / "report" / "table1.csv") == table_without_timing(local / "report" / "table1.csv")
    state = subprocess.run(["sacct", "-n", "-X", "-j", array, "-o", "State"], check=False, capture_output=True, text=True)
    if state.returncode == 0:  # with accounting: every task COMPLETED
        assert set(state.stdout.split()) == {"COMPLETED"}, state.stdout


def test_executor_slurm_fills_the_folder_like_local_and_reruns_only_unfinished(cohort, tmp_path, capsys, monkeypatch):  # noqa: F811
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    local, cluster = tmp_path / "local", tmp_path / "cluster"
    assert main(study_args(cohort, local)) == 0
    # One cell finished beforehand: only the other two are submitted.
    assert main([*study_args(cohort, cluster), "--cell", "intensity-baseline"]) == 0
    capsys.readouterr()
    assert main([*study_args(cohort, cluster), "--executor", "slurm", "--gpus-per-task", "1", "--mem", "2G", "--time", "10"]) == 0
    err = capsys.readouterr().err
    assert "submitted 2 cells as Slurm array" in err
    record = json.loads((cluster / "slurm" / "jobs.json").read_text())["submissions"][-1]
    assert sorted(record["cells"]) == ["anovl-industrial", "vand-industrial"]
    assert table_without_timing(cluster / "report" / "table1.csv") == table_without_timing(local / "report" / "table1.csv")
    _wait_gone([record["report"]])
    assert main(["study", "--status", str(cluster)]) == 0
    out = capsys.readouterr()
    assert out.out.split() == ["intensity-baseline", "finished", "vand-industrial", "finished", "anovl-industrial", "finished"]
    assert "finished 3 / running 0 / pending 0 / failed 0" in out.err


@pytest.mark.xfail(strict=False, reason="issue 17 open: on a quiet 2-core machine the cancelled tiny cell is still "
                   "reported 'finished' (seen in CI on 2026-12-02 even with SIGKILL); the cancel/requeue path needs a "
                   "deterministic victim before this test may gate CI again")
def test_scancelled_cell_is_reported_failed_with_its_log_and_rerun_resubmits_only_it(cohort, tmp_path, capsys, monkeypatch):  # noqa: F811
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "study"
    args = [*study_args(cohort, out), "--executor", "slurm", "--mem", "2G", "--time", "10"]
    assert main([*args, "--detach"]) == 0
    record = json.loads((out / "slurm" / "jobs.json").read_text())["submissions"][-1]
    victim = record["cells"]["vand-industrial"]["job"]
    end = time.monotonic() + 180
    while time.monotonic() < end:  # cancel it once it runs (a kill mid-cell, not a never-started job)
        state = subprocess.run(["squeue", "-h", "-j", victim, "-o", "%T"], check=False, capture_output=True, text=True).stdout.strip()
        if state == "RUNNING":
            break
        time.sleep(0.5)
    # submitit's job handler ignores SIGTERM (it "bypasses" it), so a plain scancel lands only after Slurm's KillWait,
    # by when a tiny cell may have finished: kill the batch step and its children at once.
    subprocess.run(["scancel", "--signal=KILL", "--full", victim], check=True)
    _wait_gone([record["array"], record["report"]])
    capsys.readouterr()
    assert main(["study", "--status", str(out)]) == 0
    lines = {line.split("\t")[0]: line.split("\t")[1:] for line in capsys.readouterr().out.splitlines()}
    assert lines["vand-industrial"][0] == "failed" and lines["vand-industrial"][1] == record["cells"]["vand-industrial"]["log"]
    assert lines["intensity-baseline"] == ["finished"] and lines["anovl-industrial"] == ["finished"]
    assert not (out / "cells" / "vand-industrial" / "done.json").exists()
    before = {c: (out / "cells" / c / "done.json").stat().st_mtime_ns for c in ("intensity-baseline", "anovl-industrial")}
    assert main(args) == 0  # the same command again: only the cancelled cell is resubmitted
    assert "submitted 1 cells as Slurm array" in capsys.readouterr().err
    assert {c: (out / "cells" / c / "done.json").stat().st_mtime_ns for c in before} == before
    assert (out / "cells" / "vand-industrial" / "done.json").is_file()


def test_infer_shards_on_slurm_then_merge_equal_one_unsharded_run(cohort, tmp_path, capsys, monkeypatch):  # noqa: F811
    from test_cohort_shards import INFER, _files

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    whole, sharded = tmp_path / "whole", tmp_path / "sharded"
    assert main(["infer", str(cohort), *INFER, "--out", str(whole)]) == 0
    capsys.readouterr()
    assert main(["infer", str(cohort), *INFER, "--out", str(sharded), "--executor", "slurm", "--shards", "3",
                 "--mem", "2G", "--time", "10"]) == 0
    err = capsys.readouterr().err
    assert "submitted 3 shards as Slurm array" in err
    _wait_gone([re.search(r"merge as job (\d+)", err).group(1)])  # the dependent merge job also ran: let it end
    assert _files(sharded) == _files(whole)
    assert json.loads((sharded / "evaluate" / "summary.json").read_text())["n_cases"] == 4
