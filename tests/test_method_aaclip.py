"""AA-CLIP: adapters and anchors, test.py maps, official checkpoints, two-stage training (tiny-test backbone, random weights)."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from scipy import ndimage

from napari_clip_ad import build_method
from napari_clip_ad.cli import main as cli_main
from napari_clip_ad.errors import InputError, WeightsError
from napari_clip_ad.methods.aaclip import AAClip, gaussian_blur, official_map
from napari_clip_ad.methods.aaclip_stages import batch_mixing_vv_block, surgery_features
from napari_clip_ad.methods.checkpoints import save_method_weights
from napari_clip_ad.train import resolve_config, run_training
from napari_clip_ad.train.losses import aaclip_loss, dice_loss, focal_loss
from real_cohort import write_cropped_cohort

SIZE = 112
GRID = SIZE // 14


@pytest.fixture(scope="module")
def method() -> AAClip:
    return build_method("aaclip", "tiny-test", image_size=SIZE, device="cpu", init_seed=4)


@pytest.fixture(scope="module")
def images(method: AAClip) -> torch.Tensor:
    unit = torch.rand(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    mean, std = torch.tensor(method.backbone.mean).view(1, 3, 1, 1), torch.tensor(method.backbone.std).view(1, 3, 1, 1)
    return (unit - mean) / std


def official_state(width: int = 64, text_width: int = 64, embed: int = 64, levels: int = 4, image_until: int = 3,
                   text_until: int = 1, relu: bool = False, seed: int = 3) -> tuple[dict, dict]:
    """Random tensors as train.py saves them: image_adapter.pth and text_adapter.pth objects (with optimizer states)."""
    gen = torch.Generator().manual_seed(seed)
    image = collections.OrderedDict()
    for i in range(image_until):
        image[f"layer_adapters.{i}.fc.0.weight"] = torch.randn(width, width, generator=gen) * 0.2
    proj = "fc.0.weight" if relu else "fc.weight"
    for i in range(levels):
        image[f"seg_proj.{i}.{proj}"] = torch.randn(embed, width, generator=gen) * 0.2
    image[f"det_proj.{proj}"] = torch.randn(embed, width, generator=gen) * 0.2
    text = collections.OrderedDict()
    for i in range(text_until):
        text[f"{i}.fc.0.weight"] = torch.randn(text_width, text_width, generator=gen) * 0.2
    text[f"{text_until}.fc.0.weight"] = torch.randn(embed, text_width, generator=gen) * 0.2
    adam = {"state": {}, "param_groups": [{"lr": 5e-4, "betas": (0.5, 0.999), "eps": 1e-8, "weight_decay": 0,
                                            "amsgrad": False, "params": list(range(len(image)))}]}
    return ({"epoch": 20, "image_adapter": image, "image_optimizer": adam},
            {"epoch": 5, "text_adapter": text, "text_optimizer": adam})


def write_official(folder: Path, **kwargs: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    image, text = official_state(**kwargs)
    torch.save(image, folder / "image_adapter_20.pth")
    torch.save(text, folder / "text_adapter.pth")
    return folder / "image_adapter_20.pth"


# --- inference ------------------------------------------------------------------------------
def test_defaults_follow_the_official_scripts(method: AAClip) -> None:
    assert method.layers == [3, 6, 9, 12]  # 6 12 18 24 of ViT-L scaled to 12 blocks
    assert (method.image_adapt_until, method.text_adapt_until, method.surgery_blocks) == (3, 1, 10)
    assert method.config["object_name"] == "scan" and method.config["relu"] is False
    assert isinstance(method.image_adapter["det_proj"].fc, torch.nn.Linear)  # no LeakyReLU without --relu
    assert isinstance(method.text_adapter[-1].fc[1], torch.nn.LeakyReLU)  # text projection always has it
    normal, abnormal = method.anchor_sentences()
    assert normal[:3] == ["scan.", "a photo of scan.", "a scan."] and len(normal) == 6 and len(abnormal) == 10
    medical = build_method("aaclip", "tiny-test", image_size=SIZE, device="cpu", init_seed=4, prompts="medical")
    normal_medical, _ = medical.anchor_sentences()
    assert normal_medical != normal and not torch.allclose(medical.text_features(), method.text_features())
    with pytest.raises(InputError, match="references"):
        method.set_references(torch.zeros(1, 3, SIZE, SIZE))
    method.set_references(None)
    assert method.set_precision("auto") == "fp32"  # adapters mix into the stream between blocks: fp32, like the official run
    with pytest.raises(InputError, match="fp32 only"):
        method.set_precision("bf16")


def test_blur_is_korninas_reflect_gaussian() -> None:
    maps = torch.rand(2, 1, 12, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = np.arange(9) - 4
    kernel = np.exp(-x**2 / (2 * 1.5**2))
    kernel /= kernel.sum()
    expected = ndimage.correlate1d(ndimage.correlate1d(maps.numpy(), kernel, axis=2, mode="mirror"), kernel, axis=3, mode="mirror")
    np.testing.assert_allclose(gaussian_blur(maps).numpy(), expected, atol=1e-12)


def test_maps_and_scores_follow_test_py(method: AAClip, images: torch.Tensor) -> None:
    output = method.predict(images)
    seg, det = method.visual_tokens(images)
    text = method.text_features()
    expected = 0
    for tokens in seg:
        p = 100.0 * tokens @ text.t()
        grid = p.permute(0, 2, 1).reshape(3, 2, GRID, GRID)
        level = gaussian_blur(((grid[:, 1] + 1 - grid[:, 0]) / 2).unsqueeze(1))
        expected = expected + F.interpolate(level, size=(SIZE, SIZE), mode="bilinear", align_corners=True)[:, 0]
    torch.testing.assert_close(official_map(output), expected, atol=1e-3, rtol=1e-5)
    torch.testing.assert_close(output.scores, expected.flatten(1).amax(dim=1), atol=1e-3, rtol=1e-5)
    assert output.map_max == 4.0 and 0 <= float(output.maps.min()) and float(output.maps.max()) <= 4
    assert all(torch.allclose(t.norm(dim=-1), torch.ones(())) for t in seg) and det.shape == (3, 64)


def test_alone_equals_batch(method: AAClip, images: torch.Tensor) -> None:
    alone, batch = method.predict(images[1:2]), method.predict(images)
    torch.testing.assert_close(batch.maps[1:2], alone.maps, atol=1e-5, rtol=0)
    torch.testing.assert_close(batch.scores[1:2], alone.scores, atol=1e-3, rtol=1e-6)


def test_stage1_surgery_attention_mixes_the_batch_as_the_official_layout(method: AAClip, images: torch.Tensor) -> None:
    block = method.clip.visual.transformer.resblocks[-1]
    x = torch.randn(1, 5, 64, generator=torch.Generator().manual_seed(2))
    attn = block.attn
    v = F.linear(block.ln_1(x), attn.in_proj_weight[128:], attn.in_proj_bias[128:])
    after = x + attn.out_proj(v)  # batch 1: softmax over one image is 1, the block returns v (official Attention)
    torch.testing.assert_close(batch_mixing_vv_block(block, x), after + block.mlp(block.ln_2(after)))
    first = surgery_features(method, images[:2])
    changed = surgery_features(method, torch.cat([images[:1], images[2:3]]))
    assert not torch.allclose(first[0], changed[0])  # image 0's stage-1 features depend on its batch mate


# --- checkpoints ----------------------------------------------------------------------------
def test_official_checkpoint_equals_our_safetensors(images: torch.Tensor, tmp_path: Path) -> None:
    path = write_official(tmp_path / "ckpt")
    official = build_method("aaclip", "tiny-test", weights=path, image_size=SIZE, device="cpu")
    image, text = official_state()
    assert torch.equal(official.trainable_state_dict()["text_adapter.1.fc.0.weight"], text["text_adapter"]["1.fc.0.weight"])
    assert torch.equal(official.trainable_state_dict()["image_adapter.seg_proj.2.fc.weight"], image["image_adapter"]["seg_proj.2.fc.weight"])
    ours = save_method_weights(official, tmp_path / "ours.safetensors")
    again = build_method("aaclip", "tiny-test", weights=ours, image_size=SIZE, device="cpu", init_seed=9)
    a, b = official.predict(images), again.predict(images)
    assert torch.equal(a.maps, b.maps) and torch.equal(a.scores, b.scores)
    fresh = build_method("aaclip", "tiny-test", image_size=SIZE, device="cpu", init_seed=9).predict(images)
    assert not torch.allclose(fresh.maps, a.maps)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"width": 1024, "embed": 768}, "shape"),
    ({"image_until": 6}, "image_adapt_until 6"),
    ({"relu": True}, "relu=True"),
    ({"levels": 3}, "3 tapped levels"),
])
def test_mismatched_checkpoints_refused(kwargs: dict, message: str, tmp_path: Path) -> None:
    path = write_official(tmp_path / "ckpt", **kwargs)
    with pytest.raises(WeightsError, match=message) as info:
        build_method("aaclip", "tiny-test", weights=path, image_size=SIZE, device="cpu", layers=[3, 6, 9, 12])
    assert "\n" not in str(info.value)


def test_image_adapter_without_its_text_adapter_refused(tmp_path: Path) -> None:
    path = write_official(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "text_adapter.pth").unlink()
    with pytest.raises(WeightsError, match="text_adapter.pth"):
        build_method("aaclip", "tiny-test", weights=path, image_size=SIZE, device="cpu")


# --- training -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cohort(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four small real cases (every 20th brain slice, 2 offsets, of the two BraTS 2023 cases), 160 x 160 crops."""
    return write_cropped_cohort(shared_data, tmp_path_factory.mktemp("aaclip_cohort"), offsets=2, step=20, shift=7,
                                first_id=9200)


