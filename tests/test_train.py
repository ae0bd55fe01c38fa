"""Headless training: loss down / Dice up on real BraTS slices, exact resume, torchrun, checkpoints load."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from napari_clip_ad import build_method
from napari_clip_ad.cli import main as cli_main
from napari_clip_ad.errors import InputError
from napari_clip_ad.train import TrainConfig, Trainer, build_trainable, resolve_config, run_training
from napari_clip_ad.train.cache import FeatureCache
from napari_clip_ad.train.data import Augmentation, augmented_batch, load_slices
from napari_clip_ad.train.losses import dice_loss, focal_loss

SOURCES = ("BraTS-GLI-00002-000", "BraTS-GLI-00012-000")
IMAGE_SIZE = 112
VENV = Path(sys.executable).parent


@pytest.fixture(scope="module")
def cohort(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six small real cases: every 12th brain slice (3 offsets) of the two BraTS 2023 cases, t2w, t2f, seg."""
    root = tmp_path_factory.mktemp("cohort")
    for number, source in enumerate(SOURCES):
        folder = shared_data / "brats2023" / source
        images = {kind: nib.load(folder / f"{source}-{kind}.nii.gz") for kind in ("t2w", "t2f", "seg")}
        t2w = np.asarray(images["t2w"].dataobj)
        brain = np.flatnonzero(t2w.reshape(-1, t2w.shape[2]).any(axis=0))
        for offset in range(3):
            case_id = f"BraTS-GLI-{9000 + 10 * number + offset:05d}-000"
            z = np.arange(brain[0] + 4 * offset, brain[-1], 12)
            (root / case_id).mkdir()
            for kind, image in images.items():
                data = np.asarray(image.dataobj)[:, :, z]
                nib.save(nib.Nifti1Image(data, image.affine), root / case_id / f"{case_id}-{kind}.nii.gz")
    return root


def tiny_config(**changes: object) -> TrainConfig:
    config = resolve_config("anomalyclip", "brats", backbone="tiny-test", image_size=IMAGE_SIZE, epochs=2, batch_size=4,
                            lr=0.003, device="cpu", views=2, seed=3, modality="t2f", balance=True)
    for key, value in changes.items():
        setattr(config, key, value)
    return config


@pytest.fixture(scope="module")
def reference_run(cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("run")
    run_training(tiny_config(), cohort, run_dir, progress=False)
    return run_dir


def metrics_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_training_lowers_loss_and_raises_val_dice(reference_run: Path) -> None:
    records = metrics_of(reference_run)
    assert [r["epoch"] for r in records] == [0, 1, 2]
    assert records[2]["train_loss"] < records[1]["train_loss"]
    # Epoch 0 is the untrained (seeded random-init) prompts; FLAIR on a random tiny backbone.
    assert min(r["val_dice"] for r in records[1:]) > records[0]["val_dice"] + 0.05
    split = json.loads((reference_run / "split.json").read_text())
    held = json.loads((reference_run / "validation.json").read_text())
    assert len(split["train"]) == 4 and len(split["test"]) == 2
    assert set(held["fit"]) | set(held["val"]) == set(split["train"]) and len(held["val"]) == 1
    side = json.loads((reference_run / "checkpoints" / "last.json").read_text())
    assert side["method"] == "anomalyclip" and side["setup"] == "brats" and side["epoch"] == 2 and side["step"] > 0
    assert side["metrics"]["val_dice"] == records[2]["val_dice"] and side["config"]["lr"] == 0.003 and side["version"]
    best = json.loads((reference_run / "checkpoints" / "best.json").read_text())
    assert best["metrics"]["val_dice"] == max(r["val_dice"] for r in records[1:])


def test_resume_after_kill_gives_identical_weights(cohort: Path, reference_run: Path, tmp_path: Path) -> None:
    run_training(tiny_config(stop_after_epoch=1), cohort, tmp_path, progress=False)
    assert json.loads((tmp_path / "checkpoints" / "last.json").read_text())["epoch"] == 1
    run_training(tiny_config(), cohort, tmp_path, resume=True, progress=False)
    resumed, reference = (load_file(str(d / "checkpoints" / "last.safetensors")) for d in (tmp_path, reference_run))
    assert resumed.keys() == reference.keys()
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)
    assert metrics_of(tmp_path) == metrics_of(reference_run)


def test_cache_spilled_to_disk_gives_identical_weights(cohort: Path, reference_run: Path, tmp_path: Path) -> None:
    """With no RAM budget every cached feature goes through safetensors files: same weights, files removed."""
    run_training(tiny_config(cache_memory_gb=0.0), cohort, tmp_path, progress=False)
    spilled, reference = (load_file(str(d / "checkpoints" / "last.safetensors")) for d in (tmp_path, reference_run))
    assert all(torch.equal(spilled[k], reference[k]) for k in reference)
    assert metrics_of(tmp_path) == metrics_of(reference_run)
    assert not (tmp_path / "feature_cache").exists()


