"""Atomic file writes: a reader never sees a half-written file, and a failed write leaves nothing."""

from __future__ import annotations

import contextlib
import errno
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import OutputError

_WRITE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.EFBIG, errno.ENOTDIR,
                 errno.EISDIR, errno.EEXIST}
"""Failures of writing an output the user can fix (space, permissions, a file in the way): one line."""


def _tmp_name(path: Path) -> Path:
    # Keep the full suffix (".nii.gz", ".safetensors") so libraries that look at it behave the same.
    return path.with_name(f".tmp-{os.getpid()}-{path.name}")


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it into place only if the block succeeds.

    Args:
        path: Final destination. Its folder is created if missing.

    Yields:
        The temporary path to write to.
    """
    final = Path(path)
    tmp = _tmp_name(final)
    try:
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            yield tmp
            os.replace(tmp, final)
        except OSError as exc:
            if exc.errno not in _WRITE_ERRNOS:
                raise
            raise OutputError(f"{final}: cannot write the file ({exc.strerror or exc}); "
                              "free disk space or give a writable output folder") from None
    finally:
        with contextlib.suppress(OSError):
            if tmp.exists():
                tmp.unlink()


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write text atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write JSON (indented, sorted keys kept as given) atomically."""
    write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
