"""``study --executor slurm``: the unfinished cells as one Slurm job array through submitit, the report after them.

submitit (optional extra ``napari-clip-ad[cluster]``) writes the sbatch scripts, submits, carries results and
errors back and requeues a task near its time limit (:class:`CellTask` is ``Checkpointable``; a cell resumes
from disk). Slurm places the tasks (``--gpus-per-task``: ``CUDA_VISIBLE_DEVICES`` as Slurm sets it). What was
submitted is recorded in ``<out>/slurm/jobs.json`` so ``study --status OUT`` works after detaching.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import InputError
from .options import SlurmOptions
from .state import add_submission, cell_states, summarize

_TIME_RE = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


def time_minutes(text: str | None) -> int | None:
    """Slurm's time formats (``M``, ``M:S``, ``H:M:S``, ``D-H``, ``D-H:M``, ``D-H:M:S``) in whole minutes (rounded up)."""
    if text is None:
        return None
    match = _TIME_RE.match(text.strip())
    if not match:
        raise InputError(f"--time {text!r}: use a Slurm time such as 90 (minutes), 2:00:00 or 1-12:00:00")
    days, a, b, c = (int(g) if g else None for g in match.groups())
    if days is not None:  # D-H[:M[:S]]
        seconds = days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    elif c is not None:  # H:M:S
        seconds = a * 3600 + b * 60 + c
    elif b is not None:  # M:S
        seconds = a * 60 + b
    else:  # M
        seconds = a * 60
    return max(1, -(-seconds // 60))


def _executor(folder: Path, slurm: SlurmOptions, name: str, gpus: bool = True, dependency: str | None = None):
    try:
        import submitit
    except ImportError:
        raise InputError("--executor slurm needs submitit: pip install 'napari-clip-ad[cluster]'") from None
    if shutil.which("sbatch") is None:
        raise InputError("--executor slurm: no 'sbatch' on PATH (not on a Slurm login node?); use --executor local "
                         "or --emit-sbatch DIR")
    executor = submitit.SlurmExecutor(folder=str(folder / "%j"), python=sys.executable)
    # One log per task (stdout and stderr): the one path --status and the failure lines point at.
    params: dict[str, Any] = {"job_name": name, "stderr_to_stdout": True, "partition": slurm.partition,
                              "account": slurm.account, "qos": slurm.qos,
                              "additional_parameters": dict(slurm.extra) if gpus else {}}
    minutes = time_minutes(slurm.time)
    if minutes:
        params["time"] = minutes
    if gpus:
        params.update(mem=slurm.mem, cpus_per_task=slurm.cpus_per_task, gpus_per_task=slurm.gpus_per_task)
        if slurm.gpus_per_task:
            params["ntasks_per_node"] = 1
        if slurm.array_limit:
            params["array_parallelism"] = slurm.array_limit
    if dependency:
        params["dependency"] = dependency
    executor.update_parameters(**{k: v for k, v in params.items() if v is not None})
    return executor


class CellTask:
    """One study cell in a Slurm task: ``napari-clip-ad study <flags> --cell ID`` in the task's process.

    Checkpointable: near the time limit submitit requeues the same call; the cell resumes from disk.
    """

    def __init__(self, study_line: Sequence[str], extra: Sequence[str] = ()) -> None:
        self.study_line = list(study_line)
        self.extra = list(extra)

    def __call__(self, cell: str) -> str:
        from ..cli import main

        env = os.environ.get
        task = f"array task {env('SLURM_ARRAY_JOB_ID')}_{env('SLURM_ARRAY_TASK_ID')}, " if env("SLURM_ARRAY_JOB_ID") else ""
        print(f"cell {cell or '(report)'}: Slurm job {env('SLURM_JOB_ID', '?')} ({task}restart {env('SLURM_RESTART_COUNT', '0')}), "
              f"CUDA_VISIBLE_DEVICES={env('CUDA_VISIBLE_DEVICES', '')}", flush=True)  # which task ran which cell
        status = main(["study", *self.study_line, *self.extra, "--cell", cell] if cell else ["study", *self.study_line, *self.extra])
        if status:
            raise RuntimeError(f"study cell {cell or '(report)'} exited with status {status} (see this task's log)")
        return cell

    def checkpoint(self, *args: Any, **kwargs: Any):
        """Requeue the same call (submitit's hook); the cell resumes from its last checkpoint on disk."""
        import submitit

        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def submit_cells(out: Path, ids: Sequence[str], study_line: Sequence[str], slurm: SlurmOptions) -> dict[str, Any]:
    """Submit the cells as one array and the report as a job after it (afterany); record both in ``jobs.json``."""
    folder = Path(out).resolve() / "slurm"
    executor = _executor(folder, slurm, "clip-ad-cells")
    jobs = executor.map_array(CellTask(study_line), list(ids))
    array_id = jobs[0].job_id.split("_")[0]
    report_ex = _executor(folder, slurm, "clip-ad-report", gpus=False, dependency=f"afterany:{array_id}")
    report = report_ex.submit(CellTask(study_line, ["--report-only"]), "")
    record = {"array": array_id, "report": report.job_id, "folder": str(folder), "via": "submitit",
              "cells": {cell: {"job": job.job_id, "log": str(job.paths.stdout)} for cell, job in zip(ids, jobs)}}
    add_submission(out, record)
    return record


def wait_and_report(out: Path, ids: Sequence[str], log: Callable[[str], None]) -> list[str]:
    """Attached: a bar of finished / running / pending / failed cells (folder + squeue) until every task ended;
    returns the failed lines. A moment when Slurm does not answer is waited out (the tasks run on regardless)."""
    import time

    from tqdm import tqdm

    with tqdm(total=len(ids), desc="cells", unit="cell", file=sys.stderr) as bar:
        while True:
            try:
                states = cell_states(out, ids)
            except InputError as exc:
                bar.set_postfix_str(f"Slurm did not answer ({exc}); asking again")
                time.sleep(10)
                continue
            bar.n = sum(state[0] == "finished" for state in states.values())
            bar.set_postfix_str(summarize(states))
            if all(state[0] in ("finished", "failed") for state in states.values()):
                break
            time.sleep(2)
    failed = [f"cell {cell} failed (Slurm: {slurm_state}); log: {logpath}" for cell, (kind, logpath, slurm_state) in states.items()
              if kind == "failed"]
    for line in failed:
        log(line)
    return failed


class InferTask:
    """One cohort shard (or the merge, ``shard=""``) in a Slurm task: ``napari-clip-ad infer <flags> --shard K/N``."""

    def __init__(self, infer_line: Sequence[str]) -> None:
        self.infer_line = list(infer_line)

    def __call__(self, shard: str) -> str:
        from ..cli import main

        status = main(["infer", *self.infer_line, *(["--shard", shard] if shard else ["--merge"])])
        if status:
            raise RuntimeError(f"infer {'--shard ' + shard if shard else '--merge'} exited with status {status} (see this task's log)")
        return shard

    def checkpoint(self, *args: Any, **kwargs: Any):
        """Requeue the same shard near the time limit; its finished cases are rewritten identically."""
        import submitit

        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def submit_shards(out: Path, count: int, infer_line: Sequence[str], slurm: SlurmOptions, attach: bool,
                  log: Callable[[str], None]) -> int:
    """``infer --executor slurm --shards N``: N shard tasks as one array, ``--merge`` after them (afterany).

    Attached, waits for the array (submitit carries each task's error and log) and merges here too.
    """
    folder = Path(out).resolve() / "slurm"
    shards = [f"{k}/{count}" for k in range(1, count + 1)]
    jobs = _executor(folder, slurm, "clip-ad-shards").map_array(InferTask(infer_line), shards)
    array_id = jobs[0].job_id.split("_")[0]
    merge = _executor(folder, slurm, "clip-ad-merge", gpus=False, dependency=f"afterany:{array_id}").submit(InferTask(infer_line), "")
    log(f"submitted {count} shards as Slurm array {array_id} (logs in {folder}), merge as job {merge.job_id} after it")
    if not attach:
        return 0
    from tqdm import tqdm

    failed = []
    for shard, job in tqdm(list(zip(shards, jobs)), desc="shards", unit="shard", file=sys.stderr):
        error = job.exception()  # submitit waits for the task (sacct notices killed ones) and carries its error
        if error is not None:
            failed.append(shard)
            log(f"shard {shard} failed: {str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__}; "
                f"log: {job.paths.stdout}")
    from ..cli import main

    status = main(["infer", *infer_line, "--merge"])
    return 1 if failed else status
