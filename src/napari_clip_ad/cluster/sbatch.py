"""``study --emit-sbatch DIR``: an array script (one task per cell), a dependent report script, a submit script.

Plain Slurm a user can read and ``sbatch`` by hand: task ``i`` runs ``study ... --cell <i-th ID>`` (the IDs
of ``study --list-cells``) into the shared ``--out``; the report job waits for the whole array
(``--dependency=afterany``) and runs ``study ... --report-only``, which names any cell that did not finish.
Rerunning ``submit.sh`` is safe: finished cells are skipped by the cells themselves.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from ..atomic import write_text
from .options import SLURM_DESTS, SlurmOptions

REQUEUE_SIGNAL_SECONDS = 300
"""Slurm sends the batch shell SIGUSR1 this long before the time limit; the script then requeues its task."""


def rebuild_command(args: argparse.Namespace, parser: argparse.ArgumentParser, drop: Iterable[str] = ()) -> list[str]:
    """The flags of ``args`` as a command line for ``parser`` again (non-default values only; paths absolute).

    Generic over the parser's actions, so flags added to ``study`` later travel into the scripts unchanged.
    """
    dropped = set(drop) | set(SLURM_DESTS) | {"help", "func", "study_parser", "command"}
    line: list[str] = []
    for action in parser._actions:  # argparse has no public iterator over a parser's options
        if action.dest in dropped or not action.option_strings or not hasattr(args, action.dest):
            continue
        value, flag = getattr(args, action.dest), action.option_strings[-1]
        if value == action.default or value is None:
            continue
        if isinstance(action, argparse._StoreTrueAction):
            line.append(flag)
        elif isinstance(value, (list, tuple)):
            line += [flag, *map(_arg, value)]
        else:
            line += [flag, _arg(value)]
    return line


def _arg(value: object) -> str:
    return str(Path(value).resolve()) if isinstance(value, Path) else str(value)


def _header(job_name: str, log: str, directives: Sequence[str]) -> list[str]:
    return ["#!/bin/bash", f"#SBATCH --job-name={job_name}", f"#SBATCH --output={log}", f"#SBATCH --chdir={os.getcwd()}",
            *(f"#SBATCH {d}" for d in directives)]


def write_sbatch(folder: Path, cell_ids: Sequence[str], study_line: Sequence[str], slurm: SlurmOptions, out: Path,
                 python: str = sys.executable) -> list[Path]:
    """Write ``cells.txt``, ``cells.sbatch``, ``report.sbatch`` and ``submit.sh`` into ``folder``; returns the scripts.

    ``cells.txt`` lists the cell of array task ``i`` on line ``i + 1``. ``submit.sh`` and each cell task record the
    array in ``out/slurm/jobs.json`` (:mod:`napari_clip_ad.cluster.state`), so ``study --status OUT`` works.

    Args:
        folder: Where the scripts (and the tasks' logs, under ``logs/``) go.
        cell_ids: The grid's cell IDs in order (array index i runs ``cell_ids[i]``).
        study_line: The ``study`` flags shared by every task (data, out, grid and options).
        slurm: What each cell task asks for.
        out: The study's ``--out`` (where the submissions are recorded).
        python: The interpreter the tasks run (default: this one, so the same environment).
    """
    folder = Path(folder).resolve()
    logs = folder / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    base = [python, "-m", "napari_clip_ad.cli", "study", *study_line]
    record = [python, "-m", "napari_clip_ad.cluster.state", "record", "--out", str(Path(out).resolve()), "--scripts", str(folder)]
    write_text(folder / "cells.txt", "".join(f"{cell}\n" for cell in cell_ids))
    array = f"--array=0-{len(cell_ids) - 1}" + (f"%{slurm.array_limit}" if slurm.array_limit else "")
    # --open-mode=append: a requeued task adds to its log (Slurm would truncate it, losing the first run's lines).
    cells = _header("clip-ad-cells", f"{logs}/cell_%A_%a.out", [array, *slurm.directives(), "--requeue",
                                                                   f"--signal=B:USR1@{REQUEUE_SIGNAL_SECONDS}",
                                                                   "--open-mode=append"])
    cells += [
        "# One study cell per array task (IDs as 'study --list-cells' prints them); finished cells are skipped.",
        "set -euo pipefail",
        "CELLS=(" + " ".join(shlex.quote(c) for c in cell_ids) + ")",
        'CELL="${CELLS[$SLURM_ARRAY_TASK_ID]}"',
        'echo "cell $CELL: array task ${SLURM_ARRAY_JOB_ID:-?}_${SLURM_ARRAY_TASK_ID} on $(hostname), CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-}"',
        "# Record the array for 'study --status' (done by submit.sh too; this covers an array sbatched by hand).",
        " ".join(shlex.quote(a) for a in record) + ' --array "$SLURM_ARRAY_JOB_ID" || echo "warning: could not record the array"',
        "# Near the time limit Slurm signals this shell: requeue the task; training resumes from its last checkpoint.",
        'trap \'echo "time limit near: requeueing $CELL"; scontrol requeue "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"\' USR1',
        " ".join(shlex.quote(a) for a in base) + ' --cell "$CELL" &',
        "wait $! || status=$?",  # a trapped signal ends 'wait' early: wait again for the cell itself
        'if [ -n "${status:-}" ] && [ "$status" -gt 128 ]; then wait $! || status=$?; fi',
        'exit "${status:-0}"',
    ]
    report = _header("clip-ad-report", f"{logs}/report_%j.out", slurm.directives(gpus=False))
    report += [
        "# The report from every finished cell; lists (and exits 1 on) cells that did not finish.",
        "set -euo pipefail",
        "exec " + " ".join(shlex.quote(a) for a in [*base, "--report-only"]),
    ]
    submit = [
        "#!/bin/bash",
        "# Submit the cell array, then the report once every cell task has ended (afterany). Safe to rerun.",
        "set -euo pipefail",
        'here="$(cd "$(dirname "$0")" && pwd)"',
        'cells=$(sbatch --parsable "$here/cells.sbatch")',
        'cells=${cells%%;*}',
        'report=$(sbatch --parsable --dependency=afterany:"$cells" "$here/report.sbatch")',
        'report=${report%%;*}',
        " ".join(shlex.quote(a) for a in record) + ' --array "$cells" --report "$report"',
        f'echo "cells: array job $cells ({len(cell_ids)} tasks, logs in {logs}); report: job $report; '
        f'progress: {shlex.quote(python)} -m napari_clip_ad.cli study --status {shlex.quote(str(Path(out).resolve()))}"',
    ]
    paths = []
    for name, lines in (("cells.sbatch", cells), ("report.sbatch", report), ("submit.sh", submit)):
        path = folder / name
        write_text(path, "\n".join(lines) + "\n")
        path.chmod(0o755)
        paths.append(path)
    return paths
