"""Cross-subject scoring: never the case itself, level windows, lesion patches out, feature cache, depth pooling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import napari_clip_ad.crosssubject as cs
from napari_clip_ad.crosssubject import (
    CrossSubjectSettings,
    Subject,
    choose_references,
    depth_pooled,
    relative_levels,
    score_volume,
)
from napari_clip_ad.errors import InputError
from napari_clip_ad.methods import build_method


def _subject(case_id, seed, shape=(12, 40, 40), blob=False):
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[: shape[0], : shape[1], : shape[2]]
    brain = ((y - 20) ** 2 + (x - 20) ** 2 < 15**2) & (z >= 1) & (z <= 10)
    volume = np.where(brain, 1.0 + 0.1 * rng.standard_normal(shape), 0.0).astype(np.float32)
    lesion = None
    if blob:
        lesion = brain & ((y - 15) ** 2 + (x - 22) ** 2 < 5**2) & (z >= 4) & (z <= 7)
        volume[lesion] = 3.0
    return Subject(case_id, volume, brain, lesion)


@pytest.fixture(scope="module")
def method():
    return build_method("anomalydino", backbone="tiny-dinov2", image_size=112, device="cpu", layers=[6])


def test_map_is_in_unit_range_zero_outside_the_brain_with_provenance(method):
    target, pool = _subject("t", 0), [_subject("a", 1), _subject("b", 2)]
    result = score_volume(method, target, pool, CrossSubjectSettings(k=4))
    assert result.anomaly_map.shape == target.volume.shape
    assert result.anomaly_map.min() >= 0 and result.anomaly_map.max() <= 1
    assert not result.anomaly_map[~target.brain].any()
    assert result.info["pool"] == ["a", "b"] and result.info["mode"] == "cross-subject"
    assert result.analysed.sum() == 10 and result.info["references_per_slice"]["max"] <= 4


def test_the_case_itself_is_never_a_reference(method):
    target = _subject("t", 0)
    with pytest.raises(InputError, match="never uses it"):
        score_volume(method, target, [_subject("a", 1), _subject("t", 5)])
    renamed = Subject("copy", target.volume.copy(), target.brain.copy())
    with pytest.raises(InputError, match="never uses it"):
        score_volume(method, target, [renamed])


def test_lesion_patches_of_pool_subjects_are_not_references(method):
    """A pool twin carrying the target's lesion would explain it away unless its lesion patches are left out."""
    target = _subject("t", 0, blob=True)
    twin = Subject("twin", target.volume + 0.001, target.brain, target.lesion)
    kept = score_volume(method, Subject("t", target.volume, target.brain), [twin], CrossSubjectSettings(exclude_lesion="none", sigma=0))
    left_out = score_volume(method, Subject("t", target.volume, target.brain), [twin], CrossSubjectSettings(sigma=0))
    assert left_out.anomaly_map[target.lesion].mean() > 5 * kept.anomaly_map[target.lesion].mean()


def test_pool_features_are_computed_once_per_subject_and_cached(method, tmp_path, monkeypatch):
    calls = []
    real_tap = cs._tap
    monkeypatch.setattr(cs, "_tap", lambda m, images: calls.append(len(images)) or real_tap(m, images))
    cohort = [_subject(name, seed) for seed, name in enumerate("abc")]
    first = score_volume(method, cohort[0], cohort[1:], cache_dir=tmp_path)
    score_volume(method, cohort[1], [cohort[0], cohort[2]], cache_dir=tmp_path)
    assert sum(calls) == 3 * 10  # 3 subjects x 10 brain slices: N backbone passes, not N^2
    again = score_volume(method, cohort[0], cohort[1:], cache_dir=tmp_path)
    assert sum(calls) == 30 and np.array_equal(first.anomaly_map, again.anomaly_map)
    assert len(list(tmp_path.glob("*.safetensors"))) == 3


def test_references_come_from_the_level_window_closest_first():
    levels = np.array([0.0, 0.48, 0.5, 0.53, 0.56, 0.9])
    chosen = choose_references(0.5, levels, CrossSubjectSettings(window=0.05, k=2), seed=0)
    assert chosen.tolist() == [1, 2]
    assert choose_references(0.5, levels, CrossSubjectSettings(window=0.05, k=None), seed=0).tolist() == [1, 2, 3]
    anywhere = choose_references(0.5, levels, CrossSubjectSettings(matched_level=False, k=3), seed=1)
    assert len(anywhere) == 3
    brain = np.zeros((5, 2, 2), bool)
    brain[1:4] = True
    np.testing.assert_allclose(relative_levels(brain)[1:4], [0.0, 0.5, 1.0])


def test_depth_pooling_averages_neighbouring_brain_slices():
    tokens = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1)
    pooled = depth_pooled(tokens, np.array([3, 4, 5, 7]), 3)
    assert pooled.view(-1).tolist() == [0.5, 1.0, 1.5, 3.0]  # slice 7 has no brain neighbour
    with pytest.raises(InputError, match="odd"):
        depth_pooled(tokens, np.array([3, 4, 5, 7]), 2)


def test_musc_cross_subject_runs(tmp_path):
    method = build_method("musc", backbone="tiny-dinov2", image_size=112, device="cpu", layers=[6])
    result = score_volume(method, _subject("t", 0), [_subject("a", 1), _subject("b", 2)], CrossSubjectSettings(k=4))
    assert result.anomaly_map.max() <= 1 and np.isfinite(result.scores).all()


def test_musc_kept_aggregates_equal_aggregating_the_chosen_set():
    """The pool slices' LNAMD kept across target slices equals LNAMD of each chosen set, bitwise."""
    from napari_clip_ad.methods.musc import lnamd

    method = build_method("musc", backbone="tiny-dinov2", image_size=112, device="cpu")
    tokens = torch.randn(9, len(method.layers), 64, 16)
    kept = cs._AggregatedPool(method, tokens)
    for chosen in ([0, 1, 2, 3], [2, 3, 4, 5], [5, 6, 8], [0, 8]):  # overlapping, then disjoint sets
        got = kept(np.array(chosen))
        for n, r in enumerate(method.r_list):
            assert torch.equal(got[n], lnamd(tokens[chosen], r))
        assert sorted(kept.kept) == chosen  # only the chosen slices' aggregates are held


@pytest.mark.parametrize("name", ["anomalydino", "musc"])
def test_bfloat16_features_stay_close_and_bad_dtype_is_refused(name):
    m = build_method(name, backbone="tiny-dinov2", image_size=112, device="cpu", layers=[6])
    target, pool = _subject("t", 0, blob=True), [_subject("a", 1), _subject("b", 2)]
    full = score_volume(m, target, pool, CrossSubjectSettings(k=4, sigma=0))
    half = score_volume(m, target, pool, CrossSubjectSettings(k=4, sigma=0, feature_dtype="bfloat16"))
    assert full.info["settings"]["feature_dtype"] == "float32" and half.info["settings"]["feature_dtype"] == "bfloat16"
    assert not np.array_equal(full.anomaly_map, half.anomaly_map)  # the storage really changed
    assert np.abs(full.anomaly_map - half.anomaly_map).max() < 0.05  # bf16 keeps ~3 significant digits
    with pytest.raises(InputError, match="feature_dtype"):
        score_volume(m, target, pool, CrossSubjectSettings(feature_dtype="float16"))
