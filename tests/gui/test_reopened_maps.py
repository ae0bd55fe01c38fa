"""A saved anomaly map reopens as a map: by infer's name or, under any name, by our provenance in its header."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from napari_clip_ad._napari.layers import MAP_KIND, MASK_KIND, map_kwargs
from napari_clip_ad._napari.reader import read_nifti_file
from napari_clip_ad._napari.writer import write_image, write_labels, write_layers
from napari_clip_ad.io import load_case, save_volume
from napari_clip_ad.io.header import provenance_text, read_provenance

CASE = "BraTS-GLI-00002-000"


@pytest.fixture(scope="module")
def case(case_dir: Path):
    return load_case(case_dir, modalities=["t2f"])


@pytest.fixture(scope="module")
def anomaly(case) -> np.ndarray:
    return np.linspace(0, 1, np.prod(case.shape), dtype=np.float32).reshape(case.shape)


def _result(anomaly: np.ndarray, threshold: float, min_component: int = 0):
    """An engine result as the pipeline returns it (one axial view)."""
    from napari_clip_ad.case_options import CaseOptions
    from napari_clip_ad.engine.pipeline import CaseResult
    from napari_clip_ad.engine.run import VolumeResult

    n = anomaly.shape[0]
    view = VolumeResult(anomaly, anomaly.reshape(n, -1).max(axis=1), np.ones(n, dtype=bool), {})
    return CaseResult(anomaly, (anomaly >= threshold).astype(np.uint8), {"method": "vand"}, views=[view],
                      options=CaseOptions(threshold=threshold, min_component=min_component))


def test_provenance_text_round_trips_and_fits_the_header_field():
    text = provenance_text("anomaly_map", thr="0.35", minc=0, case=CASE, method="vand", skipped=None)
    header = nib.Nifti1Header()
    header["descrip"] = text.encode()
    assert read_provenance(header) == {"kind": "anomaly_map", "thr": "0.35", "minc": "0",
                                       "case": CASE, "method": "vand"}
    long = provenance_text("anomaly_map", thr="0.5", case="x" * 90)
    assert len(long.encode()) <= 80 and long == "napari-clip-ad anomaly_map thr=0.5"  # the field that fits
    header["descrip"] = b"FreeSurfer mri_convert"
    assert read_provenance(header) is None


def test_infer_outputs_carry_provenance_and_reopen_under_any_name(case, anomaly, tmp_path):
    from napari_clip_ad.engine.pipeline import write_case_outputs

    write_case_outputs(_result(anomaly, 0.35, 3), case, tmp_path / CASE)
    renamed = tmp_path / "my result.nii.gz"  # a name that says nothing
    (tmp_path / f"{CASE}_anomaly.nii.gz").rename(renamed)
    (data, kwargs, kind), = read_nifti_file(renamed)
    meta = kwargs["metadata"]
    assert kind == "image" and meta["kind"] == MAP_KIND and kwargs["colormap"] == "inferno"
    assert kwargs["contrast_limits"] == (0.0, 1.0) and kwargs["blending"] == "additive"
    assert meta["case_id"] == CASE and meta["threshold"] == 0.35 and meta["min_component"] == 3
    assert meta["method"] == "vand"
    np.testing.assert_array_equal(data, anomaly)
    (mask, mask_kwargs, kind), = read_nifti_file(tmp_path / f"{CASE}_mask.nii.gz")
    assert kind == "labels" and mask_kwargs["metadata"]["kind"] == MASK_KIND and mask.dtype == np.uint8
    assert mask_kwargs["metadata"]["case_id"] == CASE


def test_a_map_named_like_infer_without_provenance_takes_the_metrics_beside_it(case, anomaly, tmp_path):
    save_volume(anomaly, case, tmp_path / f"{CASE}_anomaly.nii.gz")  # no provenance (e.g. an older run)
    (tmp_path / f"{CASE}_metrics.json").write_text(json.dumps({"case_id": CASE, "threshold": 0.4, "method": "winclip"}))
    (_, kwargs, _), = read_nifti_file(tmp_path / f"{CASE}_anomaly.nii.gz")
    meta = kwargs["metadata"]
    assert meta["kind"] == MAP_KIND and meta["case_id"] == CASE  # not "<id>_anomaly": the ground truth matches it
    assert meta["threshold"] == 0.4 and meta["method"] == "winclip"


def test_writer_marks_map_and_mask_layers_and_nothing_else(case, anomaly, tmp_path):
    meta = map_kwargs("t2f anomaly", {"case_id": CASE, "threshold": 0.6, "min_component": 0, "method": "anovl",
                                      "geometry": case.geometry}, (1, 1, 1), (0, 0, 0))["metadata"]
    map_path, = write_image(str(tmp_path / "exported"), anomaly, {"metadata": meta})
    assert read_provenance(nib.load(map_path).header)["kind"] == MAP_KIND
    (_, kwargs, kind), = read_nifti_file(map_path)
    assert kind == "image" and kwargs["metadata"]["kind"] == MAP_KIND and kwargs["metadata"]["threshold"] == 0.6
    # A layer read from the map keeps the map's header in its geometry; saving it as something else drops the mark.
    reread_geometry = kwargs["metadata"]["geometry"]
    plain, = write_image(str(tmp_path / "plain"), anomaly * 100, {"metadata": {"geometry": reread_geometry}})
    assert read_provenance(nib.load(plain).header) is None
    (_, plain_kwargs, _), = read_nifti_file(plain)
    assert "kind" not in plain_kwargs["metadata"]
    mask_meta = {**meta, "kind": MASK_KIND}
    written = write_layers(str(tmp_path / "both"), [(anomaly, {"name": "a map", "metadata": meta}, "image"),
                                                    ((anomaly >= 0.6).astype(np.uint8),
                                                     {"name": "a map mask", "metadata": mask_meta}, "labels")])
    kinds = [read_nifti_file(path)[0][1]["metadata"]["kind"] for path in written]
    assert kinds == [MAP_KIND, MASK_KIND]
    labels, = write_labels(str(tmp_path / "labels"), (anomaly > 0.5).astype(np.uint8), {"metadata": {"geometry": case.geometry}})
    assert read_provenance(nib.load(labels).header) is None


@pytest.mark.gui
def test_threshold_widget_takes_a_reopened_map(make_napari_viewer, case_dir, case, anomaly, tmp_path):
    from napari_clip_ad.engine.pipeline import write_case_outputs

    write_case_outputs(_result(anomaly, 0.7), case, tmp_path / CASE)
    renamed = tmp_path / "result.nii.gz"
    (tmp_path / f"{CASE}_anomaly.nii.gz").rename(renamed)
    viewer = make_napari_viewer()
    viewer.open(str(case_dir), plugin="napari-clip-ad")
    _, widget = viewer.window.add_plugin_dock_widget("napari-clip-ad", "Threshold and metrics")
    map_layer, = viewer.open(str(renamed), plugin="napari-clip-ad")
    widget.flush()
    assert widget.anomaly_map.value is map_layer
    assert widget.ground_truth.value is viewer.layers[f"{CASE} seg"]  # same case id: pre-selected
    assert widget.current_threshold == pytest.approx(0.7)
    assert "Dice" in widget.volume_numbers.value and "Warning" not in widget.volume_numbers.value


@pytest.mark.gui
def test_the_case_opened_after_its_map_gives_the_ground_truth(make_napari_viewer, small_cohort, tmp_path):
    from napari_clip_ad.engine.pipeline import write_case_outputs

    case = load_case(small_cohort / CASE, modalities=["t2f"])
    anomaly = np.linspace(0, 1, np.prod(case.shape), dtype=np.float32).reshape(case.shape)
    write_case_outputs(_result(anomaly, 0.5), case, tmp_path / CASE)
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("napari-clip-ad", "Threshold and metrics")
    map_layer, = viewer.open(str(tmp_path / f"{CASE}_anomaly.nii.gz"), plugin="napari-clip-ad")
    widget.flush()
    assert widget.anomaly_map.value is map_layer and widget.ground_truth.value is None
    viewer.open(str(small_cohort / "BraTS-GLI-00012-000"), plugin="napari-clip-ad")  # another case: not taken
    assert widget.ground_truth.value is None
    viewer.open(str(small_cohort / CASE), plugin="napari-clip-ad")  # the map's own case, opened afterwards
    widget.flush()
    assert widget.ground_truth.value is viewer.layers[f"{CASE} seg"]
    assert "Dice" in widget.volume_numbers.value and "Warning" not in widget.volume_numbers.value
