"""The embedded synthetic BraTS-like case and the ``sample`` command."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from napari_clip_ad import sample_case
from napari_clip_ad.cli import main
from napari_clip_ad.io import Case, find_cases, load_case
from napari_clip_ad.sample.anatomy import tissue_maps

MODALITIES = ("t1n", "t1c", "t2w", "t2f")
REAL_CASE = "brats2023/BraTS-GLI-00002-000"


@pytest.fixture(scope="module")
def case() -> Case:
    return sample_case(seed=0)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two cases (seeds 0 and 1) written by the CLI into a folder that already holds other content."""
    out = tmp_path_factory.mktemp("cohort")
    (out / "notes.txt").write_text("not a case")
    assert main(["sample", str(out), "--n-cases", "2", "--seed", "0"]) == 0
    return out


def _tissue_mean(case: Case, modality: str, region: np.ndarray) -> float:
    assert region.sum() > 100
    return float(case.images[modality][region].mean())


def test_grid_matches_real_brats(case: Case, shared_data: Path) -> None:
    real = load_case(shared_data / REAL_CASE, modalities=["t1n"])
    assert case.shape == (155, 240, 240) == real.shape
    assert case.spacing == (1.0, 1.0, 1.0)
    np.testing.assert_array_equal(case.geometry.affine, real.geometry.affine)
    np.testing.assert_array_equal(case.geometry.transform, real.geometry.transform)
    # The template brain sits where real BraTS brains are.
    dice = 2 * np.sum(case.brain_mask & real.brain_mask) / (case.brain_mask.sum() + real.brain_mask.sum())
    assert dice > 0.85


def test_images_are_skull_stripped_float32(case: Case) -> None:
    assert set(case.images) == set(MODALITIES)
    for modality, volume in case.images.items():
        assert volume.dtype == np.float32 and volume.shape == case.shape, modality
        assert np.all(volume[~case.brain_mask] == 0), modality
        assert np.all(volume[case.brain_mask] > 0), modality
    assert 1.2e6 < case.brain_mask.sum() < 1.8e6  # 1.2-1.8 litres of brain


def test_labels_nest_like_metastases(case: Case) -> None:
    seg = case.seg
    assert seg is not None and seg.dtype == np.int16
    assert set(np.unique(seg).tolist()) == {0, 1, 2, 3}
    assert not np.any((seg > 0) & ~case.brain_mask)
    tumour = np.isin(seg, (1, 3))
    core = seg == 1
    # Every neighbour of a necrotic voxel is necrosis or enhancing rim: the rim wraps the core.
    assert not np.any(ndimage.binary_dilation(core) & ~tumour)
    # Edema lies outside the lesions, never enclosed by them.
    assert not np.any(ndimage.binary_fill_holes(tumour) & (seg == 2))
    assert np.all(case.whole_tumour == (seg > 0))


def test_several_lesions_of_varied_size(case: Case) -> None:
    components, n = ndimage.label(case.seg > 0)
    assert n >= 3
    volumes_cm3 = np.bincount(components.ravel())[1:] / 1000.0  # 1 mm voxels
    assert volumes_cm3.min() < 1.0
    assert volumes_cm3.max() > 5.0
    # Each lesion has an enhancing part (metastases enhance), the largest a necrotic core.
    largest = components == (np.argmax(volumes_cm3) + 1)
    assert np.any(case.seg[largest] == 1)
    for index in range(1, n + 1):
        assert np.any(case.seg[components == index] == 3)


def test_some_lesion_near_brain_surface(case: Case) -> None:
    depth = tissue_maps().depth
    enhancing, n = ndimage.label(case.seg == 3)
    nearest = ndimage.minimum(depth, enhancing, index=np.arange(1, n + 1))
    assert np.min(nearest) < 10.0


