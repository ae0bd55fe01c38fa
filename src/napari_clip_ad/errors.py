"""User-facing errors: one clear line, no traceback."""

from __future__ import annotations


class ClipAdError(Exception):
    """An error caused by the user's input, shown as one line (file, problem, what to do).

    The CLI prints ``error: <message>`` and exits with status 2; the napari widgets show it as one
    notification. Raise it for anything the user can fix; let programming errors propagate.
    """

    exit_code = 2


class InputError(ClipAdError):
    """A file or folder the user gave cannot be used as it is."""


class WeightsError(ClipAdError):
    """A weight file or backbone cannot be loaded (missing offline, wrong method, unsafe)."""


class Cancelled(Exception):
    """Raised inside long runs when the caller's cancel flag is set."""


class OutputError(InputError):
    """An output cannot be written (read-only or full disk, a file where a folder belongs); nothing was changed."""


class OutputBusy(ClipAdError):
    """Another live process is writing the same output folder (see :func:`napari_clip_ad.outputs.output_lock`)."""
