"""Run a method over the BMAD Brain test split through the engine and score it as the literature does.

Per image: the engine's own batch step (:func:`napari_clip_ad.engine.run._predict_batch`, the one
``run_volume`` uses: per-slice min-max scaling, bicubic resize to the method's size, CLIP
normalisation, the method's official smoothing, bilinear resize of the map back to the image size,
maps in [0, 1]). Maps are scored at the image's own size (240 x 240 for BMAD) against its mask.
Metric definitions and their sources: ``docs/benchmarks_literature.md``.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic import atomic_path
from ..engine.preprocess import preprocess_slices
from ..engine.run import _predict_batch, default_batch_size
from ..errors import InputError
from ..methods import AnomalyMethod
from ..metrics import PixelAccumulator, ranking_scores
from .layout import BmadImage, read_image, read_mask, read_test_split, reference_images

IMAGE_SCORES = ("method", "max")
"""Image score: the method's own image score (its official test code's), or the maximum of its map."""


def set_few_shot(method: AnomalyMethod, root: Path, k_shot: int, seed: int, split: str = "train") -> list[str]:
    """Give ``method`` ``k_shot`` seeded normal references from ``<split>/good`` (none for 0); their file names.

    Raises:
        InputError: The method has no few-shot mode (from ``set_references``) or too few normal images.
    """
    if k_shot < 0:
        raise InputError(f"--k-shot {k_shot}: give 0 (zero-shot) or a positive number of normal references")
    if k_shot == 0:
        method.set_references(None)
        return []
    paths = reference_images(root, k_shot, seed, split)
    raw = torch.from_numpy(np.stack([read_image(p) for p in _same_size(paths)])).to(method.device)
    method.set_references(preprocess_slices(raw, method.image_size, method.backbone.mean, method.backbone.std))
    return [p.name for p in paths]


def _same_size(paths: list[Path]) -> list[Path]:
    shapes = {read_image(p).shape for p in paths}
    if len(shapes) > 1:
        raise InputError(f"few-shot references of different sizes {sorted(shapes)}; BMAD images are all 240x240")
    return paths


def _batches(items: list[BmadImage], size: int):
    """Consecutive images of one size, at most ``size`` per batch, as ``(items, (N, 3, H, W) array)``."""
    batch: list[BmadImage] = []
    arrays: list[np.ndarray] = []
    for item in items:
        image = read_image(item.image)
        if arrays and (len(batch) == size or image.shape != arrays[0].shape):
            yield batch, np.stack(arrays)
            batch, arrays = [], []
        batch.append(item)
        arrays.append(image)
    if batch:
        yield batch, np.stack(arrays)


def run_bmad(root: Path, method: AnomalyMethod, image_score: str = "method", batch_size: int | None = None,
             maps_dir: Path | None = None, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Predict every test image, save its map, and pool the metrics.

    Args:
        root: BMAD Brain folder (see :func:`~napari_clip_ad.bmad.layout.find_root`).
        method: A built method (references already set for few-shot).
        image_score: ``'method'`` or ``'max'`` (see :data:`IMAGE_SCORES`).
        batch_size: Images per forward pass (None: the engine's default for the device).
        maps_dir: Where each map goes as ``<group>/<stem>.npy`` (float32, the image's size); None: not saved.
        progress: Called as ``progress(done, total)`` after each batch.

    Returns:
        ``{"metrics": {...}, "counts": {...}, "scores_csv": str}`` (metrics as fractions, not %).
    """
    if image_score not in IMAGE_SCORES:
        raise InputError(f"--image-score {image_score!r}: use one of {', '.join(IMAGE_SCORES)}")
    items = read_test_split(root)
    size = int(batch_size or default_batch_size(method.device))
    if size < 1:
        raise InputError(f"--batch-size {size}: give at least 1")
    pixels = PixelAccumulator()
    rows: list[dict[str, Any]] = []
    done = 0
    for batch, images in _batches(items, size):
        raw = torch.from_numpy(images).to(method.device)
        try:
            maps, scores, peaks = _predict_batch(method, raw, tuple(images.shape[-2:]), method.default_sigma)
        except torch.cuda.OutOfMemoryError:
            raise InputError(f"out of GPU memory at --batch-size {size}; give a smaller --batch-size") from None
        maps_np, scores_np, peaks_np = maps.cpu().numpy(), scores.cpu().numpy().astype(np.float64), peaks.cpu().numpy()
        for item, anomaly_map, score, peak in zip(batch, maps_np, scores_np, peaks_np):
            mask = read_mask(item.mask, anomaly_map.shape)
            pixels.update(anomaly_map, mask, source=str(item.image), regions="2d")
            rows.append({"image": item.name, "label": item.label, "method_score": float(score), "peak": float(peak),
                         "map_max": float(anomaly_map.max()), "lesion_pixels": int(mask.sum())})
            if maps_dir is not None:
                with atomic_path(maps_dir / item.group / f"{item.image.stem}.npy") as tmp:
                    with open(tmp, "wb") as handle:
                        np.save(handle, anomaly_map.astype(np.float32))
        done += len(batch)
        if progress:
            progress(done, len(items))
    # Set-level image scores (e.g. VAND few-shot's min-max over the evaluated set, as test.py): over the whole test set.
    combined = method.set_scores(torch.tensor([r["method_score"] for r in rows]), torch.tensor([r.pop("peak") for r in rows]))
    for row, value in zip(rows, combined.tolist()):
        row["method_score"] = float(value)
    labels = np.array([r["label"] for r in rows])
    chosen = np.array([r["method_score" if image_score == "method" else "map_max"] for r in rows])
    image_auroc, image_ap = ranking_scores(chosen, labels, "image scores")
    metrics = {
        "image_auroc": image_auroc, "image_ap": image_ap,
        "pixel_auroc": pixels.auroc(), "pixel_ap": pixels.average_precision(), "aupro": pixels.aupro(),
        # Pooled (micro) Dice at the pooled F1-max threshold is F1 there, i.e. F1-max itself.
        "dice_f1max": pixels.f1max(), "f1max": pixels.f1max(), "f1max_threshold": pixels.f1max_threshold(),
        "pixel_auroc_bound": pixels.auroc_bound(), "pixel_ap_bound": pixels.average_precision_bound(),
        "aupro_bound": pixels.aupro_bound(), "pooled_exact": pixels.is_exact,
    }
    counts = {"images": len(rows), "normal": int((labels == 0).sum()), "abnormal": int((labels == 1).sum()),
              "abnormal_with_empty_mask": int(sum(1 for r in rows if r["label"] == 1 and r["lesion_pixels"] == 0)),
              "pixels": pixels.n_voxels, "lesion_pixels": pixels.n_positive, "regions": pixels.n_regions}
    return {"metrics": metrics, "counts": counts, "scores_csv": _scores_csv(rows)}


def _scores_csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["image", "label", "method_score", "map_max", "lesion_pixels"],
                            lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: repr(v) if isinstance(v, float) else v for k, v in row.items()})
    return buffer.getvalue()
