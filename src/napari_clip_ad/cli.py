"""Command-line front door: ``napari-clip-ad <command> ...``.

Each command lives in :mod:`napari_clip_ad.commands` as a module with ``register(subparsers)``.
User errors (:class:`~napari_clip_ad.errors.ClipAdError`) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from . import __version__
from .errors import ClipAdError

COMMAND_MODULES = ("sample", "evaluate", "infer", "weights", "demo", "train", "study", "report")
COMMAND_MODULES += ("benchmark",)


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line (``error: ...``, exit 2) like every other error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {self.prog}: {message}; see '{self.prog} --help'\n")


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser with every available command."""
    parser = OneLineParser(
        prog="napari-clip-ad",
        description="CLIP-based zero-shot anomaly detection on brain MRI (BraTS).",
    )
    parser.add_argument("--version", action="version", version=f"napari-clip-ad {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f".commands.{name}", __package__)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.endswith(f"commands.{name}"):
                continue  # command not part of this build yet
            raise
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except ClipAdError as exc:
        _end_progress_bars()
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # a filesystem failure no check above caught: still one line, never a traceback
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc}; check the paths, free space and permissions", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _end_progress_bars()
        print("error: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


def _end_progress_bars() -> None:
    """Close the progress bars still shown, so that an error starts on its own line.

    A bar leaves its line unfinished while it runs. Closing them can leave the cursor mid-line (an outer
    bar closed first by its loop moves the inner ones), so on a terminal the line is then cleared from
    its start; on any other stream it is ended.
    """
    if "tqdm" not in sys.modules:
        return
    from tqdm import tqdm

    bars = [bar for bar in list(getattr(tqdm, "_instances", ())) if not bar.disable]
    for bar in sorted(bars, key=lambda bar: -abs(getattr(bar, "pos", 0))):  # inner bars first
        bar.close()
    if bars:
        sys.stderr.write("\r\x1b[K" if hasattr(sys.stderr, "isatty") and sys.stderr.isatty() else "\n")
    sys.stderr.flush()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
