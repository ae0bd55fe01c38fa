"""Where each study cell stands on Slurm, from the folder and Slurm itself (``study --status OUT``).

Every submission, through ``--executor slurm`` (submitit) or through the ``--emit-sbatch`` scripts
(``submit.sh``, or a cell task of an array sbatched by hand), is recorded in ``OUT/slurm/jobs.json``: the array
job, the report job, and per cell its array task and log. A cell's state then comes from the folder
(``cells/<ID>/done.json``: finished) and from Slurm for the rest: ``squeue`` while the task is queued or running,
and a task Slurm no longer lists that left no ``done.json`` has failed; ``sacct`` (where the cluster has
accounting) adds how it ended (CANCELLED, TIMEOUT, OUT_OF_MEMORY, FAILED). No submitit is needed to read it.

``python -m napari_clip_ad.cluster.state record --out OUT --scripts DIR --array ID [--report ID]`` is what the
emitted scripts call to record an array they submitted (idempotent).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..atomic import write_json
from ..errors import InputError

RUNNING = ("RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT", "RESIZING")
"""Slurm states (squeue) of a task that holds its allocation; every other queued state counts as pending."""
_RANGE_RE = re.compile(r"^(\d+)_\[([^\]]+)\]$")


def jobs_path(out: Path) -> Path:
    return Path(out) / "slurm" / "jobs.json"


def read_jobs(out: Path) -> dict[str, Any]:
    """What ``jobs.json`` recorded (empty when nothing was submitted)."""
    path = jobs_path(out)
    return json.loads(path.read_text()) if path.is_file() else {}


def add_submission(out: Path, record: dict[str, Any]) -> bool:
    """Append ``record`` to ``jobs.json`` (locked, atomic) unless its array is recorded already; returns whether added."""
    from filelock import FileLock

    path = jobs_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock", timeout=60):  # cell tasks of one array may record it at the same moment
        submissions = read_jobs(out).get("submissions", [])
        known = [s for s in submissions if s.get("array") == record["array"]]
        if known:  # a cell task recorded the array first: submit.sh only adds the report job
            if record.get("report") and not known[0].get("report"):
                known[0]["report"] = record["report"]
                write_json(path, {"submissions": submissions})
            return False
        write_json(path, {"submissions": [*submissions, record]})
    return True


def record_sbatch_array(out: Path, scripts: Path, array: str, report: str | None = None) -> bool:
    """Record an array of ``cells.sbatch`` (from ``--emit-sbatch``): task ``i`` runs line ``i`` of ``cells.txt``."""
    scripts = Path(scripts).resolve()
    ids = (scripts / "cells.txt").read_text().split()
    cells = {cell: {"job": f"{array}_{i}", "log": str(scripts / "logs" / f"cell_{array}_{i}.out")} for i, cell in enumerate(ids)}
    return add_submission(out, {"array": str(array), "report": report, "folder": str(scripts), "via": "sbatch", "cells": cells})


def _run(command: list[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(command, check=False, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return subprocess.CompletedProcess(command, 1, "", str(exc))


def _expand(job_id: str) -> list[str]:
    """``123_[0-2,5%2]`` (a not yet split array, as sacct prints it) -> ``123_0 123_1 123_2 123_5``; others as given."""
    match = _RANGE_RE.match(job_id)
    if not match:
        return [job_id]
    ids = []
    for part in match.group(2).split("%")[0].split(","):
        first, _, last = part.partition("-")
        ids += [f"{match.group(1)}_{i}" for i in range(int(first), int(last or first) + 1)]
    return ids


def _parse(text: str) -> dict[str, str]:
    states = {}
    for line in text.splitlines():
        job, _, state = line.strip().partition("|")
        for one in _expand(job):
            states[one] = state.strip()
    return states


def slurm_states(job_ids: Sequence[str]) -> tuple[dict[str, str], dict[str, str]]:
    """(queued, ended): Slurm's state of each job (``123``) or array task (``123_4``) that squeue still lists, and
    sacct's final state of the others (empty without accounting)."""
    arrays = sorted({job.split("_")[0] for job in job_ids})
    if not arrays:
        return {}, {}
    if shutil.which("squeue") is None:
        raise InputError("no 'squeue' on PATH: run 'study --status' where Slurm's commands work (a login node)")
    listed = _run(["squeue", "-h", "-r", "-o", "%i|%T", "-j", ",".join(arrays)])
    if listed.returncode != 0:  # one id Slurm forgot makes squeue refuse the whole list: ask one by one
        answers = [_run(["squeue", "-h", "-r", "-o", "%i|%T", "-j", a]) for a in arrays]
        broken = [a for a in answers if a.returncode != 0 and "Invalid job id" not in a.stderr]
        if broken:  # not a forgotten job: Slurm did not answer, so no state can be told
            raise InputError(f"squeue failed, so the cells' states are unknown: {broken[0].stderr.strip()[:300]}")
        listed.stdout = "".join(a.stdout for a in answers)
    queued = {job: state for job, state in _parse(listed.stdout).items() if job in job_ids}
    ended: dict[str, str] = {}
    rest = [job for job in job_ids if job not in queued]
    if rest:
        accounted = _run(["sacct", "-n", "-P", "-X", "-o", "JobID,State", "-j", ",".join(sorted({j.split("_")[0] for j in rest}))])
        if accounted.returncode == 0:
            ended = {job: state for job, state in _parse(accounted.stdout).items() if job in rest}
    return queued, ended


