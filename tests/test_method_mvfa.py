"""MVFA-AD: residual adapters, zero-/few-shot maps, official checkpoints, training (tiny-test backbone, random weights)."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from napari_clip_ad import build_method
from napari_clip_ad.cli import main as cli_main
from napari_clip_ad.errors import InputError, WeightsError
from napari_clip_ad.methods.checkpoints import load_method_weights, save_method_weights
from napari_clip_ad.methods.mvfa import MVFA, ClipAdapter, adapter_count, checkpoint_layers
from napari_clip_ad.methods.mvfa_fewshot import AUGMENTED_PER_REFERENCE, augment_references, fuse_set
from napari_clip_ad.methods.released import RELEASED
from napari_clip_ad.train import Trainer, build_trainable, resolve_config, run_training
from napari_clip_ad.train.data import load_slices
from napari_clip_ad.train.losses import dice_loss, focal_loss, method_loss
from real_cohort import write_cropped_cohort

SIZE = 240
GRID = 17


@pytest.fixture(scope="module")
def method() -> MVFA:
    built = build_method("mvfa", "tiny-test", device="cpu", init_seed=4)
    with torch.no_grad():  # larger adapter weights, so the adapters visibly change the stream
        for part in built.trainable_parts().values():
            for p in part.parameters():
                p.mul_(3.0)
    return built


@pytest.fixture(scope="module")
def images(method: MVFA) -> torch.Tensor:
    unit = torch.rand(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    return normalise(method, unit)


def normalise(method: MVFA, unit: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(method.backbone.mean).view(1, 3, 1, 1)
    std = torch.tensor(method.backbone.std).view(1, 3, 1, 1)
    return (unit - mean) / std


def official_checkpoint(n_adapters: int = 4, width: int = 64, embed_dim: int = 64, seed: int = 3) -> dict:
    """Random tensors as train_zero.py / train_few.py save them: seg_adapters / det_adapters state dicts."""
    gen = torch.Generator().manual_seed(seed)
    checkpoint = {}
    for part in ("seg_adapters", "det_adapters"):
        state = collections.OrderedDict()
        for i in range(n_adapters):
            state[f"{i}.fc1.0.weight"] = torch.randn(embed_dim, width, generator=gen) * 0.3
            state[f"{i}.fc2.0.weight"] = torch.randn(width, embed_dim, generator=gen) * 0.3
        checkpoint[part] = state
    return checkpoint


# --- architecture ---------------------------------------------------------------------------
def test_defaults_and_official_geometry(method: MVFA) -> None:
    assert method.default_backbone == "openai-vit-l-14-336" and method.default_layers == (6, 12, 18, 24)
    assert method.layers == [3, 6, 9, 12] and method.map_max == 4.0 and method.default_sigma == 0
    assert method.config["object_name"] == "Brain" and method.supports_references and method.n_references == 0
    assert all(type(b.mlp.gelu) is torch.nn.GELU for b in method.clip.visual.transformer.resblocks)
    assert method.clip.visual.positional_embedding.shape == (GRID * GRID + 1, 64)
    # ViT-L/14: ClipAdapter(1024, bottleneck=768), no biases, keys as adapter.py names them.
    state = torch.nn.ModuleList([ClipAdapter(1024, 768) for _ in range(4)]).state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        **{f"{i}.fc1.0.weight": (768, 1024) for i in range(4)}, **{f"{i}.fc2.0.weight": (1024, 768) for i in range(4)}
    }
    with pytest.raises(InputError, match="repeats"):
        build_method("mvfa", method.backbone, device="cpu", layers=(3, 3))
    with pytest.raises(InputError, match="no option"):
        build_method("mvfa", method.backbone, device="cpu", sigma=1)


def test_stream_is_unnormalised_and_adapted_for_later_blocks(method: MVFA, images: torch.Tensor) -> None:
    """The network sees [0, 1] RGB; after a tapped block the stream is 0.8 x + 0.1 seg + 0.1 det."""
    blocks = method.clip.visual.transformer.resblocks
    first = method.layers[0]
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        blocks[0].register_forward_pre_hook(lambda _m, args: seen.setdefault("in0", args[0])),
        blocks[first - 1].register_forward_hook(lambda _m, _i, out: seen.setdefault("out", out)),
        blocks[first].register_forward_pre_hook(lambda _m, args: seen.setdefault("next", args[0])),
    ]
    try:
        method.predict(images[:1])
    finally:
        for hook in hooks:
            hook.remove()
    from napari_clip_ad.backbones import embed_patches

    mean = torch.tensor(method.backbone.mean).view(1, 3, 1, 1)
    std = torch.tensor(method.backbone.std).view(1, 3, 1, 1)
    with torch.no_grad():
        expected_in = embed_patches(method.clip.visual, images[:1] * std + mean)
        out = seen["out"]
        mixed = 0.8 * out + 0.1 * method.seg_adapters[0](out)[1] + 0.1 * method.det_adapters[0](out)[1]
    torch.testing.assert_close(seen["in0"], expected_in, atol=1e-5, rtol=0)
    torch.testing.assert_close(seen["next"], mixed, atol=1e-6, rtol=0)
    assert (mixed - out).abs().max() > 1e-2  # the adapters really change what block first+1 sees


def test_adapter_index_follows_the_given_layer_order(method: MVFA, images: torch.Tensor) -> None:
    """Official ``features.index(i + 1)``: adapter i belongs to layers[i], whatever the order."""
    swapped = build_method("mvfa", method.backbone, device="cpu", layers=(12, 9, 6, 3))
    state = method.trainable_state_dict()
    order = [3, 2, 1, 0]
    swapped.load_trainable_state(
        {k.replace(f".{i}.", f".{order[i]}.", 1): v for i in range(4) for k, v in state.items() if k.split(".")[1] == str(i)},
        "test",
    )
    torch.testing.assert_close(swapped.predict(images[:1]).maps, method.predict(images[:1]).maps, atol=1e-5, rtol=0)


def test_zero_shot_maps_and_scores_follow_the_official_formula(method: MVFA, images: torch.Tensor) -> None:
    out = method.predict(images[:2])
    assert out.maps.shape == (2, SIZE, SIZE) and out.scores.shape == (2,) and out.map_max == 4.0
    text = method.text_features()
    with torch.no_grad():
        seg, det = method.adapted_tokens(method.tap_tokens(images[:2]))
    expected, scores = torch.zeros(2, SIZE, SIZE), torch.zeros(2)
    for s, d in zip(seg, det):
        d = F.normalize(d[:, 1:], dim=-1)
        scores += (100.0 * d @ text.t()).softmax(-1)[..., 1].mean(-1)
        s = F.normalize(s[:, 1:], dim=-1)
        logits = (100.0 * s @ text.t()).permute(0, 2, 1).reshape(2, 2, GRID, GRID)
        expected += F.interpolate(logits, size=SIZE, mode="bilinear", align_corners=True).softmax(1)[:, 1]
    torch.testing.assert_close(out.maps, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.scores, scores, atol=1e-6, rtol=0)
    corner = sum((100.0 * F.normalize(s[:, -1], dim=-1) @ text.t()).softmax(-1)[:, 1] for s in seg)
    torch.testing.assert_close(out.maps[:, -1, -1], corner, atol=1e-5, rtol=0)


def test_zero_shot_alone_equals_batch(method: MVFA, images: torch.Tensor) -> None:
    alone, batch = method.predict(images[1:2]), method.predict(images)
    torch.testing.assert_close(batch.maps[1:2], alone.maps, atol=1e-5, rtol=0)
    torch.testing.assert_close(batch.scores[1:2], alone.scores, atol=1e-6, rtol=0)


def test_grad_reaches_every_adapter_only_in_forward(images: torch.Tensor) -> None:
    fresh = build_method("mvfa", "tiny-test", device="cpu")
    assert not fresh.predict(images[:1]).maps.requires_grad
    details = fresh.forward_details(images[:1])
    (details.output.maps.mean() + details.det_scores.sum()).backward()
    last = len(fresh.layers) - 1
    for name, part in fresh.trainable_parts().items():
        for key, p in part.named_parameters():
            # The last level's fc2 only feeds the stream after the last tap, which nothing reads (as officially).
            if key.startswith(f"{last}.fc2"):
                assert p.grad is None, (name, key)
            else:
                assert p.grad is not None and p.grad.abs().sum() > 0, (name, key)
    assert all(p.grad is None for p in fresh.clip.parameters())


# --- few-shot -------------------------------------------------------------------------------
def test_reference_augmentation_follows_utils_augment() -> None:
    refs = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    out = augment_references(refs)
    assert out.shape == (2 * AUGMENTED_PER_REFERENCE, 3, 32, 32) and AUGMENTED_PER_REFERENCE == 11
    assert torch.equal(out[:2], refs) and torch.equal(out[18:20], refs.flip(-1)) and torch.equal(out[20:22], refs.flip(-2))
    # Translation (0.1, 0.1) with reflection padding: sampling at x + 0.1 in [-1, 1] units = 1.6 px here.
    theta = torch.tensor([[[1.0, 0.0, 0.1], [0.0, 1.0, 0.1]]]).repeat(2, 1, 1)
    grid = F.affine_grid(theta, [2, 3, 32, 32], align_corners=False)
    torch.testing.assert_close(out[10:12], F.grid_sample(refs, grid, padding_mode="reflection", align_corners=False))
    assert all(not torch.equal(out[2 * i : 2 * i + 2], refs) for i in range(1, 11))


def test_few_shot_memory_maps_and_scores(method: MVFA, images: torch.Tensor) -> None:
    refs = normalise(method, torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(7)))
    method.set_references(refs)
    try:
        assert method.n_references == 2 and method.map_max == 1.0 and method.describe()["k_shot"] == 2
        assert [m.shape for m in method._memory] == [(2 * 11 * (GRID * GRID + 1), 64)] * 4  # CLS rows kept
        out = method.predict(images)
        zero, few = method.few_shot_components(images)
        # The memory holds the references' own tokens: a reference's few-shot map is ~0 everywhere.
        _, few_ref = method.few_shot_components(refs[:1])
        assert few_ref.abs().max() < 1e-4 and few.min() > 1e-3
        fused = 0.5 * (zero - zero.min()) / (zero.max() - zero.min()) + 0.5 * (few - few.min()) / (few.max() - few.min())
        torch.testing.assert_close(out.maps, fused, atol=1e-6, rtol=0)
        torch.testing.assert_close(out.scores, fused.flatten(1).amax(1), atol=1e-6, rtol=0)
        assert out.map_max == 1.0 and out.maps.min() >= 0 and out.maps.max() <= 1
        # Official: min-max over the evaluated set. predict normalises over the images of the call, so a slice
        # alone differs from the same slice in a batch only through that normalisation.
        alone = method.predict(images[1:2])
        assert not torch.allclose(alone.maps, out.maps[1:2], atol=1e-3)
        zero_alone, few_alone = method.few_shot_components(images[1:2])
        torch.testing.assert_close(zero_alone, zero[1:2], atol=1e-5, rtol=0)
        torch.testing.assert_close(few_alone, few[1:2], atol=1e-5, rtol=0)
        torch.testing.assert_close(alone.maps, fuse_set(zero_alone, few_alone)[0], atol=1e-6, rtol=0)
        # Fusing over a larger set (e.g. a whole volume) is the same function.
        torch.testing.assert_close(fuse_set(zero, few)[0], out.maps, atol=1e-6, rtol=0)
    finally:
        method.set_references(None)


def test_set_references_none_restores_zero_shot_bitwise(method: MVFA, images: torch.Tensor) -> None:
    before = method.predict(images)
    method.set_references(images[:1])
    assert not torch.equal(method.predict(images).maps, before.maps)
    method.set_references(None)
    after = method.predict(images)
    assert torch.equal(after.maps, before.maps) and torch.equal(after.scores, before.scores)
    assert method.n_references == 0 and method.map_max == 4.0 and "few_shot_normalisation" not in method.describe()


def test_bad_references_refused(method: MVFA) -> None:
    with pytest.raises(InputError, match="references must be"):
        method.set_references(torch.zeros(3, SIZE, SIZE))
    with pytest.raises(InputError, match="px but the method"):
        method.set_references(torch.zeros(1, 3, 64, 64))
    with pytest.raises(InputError, match="no references"):
        method.few_shot_components(torch.zeros(1, 3, SIZE, SIZE))
    assert method.n_references == 0


# --- checkpoints ----------------------------------------------------------------------------
def test_official_checkpoint_loads_and_clears_a_stale_memory(images: torch.Tensor, tmp_path: Path) -> None:
    fresh = build_method("mvfa", "tiny-test", device="cpu")
    before = fresh.predict(images[:1]).maps
    fresh.set_references(images[1:2])
    checkpoint = official_checkpoint()
    path = tmp_path / "Brain.pth"
    torch.save(checkpoint, path)
    load_method_weights(fresh, path)
    assert fresh.n_references == 0  # built with the old adapters: dropped
    state = fresh.trainable_state_dict()
    assert all(torch.equal(state[f"{p}.{k}"], v) for p in ("seg_adapters", "det_adapters") for k, v in checkpoint[p].items())
    assert not torch.allclose(fresh.predict(images[:1]).maps, before)
    built = build_method("mvfa", "tiny-test", weights=path, device="cpu")
    torch.testing.assert_close(built.predict(images[:1]).maps, fresh.predict(images[:1]).maps, atol=0, rtol=0)
    # The checkpoint fixes the number of tapped levels (for build_method's layers-from-checkpoint rule).
    assert adapter_count(checkpoint) == MVFA.checkpoint_layer_count(checkpoint) == 4
    assert checkpoint_layers(checkpoint, 24) == [6, 12, 18, 24] and checkpoint_layers(checkpoint, 12) == [3, 6, 9, 12]
    assert checkpoint_layers(official_checkpoint(2), 24) is None


@pytest.mark.parametrize(
    ("checkpoint", "message"),
    [
        (official_checkpoint(width=128), r"needs \(64, 64\).*another backbone"),
        ({"seg_adapters": official_checkpoint()["seg_adapters"]}, "not an MVFA-AD checkpoint"),
        ({"trainable_linearlayer": {"fc.0.weight": torch.zeros(2, 2)}}, "not an MVFA-AD checkpoint"),
        ({"seg_adapters": {"0.weight": torch.zeros(2, 2)}, "det_adapters": {}}, "not an MVFA-AD adapter state dict"),
        ({**official_checkpoint(), "det_adapters": official_checkpoint(2)["det_adapters"]}, "different numbers of adapters"),
    ],
)
def test_mismatched_checkpoints_refused(checkpoint: dict, message: str, tmp_path: Path) -> None:
    path = tmp_path / "bad.pth"
    torch.save(checkpoint, path)
    with pytest.raises(WeightsError, match=message) as error:
        build_method("mvfa", "tiny-test", weights=path, device="cpu")
    assert "\n" not in str(error.value) and str(path) in str(error.value)


def test_safetensors_round_trip_and_released_entries(method: MVFA, images: torch.Tensor, tmp_path: Path) -> None:
    path = save_method_weights(method, tmp_path / "mvfa.safetensors")
    again = build_method("mvfa", "tiny-test", weights=path, device="cpu")
    assert torch.equal(again.predict(images[:1]).maps, method.predict(images[:1]).maps)
    brain = RELEASED["mvfa-few-brain"]
    assert brain.method == "mvfa" and "BraTS2021" in brain.trained_on and brain.url == "" and "drive.google.com" in brain.page
    assert RELEASED["mvfa-zero-brain"].trained_on.startswith("BMAD leave-Brain-out")
    assert len([w for w in RELEASED.values() if w.method == "mvfa"]) == 12


# --- training -------------------------------------------------------------------------------
IMAGE_SIZE = 112


@pytest.fixture(scope="module")
def cohort(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six small real cases (every 16th brain slice, 3 offsets, of the two BraTS 2023 cases), 160 x 160 crops."""
    return write_cropped_cohort(shared_data, tmp_path_factory.mktemp("mvfa_cohort"), offsets=3, step=16, shift=5,
                                first_id=9100)


