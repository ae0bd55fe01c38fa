"""Issue 11, classes 3-7: every bad flag, output, lock, training-state and weights fault ends in one clear line.

The corpus builds its bad files at test time and asserts, for each: exit 2, exactly one ``error:`` line on
stderr naming the flag or file, no traceback, and the output folder exactly as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hardening_helpers import (
    INFER,
    TRAIN,
    TRAIN_CONFIG,
    assert_one_line,
    make_cohort,
    run_cli,
    snapshot,
    subprocess_env,
)

from napari_clip_ad.errors import InputError, WeightsError


@pytest.fixture(scope="module")
def world(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny real cohort, its maps, a finished 2-epoch training run and a copy stopped after epoch 1."""
    root = tmp_path_factory.mktemp("hardening")
    cohort = make_cohort(shared_data, root / "cohort")
    config = root / "config.json"
    config.write_text(TRAIN_CONFIG)
    from napari_clip_ad.cli import main

    assert main(["infer", str(cohort), *INFER, "--out", str(root / "maps")]) == 0
    train = [*TRAIN, "--config", str(config), "--data", str(cohort)]
    assert main(["train", *train, "--out", str(root / "epoch1"), "--stop-after-epoch", "1"]) == 0
    shutil.copytree(root / "epoch1", root / "run")
    assert main(["train", *train, "--out", str(root / "run"), "--resume"]) == 0
    broken = root / "broken-cohort"
    shutil.copytree(cohort, broken)
    second = broken / "BraTS-GLI-00012-000" / "BraTS-GLI-00012-000-t2w.nii.gz"
    second.write_bytes(second.read_bytes()[:2000])  # a truncated download
    return {"root": root, "cohort": cohort, "config": config, "maps": root / "maps", "run": root / "run",
            "epoch1": root / "epoch1", "broken": broken, "train": train}


def _train(world: dict, out: Path, *extra: str, config: str | None = None, data: Path | None = None,
           drop: str | None = None) -> list[str]:
    argv = list(world["train"])
    if drop is not None:
        del argv[argv.index(drop) : argv.index(drop) + 2]
    if config is not None:
        argv[argv.index("--config") + 1] = config
    if data is not None:
        argv[argv.index("--data") + 1] = str(data)
    return ["train", *argv, "--out", str(out), *extra]


def _config_file(tmp: Path, text: str) -> str:
    path = tmp / "bad-config.json"
    path.write_text(text)
    return str(path)