def tiny_config(**changes: object):
    config = resolve_config("aaclip", "brats", backbone="tiny-test", image_size=SIZE, epochs=2, device="cpu", views=2,
                            seed=3, modality="t2f", max_slices_per_case=3, val_fraction=0.3)
    config.stages = {**config.stages, "text_epochs": 1, "text_batch_size": 4, "text_lr": 1e-3, "milestones": [1]}
    for key, value in changes.items():
        setattr(config, key, value)
    return config


def test_official_schedule_and_losses() -> None:
    config = resolve_config("aaclip", "brats")
    assert (config.epochs, config.batch_size, config.lr, config.betas) == (25, 2, 5e-4, [0.5, 0.999])
    assert config.stages == {"text_epochs": 5, "text_batch_size": 16, "text_lr": 1e-5, "milestones": [16000, 32000],
                             "gamma": 0.5, "text_norm_weight": 0.1}
    assert resolve_config("aaclip", "pmc").backbone == "pmc-vit-l-14"
    shipped = Path(__file__).resolve().parents[1] / "training" / "configs"
    for setup in ("brats", "pmc"):
        file_config = resolve_config("aaclip", setup, shipped / f"aaclip-{setup}.json")
        assert (file_config.stages, file_config.epochs, file_config.lr) == (config.stages, 25, 5e-4)
    with pytest.raises(InputError, match="stages"):
        resolve_config("aaclip", "brats", stages={"text_epochs": 1})
    probs = torch.rand(2, 1, 2, 8, 8, generator=torch.Generator().manual_seed(0)).softmax(dim=2)
    text = F.normalize(torch.randn(2, 16, generator=torch.Generator().manual_seed(1)), dim=-1)
    masks = torch.zeros(2, 8, 8)
    masks[1, 2:5, 2:5] = 1
    stage1 = collections.namedtuple("Stage1", "layer_probs text")(probs, text)
    seg = focal_loss(probs[:, 0], masks) + dice_loss(probs[:, 0, 0], 1 - masks) + dice_loss(probs[:, 0, 1], masks)
    torch.testing.assert_close(aaclip_loss(stage1, masks, 0.1), seg + 0.1 * (text[0] @ text[1]) ** 2)
    logits = torch.randn(2, 2, generator=torch.Generator().manual_seed(2))
    stage2 = collections.namedtuple("Stage2", "layer_probs det_logits")(probs, logits)
    torch.testing.assert_close(aaclip_loss(stage2, masks), seg + F.cross_entropy(logits, torch.tensor([0, 1])))


