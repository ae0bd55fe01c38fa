"""napari sample data: the package's synthetic BraTS-like case (no download), built once, then cached on disk.

The first build takes tens of seconds, so inside a viewer it runs in a worker with a progress bar and
the layers appear when it is done (the UI stays usable); the case is then saved under the user cache
dir (``$XDG_CACHE_HOME/napari-clip-ad/sample``) and later loads read those files.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..errors import InputError
from .layers import LayerData, case_layers

SAMPLE_SEED = 0
PLACEHOLDER_KIND = "sample_placeholder"


def sample_cache_dir() -> Path:
    """Where the built sample case is kept (one folder per package version)."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "napari-clip-ad" / "sample" / f"v{__version__}"


def _cached_layers() -> list[LayerData] | None:
    from ..io import find_cases, load_case

    folder = sample_cache_dir()
    try:
        cases = find_cases(folder) if folder.is_dir() else []
        return case_layers(load_case(cases[0])) if len(cases) == 1 else None
    except (InputError, OSError):
        return None  # a partial or damaged cache is rebuilt


def build_sample() -> list[LayerData]:
    """Build the deterministic synthetic case (seed 0), cache it on disk, and return its layers."""
    from ..sample import sample_case
    from ..sample.cohort import write_case

    case = sample_case(SAMPLE_SEED)
    try:
        write_case(case, sample_cache_dir())
    except OSError:
        pass  # no writable cache: the sample still opens, it is only rebuilt next time
    return case_layers(case)


def synthetic_case() -> list[LayerData]:
    """The synthetic case's four modalities and segmentation: from the cache, or built in a worker.

    Returns the layers when cached (or when no viewer is open); else starts the build in a worker that
    replaces a placeholder layer with them when done.
    """
    cached = _cached_layers()
    if cached is not None:
        return cached
    import napari
    from napari.qt.threading import create_worker
    from napari.utils import progress
    from napari.utils.notifications import show_info

    viewer = napari.current_viewer()
    if viewer is None:
        return build_sample()
    bar = progress(total=0, desc="Building the synthetic sample case (first time only)")
    show_info(f"Building the synthetic sample case in the background (first time only; cached in {sample_cache_dir()})")

    def add(layers: list[LayerData]) -> None:
        for layer in [lay for lay in viewer.layers if lay.metadata.get("kind") == PLACEHOLDER_KIND]:
            viewer.layers.remove(layer)
        for data, kwargs, kind in layers:
            getattr(viewer, f"add_{kind}")(data, **kwargs)

    worker = create_worker(build_sample, _connect={"returned": add, "finished": bar.close})
    synthetic_case.worker = worker  # type: ignore[attr-defined]  # tests wait on it
    # napari wants at least one layer now: a 1-voxel placeholder, replaced by the case when it is built.
    return [(np.zeros((1, 1, 1), dtype=np.float32),
             {"name": "synthetic case (building, see the progress bar)", "metadata": {"kind": PLACEHOLDER_KIND}}, "image")]


def sample_worker() -> Any:
    """The worker of the last background build (None before any)."""
    return getattr(synthetic_case, "worker", None)
