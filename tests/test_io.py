"""Case IO on the real layouts: shapes, spacing, labels, canonical orientation, aligned saving, splits."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

from napari_clip_ad.errors import InputError
from napari_clip_ad.io import (
    CANONICAL_AXCODES,
    LAYOUTS,
    MODALITIES,
    Layout,
    case_id_of,
    find_cases,
    load_case,
    load_split,
    patient_id,
    register_layout,
    save_split,
    save_volume,
    split_cases,
)

GLI = "BraTS-GLI-00002-000"
SHAPE = (155, 240, 240)  # canonical (z, y, x) of the 240 x 240 x 155 BraTS grid


def source_array(path: Path) -> np.ndarray:
    """A file's voxels exactly as stored (source layout), read directly with nibabel."""
    return np.asanyarray(nib.load(str(path)).dataobj)


def tumour_voxels(seg_path: Path) -> int:
    return int((source_array(seg_path) > 0).sum())


@pytest.fixture(scope="module")
def gli_dir(shared_data: Path) -> Path:
    return shared_data / "brats2023" / GLI


@pytest.fixture(scope="module")
def gli(gli_dir: Path):
    """The full BraTS 2023 case (4 modalities + seg), loaded once."""
    return load_case(gli_dir)


@pytest.fixture
def restore_layouts():
    """Put the built-in layout list back after a test registers its own."""
    saved = list(LAYOUTS)
    yield
    LAYOUTS[:] = saved


# --- BraTS 2023 -------------------------------------------------------------------------------


def test_brats2023_case_loads_all_modalities_in_canonical_orientation(gli, gli_dir: Path) -> None:
    assert gli.layout == "brats2023" and gli.case_id == GLI
    assert list(gli.images) == list(MODALITIES)
    assert gli.shape == SHAPE and gli.spacing == (1.0, 1.0, 1.0)
    for modality in MODALITIES:
        image = gli.images[modality]
        assert image.dtype == np.float32 and image.shape == SHAPE and image.flags.c_contiguous
        # BraTS files are stored (L, P, S): canonical (S, P, L) is the pure transpose.
        source = source_array(gli_dir / f"{GLI}-{modality}.nii.gz")
        np.testing.assert_array_equal(image, source.transpose(2, 1, 0))
    assert gli.seg.dtype == np.int16 and set(np.unique(gli.seg)) <= {0, 1, 2, 3}
    assert int(gli.whole_tumour.sum()) == tumour_voxels(gli_dir / f"{GLI}-seg.nii.gz")
    any_signal = np.any([image != 0 for image in gli.images.values()], axis=0)
    np.testing.assert_array_equal(gli.brain_mask, any_signal)


def test_geometry_keeps_the_source_affine_and_header(gli, gli_dir: Path) -> None:
    source = nib.load(str(gli_dir / f"{GLI}-t1n.nii.gz"))
    np.testing.assert_array_equal(gli.geometry.affine, source.affine)
    assert gli.geometry.header.binaryblock == source.header.binaryblock
    assert gli.files["t1n"].name == f"{GLI}-t1n.nii.gz" and gli.files["seg"].name == f"{GLI}-seg.nii.gz"


def test_canonical_axes_point_superior_posterior_left(gli) -> None:
    """Axis 0 goes up (S), axis 1 to the back (P), axis 2 to the patient's left (L)."""
    assert nib.aff2axcodes(gli.geometry.canonical_affine) == CANONICAL_AXCODES == ("S", "P", "L")


def test_second_brats2023_case_loads_only_the_requested_modality(shared_data: Path) -> None:
    folder = shared_data / "brats2023" / "BraTS-GLI-00012-000"
    case = load_case(folder, modalities=["t2f"])
    assert list(case.images) == ["t2f"] and case.shape == SHAPE
    assert int(case.whole_tumour.sum()) == tumour_voxels(folder / "BraTS-GLI-00012-000-seg.nii.gz")
    with pytest.raises(InputError, match="has no t1n image"):
        case.image("t1n")


def test_brats2023_round_trips_through_save_volume(gli, gli_dir: Path, tmp_path: Path) -> None:
    for part, array in (("t1c", gli.images["t1c"]), ("seg", gli.seg)):
        source_path = gli_dir / f"{GLI}-{part}.nii.gz"
        written = save_volume(array, like=gli, path=tmp_path / f"{part}.nii.gz")
        saved, source = nib.load(str(written)), nib.load(str(source_path))
        assert saved.shape == source.shape
        np.testing.assert_array_equal(saved.affine, source.affine)
        np.testing.assert_array_equal(np.asanyarray(saved.dataobj), np.asanyarray(source.dataobj))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seg.nii.gz", "t1c.nii.gz"]  # no temporary left


