"""The one case pipeline (:func:`run_case`): ``infer``, the study and the widget produce the same map and mask.

Tiny random-weights backbone on crops of the real BraTS 2023 cases: the maps mean nothing, but every front
end must give bitwise the same arrays for the same options.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from napari_clip_ad.case_options import OPTION_SPECS, CaseOptions, add_case_arguments, options_from_args
from napari_clip_ad.cli import main
from napari_clip_ad.engine import run_volume
from napari_clip_ad.engine.pipeline import case_from_arrays, run_case
from napari_clip_ad.engine.views import run_views, threshold_mask
from napari_clip_ad.errors import InputError
from napari_clip_ad.io import load_case
from napari_clip_ad.methods import build_method

CROP = (slice(160, 192), slice(70, 102), slice(75, 87))
"""Source (x, y, z) crop: 32 x 32 x 12 voxels with tumour and brain."""
CASE = "BraTS-GLI-00002-000"


@pytest.fixture(scope="module")
def cohort(crop_real_cohort, tmp_path_factory) -> Path:
    return crop_real_cohort(tmp_path_factory.mktemp("pipeline") / "cohort", CROP, cases=(CASE,))


@pytest.fixture(scope="module")
def method():
    return build_method("vand", "tiny-test", device="cpu")


def _array(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


@pytest.mark.parametrize(
    "flags, options",
    [
        ([], CaseOptions()),
        (["--modality", "t1c+t2w+t2f", "--views", "all", "--fuse", "max", "--smooth3d", "1.5", "--restrict-to-brain",
          "--min-component", "3", "--threshold", "0.4"],
         CaseOptions(modality="t1c+t2w+t2f", views="all", fuse="max", smooth3d_mm=1.5, restrict_to_brain=True,
                     min_component=3, threshold=0.4)),
    ],
)
def test_infer_files_equal_run_case(cohort, method, tmp_path, flags, options):
    out = tmp_path / "out"
    assert main(["infer", str(cohort / CASE), "--method", "vand", "--backbone", "tiny-test", "--device", "cpu",
                 *flags, "--out", str(out)]) == 0
    case = load_case(cohort / CASE, modalities=options.modalities_to_load)
    result = run_case(case, method, options)
    saved_map, saved_mask = _array(out / f"{CASE}_anomaly.nii.gz"), _array(out / f"{CASE}_mask.nii.gz")
    # Files are in the source orientation; compare in canonical order through the case geometry.
    assert np.array_equal(case.geometry.to_canonical(saved_map), result.anomaly_map)
    assert np.array_equal(case.geometry.to_canonical(saved_mask), result.mask)
    assert result.info["modality"] == options.modality and result.info["threshold"] == options.threshold


def test_run_case_equals_the_steps(cohort, method):
    """run_case = run_views + threshold_mask with the same options (the pre-pipeline infer path)."""
    options = CaseOptions(views="axial+coronal", smooth3d_mm=1.0, min_component=2, threshold=0.3)
    case = load_case(cohort / CASE)
    result = run_case(case, method, options)
    anomaly_map, _, _ = run_views(case, method, options.post, modality=options.modalities)
    assert np.array_equal(result.anomaly_map, anomaly_map)
    assert np.array_equal(result.mask, threshold_mask(anomaly_map, 0.3, 2))
    assert np.array_equal(result.mask_at(0.6), threshold_mask(anomaly_map, 0.6, 2))


def test_arrays_case_equals_plain_engine(cohort, method):
    """A napari layer (array + spacing) through the pipeline = run_volume on the array (the widget's old path)."""
    case = load_case(cohort / CASE)
    volume = case.image("t2w")
    arrays = case_from_arrays({"t2w": volume}, spacing=case.spacing, case_id="layer")
    result = run_case(arrays, method, CaseOptions())
    plain = run_volume(volume, method, modality="t2w")
    assert np.array_equal(result.anomaly_map, plain.anomaly_map)
    assert arrays.geometry.spacing == case.spacing and arrays.brain_mask.sum() == (volume != 0).sum()


@pytest.mark.parametrize(
    "kwargs, flag",
    [({"threshold": 1.5}, "--threshold"), ({"threshold": float("nan")}, "--threshold"), ({"sigma": -2.0}, "--sigma"),
     ({"sigma": float("inf")}, "--sigma"), ({"smooth3d_mm": float("inf")}, "--smooth3d"), ({"batch_size": 0}, "--batch-size"),
     ({"views": "diagonal"}, "views"), ({"modality": "t2w+t2f"}, "modality"), ({"min_component": -1}, "--min-component")],
)
def test_bad_options_refused_with_their_flag(kwargs, flag):
    with pytest.raises(InputError, match=flag):
        CaseOptions(**kwargs)


def test_options_round_trip_and_flags_match_specs():
    options = CaseOptions(modality="t1c+t2w+t2f", views="all", sigma=2.0, threshold=0.25)
    assert CaseOptions.from_json(options.to_json()) == options
    parser = argparse.ArgumentParser()
    add_case_arguments(parser)
    flags = {a.option_strings[0] for a in parser._actions if a.option_strings and a.option_strings[0] != "-h"}
    assert flags == {spec.flag for spec in OPTION_SPECS}
    parsed = parser.parse_args(["--views", "all", "--sigma", "2", "--threshold", "0.25", "--modality", "t1c+t2w+t2f"])
    assert options_from_args(parsed) == options
    assert options_from_args(parser.parse_args([])) == CaseOptions()


def test_case_from_arrays_refuses_bad_input():
    with pytest.raises(InputError, match="one shape"):
        case_from_arrays({"t2w": np.zeros((4, 5, 6)), "t2f": np.zeros((4, 5, 7))})
    with pytest.raises(InputError, match="spacing"):
        case_from_arrays({"t2w": np.zeros((4, 5, 6))}, spacing=(1.0, 0.0, 1.0))
    with pytest.raises(InputError, match="modality"):
        case_from_arrays({"flair": np.zeros((4, 5, 6))})


def test_references_through_infer_never_from_the_analysed_case(crop_real_cohort, tmp_path):
    """--references auto in a cohort: each case's 2-shot memory comes from the other case, recorded per case."""
    import json

    cohort = crop_real_cohort(tmp_path / "refs", (slice(40, 200), slice(30, 210), slice(24, 36)))  # tumour-free slices in both
    out = tmp_path / "out"
    assert main(["infer", str(cohort), "--method", "vand", "--backbone", "tiny-test", "--device", "cpu",
                 "--references", "auto", "--k-shot", "2", "--out", str(out)]) == 0
    for case_id in ("BraTS-GLI-00002-000", "BraTS-GLI-00012-000"):
        record = json.loads((out / f"{case_id}_metrics.json").read_text())
        used = record["references_used"]["axial"]
        assert record["k_shot"] == 2 and used["excluded_case"] == case_id
        assert len(used["references"]) == 2 and all(r["case_id"] != case_id for r in used["references"])
    info = json.loads((out / "infer.json").read_text())
    assert info["references"] == "auto" and info["k_shot"] == 2


def test_zero_shot_method_refuses_references_in_one_line(cohort, tmp_path, capsys):
    code = main(["infer", str(cohort / CASE), "--method", "anomalyclip", "--backbone", "tiny-test", "--device", "cpu",
                 "--references", str(cohort), "--k-shot", "1", "--out", str(tmp_path / "o")])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert code == 2 and len(err) == 1 and "no few-shot mode" in err[0]
