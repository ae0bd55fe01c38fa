"""``napari-clip-ad weights list|fetch``: the authors' released checkpoints and their local state."""

from __future__ import annotations

import argparse
import urllib.error
import urllib.request
from pathlib import Path

from ..atomic import atomic_path
from ..errors import WeightsError
from ..methods.released import RELEASED, cache_dir, local_path


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``weights`` command."""
    p = subparsers.add_parser("weights", help="list or fetch the authors' released method checkpoints")
    sub = p.add_subparsers(dest="weights_command", required=True)
    sub.add_parser("list", help="show released checkpoints and whether they are in the cache").set_defaults(func=run_list)
    fetch = sub.add_parser("fetch", help="download a released checkpoint into the cache")
    fetch.add_argument("name", help="a name from 'weights list'")
    fetch.set_defaults(func=run_fetch)


def run_list(args: argparse.Namespace) -> int:
    """Print one row per released checkpoint."""
    print(f"cache: {cache_dir()}")
    print(f"{'name':24} {'method':12} {'trained on':38} {'backbone':22} state")
    for w in RELEASED.values():
        state = "cached" if local_path(w).is_file() else ("fetchable" if w.url else "manual download")
        print(f"{w.name:24} {w.method:12} {w.trained_on:38} {w.backbone:22} {state}")
    return 0


def run_fetch(args: argparse.Namespace, timeout: float = 20.0) -> int:
    """Download one checkpoint into the cache, atomically."""
    if args.name not in RELEASED:
        raise WeightsError(f"unknown released weights {args.name!r}; see 'napari-clip-ad weights list'")
    release = RELEASED[args.name]
    target = local_path(release)
    if target.is_file():
        print(target)
        return 0
    if not release.url:
        raise WeightsError(f"{release.name} has no direct download; get {release.page} and put the file at {target}")
    try:
        with urllib.request.urlopen(release.url, timeout=timeout) as response, atomic_path(target) as tmp:
            with open(tmp, "wb") as handle:
                while chunk := response.read(1 << 20):
                    handle.write(chunk)
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        raise WeightsError(f"could not download {release.url} ({getattr(exc, 'reason', exc)}); download it by hand and put it at {target}") from None
    print(target)
    return 0


def fetched(name: str) -> Path | None:
    """Cached path of a released checkpoint, or None."""
    path = local_path(RELEASED[name])
    return path if path.is_file() else None