def cell_states(out: Path, ids: Sequence[str]) -> dict[str, tuple[str, str, str]]:
    """Per cell: (``finished`` | ``running`` | ``pending`` | ``failed`` | ``not submitted``, log path or '', Slurm's state).

    Finished is read from the folder (``done.json``); the rest from Slurm for the cell's latest submission. A
    task Slurm no longer lists whose cell has no ``done.json`` failed (its Slurm state says how, with accounting).
    """
    latest: dict[str, dict[str, str]] = {}
    for record in read_jobs(out).get("submissions", []):
        for cell, info in record["cells"].items():
            latest[cell] = info
    done = {cell for cell in ids if (Path(out) / "cells" / cell / "done.json").is_file()}
    queued, ended = slurm_states([latest[cell]["job"] for cell in ids if cell in latest and cell not in done])
    states = {}
    for cell in ids:
        info = latest.get(cell)
        log = info["log"] if info else ""
        if cell in done:
            states[cell] = ("finished", log, "")
        elif info is None:
            states[cell] = ("not submitted", "", "")
        elif info["job"] in queued:
            state = queued[info["job"]]
            states[cell] = ("running" if state in RUNNING else "pending", log, state)
        else:
            states[cell] = ("failed", log, ended.get(info["job"], "ended"))
    return states


def summarize(states: dict[str, tuple[str, ...]]) -> str:
    """``finished 2 / running 1 / pending 1 / failed 0`` (the progress line)."""
    kinds = [state[0] for state in states.values()]
    return " / ".join(f"{k} {kinds.count(k)}" for k in ("finished", "running", "pending", "failed"))


def main(argv: Sequence[str] | None = None) -> int:
    """``record --out OUT --scripts DIR --array ID [--report ID]``: record an array sbatched from ``DIR``."""
    parser = argparse.ArgumentParser(prog="python -m napari_clip_ad.cluster.state")
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record", help="record an array of DIR/cells.sbatch in OUT/slurm/jobs.json (for study --status)")
    rec.add_argument("--out", type=Path, required=True)
    rec.add_argument("--scripts", type=Path, required=True)
    rec.add_argument("--array", required=True)
    rec.add_argument("--report", default=None)
    args = parser.parse_args(argv)
    if not args.array.isdigit() or (args.report is not None and not args.report.isdigit()):
        print(f"error: --array {args.array!r} / --report {args.report!r}: give Slurm job ids (numbers)", file=sys.stderr)
        return 2
    if not (args.scripts / "cells.txt").is_file():
        print(f"error: {args.scripts}: no cells.txt; give the folder 'study --emit-sbatch' wrote", file=sys.stderr)
        return 2
    record_sbatch_array(args.out, args.scripts, args.array, args.report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
