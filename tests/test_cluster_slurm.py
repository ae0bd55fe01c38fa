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


def _env_for_tasks(monkeypatch) -> None:
    """Cell tasks import this tree (not the installed copy) and stay on one thread each."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def _wait_for(check, what: str, limit_s: float = 300) -> None:
    """Poll ``check()`` every 0.05 s; fail the test (not hang) when it never holds."""
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        if check():
            return
        time.sleep(0.05)
    pytest.fail(f"{what}: not seen within {limit_s} s")


def _squeue(job: str) -> str:
    return subprocess.run(["squeue", "-h", "-j", job, "-o", "%T|%r"], check=False, capture_output=True, text=True).stdout.strip()


def _release_requeued(job: str) -> None:
    """Once Slurm holds the requeued task (BeginTime, ~120 s), let it start now instead.

    Not in the same second as the requeue's kill: slurmd revokes the job's credential with 1-second resolution
    and refuses a relaunch whose credential dates from that second ("Job N already killed, do not launch batch
    job"; seen here once, the task then FAILED). Slurm's own hold exists for this; 3 s is enough on one node.
    """
    _wait_for(lambda: _squeue(job) == "PENDING|BeginTime", f"requeued task {job} held by Slurm")
    time.sleep(3)
    subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], check=True)


def _status(out: Path, capsys) -> dict[str, list[str]]:
    """``study --status OUT`` as {cell: [state, log, slurm state]} (log and Slurm state unless finished)."""
    capsys.readouterr()
    assert main(["study", "--status", str(out)]) == 0
    return {line.split("\t")[0]: line.split("\t")[1:] for line in capsys.readouterr().out.splitlines()}


@pytest.fixture(scope="module")
def local_table(cohort, tmp_path_factory):  # noqa: F811
    """The three-cell study run locally once: what every Slurm run must reproduce."""
    out = tmp_path_factory.mktemp("local")
    assert main(study_args(cohort, out)) == 0
    return table_without_timing(out / "report" / "table1.csv")


def test_emitted_array_on_slurm_gives_the_local_report(cohort, local_table, tmp_path, capsys, monkeypatch):  # noqa: F811
    _env_for_tasks(monkeypatch)
    cluster, scripts = tmp_path / "cluster", tmp_path / "jobs"
    assert main([*study_args(cohort, cluster), "--gpus-per-task", "1", "--mem", "2G", "--time", "10",
                 "--emit-sbatch", str(scripts)]) == 0
    ids = (scripts / "cells.txt").read_text().split()
    assert ids == ["intensity-baseline", "vand-industrial", "anovl-industrial"]
    # As a user would: plain bash + sbatch, nothing from this process.
    submitted = subprocess.run(["bash", str(scripts / "submit.sh")], check=False, capture_output=True, text=True, timeout=60)
    assert submitted.returncode == 0, submitted.stderr
    array, report = re.search(r"array job (\d+) .* report: job (\d+)", submitted.stdout).groups()
    # --status of a study submitted by hand: submit.sh recorded the array; task i is the i-th cell, its log is its own.
    early = _status(cluster, capsys)
    assert list(early) == ids
    for i, cell in enumerate(ids):
        assert early[cell][0] in ("pending", "running", "finished"), early
        if early[cell][0] != "finished":
            assert early[cell][1] == str(scripts / "logs" / f"cell_{array}_{i}.out"), early
    # Time limit, plain-sbatch way: Slurm signals the batch shell (--signal=B:USR1@300), whose trap requeues the
    # task; Slurm holds it (BeginTime) before it runs the cell again. Sent by hand once the cell is at work.
    requeued = scripts / "logs" / f"cell_{array}_2.out"
    _wait_for(lambda: requeued.is_file() and "anovl/industrial: running" in requeued.read_text(), "anovl-industrial at work")
    subprocess.run(["scancel", "--batch", "--signal=USR1", f"{array}_2"], check=True)
    _release_requeued(f"{array}_2")
    _wait_gone([array, report])
    text = requeued.read_text()
    assert text.count("cell anovl-industrial: array task") == 2 and "time limit near: requeueing anovl-industrial" in text
    logs = sorted((scripts / "logs").glob(f"cell_{array}_*.out"))
    assert len(logs) == 3, [p.name for p in logs]
    for i, cell in enumerate(ids):  # the log of task i starts by naming cell i
        assert (scripts / "logs" / f"cell_{array}_{i}.out").read_text().startswith(f"cell {cell}: array task {array}_{i} ")
    devices = {re.search(r"CUDA_VISIBLE_DEVICES=(\S*)", p.read_text()).group(1) for p in logs}
    assert devices == {"0", "1"}, devices  # the first two tasks run side by side, each on its own (fake) GPU
    assert table_without_timing(cluster / "report" / "table1.csv") == local_table
    state = subprocess.run(["sacct", "-n", "-X", "-j", array, "-o", "State"], check=False, capture_output=True, text=True)
    if state.returncode == 0:  # with accounting: every task COMPLETED
        assert set(state.stdout.split()) == {"COMPLETED"}, state.stdout
    assert {cell: kind for cell, (kind, *_) in _status(cluster, capsys).items()} == dict.fromkeys(ids, "finished")


def test_executor_slurm_scancelled_cell_fails_requeued_cell_resumes_rerun_resubmits_only_unfinished(
        cohort, local_table, tmp_path, capsys, monkeypatch):  # noqa: F811
    """``--executor slurm`` (submitit), detached then attached: the local report, failures named, reruns minimal."""
    if os.geteuid() != 0:  # .ci/run is root; a developer's pytest may not be
        pytest.skip("'scontrol suspend' (which makes the cancelled cell certainly unfinished) needs a Slurm operator: run as root")
    _env_for_tasks(monkeypatch)
    out = tmp_path / "study"
    args = [*study_args(cohort, out), "--executor", "slurm", "--gpus-per-task", "1", "--mem", "2G", "--time", "10"]
    assert main([*args, "--detach"]) == 0
    record = json.loads((out / "slurm" / "jobs.json").read_text())["submissions"][-1]
    ids = ["intensity-baseline", "vand-industrial", "anovl-industrial"]
    array = record["array"]
    assert [record["cells"][c]["job"] for c in ids] == [f"{array}_{i}" for i in range(3)]  # task i runs the i-th cell
    victim, requeued = record["cells"]["vand-industrial"], record["cells"]["anovl-industrial"]

    # scancel mid-cell. The cell holds its lock while it runs; 'scontrol suspend' then freezes it (SIGSTOP to the
    # task), so it certainly cannot finish before the cancel lands. scancel of a suspended job kills at once (no
    # SIGTERM grace, which submitit's task would bypass until KillWait).
    _wait_for(lambda: (out / "cells" / "vand-industrial" / ".lock").exists(), "vand-industrial's cell lock")
    subprocess.run(["scontrol", "suspend", victim["job"]], check=True)
    assert not (out / "cells" / "vand-industrial" / "done.json").exists()
    subprocess.run(["scancel", victim["job"]], check=True)

    # Time limit: Slurm sends USR2 90 s before --time (submitit's --signal=USR2@90); submitit's handler calls
    # CellTask.checkpoint and 'scontrol requeue's the task, which Slurm holds (BeginTime, ~120 s) before it runs
    # again. Sent here by hand once the cell is at work (the study logs "running" inside the cell's lock; the
    # handler was installed at the task's start), so the requeued task must redo a half-written cell.
    _wait_for(lambda: Path(requeued["log"]).is_file() and "anovl/industrial: running" in Path(requeued["log"]).read_text(),
              "anovl-industrial at work")
    subprocess.run(["scancel", "--signal=USR2", requeued["job"]], check=True)
    _release_requeued(requeued["job"])
    _wait_gone([array, record["report"]])

    lines = _status(out, capsys)
    assert lines["vand-industrial"][:2] == ["failed", victim["log"]]
    assert lines["vand-industrial"][2].startswith("CANCELLED") or lines["vand-industrial"][2] == "ended"  # sacct's word
    assert lines["intensity-baseline"] == ["finished"] and lines["anovl-industrial"] == ["finished"]
    assert re.search(rf"cell vand-industrial: Slurm job \d+ \(array task {victim['job']}, restart 0\)", Path(victim["log"]).read_text())
    log = Path(requeued["log"]).read_text()
    assert "Caught signal SIGUSR2" in log and f"Requeued job {requeued['job']}" in log
    assert log.index("anovl/industrial: running") < log.index("Caught signal SIGUSR2")  # mid-cell
    assert "array task %s, restart 0)" % requeued["job"] in log and "array task %s, restart 1)" % requeued["job"] in log
    assert not (out / "cells" / "vand-industrial" / "done.json").exists()

    devices = re.findall(r"cell \S+: Slurm job .*CUDA_VISIBLE_DEVICES=(\S*)", "".join(Path(record["cells"][c]["log"]).read_text() for c in ids))
    assert set(devices) <= {"0", "1"} and len(devices) == 4, devices  # each task on a (fake) GPU Slurm gave it

    before = {c: (out / "cells" / c / "done.json").stat().st_mtime_ns for c in ("intensity-baseline", "anovl-industrial")}
    assert main(args) == 0  # the same command again (attached): only the cancelled cell is resubmitted
    assert "submitted 1 cells as Slurm array" in capsys.readouterr().err
    assert {c: (out / "cells" / c / "done.json").stat().st_mtime_ns for c in before} == before
    assert (out / "cells" / "vand-industrial" / "done.json").is_file()
    assert table_without_timing(out / "report" / "table1.csv") == local_table  # the requeued cell's results too
    rerun = json.loads((out / "slurm" / "jobs.json").read_text())["submissions"][-1]
    _wait_gone([rerun["report"]])  # the dependent report job ran too
    capsys.readouterr()
    assert main(["study", "--status", str(out)]) == 0
    status = capsys.readouterr()
    assert status.out.split() == ["intensity-baseline", "finished", "vand-industrial", "finished", "anovl-industrial", "finished"]
    assert "finished 3 / running 0 / pending 0 / failed 0" in status.err


def test_infer_shards_on_slurm_then_merge_equal_one_unsharded_run(cohort, tmp_path, capsys, monkeypatch):  # noqa: F811
    from test_cohort_shards import INFER, _files

    _env_for_tasks(monkeypatch)
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
