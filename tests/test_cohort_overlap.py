"""Cohort ``infer`` with loading and writing overlapped (engine/overlap.py): same files as the serial path."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest

from napari_clip_ad.cli import main
from napari_clip_ad.engine.overlap import CaseSteps, run_cases

CROP = (slice(60, 180), slice(60, 180), slice(70, 78))


@pytest.fixture(scope="module")
def cohort(crop_real_cohort, tmp_path_factory) -> Path:
    """The two real cases cropped, a third (a copy under another id) and a case whose T2w file is corrupt."""
    root = crop_real_cohort(tmp_path_factory.mktemp("cohort"), CROP)
    source = root / "BraTS-GLI-00002-000"
    for new_id in ("BraTS-GLI-00003-000", "BraTS-GLI-00004-000"):
        target = root / new_id
        target.mkdir()
        for file in source.iterdir():
            shutil.copy(file, target / file.name.replace("BraTS-GLI-00002-000", new_id))
    (root / "BraTS-GLI-00004-000" / "BraTS-GLI-00004-000-t2w.nii.gz").write_bytes(b"\x1f\x8b broken")
    return root


def _infer(cohort: Path, out: Path, *extra: str) -> int:
    return main(["infer", str(cohort), "--method", "vand", "--backbone", "tiny-test", "--device", "cpu",
                 "--batch-size", "4", "--out", str(out), *extra])


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")}


def test_overlapped_outputs_equal_the_serial_path(cohort, tmp_path):
    serial, overlapped = tmp_path / "serial", tmp_path / "overlapped"
    assert _infer(cohort, serial, "--serial-io") == 1  # one broken case: the cohort goes on, exit 1
    assert _infer(cohort, overlapped) == 1
    a, b = _files(serial), _files(overlapped)
    assert set(a) == set(b)
    maps = [name for name in a if name.endswith(("_anomaly.nii.gz", "_mask.nii.gz"))]
    assert len(maps) == 6  # three good cases, map and mask each; nothing of the broken case
    for name in a:
        if name == "infer.json":
            continue
        assert a[name] == b[name], name  # bitwise the same files
    record_a, record_b = json.loads(a["infer.json"]), json.loads(b["infer.json"])
    assert record_a == record_b
    assert record_b["succeeded"] == ["BraTS-GLI-00002-000", "BraTS-GLI-00003-000", "BraTS-GLI-00012-000"]
    assert list(record_b["failed"]) == ["BraTS-GLI-00004-000"]
    assert "BraTS-GLI-00004-000-t2w.nii.gz" in record_b["failed"]["BraTS-GLI-00004-000"]


@pytest.mark.parametrize("serial", [True, False])
def test_a_write_failure_is_reported_in_infer_json(cohort, tmp_path, serial):
    out = tmp_path / "out"
    out.mkdir()
    # A folder where the second case's mask belongs: writing that case fails; the cohort goes on.
    (out / "BraTS-GLI-00003-000_mask.nii.gz").mkdir()
    assert _infer(cohort, out, *(["--serial-io"] if serial else [])) == 1
    record = json.loads((out / "infer.json").read_text())
    assert record["succeeded"] == ["BraTS-GLI-00002-000", "BraTS-GLI-00012-000"]
    assert list(record["failed"]) == ["BraTS-GLI-00003-000", "BraTS-GLI-00004-000"]
    assert "BraTS-GLI-00003-000_mask.nii.gz" in record["failed"]["BraTS-GLI-00003-000"]
    written = sorted(p.name for p in out.iterdir() if p.is_file() and p.name != "infer.json")
    # The failed case left none of its files (all or nothing); the cases after it were written.
    assert [name for name in written if "00003" in name] == []
    assert len([name for name in written if name.endswith("_anomaly.nii.gz")]) == 2


def _recording_steps(events: list[str], fail_write: str | None = None, fail_run: str | None = None) -> CaseSteps:
    lock = threading.Lock()

    def note(text: str) -> None:
        with lock:
            events.append(text)

    def load(path):
        note(f"load {path}")
        return {"id": str(path)}

    def compute(path, case):
        note(f"run {path}")
        if str(path) == fail_run:
            raise ValueError(f"cannot run {path}")
        return str(path).upper()

    def write(path, case, result):
        note(f"write {path}")
        if str(path) == fail_write:
            raise OSError(f"disk full at {path}")
        return [Path(f"{result}.out")]

    return CaseSteps(load, compute, write)


def test_outcomes_come_in_order_with_each_failure_at_its_case():
    events: list[str] = []
    paths = [Path(p) for p in ("a", "b", "c", "d")]
    seen = []
    outcomes = run_cases(paths, _recording_steps(events, fail_write="b", fail_run="c"), on_outcome=seen.append)
    assert [o.path.name for o in outcomes] == ["a", "b", "c", "d"] and seen == outcomes
    assert [(o.ok, o.stage) for o in outcomes] == [(True, None), (False, "write"), (False, "run"), (True, None)]
    assert outcomes[0].files == [Path("A.out")] and outcomes[3].files == [Path("D.out")]
    assert "disk full at b" in str(outcomes[1].error)
    assert sorted(events) == sorted([f"{step} {p}" for p in "abcd" for step in ("load", "run")]
                                    + [f"write {p}" for p in "abd"])
    # Bounded: a case is loaded at most one ahead of the one running (memory of about two cases).
    for k, name in enumerate("abcd"[2:], start=2):
        assert events.index(f"load {name}") > events.index(f"run {'abcd'[k - 2]}")
    assert "write c" not in events  # a failed run is not written


def test_a_fatal_failure_stops_later_writes():
    events: list[str] = []
    paths = [Path(p) for p in ("a", "b", "c", "d")]
    with pytest.raises(OSError, match="disk full at b"):
        run_cases(paths, _recording_steps(events, fail_write="b"), fatal=lambda outcome: outcome.stage == "write")
    assert "write a" in events and "write b" in events
    assert "write c" not in events and "write d" not in events


def test_serial_and_overlapped_outcomes_match():
    paths = [Path(p) for p in ("a", "b", "c")]
    runs = []
    for overlap in (False, True):
        outcomes = run_cases(paths, _recording_steps([], fail_write="b"), overlap=overlap)
        runs.append([(o.path, o.files, o.stage, str(o.error)) for o in outcomes])
    assert runs[0] == runs[1]
