"""Cohort shards: ``infer --shard K/N`` runs a fixed 1/N of a cohort into a shared folder, ``infer --merge`` joins them.

Each shard writes its cases' outputs straight into ``--out`` (as an unsharded run does) and a record
``<out>/shards/shard-K-of-N.json``: ``status`` "started" when it begins, "finished" with its case ids at the
end. ``--merge`` writes ``infer.json`` for the union (the same content an unsharded run writes) and names
every case that is missing, with its shard and whether that shard finished (then the case failed) or not.
Shards are independent processes (one Slurm array task each, or any machines sharing the folder).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .atomic import write_json
from .errors import InputError
from .io import case_id_of

SHARD_DIR = "shards"
_SHARD_RE = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` (1-based) of ``count``."""

    index: int
    count: int

    @property
    def label(self) -> str:
        """``K/N`` as the user wrote it."""
        return f"{self.index}/{self.count}"

    def record_path(self, out: Path) -> Path:
        """This shard's record in the shared output folder."""
        return Path(out) / SHARD_DIR / f"shard-{self.index}-of-{self.count}.json"


def parse_shard(text: str) -> Shard:
    """``"2/3"`` -> ``Shard(2, 3)``; a clear :class:`InputError` for anything else."""
    match = _SHARD_RE.match(text or "")
    if not match:
        raise InputError(f"--shard {text!r}: write K/N, e.g. --shard 2/3 (shard 2 of 3, K from 1 to N)")
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1 or not 1 <= index <= count:
        raise InputError(f"--shard {text}: K must be between 1 and N (N >= 1), e.g. --shard 1/{max(count, 1)}")
    return Shard(index, count)


def shard_of(position: int, count: int) -> int:
    """The 1-based shard that owns the case at ``position`` in the sorted cohort (round-robin)."""
    return position % count + 1


def shard_cases(cases: Sequence[Path], shard: Shard) -> list[Path]:
    """The shard's cases: every N-th case of the cohort sorted by case id, starting at the K-th.

    Deterministic from the case ids alone, so N processes on N machines split a cohort without talking.
    Round-robin (not contiguous blocks) keeps the shards' sizes within one case of each other.
    """
    ordered = sorted(cases, key=case_id_of)
    return [path for i, path in enumerate(ordered) if shard_of(i, shard.count) == shard.index]


def start_shard(out: Path, shard: Shard, cases: Sequence[Path], summary: dict[str, Any]) -> None:
    """Record that the shard began, with what it was asked to do (read by :func:`merge_shards`)."""
    write_json(shard.record_path(out), {"shard": shard.label, "status": "started", "summary": summary,
                                       "assigned": [case_id_of(p) for p in cases], "finished": []})


def finish_shard(out: Path, shard: Shard, cases: Sequence[Path], summary: dict[str, Any]) -> None:
    """Record that the shard wrote every one of its cases."""
    ids = [case_id_of(p) for p in cases]
    write_json(shard.record_path(out), {"shard": shard.label, "status": "finished", "summary": summary,
                                       "assigned": ids, "finished": ids})


def case_written(out: Path, case_id: str) -> bool:
    """Whether a case's map and mask are in ``out`` (both are written atomically, the map first)."""
    return (Path(out) / f"{case_id}_anomaly.nii.gz").is_file() and (Path(out) / f"{case_id}_mask.nii.gz").is_file()


@dataclass
class MergeResult:
    """What :func:`merge_shards` found."""

    done: list[str]
    summary: dict[str, Any]
    """The shards' common method and options (what infer.json holds besides its case list)."""
    problems: list[str]
    """One line per missing case: its id, its shard and why (shard not run, not finished, or case failed)."""


def _records(out: Path) -> list[dict[str, Any]]:
    records = []
    for path in sorted((Path(out) / SHARD_DIR).glob("shard-*-of-*.json")):
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, ValueError) as exc:
            raise InputError(f"{path}: unreadable shard record ({exc}); delete it and rerun that shard") from None
    return records


def merge_shards(cases: Sequence[Path], out: Path) -> MergeResult:
    """Write ``<out>/infer.json`` for the cases the shards wrote; name the missing ones and why.

    Args:
        cases: The whole cohort (``find_cases`` of the path the shards were given).
        out: The shared output folder.

    Raises:
        InputError: No shard record in ``out``, or shards that ran with different methods or options
            (their maps must not be pooled into one run).
    """
    out = Path(out)
    records = _records(out)
    if not records:
        raise InputError(f"{out}: no shard records in {out / SHARD_DIR}; run 'infer --shard K/N --out {out}' first")
    summaries = {json.dumps(r["summary"], sort_keys=True, default=str) for r in records}
    if len(summaries) > 1:
        raise InputError(f"{out}: the shards ran with different methods or options (see {out / SHARD_DIR}); "
                         "rerun them with one command line into a fresh --out")
    summary = records[0]["summary"]
    counts = {int(r["shard"].split("/")[1]) for r in records}
    if len(counts) > 1:
        raise InputError(f"{out}: shard records of different N ({sorted(counts)}) in {out / SHARD_DIR}; use one N per folder")
    count = counts.pop()
    status = {r["shard"]: r["status"] for r in records}
    ordered = sorted(cases, key=case_id_of)
    done, problems = [], []
    for i, path in enumerate(ordered):
        case_id = case_id_of(path)
        if case_written(out, case_id):
            done.append(case_id)
            continue
        label = f"{shard_of(i, count)}/{count}"
        state = status.get(label)
        why = {None: "its shard never started", "started": "its shard started but did not finish (failed or still running)",
               "finished": "its shard finished without it (the case failed)"}[state]
        problems.append(f"{case_id} (shard {label}): missing, {why}; rerun 'infer --shard {label}'")
    # The same infer.json an unsharded run writes (its 'cases' the union written), so report/evaluate read it alike.
    record = {**summary, "cases": done, "succeeded": sorted(done),
              "failed": {p.split(" ", 1)[0]: p.split(": ", 1)[-1] for p in problems}}
    if problems:
        record["missing_cases"] = [p.split(" ", 1)[0] for p in problems]
    write_json(out / "infer.json", record)
    return MergeResult(done=done, summary=summary, problems=problems)
