"""Issue 11 faults: SIGKILL during infer and train, two concurrent writers, full and read-only disks.

Kills and races run the real CLI in subprocesses; disks are small tmpfs mounts (root on Linux only,
skipped elsewhere with the reason).
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from hardening_helpers import (
    INFER,
    TRAIN,
    TRAIN_CONFIG,
    Tmpfs,
    assert_one_line,
    can_mount_tmpfs,
    cli_command,
    make_cohort,
    run_cli,
    snapshot,
    subprocess_env,
)

from napari_clip_ad.cli import main


@pytest.fixture(scope="module")
def data(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("faults")
    config = root / "config.json"
    config.write_text(TRAIN_CONFIG)
    cohort = make_cohort(shared_data, root / "cohort")
    assert main(["infer", str(cohort), *INFER, "--out", str(root / "maps")]) == 0
    return {"root": root, "cohort": cohort, "config": config, "maps": root / "maps"}


def _wait_for(predicate, process: subprocess.Popen, timeout: float = 240.0) -> bool:
    """Poll until ``predicate()`` or the process ends; True when the predicate held first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        if process.poll() is not None:
            return predicate()
        time.sleep(0.01)
    return False


def _kill(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGKILL)
    process.wait()


def test_sigkill_during_infer_leaves_only_whole_files_and_the_rerun_completes(data, tmp_path, capsys):
    out = tmp_path / "maps"
    process = subprocess.Popen([*cli_command(), "infer", str(data["cohort"]), *INFER, "--out", str(out)],
                               env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: out.is_dir() and any(p.name.endswith(".nii.gz") for p in out.iterdir()), process)
    finally:
        _kill(process)
    for path in out.glob("*.nii.gz"):
        if not path.name.startswith(".tmp-"):
            np.asarray(nib.load(path).dataobj)  # every visible map is whole
    maps = sorted(p for p in out.glob("*_anomaly.nii.gz") if not p.name.startswith(".tmp-"))
    status, lines = run_cli(capsys, "evaluate", "--maps", out, "--data", data["cohort"], "--out", tmp_path / "eval")
    if maps:
        assert status == 0, lines  # temporaries of the killed run are skipped
        assert json.loads((tmp_path / "eval" / "summary.json").read_text())["n_cases"] == len(maps)
    else:
        assert_one_line(status, lines, "no <case_id>_anomaly")
    status, lines = run_cli(capsys, "infer", data["cohort"], *INFER, "--out", out)
    assert status == 0, lines
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # stale temporaries and the lock are gone
    assert len(json.loads((out / "infer.json").read_text())["succeeded"]) == 4


def test_sigkill_during_training_resumes_to_bitwise_identical_weights(data, tmp_path, capsys):
    from safetensors.torch import load_file

    train = ["train", *TRAIN, "--epochs", "5", "--config", str(data["config"]), "--data", str(data["cohort"])]
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    assert main([*train, "--out", str(reference)]) == 0
    process = subprocess.Popen([*cli_command(), *train, "--out", str(killed)], env=subprocess_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: (killed / "checkpoints" / "last.safetensors").is_file(), process)
    finally:
        _kill(process)
    status, lines = run_cli(capsys, *train, "--out", killed, "--resume")
    assert status == 0, lines
    resumed, expected = (load_file(str(d / "checkpoints" / "last.safetensors")) for d in (killed, reference))
    assert resumed.keys() == expected.keys()
    assert all(torch.equal(resumed[k], expected[k]) for k in expected)
    epochs = [json.loads(line)["epoch"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1, 2, 3, 4, 5]


def test_two_concurrent_infers_never_leave_masks_that_disagree_with_infer_json(data, tmp_path):
    out = tmp_path / "maps"
    runs = [subprocess.Popen([*cli_command(), "infer", str(data["cohort"]), *INFER, "--threshold", threshold,
                              "--out", str(out)], env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            for threshold in ("0.3", "0.7")]
    results = [(run.wait(timeout=600), run.stderr.read().decode()) for run in runs]
    for status, err in results:
        errors = [line for line in err.splitlines() if line.startswith("error") or "Traceback" in line]
        if status != 0:  # the second writer is refused with one line
            assert status == 2 and len(errors) == 1 and "in use by pid" in errors[0], err
        else:
            assert not errors, err
    assert any(status == 0 for status, _ in results)
    threshold = json.loads((out / "infer.json").read_text())["threshold"]
    for anomaly in out.glob("*_anomaly.nii.gz"):
        mask = nib.load(str(anomaly).replace("_anomaly", "_mask"))
        expected = (np.asarray(nib.load(anomaly).dataobj) >= threshold).astype(np.uint8)
        np.testing.assert_array_equal(np.asarray(mask.dataobj), expected)


@pytest.mark.skipif(can_mount_tmpfs() is not None, reason=str(can_mount_tmpfs()))
def test_read_only_disk_gives_one_line_for_every_writer(data, tmp_path, capsys):
    with Tmpfs(tmp_path / "ro", read_only=True) as disk:
        commands = {
            "infer": ["infer", data["cohort"], *INFER, "--out", disk / "maps"],
            "evaluate": ["evaluate", "--maps", data["maps"], "--data", data["cohort"], "--out", disk / "eval"],
            "report": ["report", data["maps"], "--setup", "x", "--data", data["cohort"], "--out", disk / "report"],
            "train": ["train", *TRAIN, "--config", data["config"], "--data", data["cohort"], "--out", disk / "run"],
        }
        for name, argv in commands.items():
            status, lines = run_cli(capsys, *argv)
            assert_one_line(status, lines, str(disk))
            assert not list(disk.iterdir()), name


@pytest.mark.skipif(can_mount_tmpfs() is not None, reason=str(can_mount_tmpfs()))
def test_full_disk_keeps_the_old_report_and_writes_no_partial_files(data, tmp_path, capsys):
    with Tmpfs(tmp_path / "small", size_kb=2048) as disk:
        report = disk / "report"
        assert main(["report", str(data["maps"]), "--setup", "x", "--data", str(data["cohort"]), "--out", str(report)]) == 0
        before = snapshot(report)
        filler = disk / "filler"
        with open(filler, "wb", buffering=0) as handle:  # fill the disk up to the last block
            try:
                while True:
                    handle.write(b"\0" * 4096)
            except OSError:
                pass
        status, lines = run_cli(capsys, "report", data["maps"], "--setup", "x", "--threshold", "f1max",
                                "--data", data["cohort"], "--out", report)
        assert_one_line(status, lines, str(report))
        assert snapshot(report) == before
        for argv in (["evaluate", "--maps", data["maps"], "--data", data["cohort"], "--out", disk / "eval"],
                     ["infer", data["cohort"], *INFER, "--out", disk / "maps"]):
            status, lines = run_cli(capsys, *argv)
            assert_one_line(status, lines, str(disk))
            assert sorted(p.name for p in disk.iterdir()) == ["filler", "report"], argv[0]
