"""Frozen-encoder feature cache: the backbone runs once per (slice, augmented view), not once per step.

Correctness: the cached value is exactly what the frozen encoder returns for that augmented view, so
training on the cache equals training without it whenever the same views are drawn (the loop draws
views from a fixed set of ``views`` seeded augmentations per slice in both modes).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

Tree = Any
"""A tensor, or a (named) tuple / list / dict of tensors: whatever ``tap_tokens`` returns."""


def map_tree(fn: Callable[[torch.Tensor], torch.Tensor], tree: Tree) -> Tree:
    """Apply ``fn`` to every tensor of a tree, keeping its structure."""
    if isinstance(tree, torch.Tensor):
        return fn(tree)
    if isinstance(tree, dict):
        return {k: map_tree(fn, v) for k, v in tree.items()}
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)(*(map_tree(fn, v) for v in tree))
    if isinstance(tree, (tuple, list)):
        return type(tree)(map_tree(fn, v) for v in tree)
    return tree


def cat_trees(trees: Sequence[Tree]) -> Tree:
    """Concatenate trees of the same structure along the batch dimension."""
    first = trees[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(list(trees))
    if isinstance(first, dict):
        return {k: cat_trees([t[k] for t in trees]) for k in first}
    if isinstance(first, tuple) and hasattr(first, "_fields"):
        return type(first)(*(cat_trees([t[i] for t in trees]) for i in range(len(first))))
    if isinstance(first, (tuple, list)):
        return type(first)(cat_trees([t[i] for t in trees]) for i in range(len(first)))
    return first


def supports_cache(method: Any) -> bool:
    """True when the trainable parts sit after a frozen encoder: ``tap_tokens`` + ``head``."""
    return callable(getattr(method, "tap_tokens", None)) and callable(getattr(method, "head", None))


class FeatureCache:
    """In-memory store of frozen-encoder outputs, keyed by (slice, view), on CPU.

    Args:
        n_slices: Number of slices. views: Views per slice.
    """

    def __init__(self, n_slices: int, views: int) -> None:
        self.n_slices, self.views = n_slices, views
        self._store: dict[tuple[int, int], Tree] = {}

    def __contains__(self, key: tuple[int, int]) -> bool:
        return key in self._store

    def __len__(self) -> int:
        return len(self._store)

    def put(self, keys: Sequence[tuple[int, int]], batch: Tree) -> None:
        """Store a batch of encoder outputs, one entry per key."""
        cpu = map_tree(lambda t: t.detach().to("cpu"), batch)
        for row, key in enumerate(keys):
            self._store[key] = map_tree(lambda t, row=row: t[row : row + 1].clone(), cpu)

    def get(self, keys: Sequence[tuple[int, int]], device: torch.device) -> Tree:
        """A batch of stored outputs, in key order, on ``device``."""
        return map_tree(lambda t: t.to(device, non_blocking=True), cat_trees([self._store[k] for k in keys]))

    def nbytes(self) -> int:
        """Memory held by the cache."""
        total = 0

        def count(t: torch.Tensor) -> torch.Tensor:
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        for value in self._store.values():
            map_tree(count, value)
        return total
