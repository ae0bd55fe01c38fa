"""``napari-clip-ad benchmark bmad`` on a small BMAD-Brain-layout folder built from the real BraTS cases.

Images are FLAIR (t2f) slices written as BMAD's ``bras.py`` writes them (``plt.imsave(..., cmap="bone")``,
RGBA, no transpose); masks are whole-tumour 0/255 gray PNGs. The run uses the tiny random backbone.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402
from sklearn.metrics import average_precision_score, roc_auc_score  # noqa: E402

from napari_clip_ad.bmad import comparison_markdown, find_root, published_rows, read_test_split  # noqa: E402
from napari_clip_ad.cli import main  # noqa: E402
from napari_clip_ad.errors import InputError  # noqa: E402
from napari_clip_ad.metrics import PixelAccumulator  # noqa: E402

CASES = ("BraTS-GLI-00002-000", "BraTS-GLI-00012-000")


def write_slice(path: Path, array: np.ndarray, mask: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if mask:
        Image.fromarray((array > 0).astype(np.uint8) * 255, mode="L").save(path)
    else:
        plt.imsave(path, array, cmap="bone")


def build_bmad(shared_data: Path, root: Path, mask_folder: str = "anomaly_mask") -> Path:
    """test/good (tumour-free slices), test/Ungood (+ masks), train/good: 2 + 3 + 3 slices per case."""
    for case_id in CASES:
        folder = shared_data / "brats2023" / case_id
        flair = np.asarray(nib.load(folder / f"{case_id}-t2f.nii.gz").dataobj, dtype=np.float32)
        seg = np.asarray(nib.load(folder / f"{case_id}-seg.nii.gz").dataobj)
        tumour = seg.reshape(-1, seg.shape[2]).max(axis=0) > 0
        brain = flair.reshape(-1, flair.shape[2]).max(axis=0) > 0
        normal = np.flatnonzero(brain & ~tumour)
        lesion = np.flatnonzero(tumour)
        short = case_id.split("-")[2]
        picks = {"test/good": normal[[5, -8]], "test/Ungood": lesion[[len(lesion) // 4, len(lesion) // 2, -3]],
                 "train/good": normal[[3, 6, -5]]}
        for split, slices in picks.items():
            for j in slices:
                name = f"{short}_{j}.png"
                write_slice(root / split / "img" / name, flair[:, :, j])
                if split == "test/Ungood":
                    write_slice(root / "test/Ungood" / mask_folder / name, seg[:, :, j], mask=True)
    return root


@pytest.fixture(scope="module")
def bmad_run(shared_data, tmp_path_factory):
    base = tmp_path_factory.mktemp("bmad")
    data = build_bmad(shared_data, base / "Brain_AD")
    out = base / "out"
    status = main(["benchmark", "bmad", str(base), "--method", "vand", "--backbone", "tiny-test", "--device", "cpu",
                   "--out", str(out)])
    assert status == 0
    return data, out


def test_writes_metrics_table_scores_and_maps(bmad_run, capsys):
    data, out = bmad_run
    record = json.loads((out / "metrics.json").read_text())
    assert record["method"] == "vand" and record["k_shot"] == 0 and record["random_weights"]
    assert record["counts"] == {"images": 10, "normal": 4, "abnormal": 6, "abnormal_with_empty_mask": 0,
                                "pixels": 10 * 240 * 240, "lesion_pixels": record["counts"]["lesion_pixels"],
                                "regions": record["counts"]["regions"]}
    for key in ("image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "aupro", "dice_f1max"):
        assert 0.0 <= record["metrics"][key] <= 1.0, key
    table = (out / "metrics.md").read_text()
    assert "| **this run**: vand zero-shot" in table and "Random weights" in table
    for label in ("image AUROC", "image AP", "pixel AUROC", "pixel AP", "AUPRO", "Dice"):
        assert label in table
    maps = sorted((out / "maps").rglob("*.npy"))
    assert len(maps) == 10 and {p.parent.name for p in maps} == {"good", "Ungood"}


def test_metrics_equal_library_and_sklearn_on_the_saved_maps(bmad_run):
    data, out = bmad_run
    record = json.loads((out / "metrics.json").read_text())["metrics"]
    with open(out / "scores.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    pixels, all_scores, all_labels = PixelAccumulator(), [], []
    for row in rows:
        group, stem = row["image"].split("/")
        anomaly_map = np.load(out / "maps" / group / f"{stem}.npy")
        mask_path = data / "test" / group / "anomaly_mask" / f"{stem}.png"
        mask = np.asarray(Image.open(mask_path).convert("L")) != 0 if group == "Ungood" else np.zeros((240, 240), bool)
        assert anomaly_map.shape == (240, 240) and float(row["map_max"]) == float(anomaly_map.max())
        pixels.update(anomaly_map, mask, regions="2d")
        all_scores.append(anomaly_map.ravel())
        all_labels.append(mask.ravel())
    scores, labels = np.concatenate(all_scores), np.concatenate(all_labels)
    assert record["pooled_exact"]  # 576,000 pixels: exact path, equal to scikit-learn
    assert record["pixel_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-9)
    assert record["pixel_ap"] == pytest.approx(average_precision_score(labels, scores), abs=1e-9)
    assert record["aupro"] == pytest.approx(pixels.aupro(), abs=1e-12)
    assert record["dice_f1max"] == pytest.approx(pixels.f1max(), abs=1e-12)
    image_labels = [int(r["label"]) for r in rows]
    method_scores = [float(r["method_score"]) for r in rows]
    assert record["image_auroc"] == pytest.approx(roc_auc_score(image_labels, method_scores), abs=1e-12)
    assert record["image_ap"] == pytest.approx(average_precision_score(image_labels, method_scores), abs=1e-12)
    assert [r["image"].split("/")[0] for r in rows] == ["good"] * 4 + ["Ungood"] * 6  # MVFA-AD's order


def test_map_max_image_score_and_label_masks(shared_data, tmp_path, capsys):
    data = build_bmad(shared_data, tmp_path / "bmad", mask_folder="label")  # AA-CLIP's folder name
    out = tmp_path / "out"
    assert main(["benchmark", "bmad", str(data), "--method", "vand", "--backbone", "tiny-test", "--device", "cpu",
                 "--image-score", "max", "--no-maps", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "this run" in printed and "published" in printed
    record = json.loads((out / "metrics.json").read_text())
    with open(out / "scores.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert record["image_score"] == "max"
    assert record["metrics"]["image_auroc"] == pytest.approx(
        roc_auc_score([int(r["label"]) for r in rows], [float(r["map_max"]) for r in rows]), abs=1e-12)
    assert not (out / "maps").exists()


def test_k_shot_is_refused_with_one_line_for_a_zero_shot_method(shared_data, tmp_path, capsys):
    data = build_bmad(shared_data, tmp_path / "bmad")
    assert main(["benchmark", "bmad", str(data), "--method", "anomalyclip", "--backbone", "tiny-test", "--device", "cpu",
                 "--k-shot", "4", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "few-shot" in err and "\n" not in err and not (tmp_path / "out").exists()


def test_layout_errors_are_one_line(tmp_path, capsys):
    assert main(["benchmark", "bmad", str(tmp_path), "--method", "vand", "--backbone", "tiny-test", "--device", "cpu",
                 "--out", str(tmp_path / "out")]) == 2
    assert "not a BMAD Brain folder" in capsys.readouterr().err
    for folder in ("test/good/img", "test/Ungood/img"):
        (tmp_path / folder).mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "test/good/img/a.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "test/Ungood/img/b.png")
    assert find_root(tmp_path) == tmp_path
    with pytest.raises(InputError, match="b.png: no mask"):
        read_test_split(tmp_path)


def test_published_rows_are_printed_beside_this_run():
    rows = published_rows("mvfa", 4)
    assert rows and rows[0].values["image_auroc"] == 92.44
    table = comparison_markdown({"image_auroc": 0.5, "pixel_auroc": 0.25}, "mvfa 4-shot", rows)
    lines = table.splitlines()
    assert lines[2].startswith("| **this run**: mvfa 4-shot | 50.00 | – | 25.00")
    assert lines[3].startswith("| **published**: mvfa 4-shot | 92.44 | – | 97.30") and "README" in lines[3]
    assert published_rows("anomalyclip", 0) == []
    assert "none found" in comparison_markdown({}, "anomalyclip zero-shot", [])


def test_few_shot_references_are_seeded_draws_from_train_good(shared_data, tmp_path):
    from napari_clip_ad.bmad import reference_images

    data = build_bmad(shared_data, tmp_path / "bmad")
    pool = sorted((data / "train/good/img").iterdir())
    first = reference_images(data, 4, seed=0)
    assert first == reference_images(data, 4, seed=0) and set(first) <= set(pool) and len(set(first)) == 4
    assert any(reference_images(data, 4, seed=s) != first for s in range(1, 6))
    with pytest.raises(InputError, match="6 normal images but --k-shot 7"):
        reference_images(data, 7, seed=0)
    flat = tmp_path / "flat"  # bras.py writes train/good/*.png without img/
    (flat / "train/good").mkdir(parents=True)
    for path in pool:
        (flat / "train/good" / path.name).write_bytes(path.read_bytes())
    assert [p.name for p in reference_images(flat, 4, seed=0)] == [p.name for p in first]


def test_four_shot_vand_uses_train_good_references(bmad_run, tmp_path):
    """4-shot VAND (APRIL-GAN few-shot): references from train/good, recorded; the table labels it 4-shot."""
    data, zero_out = bmad_run
    out = tmp_path / "four"
    assert main(["benchmark", "bmad", str(data), "--method", "vand", "--backbone", "tiny-test", "--device", "cpu",
                 "--k-shot", "4", "--no-maps", "--out", str(out)]) == 0
    record = json.loads((out / "metrics.json").read_text())
    zero = json.loads((zero_out / "metrics.json").read_text())
    assert record["k_shot"] == 4 and "4-shot" in (out / "metrics.md").read_text()
    assert record["metrics"]["pixel_auroc"] != zero["metrics"]["pixel_auroc"]  # the memory bank changes the maps
    train_good = {f.name for f in (data / "train" / "good" / "img").iterdir()} if (data / "train" / "good" / "img").is_dir() \
        else {f.name for f in (data / "train" / "good").rglob("*.png")}
    assert record["reference_split"] == "train" and len(record["references"]) == 4 and set(record["references"]) <= train_good
