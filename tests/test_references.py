"""Reference slices for few-shot: drawn from normal data, never from the analysed case (crops of real cases)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from napari_clip_ad import build_method
from napari_clip_ad.engine import preprocess_slices
from napari_clip_ad.errors import InputError
from napari_clip_ad.io import find_cases, load_case
from napari_clip_ad.references import load_references

CROP = (slice(40, 200), slice(40, 200), slice(20, 70))
"""Source (x, y, z): 160 x 160 px, axial slices 20..69 (tumour from 33 in case 00002, from 58 in 00012)."""
ANALYSED = "BraTS-GLI-00002-000"
SAME_PATIENT = "BraTS-GLI-00002-001"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory, crop_real_cohort) -> Path:
    """Two real cases plus a second time point of the analysed patient (a copy under its own id)."""
    root = crop_real_cohort(tmp_path_factory.mktemp("refs") / "cohort", CROP)
    (root / SAME_PATIENT).mkdir()
    for part in (root / ANALYSED).iterdir():
        shutil.copy(part, root / SAME_PATIENT / part.name.replace(ANALYSED, SAME_PATIENT))
    return root


@pytest.fixture(scope="module")
def method():
    return build_method("vand", "tiny-test", device="cpu")


def engine_input(case_path: Path, index: int, modalities: list[str], method) -> torch.Tensor:
    case = load_case(case_path, modalities=modalities)
    raw = case.images[modalities[0]][index] if len(modalities) == 1 else np.stack([case.images[m][index] for m in modalities])
    return preprocess_slices(torch.from_numpy(raw)[None], method.image_size, method.backbone.mean, method.backbone.std)[0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auto_never_uses_the_analysed_case_or_its_patient(cohort: Path, method, seed: int) -> None:
    cases = find_cases(cohort)
    assert len(cases) == 3
    refs = load_references("auto", method, k_shot=4, training_cases=cases, exclude_case_id=ANALYSED, seed=seed)
    drawn = refs.provenance["references"]
    assert refs.images.shape == (4, 3, 240, 240) and len(drawn) == 4
    assert {d["case_id"] for d in drawn} == {"BraTS-GLI-00012-000"}
    assert len({d["slice"] for d in drawn}) == 4  # no slice twice
    assert refs.provenance["excluded_case"] == ANALYSED and refs.provenance["source"] == "auto"
    other = load_case(cohort / "BraTS-GLI-00012-000", modalities=["t2w"])
    for d, image in zip(drawn, refs.images):
        assert not other.whole_tumour[d["slice"]].any()  # tumour-free
        area = other.brain_mask.reshape(other.shape[0], -1).sum(1)
        assert area[d["slice"]] >= 0.5 * area.max()
        torch.testing.assert_close(image, engine_input(cohort / "BraTS-GLI-00012-000", d["slice"], ["t2w"], method), atol=0, rtol=0)


def test_auto_is_seeded_and_spreads_over_cases(cohort: Path, method) -> None:
    cases = find_cases(cohort)
    # Case 00002 has tumour from slice 13 of the crop up: its few tumour-free slices hold little brain.
    a = load_references("auto", method, k_shot=3, training_cases=cases, seed=7, min_brain_fraction=0.1)
    b = load_references("auto", method, k_shot=3, training_cases=list(reversed(cases)), seed=7, min_brain_fraction=0.1)
    assert a.provenance["references"] == b.provenance["references"] and torch.equal(a.images, b.images)
    assert len({d["case_id"] for d in a.provenance["references"]}) == 3  # one slice per case first
    seeds = {tuple((d["case_id"], d["slice"]) for d in load_references("auto", method, 3, training_cases=cases, seed=s).provenance["references"]) for s in range(4)}
    assert len(seeds) > 1


def test_composite_channels_match_the_engine(cohort: Path, method) -> None:
    refs = load_references("auto", method, k_shot=2, modality="t1c+t2w+t2f", training_cases=find_cases(cohort), exclude_case_id=ANALYSED)
    assert refs.provenance["modality"] == "t1c+t2w+t2f"
    for d, image in zip(refs.provenance["references"], refs.images):
        torch.testing.assert_close(image, engine_input(cohort / d["case_id"], d["slice"], ["t1c", "t2w", "t2f"], method), atol=0, rtol=0)


def test_folder_of_normal_cases_without_labels(cohort: Path, method, tmp_path: Path) -> None:
    normal = tmp_path / "normal"
    for case_id in (ANALYSED, "BraTS-GLI-00012-000"):
        (normal / case_id).mkdir(parents=True)
        for part in (cohort / case_id).iterdir():
            if not part.name.endswith("-seg.nii.gz"):
                shutil.copy(part, normal / case_id / part.name)
    refs = load_references(normal, method, k_shot=5, exclude_case_id=ANALYSED, seed=3)
    drawn = refs.provenance["references"]
    assert refs.provenance["source"] == str(normal) and {d["case_id"] for d in drawn} == {"BraTS-GLI-00012-000"}
    # No labels: the folder is declared normal, so slices inside the (unlabelled) tumour range may be drawn;
    # 'auto' instead needs labels and refuses unlabelled cases.
    with pytest.raises(InputError, match="segmentation labels"):
        load_references("auto", method, k_shot=1, training_cases=find_cases(normal))


def test_folder_of_png_slices(method, tmp_path: Path) -> None:
    folder = tmp_path / "pngs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png", "c.jpg", f"{ANALYSED}_s40.png", "BraTS-GLI-00002-001_s10.png", "notes.txt"):
        path = folder / name
        if name.endswith("txt"):
            path.write_text("not an image")
        else:
            Image.fromarray(rng.integers(0, 255, (90, 110, 3), dtype=np.uint8)).save(path)
    refs = load_references(folder, method, k_shot=3, exclude_case_id=ANALYSED)
    assert [d["file"] for d in refs.provenance["references"]] == ["a.png", "b.png", "c.jpg"]
    grey = np.asarray(Image.open(folder / "a.png").convert("L"), dtype=np.float32)
    expected = preprocess_slices(torch.from_numpy(grey)[None], 240, method.backbone.mean, method.backbone.std)[0]
    torch.testing.assert_close(refs.images[0], expected, atol=0, rtol=0)
    rgb = load_references(folder, method, k_shot=2, modality="t1c+t2w+t2f", exclude_case_id=ANALYSED, seed=1)
    assert rgb.images.shape == (2, 3, 240, 240) and not torch.equal(rgb.images[0, 0], rgb.images[0, 1])
    with pytest.raises(InputError, match="3 usable reference image"):
        load_references(folder, method, k_shot=4, exclude_case_id=ANALYSED)
    (folder / "broken.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match="broken.png: cannot be read"):
        load_references(folder, method, k_shot=6)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m, c: load_references("auto", m, k_shot=0, training_cases=c), "k-shot"),
        (lambda m, c: load_references("auto", m, k_shot=2), "needs training cases"),
        (lambda m, c: load_references("/no/such/folder", m), "no such folder"),
        (lambda m, c: load_references("auto", m, k_shot=500, training_cases=c), "tumour-free brain slices"),
        (lambda m, c: load_references("auto", m, training_cases=[p for p in c if "00002" in p.name], exclude_case_id=ANALYSED), "no reference case left"),
    ],
)
def test_bad_requests_are_one_line(cohort: Path, method, call, message: str) -> None:
    with pytest.raises(InputError, match=message) as info:
        call(method, find_cases(cohort))
    assert "\n" not in str(info.value)


def test_empty_folder_is_refused(method, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="neither case folders nor PNG/JPEG"):
        load_references(tmp_path, method)


def test_references_drive_few_shot(cohort: Path, method) -> None:
    refs = load_references("auto", method, k_shot=2, training_cases=find_cases(cohort), exclude_case_id=ANALYSED)
    method.set_references(refs.images)
    try:
        assert method.describe()["k_shot"] == 2
    finally:
        method.set_references(None)


def test_cohort_references_never_use_the_analysed_patient(cohort: Path, method) -> None:
    from napari_clip_ad.references import CohortReferences

    cases = find_cases(cohort)
    pool = CohortReferences("auto", method, k_shot=2, training_cases=cases, seed=0, min_brain_fraction=0.1)
    for path in cases:
        refs = pool.for_case(path.name)
        ids = {d["case_id"] for d in refs.provenance["references"]}
        if path.name.startswith("BraTS-GLI-00002"):
            assert not any(i.startswith("BraTS-GLI-00002") for i in ids)
        assert path.name not in ids and refs.provenance["excluded_case"] == path.name and refs.images.shape[0] == 2
    assert len(pool._cache) <= 3