def test_boolean_masks_save_as_uint8(gli, tmp_path: Path) -> None:
    saved = nib.load(str(save_volume(gli.whole_tumour, gli, tmp_path / "wt.nii.gz")))
    assert saved.get_data_dtype() == np.uint8
    assert int(np.asanyarray(saved.dataobj).sum()) == int(gli.whole_tumour.sum())


# --- BraTS 2013 (DeepMedic examples) ------------------------------------------------------------


def test_deepmedic_layout_loads_with_its_brain_mask(shared_data: Path, tmp_path: Path) -> None:
    folder = shared_data / "brats2013-deepmedic" / "pat0001"
    case = load_case(folder)
    assert case.layout == "brats2013-deepmedic" and case.case_id == "pat0001"
    assert sorted(case.images) == ["t1c", "t2f"]  # FLAIR is addressed as t2f
    assert case.shape == SHAPE and case.spacing == (1.0, 1.0, 1.0)
    flair = source_array(folder / "Flair_subtrMeanDivStd.nii.gz")
    np.testing.assert_array_equal(case.images["t2f"], flair.transpose(2, 1, 0))
    assert int(case.whole_tumour.sum()) == tumour_voxels(folder / "OTMultiClass.nii.gz")
    assert 4 in np.unique(case.seg)  # old label scheme: 4 = enhancing tumour, still part of the whole tumour
    provided = source_array(folder / "brainmask.nii.gz") > 0
    np.testing.assert_array_equal(case.brain_mask, provided.transpose(2, 1, 0))

    for name, array in (("Flair_subtrMeanDivStd", case.images["t2f"]), ("OTMultiClass", case.seg)):
        saved = nib.load(str(save_volume(array, case, tmp_path / f"{name}.nii.gz")))
        source = nib.load(str(folder / f"{name}.nii.gz"))
        assert saved.shape == source.shape
        np.testing.assert_array_equal(saved.affine, source.affine)
        np.testing.assert_array_equal(np.asanyarray(saved.dataobj), np.asanyarray(source.dataobj))


# --- BraTS 2020/2021 names, built from the real 2023 case ----------------------------------------

BRATS2020_SUFFIX = {"t1n": "t1", "t1c": "t1ce", "t2w": "t2", "t2f": "flair", "seg": "seg"}


def test_brats2020_layout_reads_the_same_volumes(gli, gli_dir: Path, tmp_path: Path) -> None:
    case_id = "BraTS20_Training_001"
    folder = tmp_path / case_id
    folder.mkdir()
    for part, suffix in BRATS2020_SUFFIX.items():
        shutil.copyfile(gli_dir / f"{GLI}-{part}.nii.gz", folder / f"{case_id}_{suffix}.nii.gz")
    case = load_case(folder)
    assert case.layout == "brats2020" and case.case_id == case_id
    assert case.shape == SHAPE and case.spacing == (1.0, 1.0, 1.0)
    for modality in MODALITIES:
        np.testing.assert_array_equal(case.images[modality], gli.images[modality])
    assert int(case.whole_tumour.sum()) == tumour_voxels(folder / f"{case_id}_seg.nii.gz")

    saved = nib.load(str(save_volume(case.images["t2f"], case, tmp_path / "out" / "flair.nii.gz")))
    source = nib.load(str(folder / f"{case_id}_flair.nii.gz"))
    assert saved.shape == source.shape
    np.testing.assert_array_equal(saved.affine, source.affine)
    np.testing.assert_array_equal(np.asanyarray(saved.dataobj), np.asanyarray(source.dataobj))


# --- Medical Segmentation Decathlon Task01 (4D), built from the real 2023 case ----------------------

MSD_CHANNELS = ("t2f", "t1n", "t1c", "t2w")  # dataset.json: 0 FLAIR, 1 T1w, 2 t1gd, 3 T2w