def _our_weights(world: dict, tmp: Path, change) -> str:
    """A copy of the trained run's last.safetensors (real header) with one tensor changed by ``change``."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    source = world["run"] / "checkpoints" / "last.safetensors"
    with safe_open(str(source), framework="pt") as handle:
        meta, state = handle.metadata(), {k: handle.get_tensor(k) for k in handle.keys()}
    key = sorted(state)[0]
    state[key] = change(state[key])
    target = tmp / "bad-weights.safetensors"
    save_file(state, str(target), metadata=meta)
    return str(target)


def _torn(world: dict, tmp: Path, keep_previous: bool) -> Path:
    """The epoch-1 run with the training state of epoch 2 (a kill between the two writes)."""
    run = tmp / "torn"
    shutil.copytree(world["epoch1"], run)
    for name in ("train_state.safetensors", "train_state.json"):
        shutil.copy(world["run"] / "checkpoints" / name, run / "checkpoints" / name)
    if keep_previous:  # what the new save writes first: the whole epoch-1 save as *.prev.*
        for name in ("train_state.safetensors", "train_state.json", "last.safetensors", "last.json"):
            stem, suffix = name.rsplit(".", 1)
            shutil.copy(world["epoch1"] / "checkpoints" / name, run / "checkpoints" / f"{stem}.prev.{suffix}")
    return run


def _damaged_run(world: dict, tmp: Path, name: str, keep: int | None = None, text: str | None = None) -> Path:
    run = tmp / "damaged"
    shutil.copytree(world["run"], run)
    target = run / name
    if text is not None:
        target.write_text(target.read_text() + text)
    else:
        target.write_bytes(target.read_bytes()[: keep if keep is not None else len(target.read_bytes()) // 2])
    return run


# Each entry: id -> function(world, tmp) giving (argv, text the one line must contain, the folder that must not change).
CORPUS = {
    # --- class 3: numeric flags and config fields -------------------------------------------------------------
    "train-lr-nan": lambda w, t: (_train(w, t / "out", "--lr", "nan"), "--lr", t / "out"),
    "train-lr-negative": lambda w, t: (_train(w, t / "out", "--lr", "-1"), "--lr", t / "out"),
    "train-epochs-negative": lambda w, t: (_train(w, t / "out", "--epochs", "-1"), "--epochs", t / "out"),
    "train-max-slices-0": lambda w, t: (_train(w, t / "out", "--max-slices-per-case", "0"), "--max-slices-per-case", t / "out"),
    "train-max-slices-negative": lambda w, t: (_train(w, t / "out", "--max-slices-per-case", "-1"), "--max-slices-per-case", t / "out"),
    "train-seed-negative": lambda w, t: (_train(w, t / "out", "--seed", "-1"), "--seed", t / "out"),
    "train-cache-gb-nan": lambda w, t: (_train(w, t / "out", "--cache-memory-gb", "nan"), "--cache-memory-gb", t / "out"),
    "train-batch-size-0": lambda w, t: (_train(w, t / "out", "--batch-size", "0"), "--batch-size", t / "out"),
    "train-device-gpu0": lambda w, t: (_train(w, t / "out", "--device", "gpu0"), "--device 'gpu0'", t / "out"),
    "train-stop-after-0": lambda w, t: (_train(w, t / "out", "--stop-after-epoch", "0"), "--stop-after-epoch", t / "out"),
    "config-batch-size-string": lambda w, t: (_train(w, t / "out", config=_config_file(t, '{"batch_size": "2"}'),
                                                     drop="--batch-size"), "'batch_size'", t / "out"),
    "config-betas-short": lambda w, t: (_train(w, t / "out", config=_config_file(t, '{"betas": [0.5]}')), "'betas'", t / "out"),
    "config-lr-string": lambda w, t: (_train(w, t / "out", config=_config_file(t, '{"lr": "fast"}')), "'lr'", t / "out"),
    "config-augment-string": lambda w, t: (_train(w, t / "out", config=_config_file(t, '{"augment": "yes"}')), "'augment'", t / "out"),
    "config-image-size-zero": lambda w, t: (_train(w, t / "out", config=_config_file(t, '{"image_size": 0}')), "'image_size'", t / "out"),
    "config-layers-strings": lambda w, t: (_train(w, t / "out", config=_config_file(t, '{"layers": ["a"]}')), "'layers'", t / "out"),
    "config-val-fraction-nan": lambda w, t: (_train(w, t / "out", config=_config_file(t, '{"val_fraction": NaN}')), "'val_fraction'", t / "out"),
    "infer-device-gpu0": lambda w, t: (["infer", w["cohort"], *INFER, "--device", "gpu0", "--out", t / "out"], "--device", t / "out"),
    "infer-image-size-0": lambda w, t: (["infer", w["cohort"], *INFER, "--image-size", "0", "--out", t / "out"], "--image-size", t / "out"),
    "infer-image-size-negative": lambda w, t: (["infer", w["cohort"], *INFER, "--image-size", "-5", "--out", t / "out"], "--image-size", t / "out"),
    "infer-sigma-nan": lambda w, t: (["infer", w["cohort"], *INFER, "--sigma", "nan", "--out", t / "out"], "--sigma", t / "out"),
    "infer-sigma-inf": lambda w, t: (["infer", w["cohort"], *INFER, "--sigma", "inf", "--out", t / "out"], "--sigma", t / "out"),
    "infer-smooth3d-inf": lambda w, t: (["infer", w["cohort"], *INFER, "--smooth3d", "inf", "--out", t / "out"], "--smooth3d", t / "out"),
    "infer-batch-size-0": lambda w, t: (["infer", w["cohort"], *INFER, "--batch-size", "0", "--out", t / "out"], "--batch-size", t / "out"),
    "evaluate-min-component-negative": lambda w, t: (["evaluate", "--maps", w["maps"], "--data", w["cohort"], "--min-component", "-1",
                                                      "--out", t / "out"], "--min-component", t / "out"),
    "study-seed-negative": lambda w, t: (["study", "--data", w["cohort"], "--out", t / "out", "--backbone", "tiny-test", "--seed", "-1"],
                                         "--seed", t / "out"),
    "study-epochs-negative": lambda w, t: (["study", "--data", w["cohort"], "--out", t / "out", "--backbone", "tiny-test",
                                            "--epochs", "-1"], "--epochs", t / "out"),
    "study-device-gpu0": lambda w, t: (["study", "--data", w["cohort"], "--out", t / "out", "--backbone", "tiny-test",
                                        "--device", "gpu0"], "--device", t / "out"),
    "study-batch-size-0": lambda w, t: (["study", "--data", w["cohort"], "--out", t / "out", "--backbone", "tiny-test",
                                         "--batch-size", "0"], "--batch-size", t / "out"),
    "demo-device-gpu0": lambda w, t: (["demo", "--device", "gpu0", "--out", t / "out"], "--device", t / "out"),
    "train-epochs-not-a-number": lambda w, t: (_train(w, t / "out", "--epochs", "1.5"), "--epochs", t / "out"),
    "infer-threshold-not-a-number": lambda w, t: (["infer", w["cohort"], *INFER, "--threshold", "high", "--out", t / "out"],
                                                  "--threshold", t / "out"),
    # --- class 4: outputs ---------------------------------------------------------------------------------------
    "train-out-is-a-file": lambda w, t: (_train(w, w["config"]), str(w["config"]), w["config"]),
    "infer-out-is-a-file": lambda w, t: (["infer", w["cohort"], *INFER, "--out", w["config"]], str(w["config"]), w["config"]),
    "evaluate-out-is-a-file": lambda w, t: (["evaluate", "--maps", w["maps"], "--data", w["cohort"], "--out", w["config"]],
                                            str(w["config"]), w["config"]),
    "report-out-is-a-file": lambda w, t: (["report", w["maps"], "--setup", "x", "--data", w["cohort"], "--out", w["config"]],
                                          str(w["config"]), w["config"]),
    # --- class 6: training state ----------------------------------------------------------------------------------
    "train-into-finished-run": lambda w, t: (_train(w, w["run"]), "--overwrite", w["run"]),
    "train-overwrite-with-corrupt-case": lambda w, t: (_train(w, w["run"], "--overwrite", data=w["broken"]),
                                                       "BraTS-GLI-00012-000-t2w.nii.gz", w["run"]),
    "train-resume-and-overwrite": lambda w, t: (_train(w, w["run"], "--resume", "--overwrite"), "--overwrite", w["run"]),
    "resume-truncated-config": lambda w, t: (_train(w, run := _damaged_run(w, t, "config.json"), "--resume"), "config.json", run),
    "resume-truncated-state-json": lambda w, t: (_train(w, run := _damaged_run(w, t, "checkpoints/train_state.json"), "--resume"),
                                                 "train_state.json", run),
    "resume-truncated-state-tensors": lambda w, t: (_train(w, run := _damaged_run(w, t, "checkpoints/train_state.safetensors"),
                                                           "--resume"), "train_state.safetensors", run),
    "resume-truncated-weights": lambda w, t: (_train(w, run := _damaged_run(w, t, "checkpoints/last.safetensors"), "--resume"),
                                              "last.safetensors", run),
    "resume-half-metrics-line": lambda w, t: (_train(w, run := _damaged_run(w, t, "metrics.jsonl", text='{"epoch": 3, "st'),
                                                     "--resume"), "metrics.jsonl", run),
    "resume-torn-checkpoint": lambda w, t: (_train(w, run := _torn(w, t, keep_previous=False), "--resume"), "torn checkpoint", run),
    # --- class 7: weights -------------------------------------------------------------------------------------------
    "weights-nan": lambda w, t: (["infer", w["cohort"], *INFER, "--weights", _our_weights(w, t, lambda x: x.fill_(float("nan"))),
                                  "--out", t / "out"], "NaN/inf", t / "out"),
    "weights-inf": lambda w, t: (["infer", w["cohort"], *INFER, "--weights", _our_weights(w, t, lambda x: x.fill_(float("inf"))),
                                  "--out", t / "out"], "NaN/inf", t / "out"),
    "weights-int8": lambda w, t: (["infer", w["cohort"], *INFER, "--weights", _our_weights(w, t, lambda x: x.to(torch.int8)),
                                   "--out", t / "out"], "int8", t / "out"),
    "weights-bool": lambda w, t: (["infer", w["cohort"], *INFER, "--weights", _our_weights(w, t, lambda x: x > 0),
                                   "--out", t / "out"], "bool", t / "out"),
    "weights-garbage-pth": lambda w, t: (["infer", w["cohort"], *INFER, "--weights", _write(t / "garbage.pth", b"not a checkpoint"),
                                          "--out", t / "out"], "not a weights file", t / "out"),
    "weights-empty-pth": lambda w, t: (["infer", w["cohort"], *INFER, "--weights", _write(t / "empty.pth", b""),
                                        "--out", t / "out"], "empty file", t / "out"),
    "weights-garbage-zip": lambda w, t: (["infer", w["cohort"], *INFER, "--weights", _write(t / "z.pth", b"PK\x03\x04" + b"\0" * 40),
                                          "--out", t / "out"], "zip archive", t / "out"),
    "weights-garbage-safetensors": lambda w, t: (["infer", w["cohort"], *INFER, "--weights", _write(t / "g.safetensors", b"\xff" * 64),
                                                  "--out", t / "out"], "not a readable safetensors", t / "out"),
}


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_bad_input_corpus(name: str, world: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("written before")
    argv, needle, watched = CORPUS[name](world, tmp_path)
    before = snapshot(watched) if watched.is_dir() else watched.read_bytes()
    status, lines = run_cli(capsys, *argv)
    assert_one_line(status, lines, needle)
    after = snapshot(watched) if watched.is_dir() else watched.read_bytes()
    assert after == before, "the output folder changed"


def test_torn_checkpoint_falls_back_to_the_previous_save_and_ends_bitwise(world: dict, tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture) -> None:
    from safetensors.torch import load_file

    run = _torn(world, tmp_path, keep_previous=True)
    status, lines = run_cli(capsys, *_train(world, run, "--resume"))
    assert status == 0, lines
    resumed, reference = (load_file(str(d / "checkpoints" / "last.safetensors")) for d in (run, world["run"]))
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)
    epochs = [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1, 2]


def test_overwrite_replaces_a_finished_run(world: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    (run / "metrics.jsonl").write_text('{"epoch": 0, "step": 0, "train_loss": null, "val_dice": 0.123}\n')
    status, lines = run_cli(capsys, *_train(world, run, "--overwrite", "--epochs", "1"))
    assert status == 0, lines
    epochs = [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1] and not (run / "checkpoints" / "last.prev.safetensors").exists()


def test_cohort_infer_goes_on_past_a_broken_case(world: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "maps"
    status, lines = run_cli(capsys, "infer", world["broken"], *INFER, "--out", out)
    line = assert_one_line(status, lines, "BraTS-GLI-00012-000", code=1)
    assert "infer.json" in line
    summary = json.loads((out / "infer.json").read_text())
    assert summary["succeeded"] == ["BraTS-GLI-00002-000", "BraTS-GLI-00102-000", "BraTS-GLI-00112-000"]
    assert list(summary["failed"]) == ["BraTS-GLI-00012-000"] and "t2w.nii.gz" in summary["failed"]["BraTS-GLI-00012-000"]
    assert not list(out.glob("BraTS-GLI-00012-000_*")) and len(list(out.glob("*_anomaly.nii.gz"))) == 3


def test_single_broken_case_still_exits_2_and_writes_nothing(world: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "maps"
    status, lines = run_cli(capsys, "infer", world["broken"] / "BraTS-GLI-00012-000", *INFER, "--out", out)
    assert_one_line(status, lines, "t2w.nii.gz")
    assert not out.exists()


def test_readers_skip_temporaries_and_the_next_run_cleans_stale_ones(world: dict, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    maps = tmp_path / "maps"
    shutil.copytree(world["maps"], maps)
    dead = _dead_pid()
    stale = maps / f".tmp-{dead}-BraTS-GLI-00002-000_anomaly.nii.gz"
    stale.write_bytes(b"\x1f\x8b half a map")  # what a SIGKILLed infer leaves
    status, lines = run_cli(capsys, "evaluate", "--maps", maps, "--data", world["cohort"], "--out", tmp_path / "eval")
    assert status == 0, lines
    assert json.loads((tmp_path / "eval" / "summary.json").read_text())["n_cases"] == 4
    assert stale.exists()  # evaluate only reads the maps folder
    live = maps / f".tmp-{os.getpid()}-other.nii.gz"
    live.write_bytes(b"a live writer's file")
    status, lines = run_cli(capsys, "infer", world["cohort"], *INFER, "--out", maps)
    assert status == 0, lines
    assert not stale.exists() and live.exists()
    assert not (maps / ".napari-clip-ad.lock").exists()


def _dead_pid() -> int:
    """A pid that belongs to no process: a child that has exited and been reaped."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


