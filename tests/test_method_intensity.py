"""The ``intensity`` baseline: robust z-score inside the brain, no model, through every front end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from napari_clip_ad.case_options import CaseOptions
from napari_clip_ad.cli import main
from napari_clip_ad.engine import run_volume
from napari_clip_ad.engine.pipeline import case_from_arrays, run_case
from napari_clip_ad.errors import InputError
from napari_clip_ad.io import load_case
from napari_clip_ad.methods import build_method
from napari_clip_ad.methods.intensity import Z_CENTRE, robust_z, z_to_unit


def _reference(volume: np.ndarray, brain: np.ndarray, sigma: float) -> np.ndarray:
    """The documented definition written out directly (median, 1.4826 MAD, in-plane Gaussian, sigmoid)."""
    values = volume[brain].astype(np.float64)
    median = np.median(values)
    spread = 1.4826 * np.median(np.abs(values - median))
    z = np.where(brain, (volume - median) / spread, 0.0)
    z = ndimage.gaussian_filter(z, sigma=(0, sigma, sigma), mode="constant")
    return np.where(brain, 1 / (1 + np.exp(-(z - Z_CENTRE))), 0.0)


def test_map_follows_the_documented_definition():
    rng = np.random.default_rng(0)
    volume = rng.normal(100, 10, (6, 32, 32)).astype(np.float32)
    volume[:, :4] = 0
    volume[2:4, 10:16, 10:16] += 60  # a bright lesion
    brain = volume != 0
    method = build_method("intensity")
    result = run_volume(volume, method)
    np.testing.assert_allclose(result.anomaly_map, _reference(volume, brain, 1.0), atol=2e-6)
    assert result.info["backbone"] == "none (no model)" and result.info["random_weights"] is False
    assert result.scores[2] == pytest.approx(result.anomaly_map[2].max())
    hypo = run_volume(volume, build_method("intensity", polarity="hypo"), sigma=0)
    assert hypo.anomaly_map[2, 12, 12] < 0.01 < result.anomaly_map[2, 12, 12]


def test_monotone_transform_keeps_rankings():
    z = np.linspace(-8, 12, 2001)
    unit = z_to_unit(z)
    assert np.all(np.diff(unit.astype(np.float64)) >= 0) and unit[0] >= 0 and unit[-1] <= 1
    assert z_to_unit(np.array([Z_CENTRE]))[0] == pytest.approx(0.5)


def test_degenerate_brains_refused():
    with pytest.raises(InputError, match="no brain voxel"):
        robust_z(np.zeros((2, 4, 4)), np.zeros((2, 4, 4), bool))
    with pytest.raises(InputError, match="one intensity"):
        robust_z(np.ones((2, 4, 4)), np.ones((2, 4, 4), bool))
    with pytest.raises(InputError, match="no trainable parts"):
        build_method("intensity", weights="x.safetensors")
    with pytest.raises(InputError, match="polarity"):
        build_method("intensity", polarity="bright")


def test_real_flair_beats_chance_by_far(shared_data: Path):
    """On a real BraTS 2023 glioma the FLAIR z-score separates tumour from brain (issue 18: ~0.95 AUROC)."""
    case = load_case(shared_data / "brats2023" / "BraTS-GLI-00012-000", modalities=["t2f"])
    result = run_case(case, build_method("intensity"), CaseOptions(modality="t2f"))
    brain = case.brain_mask
    assert roc_auc_score(case.whole_tumour[brain], result.anomaly_map[brain]) > 0.9


def test_infer_cli_and_arrays_agree(crop_real_cohort, tmp_path):
    cohort = crop_real_cohort(tmp_path / "cohort", (slice(150, 200), slice(60, 110), slice(70, 90)), cases=("BraTS-GLI-00002-000",))
    assert main(["infer", str(cohort), "--method", "intensity", "--modality", "t2f", "--out", str(tmp_path / "out")]) == 0
    info = json.loads((tmp_path / "out" / "infer.json").read_text())
    assert info["method"] == "intensity" and info["backbone"] == "none (no model)"
    case = load_case(cohort / "BraTS-GLI-00002-000", modalities=["t2f"])
    arrays = case_from_arrays({"t2f": case.image("t2f")}, spacing=case.spacing, brain_mask=case.brain_mask)
    a = run_case(case, build_method("intensity"), CaseOptions(modality="t2f"))
    b = run_case(arrays, build_method("intensity"), CaseOptions(modality="t2f"))
    assert np.array_equal(a.anomaly_map, b.anomaly_map)
