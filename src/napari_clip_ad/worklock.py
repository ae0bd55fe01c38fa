"""One process per unit of work (a study cell): an OS file lock held while the work runs.

The lock is ``filelock``'s (fcntl/flock on POSIX, so it dies with its process: a killed Slurm task or
a crashed run leaves no stale lock behind). A second process asking for a held lock is refused at
once with one clear line instead of waiting or doing the same work twice into the same folder.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import InputError


@contextmanager
def hold_lock(path: Path, what: str) -> Iterator[None]:
    """Hold the lock file ``path`` while the block runs; :class:`InputError` if another process holds it."""
    from filelock import FileLock, Timeout

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise InputError(f"{what} is being run by another process (lock {path}); wait for it, or check "
                         "'study --status' / squeue, then rerun") from None
    try:
        yield
    finally:
        lock.release()
