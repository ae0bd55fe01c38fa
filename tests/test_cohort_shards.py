"""``infer --shard K/N`` + ``infer --merge``: N shards into one folder equal one unsharded run, bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import pytest

from napari_clip_ad.cli import main
from napari_clip_ad.cohort import Shard, parse_shard, shard_cases
from napari_clip_ad.errors import InputError
from napari_clip_ad.sample import write_cohort


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """Five synthetic cases cropped to 40 x 40 x 6 voxels around the tumour side of the brain."""
    full = tmp_path_factory.mktemp("full")
    crop = tmp_path_factory.mktemp("cohort")
    for case in write_cohort(full, n_cases=5, seed=7):
        (crop / case.name).mkdir()
        for path in sorted(case.glob("*.nii.gz")):
            nib.save(nib.load(path).slicer[90:130, 90:130, 60:66], crop / case.name / path.name)
    return crop


INFER = ["--method", "vand", "--backbone", "tiny-test", "--device", "cpu", "--batch-size", "8", "--image-size", "56"]


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_three_shards_and_merge_equal_one_unsharded_run(cohort, tmp_path, capsys):
    whole, sharded = tmp_path / "whole", tmp_path / "sharded"
    assert main(["infer", str(cohort), *INFER, "--out", str(whole)]) == 0
    for k in (3, 1, 2):  # any order, any machine
        assert main(["infer", str(cohort), *INFER, "--shard", f"{k}/3", "--out", str(sharded)]) == 0
        assert not (sharded / "infer.json").exists()  # only the merge writes the cohort's summary
    capsys.readouterr()
    assert main(["infer", str(cohort), "--merge", "--out", str(sharded)]) == 0
    printed = capsys.readouterr().out
    assert str(sharded / "infer.json") in printed and str(sharded / "evaluate" / "summary.json") in printed
    assert _files(sharded) == _files(whole)  # maps, masks, scores, metrics and infer.json, byte for byte
    records = sorted((sharded / "shards").glob("*.json"))
    assert [json.loads(p.read_text())["status"] for p in records] == ["finished"] * 3
    summary = json.loads((sharded / "evaluate" / "summary.json").read_text())
    assert summary["n_cases"] == 5


def test_merge_names_missing_cases_with_their_shard(cohort, tmp_path, capsys):
    out = tmp_path / "partial"
    assert main(["infer", str(cohort), *INFER, "--shard", "1/2", "--out", str(out)]) == 0
    second = shard_cases(sorted(cohort.iterdir()), Shard(2, 2))
    capsys.readouterr()
    assert main(["infer", str(cohort), "--merge", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    for path in second:
        assert f"{path.name} (shard 2/2): missing, its shard never started" in err
    info = json.loads((out / "infer.json").read_text())
    assert info["missing_cases"] == [p.name for p in second] and len(info["cases"]) == 5 - len(second)
    # A shard that finished without one of its cases: that case failed.
    assert main(["infer", str(cohort), *INFER, "--shard", "2/2", "--out", str(out)]) == 0
    (out / f"{second[0].name}_anomaly.nii.gz").unlink()
    capsys.readouterr()
    assert main(["infer", str(cohort), "--merge", "--out", str(out)]) == 1
    assert f"{second[0].name} (shard 2/2): missing, its shard finished without it (the case failed)" in capsys.readouterr().err


def test_shards_partition_the_sorted_cohort(cohort):
    cases = sorted(cohort.iterdir(), reverse=True)
    parts = [shard_cases(cases, Shard(k, 3)) for k in (1, 2, 3)]
    assert sorted(p for part in parts for p in part) == sorted(cases)
    assert [len(p) for p in parts] == [2, 2, 1]
    assert parts[0] == shard_cases(list(reversed(cases)), Shard(1, 3))  # input order does not matter


@pytest.mark.parametrize("text", ["0/3", "4/3", "3", "a/b", "1/0"])
def test_bad_shard_is_one_line(text):
    with pytest.raises(InputError, match="--shard"):
        parse_shard(text)


def test_merge_without_shards_says_what_to_do(cohort, tmp_path, capsys):
    assert main(["infer", str(cohort), "--merge", "--out", str(tmp_path)]) == 2
    assert "run 'infer --shard K/N" in capsys.readouterr().err