@pytest.fixture(scope="module")
def msd_root(tmp_path_factory: pytest.TempPathFactory, gli_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("msd")
    task = root / "Task01_BrainTumour"
    (task / "imagesTr").mkdir(parents=True)
    (task / "labelsTr").mkdir()
    first = nib.load(str(gli_dir / f"{GLI}-t1n.nii.gz"))
    stacked = np.stack([source_array(gli_dir / f"{GLI}-{m}.nii.gz") for m in MSD_CHANNELS], axis=-1)
    nib.save(nib.Nifti1Image(stacked, first.affine, first.header), str(task / "imagesTr" / "BRATS_001.nii.gz"))
    shutil.copyfile(gli_dir / f"{GLI}-seg.nii.gz", task / "labelsTr" / "BRATS_001.nii.gz")
    # The real Task01 archive carries macOS AppleDouble files beside each volume.
    (task / "imagesTr" / "._BRATS_001.nii.gz").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (task / "dataset.json").write_text(json.dumps({"name": "BRATS", "modality": {"0": "FLAIR"}}))
    return root


def test_msd_4d_case_maps_channels_to_modalities(msd_root: Path, gli, tmp_path: Path) -> None:
    image_file = msd_root / "Task01_BrainTumour" / "imagesTr" / "BRATS_001.nii.gz"
    label_file = msd_root / "Task01_BrainTumour" / "labelsTr" / "BRATS_001.nii.gz"
    case = load_case(image_file)
    assert case.layout == "msd-task01" and case.case_id == "BRATS_001"
    assert case.shape == SHAPE and case.spacing == (1.0, 1.0, 1.0)
    for modality in MODALITIES:
        np.testing.assert_array_equal(case.images[modality], gli.images[modality])
    assert int(case.whole_tumour.sum()) == tumour_voxels(label_file)

    saved = nib.load(str(save_volume(case.seg, case, tmp_path / "BRATS_001_seg.nii.gz")))
    source = nib.load(str(label_file))
    assert saved.shape == source.shape and saved.header.get_zooms() == source.header.get_zooms()
    np.testing.assert_array_equal(saved.affine, source.affine)
    np.testing.assert_array_equal(np.asanyarray(saved.dataobj), np.asanyarray(source.dataobj))


def test_msd_loads_only_requested_channel(msd_root: Path, gli) -> None:
    case = load_case(msd_root / "Task01_BrainTumour" / "imagesTr" / "BRATS_001.nii.gz", modalities=["t1c"])
    assert list(case.images) == ["t1c"]
    np.testing.assert_array_equal(case.images["t1c"], gli.images["t1c"])


def test_find_cases_in_an_msd_folder(msd_root: Path) -> None:
    expected = [msd_root / "Task01_BrainTumour" / "imagesTr" / "BRATS_001.nii.gz"]
    assert find_cases(msd_root / "Task01_BrainTumour") == expected
    assert find_cases(msd_root) == expected  # the task folder one level down
    assert case_id_of(expected[0]) == "BRATS_001"


# --- orientation independence -------------------------------------------------------------------


@pytest.mark.parametrize("axcodes", [("R", "A", "S"), ("A", "S", "R")])
def test_other_storage_orientation_gives_same_canonical_arrays(
    gli, gli_dir: Path, tmp_path: Path, axcodes: tuple[str, str, str]
) -> None:
    folder = tmp_path / GLI
    folder.mkdir()
    for part in ("t2f", "seg"):
        img = nib.load(str(gli_dir / f"{GLI}-{part}.nii.gz"))
        if axcodes == ("R", "A", "S"):
            moved = nib.as_closest_canonical(img)
        else:
            to_target = ornt_transform(io_orientation(img.affine), axcodes2ornt(axcodes))
            moved = img.as_reoriented(to_target)
        assert nib.aff2axcodes(moved.affine) == axcodes
        nib.save(moved, str(folder / f"{GLI}-{part}.nii.gz"))
    case = load_case(folder)
    assert case.shape == SHAPE and case.spacing == gli.spacing
    np.testing.assert_array_equal(case.images["t2f"], gli.images["t2f"])
    np.testing.assert_array_equal(case.seg, gli.seg)
    np.testing.assert_allclose(case.geometry.canonical_affine, gli.geometry.canonical_affine)

    # Saved back in the copy's own orientation, not the original's.
    source = nib.load(str(folder / f"{GLI}-seg.nii.gz"))
    saved = nib.load(str(save_volume(case.seg, case, tmp_path / "seg_out.nii.gz")))
    assert nib.aff2axcodes(saved.affine) == axcodes and saved.shape == source.shape
    np.testing.assert_array_equal(saved.affine, source.affine)
    np.testing.assert_array_equal(np.asanyarray(saved.dataobj), np.asanyarray(source.dataobj))


# --- custom layouts -----------------------------------------------------------------------------


def test_register_layout_reads_a_custom_naming(restore_layouts, gli_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "subject-7"
    folder.mkdir()
    shutil.copyfile(gli_dir / f"{GLI}-t2f.nii.gz", folder / "FLAIR_preop.nii.gz")
    shutil.copyfile(gli_dir / f"{GLI}-seg.nii.gz", folder / "tumor_mask.nii.gz")
    with pytest.raises(InputError, match="no recognisable modality"):
        load_case(folder)

    custom = Layout(name="hospital", modalities={"t2f": ("FLAIR_*",)}, seg=("tumor_mask",), description="FLAIR_*, tumor_mask")
    register_layout(custom)
    case = load_case(folder)
    assert case.layout == "hospital" and list(case.images) == ["t2f"]
    assert int(case.whole_tumour.sum()) == tumour_voxels(folder / "tumor_mask.nii.gz")
    assert find_cases(tmp_path) == [folder]

    register_layout(Layout(name="hospital", modalities={"t2f": ("FLAIR_*",)}, description="replaced"), first=False)
    assert [layout.name for layout in LAYOUTS].count("hospital") == 1 and LAYOUTS[-1].description == "replaced"
    assert load_case(folder).seg is None  # the replacement has no seg pattern


# --- finding cases ------------------------------------------------------------------------------


def test_find_cases_in_shared_data(shared_data: Path) -> None:
    found = find_cases(shared_data)
    assert [case_id_of(p) for p in found] == sorted(
        ["BraTS-GLI-00002-000", "BraTS-GLI-00012-000", "pat0001", "pat0002", "pat0003"]
    )
    assert all(p.is_dir() for p in found)  # the seg-only MET folder is not a case
    assert find_cases(shared_data / "brats2023" / GLI) == [shared_data / "brats2023" / GLI]


def test_met_seg_only_folder_is_a_clear_error(shared_data: Path) -> None:
    folder = shared_data / "brats2023-met-seg"
    with pytest.raises(InputError) as caught:
        load_case(folder)
    message = str(caught.value)
    assert "BraTS-MET-00001-000-seg.nii.gz" in message and "no image" in message and "\n" not in message
    with pytest.raises(InputError) as caught:  # find_cases passes the loader's reason on
        find_cases(folder)
    assert str(caught.value) == message


# --- patient-level splits -----------------------------------------------------------------------

SPLIT_IDS = [
    "BraTS-MET-00001-000", "BraTS-MET-00001-001", "BraTS-GLI-00002-000", "BraTS-GLI-00012-000",
    "BraTS-GLI-00020-000", "BraTS-GLI-00020-001", "pat0001", "pat0002", "pat0003", "BRATS_001",
]


def test_patient_id_drops_the_timepoint() -> None:
    assert patient_id("BraTS-MET-00001-001") == patient_id("BraTS-MET-00001-000") == "BraTS-MET-00001"
    assert patient_id("pat0001") == "pat0001"


@pytest.mark.parametrize("seed", range(12))
def test_split_keeps_each_patient_on_one_side(seed: int) -> None:
    split = split_cases(SPLIT_IDS, test_fraction=0.3, seed=seed)
    assert sorted(split.train + split.test) == sorted(SPLIT_IDS)
    test_patients = {patient_id(i) for i in split.test}
    assert not test_patients & {patient_id(i) for i in split.train}
    assert len(test_patients) == round(0.3 * 8)  # 8 patients
    assert ("BraTS-MET-00001-000" in split.test) == ("BraTS-MET-00001-001" in split.test)


def test_split_is_deterministic_for_a_seed_and_varies_with_it() -> None:
    assert split_cases(SPLIT_IDS, seed=3) == split_cases(list(reversed(SPLIT_IDS)), seed=3)
    assert len({tuple(split_cases(SPLIT_IDS, seed=s).test) for s in range(10)}) > 1


def test_split_accepts_case_paths(shared_data: Path) -> None:
    split = split_cases(find_cases(shared_data), test_fraction=0.4, seed=1)
    expected = ["BraTS-GLI-00002-000", "BraTS-GLI-00012-000", "pat0001", "pat0002", "pat0003"]
    assert sorted(split.train + split.test) == expected
    assert len(split.test) == 2


def test_split_round_trips_through_json(tmp_path: Path) -> None:
    split = split_cases(SPLIT_IDS, test_fraction=0.3, seed=7)
    path = save_split(split, tmp_path / "split.json")
    assert load_split(path) == split
    assert json.loads(path.read_text())["test"] == split.test


def test_split_files_that_mix_a_patient_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "split.json"
    mixed = {"train": ["BraTS-MET-00001-000"], "test": ["BraTS-MET-00001-001"], "seed": 0, "test_fraction": 0.5}
    path.write_text(json.dumps(mixed))
    with pytest.raises(InputError, match="both train and test"):
        load_split(path)