HOLD = """
import sys, time
from pathlib import Path
from napari_clip_ad.outputs import output_lock
with output_lock(Path(sys.argv[1]), "test-holder"):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_second_writer_is_refused_and_a_killed_holder_does_not_block(world: dict, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "eval"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, env=subprocess_env())
    try:
        assert holder.stdout.readline().strip() == b"locked"
        before = snapshot(out)
        for argv in (["evaluate", "--maps", world["maps"], "--data", world["cohort"], "--out", out],
                     ["report", world["maps"], "--setup", "x", "--data", world["cohort"], "--out", out],
                     ["infer", world["cohort"], *INFER, "--out", out],
                     _train(world, out)):
            status, lines = run_cli(capsys, *argv)
            assert_one_line(status, lines, f"in use by pid {holder.pid}")
            assert snapshot(out) == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The kernel dropped the dead holder's lock: the next run goes ahead (and removes the lock file after).
    status, lines = run_cli(capsys, "evaluate", "--maps", world["maps"], "--data", world["cohort"], "--out", out)
    assert status == 0, lines
    assert (out / "summary.json").is_file() and not (out / ".napari-clip-ad.lock").exists()


def test_run_volume_api_checks() -> None:
    from napari_clip_ad.engine import run_volume
    from napari_clip_ad.methods import build_method

    method = build_method("vand", "tiny-test", image_size=56, device="cpu")
    with pytest.raises(InputError, match="no voxels"):
        run_volume(np.zeros((0, 60, 60)), method)
    with pytest.raises(InputError, match="built method"):
        run_volume(np.zeros((2, 60, 60)), "vand")
    with pytest.raises(InputError, match="dtype object"):
        run_volume(np.zeros((2, 60, 60), dtype=object), method)
    with pytest.raises(InputError, match="dtype complex"):
        run_volume(np.zeros((2, 60, 60), dtype=np.complex64), method)
    with pytest.raises(InputError, match="sigma"):
        run_volume(np.ones((2, 60, 60)), method, sigma=float("nan"))
    with pytest.raises(InputError, match="image size"):
        build_method("vand", "tiny-test", image_size=0, device="cpu")
    with pytest.raises(InputError, match="--device"):
        build_method("vand", "tiny-test", device="gpu0")


def test_backbone_file_with_nan_or_int8_tensor_is_refused(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from napari_clip_ad.backbones.local_file import read_state_dict

    good = {"visual.proj": torch.ones(4, 2), "context_length": torch.tensor(77)}
    path = tmp_path / "clip.pt"
    torch.save(good, path)
    assert set(read_state_dict(path)) == set(good)
    for name, bad in (("nan", {**good, "visual.proj": torch.full((4, 2), float("nan"))}),
                      ("int8", {**good, "visual.proj": torch.ones(4, 2, dtype=torch.int8)})):
        target = tmp_path / f"{name}.safetensors"
        save_file(bad, str(target))
        with pytest.raises(WeightsError, match=r"visual\.proj") as caught:
            read_state_dict(target)
        assert str(target) in str(caught.value)


def test_float16_and_bfloat16_weights_load(world: dict, tmp_path: Path) -> None:
    from napari_clip_ad.methods import build_method

    for dtype in (torch.float16, torch.bfloat16):
        path = _our_weights(world, tmp_path, lambda x, d=dtype: x.to(d))
        build_method("vand", "tiny-test", image_size=56, device="cpu", weights=path)


def test_lock_file_records_the_holder(tmp_path: Path) -> None:
    from napari_clip_ad.outputs import LOCK_NAME, output_lock

    with output_lock(tmp_path / "out", "infer") as out:
        record = json.loads((out / LOCK_NAME).read_text())
        assert record["pid"] == os.getpid() and record["command"] == "infer" and record["host"] and record["started"]
    assert not (tmp_path / "out").exists()  # created for the run and left empty: removed again
