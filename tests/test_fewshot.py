"""Few-shot with normal references: vand (APRIL-GAN test.py few-shot) and winclip (anomalib WinCLIP+).

Each official definition is re-computed here independently, the way the reference code writes it
(per image, sklearn cosine for APRIL-GAN; anomalib's per-patch harmonic loop and make_masks), on
the tiny random backbone (random weights).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import pairwise

from napari_clip_ad import build_method
from napari_clip_ad.engine import run_volume
from napari_clip_ad.errors import InputError
from napari_clip_ad.methods.vand import VAND
from napari_clip_ad.methods.winclip import WinCLIP

SIZE = 240


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def references() -> torch.Tensor:
    return torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(6))


@pytest.fixture(scope="module")
def vand() -> VAND:
    return build_method("vand", "tiny-test", device="cpu")


@pytest.fixture(scope="module")
def winclip() -> WinCLIP:
    return build_method("winclip", "tiny-test", device="cpu")


def block_outputs(method: VAND, image: torch.Tensor, blocks: list[int]) -> list[torch.Tensor]:
    """Raw residual stream after each block (1-based) via forward hooks: the official ``out_tokens``, (1, 1 + N, width)."""
    seen: dict[int, torch.Tensor] = {}
    hooks = [
        method.clip.visual.transformer.resblocks[b - 1].register_forward_hook(lambda _m, _i, out, b=b: seen.__setitem__(b, out))
        for b in blocks
    ]
    try:
        with torch.no_grad():
            method.clip.visual(image)
    finally:
        for hook in hooks:
            hook.remove()
    return [seen[b] for b in blocks]


def official_vand_few_shot(method: VAND, images: torch.Tensor, references: torch.Tensor, zero_shot_maps: torch.Tensor, zero_shot_scores: torch.Tensor):
    """test.py --mode few_shot, one image at a time, with few_shot.py's memory (numpy/sklearn as there)."""
    layers = method.few_shot_layers
    features = [[p[0, 1:, :] for p in block_outputs(method, ref[None], layers)] for ref in references]
    memory = [torch.cat([features[j][i] for j in range(len(features))], dim=0) for i in range(len(features[0]))]
    maps = []
    for n, image in enumerate(images):
        anomaly_map = zero_shot_maps[n : n + 1].numpy()
        few = []
        for idx, p in enumerate(block_outputs(method, image[None], layers)):
            p = p[0, 1:, :]
            cos = pairwise.cosine_similarity(memory[idx].cpu(), p.cpu())
            height = int(np.sqrt(cos.shape[1]))
            distance = np.min((1 - cos), 0).reshape(1, 1, height, height)
            few.append(F.interpolate(torch.tensor(distance), size=SIZE, mode="bilinear", align_corners=True)[0].numpy())
        maps.append(anomaly_map + np.sum(few, axis=0))
    maps = np.concatenate(maps)
    peaks = np.array([m.max() for m in maps])
    peaks = (peaks - peaks.min()) / (peaks.max() - peaks.min())
    return maps, 0.5 * (zero_shot_scores.numpy() + peaks)


def test_vand_few_shot_is_test_py(vand: VAND, images: torch.Tensor, references: torch.Tensor) -> None:
    vand.set_references(None)
    zero = vand.predict(images)
    vand.set_references(references)
    try:
        assert vand.n_references == 2 and vand.describe()["k_shot"] == 2
        assert vand.map_max == len(vand.layers) + 2 * len(vand.few_shot_layers) == 12
        few = vand.predict(images)
        maps, scores = official_vand_few_shot(vand, images, references, zero.maps, zero.scores)
        np.testing.assert_allclose(few.maps.numpy(), maps, atol=1e-5, rtol=0)
        np.testing.assert_allclose(few.scores.numpy(), scores, atol=1e-6, rtol=0)
        assert not torch.allclose(few.maps, zero.maps)
        # The map is per image; the per-image score part is the zero-shot text probability.
        alone = vand.predict(images[1:2], over_set=False)
        torch.testing.assert_close(alone.maps[0], few.maps[1], atol=1e-5, rtol=0)
        torch.testing.assert_close(alone.scores[0], zero.scores[1], atol=1e-6, rtol=0)
        # One image: the set normalisation has nothing to compare with (official 0/0): term 0.
        torch.testing.assert_close(vand.predict(images[1:2]).scores, 0.5 * zero.scores[1:2], atol=1e-6, rtol=0)
    finally:
        vand.set_references(None)
    back = vand.predict(images)
    assert torch.equal(back.maps, zero.maps) and torch.equal(back.scores, zero.scores)
    assert vand.n_references == 0 and vand.describe()["k_shot"] == 0 and vand.map_max == 4


def test_vand_few_shot_layers_option(references: torch.Tensor, images: torch.Tensor) -> None:
    method = build_method("vand", "tiny-test", device="cpu", few_shot_layers=[12])
    assert method.few_shot_layers == [12] and method.layers == [3, 6, 9, 12]
    zero = method.predict(images[:2])
    method.set_references(references[:1])
    assert method.map_max == 6
    maps, _ = official_vand_few_shot(method, images[:2], references[:1], zero.maps, zero.scores)
    np.testing.assert_allclose(method.predict(images[:2]).maps.numpy(), maps, atol=1e-5, rtol=0)
    with pytest.raises(InputError, match="repeats"):
        build_method("vand", "tiny-test", device="cpu", few_shot_layers=[6, 6])


