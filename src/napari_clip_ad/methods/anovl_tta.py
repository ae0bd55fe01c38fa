"""AnoVL's test-time parts: the 22-view augmentation of the image score and the test-time adapter.

Official reference: hq-deng/AnoVL, utils.py (``aug``), model.py (``TextAdapter``) and vl_test.py
(``loss_func``, ``weight_reset``, the adaptation loop). Randomness comes from one seeded
``torch.Generator`` per image (the official code draws from the global RNG stream seeded once per
run), so every image's result is reproducible and independent of the other images.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

ROTATIONS: tuple[float, ...] = (
    -math.pi / 4, -3 * math.pi / 16, -math.pi / 8, -math.pi / 16, math.pi / 16, math.pi / 8, 3 * math.pi / 16, math.pi / 4)
"""Small rotation angles (radians), in the official order."""
SHIFTS: tuple[tuple[float, float], ...] = (
    (0.2, 0.2), (-0.2, 0.2), (-0.2, -0.2), (0.2, -0.2), (0.1, 0.1), (-0.1, 0.1), (-0.1, -0.1), (0.1, -0.1))
"""Translations in normalised ([-1, 1]) grid units."""
GREY_WEIGHTS: tuple[float, float, float] = (0.299, 0.587, 0.114)
"""kornia ``rgb_to_grayscale`` weights (applied to the CLIP-normalised image, as the official code does)."""
NOISE_STD = 0.05 * 1.1 ** 1
"""Std of the Gaussian noise ``TextAdapter.aug`` adds to the tokens (noise_level 1)."""


def _affine(image: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    theta = theta[None].to(image.device, image.dtype).expand(image.shape[0], -1, -1)
    grid = F.affine_grid(theta, list(image.shape), align_corners=True)
    return F.grid_sample(image, grid, mode="bilinear", padding_mode="reflection", align_corners=True)


def augment_views(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The official ``aug`` of one image: (1, 3, H, W) -> (22, 3, H, W); see :func:`augment_view_batch`."""
    return augment_view_batch(image, torch.randperm(22, generator=generator))[0]


def view_order(generator: torch.Generator) -> torch.Tensor:
    """The seeded shuffle of the 22 views (``torch.randperm``), position -> view (view 0: the original)."""
    return torch.randperm(22, generator=generator)


