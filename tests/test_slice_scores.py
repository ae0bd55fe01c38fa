"""Per-slice image scores: written by ``infer`` (``<id>_scores.json``), used by ``evaluate``, map max as fallback."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from napari_clip_ad.cli import main
from napari_clip_ad.engine import run_volume
from napari_clip_ad.io import find_cases, load_case, read_nifti
from napari_clip_ad.methods import build_method
from napari_clip_ad.metrics import brain_slices, map_max_scores, ranking_scores, slice_labels

CROP = (slice(40, 200), slice(40, 200), slice(50, 90))  # source x, y, z: 40 axial slices around the tumours


@pytest.fixture(scope="module")
def inferred(crop_real_cohort, tmp_path_factory):
    root = tmp_path_factory.mktemp("slices")
    cohort = crop_real_cohort(root / "cohort", CROP)
    out = root / "maps"
    assert main(["infer", str(cohort), "--method", "vand", "--backbone", "tiny-test", "--device", "cpu",
                 "--out", str(out)]) == 0
    return cohort, out


def expected_slices(cohort, maps, use_image_scores: bool):
    scores, labels = [], []
    for path in find_cases(cohort):
        case = load_case(path, modalities=["t2w"])
        data, _ = read_nifti(maps / f"{case.case_id}_anomaly.nii.gz")
        anomaly = case.geometry.to_canonical(np.asarray(data, dtype=np.float32))
        keep = brain_slices(case.brain_mask)
        if use_image_scores:
            per_slice = np.asarray(json.loads((maps / f"{case.case_id}_scores.json").read_text())["scores"])
        else:
            per_slice = map_max_scores(anomaly)
        scores.append(per_slice[keep])
        labels.append(slice_labels(case.whole_tumour)[keep])
    return ranking_scores(np.concatenate(scores), np.concatenate(labels))


def test_infer_writes_the_engine_slice_scores(inferred):
    cohort, maps = inferred
    method = build_method("vand", "tiny-test", device="cpu")
    path = find_cases(cohort)[0]
    case = load_case(path, modalities=["t2w"])
    result = run_volume(case, method, modality="t2w")
    record = json.loads((maps / f"{case.case_id}_scores.json").read_text())
    assert record["axis"] == "axial" and record["case_id"] == case.case_id
    np.testing.assert_allclose(record["scores"], result.scores, rtol=0, atol=1e-7)
    assert record["analysed"] == result.analysed.tolist()


@pytest.mark.parametrize("slice_score", ["image", "max"])
def test_evaluate_slice_detection_uses_image_scores_or_map_max(inferred, tmp_path, slice_score):
    cohort, maps = inferred
    assert main(["evaluate", "--maps", str(maps), "--data", str(cohort), "--slice-score", slice_score,
                 "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["slice_score"] == ("image score" if slice_score == "image" else "map max")
    auroc, ap = expected_slices(cohort, maps, slice_score == "image")
    assert summary["slice_auroc"] == pytest.approx(auroc, abs=1e-12)
    assert summary["slice_ap"] == pytest.approx(ap, abs=1e-12)
    with open(tmp_path / "per_case.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {row["slice_score"] for row in rows} == {summary["slice_score"]}
    assert all(0 <= float(row["pixel_ap"]) <= 1 and 0 <= float(row["aupro"]) <= 1 for row in rows)


def test_missing_scores_fall_back_to_map_max_and_bad_ones_are_refused(inferred, tmp_path, capsys):
    cohort, maps = inferred
    copy = tmp_path / "maps"
    copy.mkdir()
    ids = [p.name for p in find_cases(cohort)]
    for name in (f"{ids[0]}_anomaly.nii.gz", f"{ids[1]}_anomaly.nii.gz", f"{ids[1]}_scores.json"):
        (copy / name).write_bytes((maps / name).read_bytes())
    assert main(["evaluate", "--maps", str(copy), "--data", str(cohort), "--out", str(tmp_path / "mixed")]) == 0
    summary = json.loads((tmp_path / "mixed" / "summary.json").read_text())
    assert summary["slice_score"] == "mixed" and summary["slice_score_cases"] == {"image score": 1, "map max": 1}
    (copy / f"{ids[1]}_scores.json").write_text(json.dumps({"axis": "axial", "scores": [0.1, 0.2]}))
    assert main(["evaluate", "--maps", str(copy), "--data", str(cohort), "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert "_scores.json" in err and "2 axial slice scores" in err and "\n" not in err
    assert not (tmp_path / "bad").exists()