def test_contrasts_ordered_like_brats(case: Case) -> None:
    maps = tissue_maps()
    healthy = case.seg == 0
    wm, gm, csf = (healthy & (p > 0.9) for p in (maps.wm, maps.gm, maps.csf))
    edema, rim, core = (case.seg == v for v in (2, 3, 1))

    def mean(modality: str, region: np.ndarray) -> float:
        return _tissue_mean(case, modality, region)

    for t1 in ("t1n", "t1c"):
        assert mean(t1, wm) > mean(t1, gm) > mean(t1, csf)
    assert mean("t2w", csf) > mean("t2w", gm) > mean("t2w", wm)
    assert mean("t2f", gm) > mean("t2f", wm) > mean("t2f", csf)
    assert mean("t2w", edema) > mean("t2w", wm)
    assert mean("t2f", edema) > max(mean("t2f", wm), mean("t2f", gm))
    # The rim enhances: brighter than white matter on t1c, not on t1n.
    assert mean("t1c", rim) / mean("t1c", wm) > 1.3
    assert mean("t1n", rim) / mean("t1n", wm) < 1.0
    assert mean("t1c", core) < mean("t1c", rim)


def test_cli_writes_loadable_brats_folders(cohort: Path, case: Case) -> None:
    folders = find_cases(cohort)
    assert [f.name for f in folders] == ["BraTS-SYN-00000-000", "BraTS-SYN-00001-000"]
    names = sorted(p.name for p in folders[0].iterdir())
    assert names == sorted(f"BraTS-SYN-00000-000-{m}.nii.gz" for m in (*MODALITIES, "seg"))
    loaded = load_case(folders[0])
    assert loaded.layout == "brats2023" and loaded.case_id == case.case_id
    # Written and reloaded equals built in memory (and a second build of the same seed is identical).
    for modality in MODALITIES:
        np.testing.assert_array_equal(loaded.images[modality], case.images[modality])
    np.testing.assert_array_equal(loaded.seg, case.seg)
    np.testing.assert_array_equal(loaded.brain_mask, case.brain_mask)
    np.testing.assert_array_equal(loaded.geometry.affine, case.geometry.affine)


def test_file_dtypes_like_brats(cohort: Path) -> None:
    import nibabel as nib

    folder = cohort / "BraTS-SYN-00000-000"
    for modality in MODALITIES:
        assert nib.load(folder / f"BraTS-SYN-00000-000-{modality}.nii.gz").get_data_dtype() == np.int16
    assert nib.load(folder / "BraTS-SYN-00000-000-seg.nii.gz").get_data_dtype() == np.uint8


def test_different_seed_different_lesions(cohort: Path, case: Case) -> None:
    other = load_case(cohort / "BraTS-SYN-00001-000")
    assert other.seg is not None
    dice = 2 * np.sum((other.seg > 0) & (case.seg > 0)) / (np.sum(other.seg > 0) + np.sum(case.seg > 0))
    assert dice < 0.5
    assert not np.array_equal(other.images["t1n"], case.images["t1n"])


def test_cli_refuses_to_overwrite(cohort: Path, capsys: pytest.CaptureFixture[str]) -> None:
    seg = cohort / "BraTS-SYN-00001-000" / "BraTS-SYN-00001-000-seg.nii.gz"
    before = seg.stat().st_mtime_ns
    capsys.readouterr()
    assert main(["sample", str(cohort), "--n-cases", "1", "--seed", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "--overwrite" in err and "\n" not in err
    assert seg.stat().st_mtime_ns == before
    assert (cohort / "notes.txt").read_text() == "not a case"


def test_cli_overwrites_when_asked(cohort: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = cohort / "BraTS-SYN-00001-000"
    before = load_case(folder)
    seg = folder / "BraTS-SYN-00001-000-seg.nii.gz"
    seg.write_bytes(b"broken")
    capsys.readouterr()
    assert main(["sample", str(cohort), "--n-cases", "1", "--seed", "1", "--overwrite"]) == 0
    printed = capsys.readouterr().out.split()
    assert len(printed) == 5 and str(seg) in printed
    np.testing.assert_array_equal(load_case(folder).seg, before.seg)


@pytest.mark.parametrize(
    "argv",
    [["--n-cases", "0"], ["--seed", "-1"], ["--seed", "99999", "--n-cases", "2"]],
)
def test_cli_rejects_bad_counts_and_seeds(tmp_path: Path, argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sample", str(tmp_path / "out"), *argv]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert not (tmp_path / "out").exists()


def test_cli_rejects_file_as_out_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "file.txt"
    target.write_text("x")
    assert main(["sample", str(target), "--n-cases", "1"]) == 2
    assert "not a folder" in capsys.readouterr().err