def augment_view_batch(images: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """The official ``aug`` for a batch: each image plus 21 transformed copies, in the order ``order``.

    Views: original; 8 rotations by +-pi/16 .. +-pi/4 and 8 shifts by +-0.1 / +-0.2 (affine grids,
    bilinear, reflection padding, align_corners=True); horizontal flip; greyscale; 90/180/270-degree
    turns (kornia ``rotate`` there; ``torch.rot90`` here, identical up to ~1e-5 px of sampling error).

    Every image of the batch gets the same views in the same order (the official seeded stream
    restarts per image here, so the shuffle is the same for each); per image the result equals the
    one-image call exactly (grid sampling has no cross-batch interaction).

    Args:
        images: (B, 3, H, W) CLIP-normalised slices.
        order: (22,) shuffle from :func:`view_order`.

    Returns:
        (B, 22, 3, H, W).
    """
    image = images
    views = [image]
    for angle in ROTATIONS:
        t = torch.tensor(angle)  # float32 angle, cos/sin in float32, as the official get_rot_mat
        views.append(_affine(image, torch.stack([
            torch.stack([t.cos(), -t.sin(), torch.tensor(0.0)]),
            torch.stack([t.sin(), t.cos(), torch.tensor(0.0)])])))
    for a, b in SHIFTS:
        views.append(_affine(image, torch.tensor([[1.0, 0.0, a], [0.0, 1.0, b]])))
    views.append(image.flip(-1))
    r, g, b = image[:, 0:1], image[:, 1:2], image[:, 2:3]
    views.append((GREY_WEIGHTS[0] * r + GREY_WEIGHTS[1] * g + GREY_WEIGHTS[2] * b).repeat(1, 3, 1, 1))
    views.extend(torch.rot90(image, k, dims=(-2, -1)) for k in (1, 2, 3))
    stacked = torch.stack(views, dim=1)
    return stacked[:, order.to(stacked.device)]


class StateAdapter(nn.Module):
    """The official ``TextAdapter``: tokens move towards a tanh-weighted sum of state sentences.

    ``out = 0.5 * x + 0.5 * tanh(Linear(x / |x|)) @ sentences`` where ``sentences`` (2 * S, E) are the
    normalised sentence embeddings of both sides (normal first). Parameters: Linear(E, 2 * S).
    """

    def __init__(self, embed_dim: int, n_sentences: int) -> None:
        super().__init__()
        self.linear = nn.Linear(embed_dim, n_sentences)

    @torch.no_grad()
    def reset(self, generator: torch.Generator) -> None:
        """``weight_reset``: ``nn.Linear.reset_parameters`` (both U(+-1/sqrt(fan_in))), from ``generator``."""
        bound = 1.0 / math.sqrt(self.linear.in_features)
        for param in (self.linear.weight, self.linear.bias):
            values = torch.empty(param.shape, dtype=param.dtype).uniform_(-bound, bound, generator=generator)
            param.copy_(values)

    def forward(self, tokens: torch.Tensor, sentences: torch.Tensor) -> torch.Tensor:
        """Adapted tokens, same shape as ``tokens`` (..., E)."""
        unit = tokens / tokens.norm(dim=-1, keepdim=True)
        return 0.5 * tokens + 0.5 * (torch.tanh(self.linear(unit)) @ sentences)


def state_probabilities(tokens: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """softmax over (normal, abnormal) of normalised tokens @ text, no temperature: (..., 2)."""
    return torch.softmax((tokens / tokens.norm(dim=-1, keepdim=True)) @ text, dim=-1)


def pseudo_label_loss(probs: torch.Tensor) -> torch.Tensor:
    """The official ``loss_func`` on (2, H, W, 2) probabilities of (clean, noisy) tokens.

    Entropy of the clean prediction plus 0.5 x cross-entropy with pseudo-labels "clean = normal"
    and "noisy = abnormal".
    """
    clean, noisy = probs[0], probs[1:]
    soft = -(clean * clean.log()).sum(-1).mean()
    mask = torch.zeros_like(noisy)
    mask[..., 1] = 1
    hard = (-mask * noisy.log() - (1 - mask) * clean.log()).sum(-1).mean()
    return soft + 0.5 * hard


def adapt_tokens(
    adapter: StateAdapter,
    tokens: torch.Tensor,
    text: torch.Tensor,
    sentences: torch.Tensor,
    epochs: int,
    lr: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """Re-initialise ``adapter``, fit it on one image's pseudo-labels, return its adapted tokens.

    Official loop: AdamW (lr, default weight decay 0.01), ``epochs`` steps, each on the clean tokens
    and one noisy copy (N(0, 0.055) noise). The official optimiser is created once per object class,
    so its Adam moments carry over from earlier test images; we start a fresh one per image so the
    result depends on this image only.

    Args:
        adapter: The adapter (re-initialised here).
        tokens: (1, H, W, E) patch tokens of one image, no grad.
        text: (E, 2) text features. sentences: (2 * S, E) normalised sentence embeddings.
        epochs: Optimisation steps. lr: Learning rate.
        generator: CPU generator for the re-initialisation and the noise.

    Returns:
        (1, H, W, E) adapted tokens (no grad).
    """
    tokens = tokens.detach()
    adapter.reset(generator)
    optimiser = torch.optim.AdamW(adapter.parameters(), lr)
    with torch.enable_grad():
        for _ in range(epochs):
            noise = torch.normal(0.0, NOISE_STD, tuple(tokens.shape), generator=generator).to(tokens)
            batch = torch.cat([tokens, tokens + noise], dim=0)
            loss = pseudo_label_loss(state_probabilities(adapter(batch, sentences), text))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    with torch.no_grad():
        return adapter(tokens, sentences)
