"""Output folders: one writer at a time (a lock), stale temporaries cleaned, reports moved into place whole.

Every command that writes a folder (``infer``, ``evaluate``, ``report``, ``train``, ``study``) holds
:func:`output_lock` on it for the whole run. The lock is ``fcntl.flock`` on ``OUT/.napari-clip-ad.lock``:
the kernel drops it when the holder exits in any way (SIGKILL included), so a dead holder never blocks
the next run, while a live one (same or other host on a local disk) refuses the second writer with one
line naming its pid, host and start time, which the holder writes into the file. Why not ``filelock``:
its flock lock is the same mechanism but records no holder, and its pid/host soft locks must guess
staleness, which flock never needs. Without ``fcntl`` (Windows) the file is created with ``O_EXCL`` and a
lock of a dead pid on this host is taken over.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import InputError, OutputBusy, OutputError

LOCK_NAME = ".napari-clip-ad.lock"
TMP_PREFIX = ".tmp-"
"""Prefix of every temporary file or folder this package writes (see :mod:`napari_clip_ad.atomic`)."""


def is_temporary(path: str | os.PathLike[str]) -> bool:
    """True for our temporaries (``.tmp-<pid>-name``) and lock files, which readers of folders skip."""
    name = Path(path).name
    return name.startswith(TMP_PREFIX) or name == LOCK_NAME


def check_output_folder(out: Path, flag: str = "--out") -> None:
    """Refuse an output path that exists and is not a folder (before anything is written)."""
    if out.exists() and not out.is_dir():
        raise InputError(f"{flag} {out}: exists and is not a folder; give a folder (new or one written before)")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def clean_stale_temporaries(folder: Path) -> list[Path]:
    """Delete ``.tmp-<pid>-*`` files and folders in ``folder`` whose writer (a pid on this host) is dead.

    Call it while holding :func:`output_lock`: no other writer of ours then uses the folder. Returns what
    was removed.
    """
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for path in folder.iterdir():
        if not path.name.startswith(TMP_PREFIX):
            continue
        pid_text = path.name[len(TMP_PREFIX):].split("-", 1)[0]
        if not pid_text.isdigit() or _pid_alive(int(pid_text)):
            continue
        with contextlib.suppress(OSError):
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
            removed.append(path)
    return removed


def _holder_record(command: str) -> str:
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                       "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n"


def _holder_text(path: Path) -> str:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        return f"pid {info['pid']} on {info['host']} ('{info['command']}' since {info['started']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


@contextlib.contextmanager
def output_lock(out: Path, command: str, flag: str = "--out", primary: bool = True) -> Iterator[Path]:
    """Hold the lock of output folder ``out`` for the block; refuse a second live writer with one line.

    Creates ``out`` if needed. On exit the lock file is removed, stale temporaries of dead writers are
    cleaned on entry, and ``out`` is removed again if this run created it and left it empty.

    Args:
        out: The output folder.
        command: Shown to a refused second writer (e.g. ``infer``).
        flag: The option that named ``out``, for messages.
        primary: False on torchrun ranks other than 0: they write into the folder rank 0 locked.

    Raises:
        InputError: ``out`` is a file. OutputBusy: a live process holds the lock. OutputError: ``out``
            cannot be created.
    """
    out = Path(out)
    check_output_folder(out, flag)
    if not primary:
        yield out
        return
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{flag} {out}: cannot create the folder ({exc.strerror or exc}); give a writable folder") from None
    lock = out / LOCK_NAME
    handle = _acquire(lock, command, flag, out)
    try:
        clean_stale_temporaries(out)
        yield out
    finally:
        _release(lock, handle)
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()  # only if empty: a run that failed before writing leaves no trace


def _acquire(lock: Path, command: str, flag: str, out: Path) -> Any:
    busy = f"{flag} {out}: in use by %s; wait for it to finish or give another {flag}"
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        return _acquire_exclusive(lock, command, busy)
    for _ in range(20):
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise OutputError(f"{flag} {out}: cannot create the lock file ({exc.strerror or exc}); give a writable folder") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise OutputBusy(busy % _holder_text(lock)) from None
        # The previous holder may have unlinked the file between our open and flock: then lock the new one.
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            with contextlib.suppress(OSError):  # a full disk: the lock holds without the holder's record
                os.ftruncate(fd, 0)
                os.write(fd, _holder_record(command).encode())
            return fd
        os.close(fd)
    raise OutputBusy(busy % "processes racing for the lock")  # pragma: no cover


def _release(lock: Path, handle: Any) -> None:
    if isinstance(handle, int):
        with contextlib.suppress(OSError):
            lock.unlink()  # while still holding it, so a waiter re-checks the inode (see _acquire)
        os.close(handle)
    else:  # pragma: no cover - Windows
        with contextlib.suppress(OSError):
            lock.unlink()


def _acquire_exclusive(lock: Path, command: str, busy: str) -> Path:  # pragma: no cover - Windows
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            try:
                info = json.loads(lock.read_text(encoding="utf-8"))
                stale = info["host"] == socket.gethostname() and not _pid_alive(int(info["pid"]))
            except (OSError, ValueError, KeyError, TypeError):
                stale = False
            if not stale:
                raise OutputBusy(busy % _holder_text(lock)) from None
            with contextlib.suppress(OSError):
                lock.unlink()
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(_holder_record(command))
        return lock
    raise OutputBusy(busy % _holder_text(lock))


@contextlib.contextmanager
def staged_files(out: Path, last: str | None = None) -> Iterator[Path]:
    """Write a set of files into a staging folder inside ``out``; move them all into place only on success.

    Each file lands with ``os.replace`` (same filesystem, needs no space), ``last`` (e.g. ``report.md``)
    after the others; a failure while writing (full disk...) leaves ``out`` as it was.
    """
    staging = out / f"{TMP_PREFIX}{os.getpid()}-staging"
    try:
        staging.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{out}: cannot write ({exc.strerror or exc}); check the folder is writable and has space") from None
    try:
        try:
            yield staging
        except (OSError, OutputError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc).split(" (", 1)[-1].split(")", 1)[0]
            raise OutputError(f"{out}: cannot write the files ({reason}); nothing was changed there; "
                              "free disk space or give a writable output folder") from None
        names = sorted(p.name for p in staging.iterdir())
        if last in names:
            names.remove(last)
            names.append(last)
        for name in names:
            os.replace(staging / name, out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


class CohortLog:
    """What a cohort run did per case: the files written, or the reason it failed.

    ``infer`` goes on after a broken case and records it here; :meth:`summary` goes into ``infer.json``
    and :attr:`exit_code` is 1 when any case failed (0 otherwise).
    """

    def __init__(self) -> None:
        self.succeeded: dict[str, list[str]] = {}
        self.failed: dict[str, str] = {}

    def success(self, case_id: str, files: list[Path]) -> None:
        """Record a case whose outputs were all written."""
        self.succeeded[case_id] = [Path(f).name for f in files]

    def failure(self, case_id: str, reason: str | BaseException) -> None:
        """Record a case that failed, with the one-line reason."""
        self.failed[case_id] = str(reason).splitlines()[0] if str(reason) else type(reason).__name__

    def summary(self) -> dict[str, Any]:
        """``{"succeeded": [...], "failed": {case_id: reason}}`` for ``infer.json``."""
        return {"succeeded": sorted(self.succeeded), "failed": dict(sorted(self.failed.items()))}

    def merge(self, other: dict[str, Any]) -> None:
        """Add another log's :meth:`summary` (e.g. another rank's or shard's)."""
        for case_id in other.get("succeeded", []):
            self.succeeded.setdefault(case_id, [])
        self.failed.update(other.get("failed", {}))

    @property
    def exit_code(self) -> int:
        """1 when a case failed, else 0."""
        return 1 if self.failed else 0

    def report(self, where: Path, stream: Any = None) -> None:
        """On stderr: nothing when all succeeded; one line for one failed case; else one per case and a count."""
        stream = stream or sys.stderr
        total = len(self.failed) + len(self.succeeded)
        if len(self.failed) == 1:
            (case_id, reason), = self.failed.items()
            print(f"error: case {case_id} failed (1 of {total} cases; the others were written, see {where}): {reason}",
                  file=stream)
        elif self.failed:
            for case_id, reason in sorted(self.failed.items()):
                print(f"error: case {case_id}: {reason}", file=stream)
            print(f"error: {len(self.failed)} of {total} cases failed (listed in {where}); fix them and rerun", file=stream)


