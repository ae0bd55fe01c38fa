"""Broken input: every case is one InputError line that names the file and the problem; failed saves leave nothing."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from napari_clip_ad.errors import InputError
from napari_clip_ad.io import load_case, load_split, read_nifti, save_volume

GLI = "BraTS-GLI-00002-000"
CASE = "BraTS-X-00001-000"
CROP = (slice(80, 144), slice(80, 144), slice(60, 92))  # 64 x 64 x 32 voxels around the tumour


def one_line_error(call, *args, names: str, **kwargs) -> str:
    """Run ``call`` expecting an InputError whose single-line message names ``names``."""
    with pytest.raises(InputError) as caught:
        call(*args, **kwargs)
    message = str(caught.value)
    assert names in message, message
    assert "\n" not in message, message
    return message


@pytest.fixture(scope="module")
def real_t2f(shared_data: Path) -> Path:
    return shared_data / "brats2023" / GLI / f"{GLI}-t2f.nii.gz"


@pytest.fixture(scope="module")
def crops(shared_data: Path):
    """Small crops of the real t2f and seg (source layout) with their affine and headers."""
    folder = shared_data / "brats2023" / GLI
    images = {part: nib.load(str(folder / f"{GLI}-{part}.nii.gz")) for part in ("t2f", "seg")}
    arrays = {part: np.asanyarray(img.dataobj)[CROP] for part, img in images.items()}
    return arrays, images["t2f"].affine, {part: img.header for part, img in images.items()}


def write_case(folder: Path, crops, image=None, seg=None, seg_affine=None) -> Path:
    """A BraTS 2023 style case folder of cropped real data, with optional replaced parts."""
    arrays, affine, headers = crops
    folder.mkdir(parents=True, exist_ok=True)
    image = arrays["t2f"] if image is None else image
    seg = arrays["seg"] if seg is None else seg
    # The arrays' own dtype is stored (the real headers would cast a float NaN into int16).
    nib.save(nib.Nifti1Image(image, affine, headers["t2f"], dtype=image.dtype), str(folder / f"{CASE}-t2f.nii.gz"))
    seg_img = nib.Nifti1Image(seg, affine if seg_affine is None else seg_affine, headers["seg"], dtype=seg.dtype)
    nib.save(seg_img, str(folder / f"{CASE}-seg.nii.gz"))
    return folder


def test_the_cropped_case_itself_loads(crops, tmp_path: Path) -> None:
    """Guards the fixtures: each failure below comes from the one change it makes."""
    case = load_case(write_case(tmp_path / CASE, crops))
    assert case.shape == (32, 64, 64) and int(case.whole_tumour.sum()) == int((crops[0]["seg"] > 0).sum()) > 0


def test_missing_folder(tmp_path: Path) -> None:
    message = one_line_error(load_case, tmp_path / "no-such-case", names="no-such-case")
    assert "no such case folder" in message


def test_folder_without_a_recognisable_modality(tmp_path: Path) -> None:
    folder = tmp_path / "strange-case"
    folder.mkdir()
    (folder / "notes.txt").write_text("scan notes")
    (folder / "strange-case-dwi.nii.gz").write_bytes(b"")
    message = one_line_error(load_case, folder, names="strange-case")
    assert "no recognisable modality" in message and "t2f" in message


def test_unknown_modality_name(real_t2f: Path) -> None:
    message = one_line_error(load_case, real_t2f.parent, modalities=["flair"], names="flair")
    assert "t2f" in message  # tells the user FLAIR is t2f


def test_truncated_gzip(real_t2f: Path, tmp_path: Path) -> None:
    folder = tmp_path / CASE
    folder.mkdir()
    raw = real_t2f.read_bytes()
    (folder / f"{CASE}-t2f.nii.gz").write_bytes(raw[: len(raw) // 2])
    message = one_line_error(load_case, folder, names=f"{CASE}-t2f.nii.gz")
    assert "truncated" in message


def test_corrupt_gzip_with_flipped_bytes(real_t2f: Path, tmp_path: Path) -> None:
    """nibabel alone loads this as silent garbage (it never checks the gzip CRC); we refuse it."""
    folder = tmp_path / CASE
    folder.mkdir()
    raw = bytearray(real_t2f.read_bytes())
    middle = len(raw) // 2
    raw[middle : middle + 64] = bytes(b ^ 0xFF for b in raw[middle : middle + 64])
    (folder / f"{CASE}-t2f.nii.gz").write_bytes(bytes(raw))
    message = one_line_error(load_case, folder, names=f"{CASE}-t2f.nii.gz")
    assert "corrupt" in message


def test_text_file_named_nii_gz(tmp_path: Path) -> None:
    folder = tmp_path / CASE
    folder.mkdir()
    (folder / f"{CASE}-t2f.nii.gz").write_text("this is not an image\nsecond line\n")
    message = one_line_error(load_case, folder, names=f"{CASE}-t2f.nii.gz")
    assert "not gzip" in message


def test_gzipped_text_named_nii_gz(tmp_path: Path) -> None:
    path = tmp_path / "fake.nii.gz"
    path.write_bytes(gzip.compress(b"hello, not a NIfTI header at all" * 20))
    assert "not a NIfTI file" in one_line_error(read_nifti, path, names="fake.nii.gz")


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.nii.gz"
    path.touch()
    assert "empty" in one_line_error(read_nifti, path, names="empty.nii.gz")


def test_uncompressed_nifti_misnamed_gz_still_loads(crops, tmp_path: Path) -> None:
    folder = write_case(tmp_path / CASE, crops)
    path = folder / f"{CASE}-t2f.nii.gz"
    path.write_bytes(gzip.decompress(path.read_bytes()))
    np.testing.assert_array_equal(load_case(folder).images["t2f"], crops[0]["t2f"].transpose(2, 1, 0))


def test_multi_member_gzip_still_loads(crops, tmp_path: Path) -> None:
    """Concatenated gzip members (bgzip, ``cat a.gz b.gz``) are valid gzip: every member is read."""
    folder = write_case(tmp_path / CASE, crops)
    path = folder / f"{CASE}-t2f.nii.gz"
    plain = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(plain[:1000]) + gzip.compress(plain[1000:]))
    np.testing.assert_array_equal(load_case(folder).images["t2f"], crops[0]["t2f"].transpose(2, 1, 0))


def test_multi_member_gzip_with_a_truncated_member(crops, tmp_path: Path) -> None:
    folder = write_case(tmp_path / CASE, crops)
    path = folder / f"{CASE}-t2f.nii.gz"
    plain = gzip.decompress(path.read_bytes())
    second = gzip.compress(plain[1000:])
    path.write_bytes(gzip.compress(plain[:1000]) + second[: len(second) // 2])
    assert "truncated" in one_line_error(load_case, folder, names=f"{CASE}-t2f.nii.gz")


@pytest.mark.parametrize("which", ["2d", "4d"])
def test_image_that_is_not_3d(crops, tmp_path: Path, which: str) -> None:
    t2f = crops[0]["t2f"]
    image = t2f[:, :, 10] if which == "2d" else np.stack([t2f, t2f], axis=-1)
    folder = write_case(tmp_path / CASE, crops, image=image)
    message = one_line_error(load_case, folder, names=f"{CASE}-t2f.nii.gz")
    assert "expected a 3D volume" in message and str(tuple(image.shape)) in message


def test_seg_with_a_different_shape(crops, tmp_path: Path) -> None:
    folder = write_case(tmp_path / CASE, crops, seg=crops[0]["seg"][:, :, :-2])
    message = one_line_error(load_case, folder, names=f"{CASE}-seg.nii.gz")
    assert "shape (64, 64, 30)" in message


def test_seg_with_a_different_affine(crops, tmp_path: Path) -> None:
    shifted = crops[1].copy()
    shifted[:3, 3] += (0.0, 0.0, 5.0)
    folder = write_case(tmp_path / CASE, crops, seg_affine=shifted)
    message = one_line_error(load_case, folder, names=f"{CASE}-seg.nii.gz")
    assert "affine differs" in message


def test_images_on_different_grids(crops, tmp_path: Path) -> None:
    folder = write_case(tmp_path / CASE, crops)
    arrays, affine, headers = crops
    nib.save(nib.Nifti1Image(arrays["t2f"][:-1], affine, headers["t2f"]), str(folder / f"{CASE}-t1c.nii.gz"))
    one_line_error(load_case, folder, names=f"{CASE}-t2f.nii.gz")  # t1c is read first, then t2f mismatches


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
def test_non_finite_voxels(crops, tmp_path: Path, bad_value: float) -> None:
    image = crops[0]["t2f"].astype(np.float32)
    image[5, 6, 7] = bad_value
    folder = write_case(tmp_path / CASE, crops, image=image)
    message = one_line_error(load_case, folder, names=f"{CASE}-t2f.nii.gz")
    assert "1 NaN/inf voxels" in message


def test_non_finite_labels(crops, tmp_path: Path) -> None:
    seg = crops[0]["seg"].astype(np.float32)
    seg[0, 0, 0] = np.nan
    folder = write_case(tmp_path / CASE, crops, seg=seg)
    assert "NaN/inf" in one_line_error(load_case, folder, names=f"{CASE}-seg.nii.gz")


def test_unknown_label_value(crops, tmp_path: Path) -> None:
    seg = crops[0]["seg"].copy()
    seg[0, 0, 0] = 7
    folder = write_case(tmp_path / CASE, crops, seg=seg)
    message = one_line_error(load_case, folder, names=f"{CASE}-seg.nii.gz")
    assert "unknown label values [7]" in message


def test_label_4_is_unknown_in_the_brats2023_scheme(crops, tmp_path: Path) -> None:
    seg = crops[0]["seg"].copy()
    seg[seg == 3] = 4  # BraTS 2021 enhancing label in a 2023-named case
    folder = write_case(tmp_path / CASE, crops, seg=seg)
    assert "unknown label values [4]" in one_line_error(load_case, folder, names=f"{CASE}-seg.nii.gz")


def test_non_integer_labels(crops, tmp_path: Path) -> None:
    seg = crops[0]["seg"].astype(np.float32)
    seg[seg == 2] = 1.5
    folder = write_case(tmp_path / CASE, crops, seg=seg)
    assert "non-integer" in one_line_error(load_case, folder, names=f"{CASE}-seg.nii.gz")


def test_save_volume_with_a_wrong_shape_keeps_the_old_file(crops, tmp_path: Path) -> None:
    case = load_case(write_case(tmp_path / CASE, crops))
    out = tmp_path / "out"
    out.mkdir()
    target = out / "score.nii.gz"
    target.write_bytes(b"previous result")
    message = one_line_error(save_volume, np.zeros((64, 64, 32), np.float32), case, target, names="score.nii.gz")
    assert "(64, 64, 32)" in message and "(32, 64, 64)" in message
    assert target.read_bytes() == b"previous result"
    assert sorted(p.name for p in out.iterdir()) == ["score.nii.gz"]


def test_save_volume_with_an_unstorable_dtype(crops, tmp_path: Path) -> None:
    case = load_case(write_case(tmp_path / CASE, crops))
    array = np.empty(case.shape, dtype=object)
    one_line_error(save_volume, array, case, tmp_path / "out" / "objects.nii.gz", names="objects.nii.gz")
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_failed_write_leaves_no_partial_file(crops, tmp_path: Path) -> None:
    """The volume is fully written to a temporary, then the move fails: nothing is left behind."""
    case = load_case(write_case(tmp_path / CASE, crops))
    out = tmp_path / "out"
    (out / "score.nii.gz").mkdir(parents=True)  # a folder in the way of the output file
    message = one_line_error(save_volume, case.images["t2f"], case, out / "score.nii.gz", names="score.nii.gz")
    assert "cannot write" in message
    assert [p.name for p in out.iterdir()] == ["score.nii.gz"] and (out / "score.nii.gz").is_dir()


def test_save_volume_needs_a_nifti_name(crops, tmp_path: Path) -> None:
    case = load_case(write_case(tmp_path / CASE, crops))
    one_line_error(save_volume, case.images["t2f"], case, tmp_path / "score.npy", names="score.npy")
    assert not (tmp_path / "score.npy").exists()


def test_single_file_that_is_not_a_case(real_t2f: Path) -> None:
    message = one_line_error(load_case, real_t2f, names=real_t2f.name)
    assert "not a case" in message


def test_broken_split_file(tmp_path: Path) -> None:
    path = tmp_path / "split.json"
    path.write_text("{not json")
    one_line_error(load_split, path, names="split.json")
    path.write_text(json.dumps({"train": "abc", "test": [], "seed": 0, "test_fraction": 0.3}))
    one_line_error(load_split, path, names="split.json")
    one_line_error(load_split, tmp_path / "missing.json", names="missing.json")
