"""The plugin's reader and writer on real BraTS files (no display needed, except the viewer test)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from napari_clip_ad._napari.layers import MAP_KIND, geometry_from_placement, placement
from napari_clip_ad._napari.reader import (
    get_reader,
    read_cohort_folder,
    read_nifti_file,
)
from napari_clip_ad._napari.writer import write_image, write_labels
from napari_clip_ad.io import Geometry, load_case, save_volume

CASE = "BraTS-GLI-00002-000"


def _by_name(layer_data):
    return {kwargs["name"]: (data, kwargs, kind) for data, kwargs, kind in layer_data}


def test_case_folder_gives_one_image_per_modality_and_the_seg_as_labels(case_dir: Path, case_layer_data) -> None:
    assert get_reader(str(case_dir)) is not None
    layers = _by_name(case_layer_data)
    assert sorted(layers) == sorted([f"{CASE} {m}" for m in ("t1n", "t1c", "t2w", "t2f")] + [f"{CASE} seg"])
    reference = nib.load(case_dir / f"{CASE}-seg.nii.gz")
    case = load_case(case_dir, modalities=["t2f"])
    for name, (data, kwargs, kind) in layers.items():
        assert kind == ("labels" if name.endswith("seg") else "image")
        assert data.shape == (155, 240, 240)
        assert kwargs["scale"] == (1.0, 1.0, 1.0)
        geometry = kwargs["metadata"]["geometry"]
        assert isinstance(geometry, Geometry)
        np.testing.assert_array_equal(geometry.affine, reference.affine)
    seg, _, _ = layers[f"{CASE} seg"]
    np.testing.assert_array_equal(seg, case.seg)
    assert set(np.unique(seg)) == {0, 1, 2, 3}
    np.testing.assert_array_equal(layers[f"{CASE} t2f"][0], case.images["t2f"])


def test_old_layout_with_its_own_labels_is_read(shared_data: Path) -> None:
    folder = shared_data / "brats2013-deepmedic" / "pat0001"
    layers = _by_name(get_reader(str(folder))(str(folder)))
    assert sorted(layers) == ["pat0001 seg", "pat0001 t1c", "pat0001 t2f"]
    seg, kwargs, kind = layers["pat0001 seg"]
    assert kind == "labels" and seg.max() == 4
    image = layers["pat0001 t2f"][0]
    assert seg.shape == image.shape and kwargs["scale"] == layers["pat0001 t2f"][1]["scale"]


def test_paths_it_cannot_read_are_left_to_other_readers_cohorts_open(tmp_path: Path, shared_data: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    assert get_reader(str(tmp_path)) is None  # folder without a case
    assert get_reader(str(tmp_path / "notes.txt")) is None
    assert get_reader(str(tmp_path / "image.png")) is None
    assert get_reader(str(tmp_path / "missing.nii.gz")) is None
    # A cohort is no longer refused: its first case opens (issue 12, item 5).
    assert get_reader(str(shared_data / "brats2023")) is read_cohort_folder
    assert get_reader([str(tmp_path / "a.nii.gz"), str(tmp_path / "b.nii.gz")]) is None


def test_single_files_keep_their_kind_and_place(case_dir: Path, case_layer_data) -> None:
    layers = _by_name(case_layer_data)
    (seg, seg_kwargs, kind), = [(d, k, t) for d, k, t in read_nifti_file(case_dir / f"{CASE}-seg.nii.gz")]
    assert kind == "labels"
    np.testing.assert_array_equal(seg, layers[f"{CASE} seg"][0])
    assert seg_kwargs["translate"] == layers[f"{CASE} seg"][1]["translate"]
    (image, image_kwargs, kind), = read_nifti_file(case_dir / f"{CASE}-t2w.nii.gz")
    assert kind == "image" and image_kwargs["name"] == f"{CASE}-t2w"
    np.testing.assert_array_equal(image, layers[f"{CASE} t2w"][0])


def test_infer_outputs_open_as_map_and_mask(case_dir: Path, tmp_path: Path) -> None:
    case = load_case(case_dir, modalities=["t2f"])
    anomaly = np.linspace(0, 1, np.prod(case.shape), dtype=np.float32).reshape(case.shape)
    save_volume(anomaly, case, tmp_path / f"{CASE}_anomaly.nii.gz")
    save_volume((anomaly >= 0.5).astype(np.uint8), case, tmp_path / f"{CASE}_mask.nii.gz")
    (data, kwargs, kind), = get_reader(str(tmp_path / f"{CASE}_anomaly.nii.gz"))(str(tmp_path / f"{CASE}_anomaly.nii.gz"))
    assert kind == "image" and kwargs["metadata"]["kind"] == MAP_KIND and kwargs["colormap"] == "inferno"
    np.testing.assert_array_equal(data, anomaly)
    (mask, _, kind), = read_nifti_file(tmp_path / f"{CASE}_mask.nii.gz")
    assert kind == "labels" and mask.dtype == np.uint8
    np.testing.assert_array_equal(mask, anomaly >= 0.5)


def _source_voxels(path: Path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(path)
    return np.asarray(img.dataobj), img.affine


@pytest.mark.parametrize("part", ["seg", "t2f"])
def test_writer_round_trips_with_the_source_affine(case_dir: Path, case_layer_data, tmp_path: Path, part: str) -> None:
    layers = _by_name(case_layer_data)
    data, kwargs, kind = layers[f"{CASE} {part}"]
    writer = write_labels if kind == "labels" else write_image
    written = writer(str(tmp_path / f"out_{part}"), data, {"metadata": kwargs["metadata"], "scale": kwargs["scale"]})
    assert written == [str(tmp_path / f"out_{part}.nii.gz")]
    source, source_affine = _source_voxels(case_dir / f"{CASE}-{part}.nii.gz")
    saved, saved_affine = _source_voxels(Path(written[0]))
    np.testing.assert_array_equal(saved_affine, source_affine)
    assert nib.aff2axcodes(saved_affine) == nib.aff2axcodes(source_affine)
    np.testing.assert_array_equal(saved, source)


def test_layers_without_geometry_are_written_from_scale_and_translate(tmp_path: Path) -> None:
    data = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    meta = {"metadata": {}, "scale": (2.0, 1.5, 0.5), "translate": (10.0, -5.0, 3.0)}
    path, = write_labels(str(tmp_path / "made_in_napari_mask.nii.gz"), data, meta)
    (back, kwargs, _), = read_nifti_file(path)
    np.testing.assert_array_equal(back, data)
    assert kwargs["scale"] == meta["scale"] and kwargs["translate"] == meta["translate"]
    geometry = geometry_from_placement(data.shape, meta["scale"], meta["translate"])
    assert placement(geometry) == {"scale": meta["scale"], "translate": meta["translate"]}


def test_a_crop_with_stale_geometry_is_not_saved_with_it(case_layer_data, tmp_path: Path) -> None:
    data, kwargs, _ = _by_name(case_layer_data)[f"{CASE} seg"]
    crop = data[70:82]
    path, = write_labels(str(tmp_path / "crop.nii.gz"), crop, {"metadata": kwargs["metadata"], "scale": kwargs["scale"],
                                                              "translate": (70.0, -239.0, 0.0)})
    (back, back_kwargs, _), = read_nifti_file(path)
    np.testing.assert_array_equal(back, crop)
    assert back_kwargs["translate"] == (70.0, -239.0, 0.0)


@pytest.mark.gui
def test_viewer_opens_a_case_folder_and_saves_a_layer_with_the_plugin(make_napari_viewer, case_dir: Path,
                                                                       tmp_path: Path) -> None:
    viewer = make_napari_viewer()
    viewer.open(str(case_dir), plugin="napari-clip-ad")
    kinds = {layer.name: type(layer).__name__ for layer in viewer.layers}
    assert kinds == {**{f"{CASE} {m}": "Image" for m in ("t1n", "t1c", "t2w", "t2f")}, f"{CASE} seg": "Labels"}
    seg = viewer.layers[f"{CASE} seg"]
    assert tuple(seg.scale) == (1.0, 1.0, 1.0) and seg.data.shape == (155, 240, 240)
    assert all(tuple(layer.translate) == tuple(seg.translate) for layer in viewer.layers)
    viewer.layers.selection = {seg}
    written = viewer.layers.save(str(tmp_path / "seg.nii.gz"), selected=True, plugin="napari-clip-ad")
    assert written == [str(tmp_path / "seg.nii.gz")]
    source, source_affine = _source_voxels(case_dir / f"{CASE}-seg.nii.gz")
    saved, saved_affine = _source_voxels(tmp_path / "seg.nii.gz")
    np.testing.assert_array_equal(saved_affine, source_affine)
    np.testing.assert_array_equal(saved, source)


@pytest.mark.gui
def test_sample_data_is_the_synthetic_case(make_napari_viewer, qtbot, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    viewer = make_napari_viewer()
    viewer.open_sample("napari-clip-ad", "synthetic-case")  # first time: built in a worker, the UI stays live
    assert [layer.metadata.get("kind") for layer in viewer.layers] == ["sample_placeholder"]
    qtbot.waitUntil(lambda: len(viewer.layers) == 5, timeout=300_000)
    assert not any(layer.metadata.get("kind") == "sample_placeholder" for layer in viewer.layers)
    built = {layer.name: np.asarray(layer.data) for layer in viewer.layers}
    viewer.layers.clear()
    viewer.open_sample("napari-clip-ad", "synthetic-case")  # then: read from the disk cache at once
    assert len(viewer.layers) == 5
    for layer in viewer.layers:
        np.testing.assert_array_equal(np.asarray(layer.data), built[layer.name])
    kinds = sorted((type(layer).__name__, layer.name.split()[-1]) for layer in viewer.layers)
    assert kinds == [("Image", "t1c"), ("Image", "t1n"), ("Image", "t2f"), ("Image", "t2w"), ("Labels", "seg")]
    seg = next(layer for layer in viewer.layers if layer.name.endswith("seg"))
    assert seg.data.max() > 0 and isinstance(seg.metadata["geometry"], Geometry)