@contextlib.contextmanager
def rank_output_lock(out: Path, command: str, ranks: Any, flag: str = "--out", device: Any = None) -> Iterator[Path]:
    """:func:`output_lock` under torchrun: rank 0 takes it and every rank learns whether it did.

    Args:
        ranks: A :class:`~napari_clip_ad.distributed.Dist` (alone: a plain :func:`output_lock`).
        device: Where the flag tensor lives for the all-reduce (CUDA under NCCL; default CPU).
    """
    if ranks.world <= 1:
        with output_lock(out, command, flag) as folder:
            yield folder
        return
    import torch

    with contextlib.ExitStack() as stack:
        refused: Exception | None = None
        if ranks.main:
            try:
                stack.enter_context(output_lock(out, command, flag))
            except (InputError, OutputBusy, OutputError) as exc:
                refused = exc
        flag_value = ranks.sum_(torch.tensor([1.0 if refused else 0.0], device=device or "cpu"))
        if refused is not None:
            raise refused
        if float(flag_value.item()) > 0:
            raise OutputBusy(f"{flag} {out}: rank 0 could not take the output folder (see its message)")
        yield out


def gather_cohort_logs(log: CohortLog, out: Path, ranks: Any) -> CohortLog:
    """Merge every rank's :class:`CohortLog` into rank 0's (through small temporary files in ``out``)."""
    if ranks.world <= 1:
        return log
    from .atomic import write_json

    part = out / f"{TMP_PREFIX}{os.getpid()}-cohort-rank{ranks.rank}.json"
    if not ranks.main:
        write_json(part, log.summary())
    ranks.barrier()
    if ranks.main:
        for other in sorted(out.glob(f"{TMP_PREFIX}*-cohort-rank*.json")):
            log.merge(json.loads(other.read_text(encoding="utf-8")))
            other.unlink(missing_ok=True)
    return log
