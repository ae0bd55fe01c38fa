"""``napari-clip-ad infer`` on the real cases: aligned outputs, metrics agreeing with ``evaluate``, bad input."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest

from napari_clip_ad.cli import main


@pytest.fixture(scope="module")
def inferred(shared_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("maps")
    status = main(["infer", str(shared_data / "brats2023"), "--method", "vand", "--backbone", "tiny-test",
                   "--device", "cpu", "--batch-size", "32", "--out", str(out)])
    assert status == 0
    return out


def test_outputs_have_the_input_grid(inferred, shared_data):
    for case in ("BraTS-GLI-00002-000", "BraTS-GLI-00012-000"):
        source = nib.load(shared_data / "brats2023" / case / f"{case}-t2w.nii.gz")
        anomaly = nib.load(inferred / f"{case}_anomaly.nii.gz")
        mask = nib.load(inferred / f"{case}_mask.nii.gz")
        for img in (anomaly, mask):
            assert img.shape == source.shape
            np.testing.assert_array_equal(img.affine, source.affine)
        data = np.asanyarray(anomaly.dataobj)
        assert data.dtype == np.float32 and 0.0 <= data.min() and data.max() <= 1.0
        assert np.asanyarray(mask.dataobj).dtype == np.uint8
        np.testing.assert_array_equal(np.asanyarray(mask.dataobj), (data >= 0.5).astype(np.uint8))
        metrics = json.loads((inferred / f"{case}_metrics.json").read_text())
        assert "random weights" in metrics["backbone"]


def test_evaluate_agrees_with_per_case_json(inferred, shared_data, tmp_path):
    assert main(["evaluate", "--maps", str(inferred), "--data", str(shared_data / "brats2023"), "--threshold", "0.5", "--out", str(tmp_path)]) == 0
    with open(tmp_path / "per_case.csv") as handle:
        rows = {row["case_id"]: row for row in csv.DictReader(handle)}
    for case_id, row in rows.items():
        metrics = json.loads((inferred / f"{case_id}_metrics.json").read_text())
        for key in ("dice", "sensitivity", "specificity", "ppv"):
            assert float(row[key]) == pytest.approx(metrics[key], abs=1e-9)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--modality", "flair"], "unknown modality"),
        (["--method", "vandd"], "Did you mean 'vand'"),
        (["--backbone", "no-such-backbone"], "unknown backbone"),
        (["--threshold", "1.5"], "--threshold"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(shared_data, tmp_path, capsys, extra, message):
    args = ["infer", str(shared_data / "brats2023" / "BraTS-GLI-00002-000"), "--backbone", "tiny-test", "--device", "cpu", "--out", str(tmp_path / "o")]
    assert main(args + extra) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


class _Payload:
    """Unpickling this would import and build an arbitrary object: weights_only refuses it."""

    def __reduce__(self):
        return (print, ("code ran",))


def test_bad_weights_and_sizes_exit_2(shared_data, tmp_path, capsys):
    import torch

    unreadable = tmp_path / "garbage.pth"
    unreadable.write_text("not a checkpoint")
    malicious = tmp_path / "malicious.pth"
    torch.save({"trainable_linearlayer": _Payload()}, malicious)
    wrong_method = tmp_path / "anomalyclip.pth"
    torch.save({"prompt_learner": {"ctx_pos": torch.zeros(1, 1, 12, 768)}}, wrong_method)
    case = str(shared_data / "brats2023" / "BraTS-GLI-00002-000")
    base = ["infer", case, "--method", "vand", "--backbone", "tiny-test", "--device", "cpu"]
    for extra, message in [
        (["--weights", str(unreadable)], "garbage.pth"),
        (["--weights", str(malicious)], "refused"),
        (["--weights", str(wrong_method)], "anomalyclip.pth"),
        (["--weights", str(tmp_path / "missing.pth")], "not found"),
        (["--image-size", "8"], "image size"),
    ]:
        out = tmp_path / f"out{len(extra[1])}"
        assert main(base + extra + ["--out", str(out)]) == 2, extra
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err and "Traceback" not in err, err
        assert not out.exists() or not any(out.iterdir())
