"""Options beyond the study's axial slice-by-slice setup: several views fused, and 3D post-processing.

Order of the steps (as ``napari-clip-ad infer`` applies them): run the method along each view, fuse the
maps (:func:`~napari_clip_ad.postprocess3d.fuse_views`), smooth in 3D (mm), zero outside the brain,
threshold, then drop small 26-connected components from the mask.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..case_options import PostOptions
from ..io import Case
from ..methods import AnomalyMethod
from ..postprocess3d import fuse_views, remove_small_components, restrict_to_brain, smooth3d
from .run import VolumeResult, run_volume



def run_views(case: Case, method: AnomalyMethod, options: PostOptions, modality: str | Sequence[str] = "t2w",
              progress_for: Callable[[str], Callable[[int, int], None] | None] | None = None,
              before_view: Callable[[str], None] | None = None,
              **kwargs: Any) -> tuple[np.ndarray, dict[str, Any], list[VolumeResult]]:
    """Run ``method`` along each view of ``options``, fuse, smooth and restrict to the brain.

    Args:
        case: A loaded case.
        method: A built method.
        options: Views and post-processing.
        modality: As for :func:`~napari_clip_ad.engine.run_volume`.
        progress_for: Gives the progress callback of one view (by name), or None.
        before_view: Called with the view's name before it runs (e.g. to set that view's references).
        **kwargs: Passed to :func:`~napari_clip_ad.engine.run_volume` (batch_size, sigma, ...).

    Returns:
        The float32 [0, 1] map, its provenance (the first view's info with ``axis`` set to the views and
        the options added), and the single-view results.
    """
    results = []
    for view in options.views:
        if before_view is not None:
            before_view(view)
        results.append(run_volume(case, method, modality=modality, axis=view,
                                  progress=progress_for(view) if progress_for else None, **kwargs))
    anomaly_map = results[0].anomaly_map if len(results) == 1 else fuse_views([r.anomaly_map for r in results], options.fuse)
    if options.smooth3d_mm > 0:
        anomaly_map = smooth3d(anomaly_map, options.smooth3d_mm, case.spacing)
    if options.restrict_to_brain:
        anomaly_map = restrict_to_brain(anomaly_map, case.brain_mask)
    info = {**results[0].info, "axis": "+".join(options.views), **options.describe()}
    if len(results) > 1:
        info["slices_analysed"] = sum(r.info["slices_analysed"] for r in results)
        info["slices_total"] = sum(r.info["slices_total"] for r in results)
    return anomaly_map, info, results


def threshold_mask(anomaly_map: np.ndarray, threshold: float, min_component: int = 0) -> np.ndarray:
    """Voxels ``>= threshold`` as uint8, without 26-connected components under ``min_component`` voxels."""
    mask = anomaly_map >= threshold
    if min_component > 0:
        mask = remove_small_components(mask, min_voxels=min_component)
    return mask.astype(np.uint8)