def test_feature_cache_spills_past_its_budget_and_reads_back_exactly(tmp_path: Path) -> None:
    Features = namedtuple("Features", "tokens cls")
    batch = (Features(torch.randn(3, 5, 4), torch.randn(3, 4).to(torch.bfloat16)), torch.rand(3, 8, 8) > 0.5)
    one_entry = 5 * 4 * 4 + 4 * 2 + 8 * 8
    cache = FeatureCache(3, 1, memory_bytes=one_entry, spill_dir=tmp_path / "spill")
    cache.put([(0, 0), (1, 0), (2, 0)], batch)
    assert len(cache) == 3 and cache.n_spilled == 2 and cache.nbytes() == one_entry
    assert sorted(p.name for p in (tmp_path / "spill").iterdir()) == ["1_0.safetensors", "2_0.safetensors"]
    (tokens, cls), masks = cache.get([(2, 0), (0, 0)], torch.device("cpu"))
    assert torch.equal(tokens, batch[0].tokens[[2, 0]]) and torch.equal(cls, batch[0].cls[[2, 0]])
    assert cls.dtype == torch.bfloat16 and torch.equal(masks, batch[1][[2, 0]])
    cache.close()
    assert not (tmp_path / "spill").exists() and len(cache) == 0


def test_backbone_stays_frozen_and_cache_matches_no_cache(cohort: Path, tmp_path: Path) -> None:
    cases = sorted(p for p in cohort.iterdir())
    train, val = load_slices(cases[:2], ["t2f"]), load_slices(cases[2:3], ["t2f"])
    losses = []
    for cache in (True, False):
        config = tiny_config(cache=cache, epochs=1)
        method = build_trainable(config, torch.device("cpu"))
        frozen = {k: v.clone() for k, v in method.clip.state_dict().items()}
        assert not any(p.requires_grad for n, p in method.clip.named_parameters())
        trainer = Trainer(config, method, train, val, tmp_path / str(cache), progress=False)
        (tmp_path / str(cache)).mkdir()
        losses.append(trainer.train_epoch(1))
        assert (0 < len(trainer.train_cache) <= 2 * len(train)) if cache else len(trainer.train_cache) == 0
        assert all(torch.equal(v, method.clip.state_dict()[k]) for k, v in frozen.items())
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)


def test_torchrun_two_processes_match_one(cohort: Path, reference_run: Path, tmp_path: Path) -> None:
    config = tiny_config().to_dict()
    (tmp_path / "config.json").write_text(json.dumps(config))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [str(VENV / "torchrun"), "--nproc_per_node", "2", "--master_port", "29517", "-m", "napari_clip_ad.cli",
               "train", "--method", "anomalyclip", "--setup", "brats", "--data", str(cohort), "--out", str(tmp_path / "run"),
               "--config", str(tmp_path / "config.json")]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "validation.json").read_text())["world_size"] == 2
    two, one = (load_file(str(d / "checkpoints" / "last.safetensors")) for d in (tmp_path / "run", reference_run))
    for key in one:
        assert torch.allclose(two[key], one[key], atol=1e-3, rtol=1e-3), key
    for a, b in zip(metrics_of(tmp_path / "run"), metrics_of(reference_run)):
        assert a["val_dice"] == pytest.approx(b["val_dice"], abs=0.02)
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-3) if b["train_loss"] else a["train_loss"] is None


def test_checkpoint_loads_into_build_method_and_infer(cohort: Path, reference_run: Path, tmp_path: Path) -> None:
    weights = reference_run / "checkpoints" / "last.safetensors"
    method = build_method("anomalyclip", "tiny-test", weights=weights, image_size=IMAGE_SIZE, device="cpu")
    trained = load_file(str(weights))
    assert all(torch.equal(v, method.trainable_state_dict()[k]) for k, v in trained.items())
    case = sorted(cohort.iterdir())[0]
    status = cli_main(["infer", str(case), "--method", "anomalyclip", "--backbone", "tiny-test", "--weights", str(weights),
                       "--image-size", str(IMAGE_SIZE), "--device", "cpu", "--out", str(tmp_path)])
    assert status == 0 and (tmp_path / f"{case.name}_anomaly.nii.gz").is_file()
    assert json.loads((tmp_path / "infer.json").read_text())["weights"] == str(weights)


def test_augmentation_moves_image_and_mask_together() -> None:
    image = torch.zeros(1, 1, 64, 64)
    image[0, 0, 10:30, 35:55] = 5.0
    image[0, 0, 5:60, 5:60] += 1.0
    mask = image[:, 0] > 3
    augmentation = Augmentation(flip_x=True, flip_y=False, angle=8.0, scale=1.08, gamma=1.1)
    inputs, masks = augmented_batch(image, mask, [augmentation], 64, (0.0,) * 3, (1.0,) * 3)
    bright = inputs[0, 0] > 0.8
    assert masks.sum() > 300 and ((bright == (masks[0] > 0.5)).float().mean() > 0.99)
    assert masks[0, 20, 10:30].all() and not masks[0, 20, 35:55].any()  # the lesion moved to the left
    assert Augmentation.draw(3, 7, 0) == Augmentation() and Augmentation.draw(3, 7, 1) == Augmentation.draw(3, 7, 1)