def test_volume_engine_normalises_vand_scores_over_the_volume(vand: VAND, references: torch.Tensor) -> None:
    volume = np.random.default_rng(2).random((4, 48, 48)).astype(np.float32)
    volume[2] = 0  # no brain: skipped, score 0
    vand.set_references(references)
    try:
        result = run_volume(volume, vand, batch_size=2)
        from napari_clip_ad.engine import preprocess_slices

        x = preprocess_slices(torch.from_numpy(volume[[0, 1, 3]]), SIZE, vand.backbone.mean, vand.backbone.std)
        per_image = vand.predict(x, over_set=False)
        expected = vand.set_scores(per_image.scores, per_image.maps.flatten(1).amax(1))
        np.testing.assert_allclose(result.scores[[0, 1, 3]], expected.numpy(), atol=1e-5, rtol=0)
        assert result.scores[2] == 0 and result.info["k_shot"] == 2
    finally:
        vand.set_references(None)


# --- WinCLIP+ -------------------------------------------------------------------------------
def anomalib_make_masks(grid: int, kernel: int) -> torch.Tensor:
    index = torch.arange(grid * grid).reshape(1, grid, grid)
    return F.unfold(index.float(), kernel_size=kernel, stride=1).int()


def anomalib_harmonic(window_scores: torch.Tensor, grid: int, masks: torch.Tensor) -> torch.Tensor:
    scores = []
    for idx in range(grid * grid):
        patch_mask = torch.any(masks == idx, dim=0)
        scores.append(sum(patch_mask) / (1 / window_scores.T[patch_mask]).sum(dim=0))
    return torch.stack(scores).T.reshape(window_scores.shape[0], grid, grid).nan_to_num(posinf=0.0)


def anomalib_association(embeddings: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    reference = reference.reshape(-1, embeddings.shape[-1])
    a = F.normalize(embeddings, p=2, dim=-1)
    b = F.normalize(reference.repeat(embeddings.shape[0], 1, 1), p=2, dim=-1)
    return (1 - torch.bmm(a, b.transpose(-2, -1))).min(dim=-1)[0] / 2


def anomalib_class_scores(embeddings: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    return (F.normalize(embeddings, dim=-1) @ F.normalize(text, dim=-1).T / 0.07).softmax(dim=-1)[..., 1]


def test_winclip_plus_is_anomalibs(winclip: WinCLIP, images: torch.Tensor, references: torch.Tensor) -> None:
    winclip.set_references(None)
    zero = winclip.predict(images)
    grid, masks = winclip.grid, [anomalib_make_masks(winclip.grid, k) for k in winclip.scales]
    with torch.no_grad():
        _, ref_windows, ref_patches = winclip.encode_all(references)
        image_emb, windows, patches = winclip.encode_all(images)
    assert patches.shape == (3, grid * grid, 64)  # ln_post'd, unprojected patch tokens
    text = winclip.text_features
    image_scores = anomalib_class_scores(image_emb, text)
    multi = [image_scores.view(-1, 1, 1).repeat(1, grid, grid)]
    multi += [anomalib_harmonic(anomalib_class_scores(w, text), grid, m) for w, m in zip(windows, masks)]
    zero_shot = (len(winclip.scales) + 1) / (1 / torch.stack(multi)).sum(dim=0)
    few = [anomalib_association(patches, ref_patches).reshape(-1, grid, grid)]
    few += [anomalib_harmonic(anomalib_association(w, r), grid, m) for w, r, m in zip(windows, ref_windows, masks)]
    few_shot = torch.stack(few).mean(dim=0)
    expected_maps = F.interpolate(((zero_shot + few_shot) / 2)[:, None], size=(SIZE, SIZE), mode="bilinear")[:, 0]
    expected_scores = (image_scores + few_shot.amax(dim=(-2, -1))) / 2

    winclip.set_references(references)
    try:
        assert winclip.n_references == 2 and winclip.describe()["k_shot"] == 2 and winclip.map_max == 1
        out = winclip.predict(images)
        torch.testing.assert_close(out.maps, expected_maps, atol=1e-5, rtol=0)
        torch.testing.assert_close(out.scores, expected_scores, atol=1e-6, rtol=0)
        alone = winclip.predict(images[2:3])
        torch.testing.assert_close(alone.maps[0], out.maps[2], atol=1e-5, rtol=0)
        torch.testing.assert_close(alone.scores[0], out.scores[2], atol=1e-6, rtol=0)
        # A reference identical to the image: every association distance is 0, the score halves.
        winclip.set_references(images[:1])
        torch.testing.assert_close(winclip.predict(images[:1]).scores, zero.scores[:1] / 2, atol=1e-5, rtol=0)
    finally:
        winclip.set_references(None)
    back = winclip.predict(images)
    assert torch.equal(back.maps, zero.maps) and torch.equal(back.scores, zero.scores)
    assert winclip.n_references == 0


# --- refusals -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["anomalyclip", "adaclip", "anovl"])
def test_methods_without_few_shot_refuse_references(name: str, references: torch.Tensor) -> None:
    method = build_method(name, "tiny-test", device="cpu")
    method.set_references(None)  # zero-shot is always fine
    with pytest.raises(InputError, match="no few-shot mode") as info:
        method.set_references(references)
    assert "\n" not in str(info.value) and "k_shot" not in method.describe()


@pytest.mark.parametrize(
    ("bad", "message"),
    [(torch.zeros(3, SIZE, SIZE), "K, 3, H, W"), (torch.zeros(0, 3, SIZE, SIZE), "K >= 1"),
     (torch.zeros(1, 3, 224, 224), "built for 240"), (torch.full((1, 3, SIZE, SIZE), float("nan")), "NaN")],
)
def test_bad_reference_images_are_refused(vand: VAND, winclip: WinCLIP, bad: torch.Tensor, message: str) -> None:
    for method in (vand, winclip):
        with pytest.raises(InputError, match=message):
            method.set_references(bad)
        assert method.n_references == 0