def test_two_stages_resume_and_infer(cohort: Path, tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    untrained = build_method("aaclip", "tiny-test", image_size=SIZE, device="cpu", init_seed=3).trainable_state_dict()
    records = run_training(tiny_config(stop_after_epoch=1), cohort, reference, progress=False)
    after_text = load_file(str(reference / "checkpoints" / "last.safetensors"))
    for key, value in after_text.items():  # stage 1 moves only the text adapter
        assert torch.equal(value, untrained[key]) == key.startswith("image_adapter."), key
    records = run_training(tiny_config(), cohort, reference, resume=True, progress=False)
    assert [r["epoch"] for r in records] == [2] and np.isfinite(records[0]["train_loss"])
    last = reference / "checkpoints" / "last.safetensors"
    final = load_file(str(last))
    for key, value in final.items():  # stage 2 moves only the image adapter (Adam leaves the text adapter alone)
        assert torch.equal(value, after_text[key]) == key.startswith("text_adapter."), key
    uninterrupted = tmp_path / "uninterrupted"
    run_training(tiny_config(), cohort, uninterrupted, progress=False)
    other = load_file(str(uninterrupted / "checkpoints" / "last.safetensors"))
    assert other.keys() == final.keys() and all(torch.equal(other[k], final[k]) for k in final)
    state = json.loads((reference / "checkpoints" / "train_state.json").read_text())
    assert [g["lr"] for g in state["param_groups"]] == [1e-3, pytest.approx(5e-4 * 0.5)]  # milestone 1 passed
    case = min(cohort.iterdir())
    status = cli_main(["infer", str(case), "--method", "aaclip", "--backbone", "tiny-test", "--weights", str(last),
                       "--image-size", str(SIZE), "--device", "cpu", "--modality", "t2f", "--out", str(tmp_path / "out")])
    assert status == 0 and (tmp_path / "out" / f"{case.name}_anomaly.nii.gz").is_file()
    assert json.loads((tmp_path / "out" / "infer.json").read_text())["weights"] == str(last)


def test_study_grid_skips_the_cells_aaclip_cannot_have(tmp_path: Path) -> None:
    """--methods mvfa,aaclip --k-shot 0,4: mvfa gets 4-shot cells, aaclip (no few-shot mode, no released weights) none."""
    from napari_clip_ad.study import StudySettings, cells, grid_notes

    settings = StudySettings(data=tmp_path, out=tmp_path / "out", methods=["mvfa", "aaclip"], k_shots=(0, 4), baseline=False)
    grid = cells(settings)
    assert [e for e in grid if e[0] == "aaclip"] == [("aaclip", "brats"), ("aaclip", "pmc")]
    assert ("mvfa", "industrial+4shot") in grid and ("mvfa", "brats+4shot") in grid
    notes = grid_notes(settings)
    assert notes == ["aaclip has no few-shot mode in its official code: no +4shot cells",
                     "aaclip: the authors released no weights: no industrial/finetune cells (train it: brats, pmc)"]


def test_train_without_released_weights_refuses_industrial(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    status = cli_main(["train", "--method", "aaclip", "--setup", "industrial", "--data", str(tmp_path), "--out", str(tmp_path / "run")])
    error = capsys.readouterr().err.strip()
    assert status != 0 and "no released weights" in error and "--setup brats or pmc" in error and "\n" not in error
    assert not (tmp_path / "run").exists()