def test_official_losses() -> None:
    target = torch.zeros(2, 8, 8)
    target[:, 2:5, 2:5] = 1
    perfect = torch.stack([1 - target, target], dim=1)
    assert dice_loss(target, target) == pytest.approx(0.0, abs=1e-6)
    assert focal_loss(perfect, target) < 1e-6 < focal_loss(torch.full_like(perfect, 0.5), target)
    assert focal_loss(torch.full_like(perfect, 0.5), target) == pytest.approx(-(0.5**2) * np.log(0.5 + 1e-5), rel=1e-3)


def test_industrial_setup_trains_nothing(cohort: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    status = cli_main(["train", "--method", "vand", "--setup", "industrial", "--data", str(cohort), "--out", str(tmp_path)])
    assert status == 0 and "nothing to train" in capsys.readouterr().err
    assert json.loads((tmp_path / "config.json").read_text())["weights"] == "vand-mvtec"
    assert not (tmp_path / "checkpoints").exists()


def test_shipped_configs_resolve_and_cli_flags_override() -> None:
    root = Path(__file__).resolve().parents[1] / "training" / "configs"
    files = sorted(root.glob("*.json"))
    assert len(files) >= 13
    for path in files:
        method, setup = path.stem.split("-", 1)
        config = resolve_config(method, setup, path)
        assert (config.backbone == "pmc-vit-l-14") == (setup == "pmc") and (config.backbone == "biomedclip") == (setup == "biomedclip")
        assert (config.weights is None) == (setup in ("brats", "pmc", "biomedclip") or method == "anovl")
    config = resolve_config("vand", "brats", root / "vand-brats.json", epochs=3, lr=0.5, seed=9)
    assert (config.epochs, config.lr, config.seed, config.batch_size) == (3, 0.5, 9, 8)
    with pytest.raises(InputError, match="config is for method"):
        resolve_config("anomalyclip", "brats", root / "vand-brats.json")


@pytest.mark.parametrize("name", ["vand", "adaclip"])
def test_other_methods_train_with_their_losses(cohort: Path, tmp_path: Path, name: str) -> None:
    cases = sorted(cohort.iterdir())
    train, val = load_slices(cases[:1], ["t2f"], max_slices_per_case=4), load_slices(cases[1:2], ["t2f"], max_slices_per_case=2)
    config = resolve_config(name, "brats", backbone="tiny-test", image_size=IMAGE_SIZE, epochs=1, batch_size=2, device="cpu")
    method = build_trainable(config, torch.device("cpu"))
    before = {k: v.clone() for k, v in method.trainable_state_dict().items()}
    frozen = {k: v.clone() for k, v in method.clip.state_dict().items()}
    trainer = Trainer(config, method, train, val, tmp_path, progress=False)
    assert trainer.cached == (name == "vand") and type(trainer.optimizer).__name__ == ("AdamW" if name == "adaclip" else "Adam")
    loss = trainer.train_epoch(1)
    assert np.isfinite(loss) and loss > 0
    assert any(not torch.equal(v, method.trainable_state_dict()[k]) for k, v in before.items())
    trained = {f"{p}.{q}" for p, part in method.trainable_parts().items() for q, _ in part.named_parameters()}
    assert all(torch.equal(v, method.clip.state_dict()[k]) for k, v in frozen.items() if k not in trained)


def test_finetune_starts_from_given_weights_and_user_errors(cohort: Path, reference_run: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    settings = {k: v for k, v in tiny_config().to_dict().items() if k not in ("method", "setup", "weights")}
    (tmp_path / "tiny.json").write_text(json.dumps(settings))
    weights = reference_run / "checkpoints" / "last.safetensors"
    base = ["train", "--method", "anomalyclip", "--data", str(cohort), "--config", str(tmp_path / "tiny.json")]
    assert cli_main([*base, "--setup", "finetune", "--weights", str(weights), "--epochs", "1", "--out", str(tmp_path / "ft")]) == 0
    start = metrics_of(tmp_path / "ft")[0]
    assert start["epoch"] == 0 and start["val_dice"] == pytest.approx(metrics_of(reference_run)[-1]["val_dice"], abs=1e-9)
    assert json.loads((tmp_path / "ft" / "checkpoints" / "last.json").read_text())["setup"] == "finetune"
    capsys.readouterr()
    assert cli_main([*base, "--setup", "brats", "--resume", "--out", str(tmp_path / "empty")]) == 2
    assert cli_main([*base, "--setup", "brats", "--weights", str(weights), "--out", str(tmp_path / "x")]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and all(line.startswith("error: ") for line in errors)
    assert "--resume" in errors[0] and "--weights" in errors[1]
