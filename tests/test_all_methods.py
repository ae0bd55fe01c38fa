"""Every registered method through the same engine and CLI, on small crops of the real BraTS 2023 cases.

The backbone is the tiny random-weights test architecture, so the maps mean nothing; what is checked is
that each method runs everywhere the others do, slice by slice, and the engine's batching, skipping and
post-processing give the same slices as the method alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_clip_ad.cli import main
from napari_clip_ad.engine import preprocess_slices, run_volume
from napari_clip_ad.io import load_case
from napari_clip_ad.methods import build_method, list_methods, method_class, smooth_maps

CROP = (slice(144, 208), slice(60, 124), slice(83, 87))
"""Source (x, y, z) crop: 64 x 64 voxels x 4 axial slices through the tumour of both real cases."""
IMAGE_SIZE = 112
TEXT_METHODS = [name for name in list_methods() if not method_class(name).vision_only]
"""The CLIP-prompted methods (tiny-test backbone). The training-free vision-only methods (anomalydino, musc:
DINOv2, references or a cohort) have their own tests: test_method_anomalydino.py, test_method_musc.py."""


@pytest.fixture(scope="module")
def cohort(crop_real_cohort, tmp_path_factory) -> Path:
    return crop_real_cohort(tmp_path_factory.mktemp("all-methods") / "cohort", CROP)


@pytest.fixture(scope="module", params=TEXT_METHODS)
def method(request):
    return build_method(request.param, "tiny-test", image_size=IMAGE_SIZE, device="cpu")


def test_every_method_is_registered():
    assert set(list_methods()) >= {"vand", "anomalyclip", "anovl", "adaclip", "winclip"}


def test_run_volume_equals_the_method_slice_by_slice(method, cohort):
    if method.volume_level:
        pytest.skip(f"{method.name} scores whole volumes (no slice-level predict); tested in its own module")
    case = load_case(cohort / "BraTS-GLI-00002-000", modalities=["t2w"])
    volume = case.image("t2w").copy()
    volume[1] = 0.0  # a slice without brain: skipped, map 0
    brain = volume != 0
    result = run_volume(volume, method, batch_size=3, brain_mask=brain)
    assert result.anomaly_map.shape == volume.shape and result.anomaly_map.dtype == np.float32
    assert list(result.analysed) == [True, False, True, True]
    assert not result.anomaly_map[1].any() and result.scores[1] == 0
    assert 0.0 <= result.anomaly_map.min() and result.anomaly_map.max() <= 1.0
    assert np.isfinite(result.scores).all() and result.info["method"] == method.name
    for k in np.flatnonzero(result.analysed):
        raw = torch.from_numpy(volume[k : k + 1].astype(np.float32))
        images = preprocess_slices(raw, method.image_size, method.backbone.mean, method.backbone.std)
        output = method.predict(images)
        alone = smooth_maps(output.unit_maps().float(), method.default_sigma)
        alone = F.interpolate(alone[:, None], size=volume.shape[1:], mode="bilinear", align_corners=False)[0, 0]
        assert alone.std() > 0  # a real map, not a constant
        np.testing.assert_allclose(result.anomaly_map[k], alone.clamp(0, 1).numpy(), atol=1e-4)
        assert result.scores[k] == pytest.approx(float(output.scores[0]), abs=1e-4)


@pytest.mark.parametrize("name", TEXT_METHODS)
def test_infer_writes_aligned_maps_and_metrics_for_each_method(name, cohort, tmp_path):
    status = main(["infer", str(cohort), "--method", name, "--backbone", "tiny-test", "--device", "cpu",
                   "--image-size", str(IMAGE_SIZE), "--batch-size", "4", "--out", str(tmp_path)])
    assert status == 0
    info = json.loads((tmp_path / "infer.json").read_text())
    assert info["method"] == name and info["cases"] == sorted(p.name for p in cohort.iterdir())
    for case_id in info["cases"]:
        source = nib.load(cohort / case_id / f"{case_id}-t2w.nii.gz")
        written = nib.load(tmp_path / f"{case_id}_anomaly.nii.gz")
        assert written.shape == source.shape and np.allclose(written.affine, source.affine)
        values = np.asarray(written.dataobj)
        assert 0.0 <= values.min() and values.max() <= 1.0 and values.std() > 0
        metrics = json.loads((tmp_path / f"{case_id}_metrics.json").read_text())
        assert metrics["method"] == name and 0.0 <= metrics["dice"] <= 1.0
