"""Bad inputs (issue 11, classes 1, 2, 8 and 9): one line on stderr naming the file, exit 2, nothing written.

Every bad file is built here from a small synthetic BraTS 2023 case; header fields are patched in the raw
bytes (nibabel would refuse to write most of them). The CLI runs in-process with a tiny random backbone.
"""

from __future__ import annotations

import gzip
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from napari_clip_ad import build_method, run_volume
from napari_clip_ad.cli import main
from napari_clip_ad.engine import scale_slices
from napari_clip_ad.errors import InputError
from napari_clip_ad.io import find_cases, load_case, read_nifti
from napari_clip_ad.io import header as header_module
from napari_clip_ad.methods import smooth_maps

CASE = "BraTS-GLI-70001-000"
SHAPE = (10, 12, 6)  # source (x, y, z)
LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
TINY = ["--method", "vand", "--backbone", "tiny-test", "--device", "cpu", "--image-size", "32"]


def synthetic_image(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = np.zeros(SHAPE, np.float32)
    image[2:8, 2:10, 1:5] = rng.uniform(100, 900, (6, 8, 4))
    return image


def write_case(folder: Path, image: np.ndarray | None = None, seed: int = 0, **header_fields) -> Path:
    """A BraTS 2023 case folder (t2w + seg); ``header_fields`` are patched into the t2w header."""
    folder.mkdir(parents=True, exist_ok=True)
    image = synthetic_image(seed) if image is None else image
    seg = np.zeros(SHAPE, np.int16)
    seg[4:6, 5:8, 2:4] = 2
    t2w = folder / f"{folder.name}-t2w.nii.gz"
    nib.save(nib.Nifti1Image(image, LPS, dtype=image.dtype), t2w)
    nib.save(nib.Nifti1Image(seg, LPS, dtype=np.int16), folder / f"{folder.name}-seg.nii.gz")
    if header_fields:
        patch_header(t2w, **header_fields)
    return folder


def patch_header(path: Path, **fields) -> Path:
    """Overwrite NIfTI-1 header fields in place, bypassing nibabel's checks."""
    raw = bytearray(gzip.decompress(path.read_bytes()))
    header = nib.Nifti1Header(bytes(raw[:348]), check=False)
    for key, value in fields.items():
        header[key] = value
    raw[:348] = header.binaryblock
    path.write_bytes(gzip.compress(bytes(raw)))
    return path


def t2w(folder: Path) -> Path:
    return folder / f"{folder.name}-t2w.nii.gz"


def stored(path: Path, data: np.ndarray) -> Path:
    """Save ``data`` as the case's t2w with its own dtype."""
    nib.save(nib.Nifti1Image(data, LPS, dtype=data.dtype), path)
    return path


# --- builders of the bad-input corpus: each returns (path given to infer, name the error must contain) ---


def _header_case(**fields) -> Callable[[Path], tuple[Path, str]]:
    def build(root: Path) -> tuple[Path, str]:
        folder = write_case(root / CASE, **fields)
        return folder, t2w(folder).name
    return build


def _data_case(make: Callable[[], np.ndarray]) -> Callable[[Path], tuple[Path, str]]:
    def build(root: Path) -> tuple[Path, str]:
        folder = write_case(root / CASE)
        stored(t2w(folder), make())
        return folder, t2w(folder).name
    return build


def _rgb() -> np.ndarray:
    rgb = np.zeros(SHAPE, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    rgb["G"] = 7
    return rgb


def _claims_2gib(root: Path) -> tuple[Path, str]:
    """A 2 GiB float32 volume of zeros, gzip-compressed to about 2 MB (32 members of 64 MiB)."""
    folder = write_case(root / CASE)
    header = nib.Nifti1Header()
    header.set_data_shape((1024, 1024, 512))
    header.set_data_dtype(np.float32)
    header.set_qform(LPS, 1)
    header.set_sform(LPS, 1)
    header.set_zooms((1.0, 1.0, 1.0))
    header["vox_offset"] = 352
    head = header.binaryblock + b"\0" * 4
    member = gzip.compress(b"\0" * (64 << 20))
    t2w(folder).write_bytes(gzip.compress(head) + member * 32)
    return folder, t2w(folder).name


def _more_data_than_declared(root: Path) -> tuple[Path, str]:
    folder = write_case(root / CASE)
    plain = gzip.decompress(t2w(folder).read_bytes())
    t2w(folder).write_bytes(gzip.compress(plain + b"\0" * (8 << 20)))  # one stream, 8 MiB past the declared end
    return folder, t2w(folder).name


def _truncated_uncompressed(root: Path) -> tuple[Path, str]:
    folder = write_case(root / CASE)
    plain = gzip.decompress(t2w(folder).read_bytes())
    t2w(folder).unlink()
    path = folder / f"{CASE}-t2w.nii"
    path.write_bytes(plain[:-100])
    return folder, path.name


def _all_zero(root: Path) -> tuple[Path, str]:
    folder = write_case(root / CASE, image=np.zeros(SHAPE, np.float32))
    return folder, CASE


def _duplicate_modality(root: Path) -> tuple[Path, str]:
    folder = write_case(root / "cohort" / CASE)
    nib.save(nib.load(t2w(folder)), folder / f"{CASE}-t2w.nii")
    return root / "cohort", f"{CASE}-t2w.nii"


def _seg_only(root: Path) -> tuple[Path, str]:
    folder = write_case(root / CASE)
    t2w(folder).unlink()
    return folder, f"{CASE}-seg.nii.gz"


def _broken_link(root: Path) -> tuple[Path, str]:
    folder = write_case(root / "cohort" / CASE)
    t2w(folder).unlink()
    os.symlink(root / "gone" / "t2w.nii.gz", t2w(folder))
    return root / "cohort", t2w(folder).name


def _same_id_twice(root: Path) -> tuple[Path, str]:
    write_case(root / "cohort" / "site-a" / CASE)
    write_case(root / "cohort" / "site-b" / CASE)
    return root / "cohort", CASE


NAN = float("nan")
BAD_INPUTS: dict[str, tuple[Callable[[Path], tuple[Path, str]], str]] = {
    # class 1: headers
    "nan-sform": (_header_case(srow_x=[NAN, 0, 0, 0]), "NaN or infinite"),
    "singular-sform": (_header_case(srow_y=[0, 0, 0, 0]), "singular"),
    "sheared-sform": (_header_case(srow_x=[-1, 0.9, 0, 0], srow_y=[0, -0.3, 0, 0]), "degrees apart"),
    "nan-quaternion": (_header_case(sform_code=0, qform_code=1, quatern_b=NAN), "affine"),
    "zero-spacing": (_header_case(pixdim=[1, 0, 1, 1, 1, 1, 1, 1]), "voxel size (0, 1, 1)"),
    "negative-spacing": (_header_case(sform_code=0, pixdim=[1, -2, 1, 1, 1, 1, 1, 1]), "voxel size (-2, 1, 1)"),
    "absurd-spacing": (_header_case(sform_code=0, pixdim=[1, 1e30, 1, 1, 1, 1, 1, 1]), "voxel size (1e+30"),
    "nan-spacing": (_header_case(pixdim=[1, 1, NAN, 1, 1, 1, 1, 1]), "voxel size (1, nan"),
    "empty-axis": (_header_case(dim=[3, 10, 0, 6, 1, 1, 1, 1]), "empty or negative axis"),
    "unknown-voxel-type": (_header_case(datatype=999), "unknown NIfTI voxel type"),
    "binary-voxel-type": (_header_case(datatype=1, bitpix=1), "voxel type binary"),
    # class 1: voxel types and values
    "complex64": (_data_case(lambda: synthetic_image().astype(np.complex64) * 1j), "complex"),
    "complex128": (_data_case(lambda: synthetic_image().astype(np.complex128)), "complex"),
    "rgb24": (_data_case(_rgb), "colour (RGB)"),
    "float64-beyond-float32": (_data_case(lambda: synthetic_image().astype(np.float64) * 1e300), "float32 range"),
    "scaled-beyond-float32": (_header_case(scl_slope=1e38, scl_inter=0.0), "float32 range"),
    "nan-voxel": (_data_case(lambda: np.where(synthetic_image() > 800, np.nan, synthetic_image())), "NaN/inf voxels"),
    # class 2: resource limits
    "declares-2gib": (_claims_2gib, "2.00 GiB uncompressed"),
    "more-data-than-declared": (_more_data_than_declared, "more than"),
    "truncated-uncompressed": (_truncated_uncompressed, "truncated"),
    # class 8: silent surprises
    "all-zero-case": (_all_zero, "brain mask is empty"),
    "same-case-id-twice": (_same_id_twice, "also names"),
    # class 9: the loader's precise reason through find_cases
    "duplicate-modality-files": (_duplicate_modality, "matches several files"),
    "seg-only-folder": (_seg_only, "only a segmentation"),
    "broken-symlink": (_broken_link, "broken symbolic link"),
}


def one_error_line(err: str, names: str, says: str) -> str:
    # The tiny backbone's "results come from random weights" note is the one other line allowed.
    lines = [line for line in err.strip().splitlines() if not line.startswith("note: backbone tiny-test")]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and names in lines[0] and says in lines[0], lines[0]
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture()
def out_with_a_file(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    (out / "earlier.txt").write_text("an earlier result")
    return out


def assert_unchanged(out: Path) -> None:
    assert sorted(p.name for p in out.iterdir()) == ["earlier.txt"]
    assert (out / "earlier.txt").read_text() == "an earlier result"


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_infer_refuses_bad_input_with_one_line(name, tmp_path, out_with_a_file, capsys):
    build, says = BAD_INPUTS[name]
    path, names = build(tmp_path / "in")
    assert main(["infer", str(path), *TINY, "--out", str(out_with_a_file)]) == 2
    one_error_line(capsys.readouterr().err, names, says)
    assert_unchanged(out_with_a_file)


def test_negative_sigma_is_refused(tmp_path, out_with_a_file, capsys):
    folder = write_case(tmp_path / CASE)
    assert main(["infer", str(folder), *TINY, "--sigma", "-2", "--out", str(out_with_a_file)]) == 2
    one_error_line(capsys.readouterr().err, "sigma -2", ">= 0")
    assert_unchanged(out_with_a_file)


def test_evaluate_refuses_an_all_zero_case_as_infer_does(tmp_path, out_with_a_file, capsys):
    cohort = tmp_path / "cohort"
    folder = write_case(cohort / CASE, image=np.zeros(SHAPE, np.float32))
    maps = tmp_path / "maps"
    maps.mkdir()
    nib.save(nib.Nifti1Image(np.zeros(SHAPE, np.float32), LPS), maps / f"{CASE}_anomaly.nii.gz")
    assert main(["evaluate", "--maps", str(maps), "--data", str(cohort), "--out", str(out_with_a_file)]) == 2
    one_error_line(capsys.readouterr().err, CASE, "brain mask is empty (all-zero image or mask)")
    assert main(["infer", str(folder), *TINY, "--out", str(out_with_a_file)]) == 2
    one_error_line(capsys.readouterr().err, CASE, "brain mask is empty (all-zero image or mask)")
    assert_unchanged(out_with_a_file)


def test_evaluate_names_and_counts_cases_without_a_map(tmp_path, capsys):
    cohort = tmp_path / "cohort"
    ids = [f"BraTS-GLI-7000{i}-000" for i in range(1, 5)]
    for seed, case_id in enumerate(ids):
        write_case(cohort / case_id, seed=seed)
    maps = tmp_path / "maps"
    maps.mkdir()
    rng = np.random.default_rng(0)
    for case_id in ids[:3]:
        nib.save(nib.Nifti1Image(rng.random(SHAPE).astype(np.float32), LPS), maps / f"{case_id}_anomaly.nii.gz")
    out = tmp_path / "eval"
    assert main(["evaluate", "--maps", str(maps), "--data", str(cohort), "--out", str(out)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: 1 of 4 cases") and ids[3] in err[0]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_cases"] == 3 and summary["n_cases_missing_map"] == 1 and summary["missing_maps"] == [ids[3]]


def test_a_symlink_loop_lists_each_case_once(tmp_path):
    cohort = tmp_path / "cohort"
    write_case(cohort / "site" / CASE)
    os.symlink(cohort, cohort / "site" / "loop")  # cohort/site/loop/site/loop/... forever
    os.symlink(cohort / "site" / CASE, cohort / "alias")  # the same case under a second name
    assert find_cases(cohort) == [cohort / "site" / CASE]


def test_a_broken_link_of_an_unused_modality_does_not_block_the_case(tmp_path):
    folder = write_case(tmp_path / CASE)
    os.symlink(tmp_path / "gone.nii.gz", folder / f"{CASE}-t1c.nii.gz")
    assert list(load_case(folder, modalities=["t2w"]).images) == ["t2w"]
    with pytest.raises(InputError, match="broken symbolic link"):
        load_case(folder)


def test_an_error_after_a_progress_bar_starts_on_its_own_line(monkeypatch, capsys, tmp_path):
    """A bar drawn when the error comes (e.g. inside run_volume) must not share the error's line."""
    from tqdm import tqdm

    import napari_clip_ad.commands.infer as infer_command

    def fails_mid_run(args):
        bar = tqdm(total=10, desc="case", file=sys.stderr, disable=False, leave=False)
        bar.update(4)
        raise InputError("a failure inside the run")

    monkeypatch.setattr(infer_command, "run", fails_mid_run)
    assert main(["infer", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "case" in err  # the bar was drawn
    assert "error: a failure inside the run" in err.split("\n")


def test_on_a_terminal_the_error_line_is_cleared_from_its_start(monkeypatch):
    """Nested bars: the outer loop's bar closes first and leaves the cursor mid-line on the inner bar's line."""
    import io

    from tqdm import tqdm

    import napari_clip_ad.commands.infer as infer_command

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)

    def fails_in_a_nested_loop(args):
        for _ in tqdm(range(2), desc="cases", file=sys.stderr, ncols=80):
            inner = tqdm(total=4, desc="slices", file=sys.stderr, leave=False, ncols=80)
            inner.update(2)
            raise InputError("a failure inside the run")

    monkeypatch.setattr(infer_command, "run", fails_in_a_nested_loop)
    assert main(["infer", "somewhere", "--out", "elsewhere"]) == 2
    before, found, _ = terminal.getvalue().rpartition("error: a failure inside the run")
    assert found and "slices" in before
    assert before.endswith("\r\x1b[K")  # back to column 0, the rest of the line erased


# --- the same rules through the library ------------------------------------------------------------


@pytest.fixture(scope="module")
def vand():
    return build_method("vand", "tiny-test", device="cpu", image_size=32)


def test_size_limit_and_memory_are_checked_before_decompressing(tmp_path, monkeypatch):
    folder, _ = _claims_2gib(tmp_path)
    path = t2w(folder)
    assert path.stat().st_size < 4 << 20
    with pytest.raises(InputError, match=r"2\.00 GiB uncompressed\), above the 1\.00 GiB limit"):
        read_nifti(path)
    monkeypatch.setenv(header_module.MAX_VOLUME_GB_ENV, "8")
    monkeypatch.setattr(header_module, "available_memory", lambda: 1 << 30)
    with pytest.raises(InputError, match=r"needs about 6\.00 GiB of memory and only 1\.00 GiB is available"):
        read_nifti(path)
    monkeypatch.setenv(header_module.MAX_VOLUME_GB_ENV, "1e-6")
    with pytest.raises(InputError, match=header_module.MAX_VOLUME_GB_ENV):
        load_case(write_case(tmp_path / "small" / CASE))


def test_multi_member_gzip_within_the_declared_size_loads(tmp_path):
    folder = write_case(tmp_path / CASE)
    plain = gzip.decompress(t2w(folder).read_bytes())
    t2w(folder).write_bytes(b"".join(gzip.compress(plain[i : i + 700]) for i in range(0, len(plain), 700)))
    np.testing.assert_array_equal(read_nifti(t2w(folder))[0], synthetic_image())
    corrupt = bytearray(t2w(folder).read_bytes())
    corrupt[-3] ^= 0xFF  # the last member's length field
    t2w(folder).write_bytes(bytes(corrupt))
    with pytest.raises(InputError, match="corrupt gzip|truncated"):
        read_nifti(t2w(folder))


def test_an_oblique_and_mildly_sheared_affine_is_accepted(tmp_path):
    angle = np.radians(25)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.array([[1, 0.2, 0], [0, 1, 0], [0, 0, 2.5]])
    folder = write_case(tmp_path / CASE)
    nib.save(nib.Nifti1Image(synthetic_image(), affine), t2w(folder))
    nib.save(nib.Nifti1Image(np.zeros(SHAPE, np.int16), affine), folder / f"{CASE}-seg.nii.gz")
    case = load_case(folder)
    assert case.shape == (6, 12, 10) and case.spacing == pytest.approx((2.5, 1.02, 1.0), rel=1e-2)


@pytest.mark.parametrize(
    ("volume", "says"),
    [
        (synthetic_image().astype(np.float64).transpose(2, 1, 0) * 1e300, "float32 range"),
        (synthetic_image().transpose(2, 1, 0) > 500, "bool"),
        (synthetic_image().transpose(2, 1, 0).astype(np.complex64), "complex"),
        (synthetic_image().transpose(2, 1, 0).astype(object), "object"),
        (np.zeros((6, 12, 10), np.float32), "brain mask is empty"),
        (np.zeros((0, 12, 10), np.float32), "non-empty 3D"),
    ],
    ids=["float64-1e300", "bool", "complex", "object", "all-zero", "empty"],
)
def test_run_volume_refuses_unusable_arrays(vand, volume, says):
    with pytest.raises(InputError, match=says):
        run_volume(volume, vand)


def test_finite_values_near_the_float32_limit_give_a_finite_map(vand):
    rng = np.random.default_rng(1)
    volume = (rng.random((4, 9, 9)) * 6.6e38 - 3.3e38).astype(np.float32)
    assert np.isfinite(volume).all()
    result = run_volume(volume, vand)
    assert np.isfinite(result.anomaly_map).all() and result.anomaly_map.shape == volume.shape
    scaled = scale_slices(torch.from_numpy(volume[:, None]))
    wide = volume.astype(np.float64)
    expected = (wide - wide.min(axis=(1, 2), keepdims=True)) / np.ptp(wide, axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(scaled[:, 0].numpy(), expected, atol=1e-6)


def test_scale_slices_is_unchanged_for_ordinary_values():
    x = torch.rand(3, 2, 5, 5) * 1000
    flat = x.flatten(2)
    low = flat.amin(2, keepdim=True)
    assert torch.equal(scale_slices(x), ((flat - low) / (flat.amax(2, keepdim=True) - low)).view_as(x))


@pytest.mark.parametrize("sigma", [-2.0, float("nan"), float("inf")])
def test_negative_or_non_finite_sigma_is_refused_by_the_library(vand, sigma):
    volume = synthetic_image().transpose(2, 1, 0)
    with pytest.raises(InputError, match="sigma"):
        run_volume(volume, vand, sigma=sigma)
    with pytest.raises(InputError, match="sigma"):
        smooth_maps(torch.zeros(2, 4, 4), sigma)
    assert torch.equal(smooth_maps(torch.ones(2, 4, 4), 0), torch.ones(2, 4, 4))


def test_training_free_method_is_not_described_as_released_weights(tmp_path, capsys):
    cohort = tmp_path / "cohort"
    write_case(cohort / CASE)
    assert main(["train", "--method", "anovl", "--setup", "brats", "--data", str(cohort), "--out", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    assert "anovl runs 0 epochs" in err and "None" not in err