def tiny_config(**changes: object):
    config = resolve_config("mvfa", "brats", backbone="tiny-test", image_size=IMAGE_SIZE, epochs=2, batch_size=2,
                            lr=3e-3, device="cpu", views=2, seed=3, modality="t2f", max_slices_per_case=4)
    for key, value in changes.items():
        setattr(config, key, value)
    return config


def test_official_loss() -> None:
    probs = torch.rand(2, 4, 2, 8, 8, generator=torch.Generator().manual_seed(0)).softmax(dim=2)
    det = torch.rand(2, 4, generator=torch.Generator().manual_seed(1))
    masks = torch.zeros(2, 8, 8)
    masks[1, 2:5, 2:5] = 1
    details = collections.namedtuple("Details", "layer_probs det_scores")(probs, det)
    bce = torch.nn.BCEWithLogitsLoss()
    expected = sum(bce(det[:, i], torch.tensor([0.0, 1.0])) + focal_loss(probs[:, i], masks) + dice_loss(probs[:, i, 1], masks)
                   for i in range(4))
    torch.testing.assert_close(method_loss(details, masks, "mvfa"), expected)


def test_config_and_cache(cohort: Path, tmp_path: Path) -> None:
    config = resolve_config("mvfa", "brats")
    assert (config.epochs, config.batch_size, config.lr, config.betas, config.optimizer) == (50, 1, 1e-4, [0.5, 0.999], "adam")
    shipped = Path(__file__).resolve().parents[1] / "training" / "configs"
    assert resolve_config("mvfa", "pmc", shipped / "mvfa-pmc.json").backbone == "pmc-vit-l-14"
    assert resolve_config("mvfa", "industrial").weights == "mvfa-zero-brain"
    cases = sorted(cohort.iterdir())
    train, val = load_slices(cases[:1], ["t2f"], max_slices_per_case=3), load_slices(cases[1:2], ["t2f"], max_slices_per_case=2)
    losses = []
    for cache in (True, False):
        method = build_trainable(tiny_config(cache=cache), torch.device("cpu"))
        trainer = Trainer(tiny_config(cache=cache), method, train, val, tmp_path / str(cache), progress=False)
        (tmp_path / str(cache)).mkdir()
        losses.append(trainer.train_epoch(1))
        assert trainer.cached == cache
        if cache:  # the cache holds the frozen stream up to the first adapter: (1, 1 + N, width) per entry
            entry = next(iter(trainer.train_cache._store.values()))[0]
            assert entry.stream.shape == (1, 1 + (IMAGE_SIZE // 14) ** 2, 64)
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_train_resume_and_infer(cohort: Path, tmp_path: Path) -> None:
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    records = run_training(tiny_config(), cohort, reference, progress=False)
    assert [r["epoch"] for r in records] == [0, 1, 2] and all(np.isfinite(r["train_loss"]) for r in records[1:])
    run_training(tiny_config(stop_after_epoch=1), cohort, resumed, progress=False)
    run_training(tiny_config(), cohort, resumed, resume=True, progress=False)
    last = reference / "checkpoints" / "last.safetensors"
    a, b = load_file(str(last)), load_file(str(resumed / "checkpoints" / "last.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    untrained = build_method("mvfa", "tiny-test", image_size=IMAGE_SIZE, device="cpu", init_seed=3).trainable_state_dict()
    assert any(not torch.equal(untrained[k], a[k]) for k in a)
    method = build_method("mvfa", "tiny-test", weights=last, image_size=IMAGE_SIZE, device="cpu")
    assert all(torch.equal(v, method.trainable_state_dict()[k]) for k, v in a.items())
    case = min(cohort.iterdir())
    status = cli_main(["infer", str(case), "--method", "mvfa", "--backbone", "tiny-test", "--weights", str(last),
                       "--image-size", str(IMAGE_SIZE), "--device", "cpu", "--modality", "t2f", "--out", str(tmp_path / "out")])
    assert status == 0 and (tmp_path / "out" / f"{case.name}_anomaly.nii.gz").is_file()
    assert json.loads((tmp_path / "out" / "infer.json").read_text())["weights"] == str(last)


def test_volume_engine_normalises_few_shot_over_the_whole_volume(method: MVFA) -> None:
    """run_volume fuses MVFA few-shot maps over all analysed slices (official: the evaluated set), whatever the batch."""
    from napari_clip_ad.engine import run_volume
    from napari_clip_ad.engine.preprocess import preprocess_slices

    rng = np.random.default_rng(3)
    volume = rng.normal(100, 20, (5, 48, 48)).astype(np.float32)
    volume[:, :, :6] = 0
    refs = normalise(method, torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(9)))
    method.set_references(refs)
    try:
        by_one = run_volume(volume, method, batch_size=1, sigma=0)
        by_five = run_volume(volume, method, batch_size=5, sigma=0)
        assert np.allclose(by_one.anomaly_map, by_five.anomaly_map, atol=1e-6)
        images = preprocess_slices(torch.from_numpy(volume), SIZE, method.backbone.mean, method.backbone.std)
        with torch.no_grad():
            expected, scores = fuse_set(*method.few_shot_components(images))
        resized = F.interpolate(expected[:, None], size=(48, 48), mode="bilinear", align_corners=False)[:, 0]
        np.testing.assert_allclose(by_one.anomaly_map, resized.clamp(0, 1).numpy(), atol=1e-5)
        np.testing.assert_allclose(by_one.scores, scores.numpy(), atol=1e-6)
        assert "whole volume" in by_one.info["few_shot_normalisation"]
    finally:
        method.set_references(None)


def test_three_adapter_checkpoint_fixes_the_layers_unless_named(tmp_path: Path) -> None:
    """Issue 13 item 8 for MVFA-AD: the adapters fix the tapped blocks (official rule) unless layers are given."""
    path = tmp_path / "three.pth"
    torch.save(official_checkpoint(3), path)
    built = build_method("mvfa", "tiny-test", weights=path, device="cpu")
    step = len(built.clip.visual.transformer.resblocks) // 3
    assert built.layers == [step, 2 * step, 3 * step] and "checkpoint" in built.describe()["layers_from"]
    with pytest.raises(WeightsError, match="has 3 adapter pairs but the method taps 4 blocks"):
        build_method("mvfa", "tiny-test", weights=path, device="cpu", layers=[1, 2, 3, 4])
