"""Frozen-encoder feature cache: the backbone runs once per (slice, augmented view), not once per step.

Correctness: the cached value is exactly what the frozen encoder returns for that augmented view, so
training on the cache equals training without it whenever the same views are drawn (the loop draws
views from a fixed set of ``views`` seeded augmentations per slice in both modes).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

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


def default_memory_budget(world: int = 1) -> int:
    """Bytes of RAM the cache may hold per process: half the machine's physical memory, shared by the ranks."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: assume 16 GiB
        total = 16 << 30
    return int(total // 2 // max(1, world))


class FeatureCache:
    """Store of frozen-encoder outputs keyed by (slice, view): in RAM up to a budget, then on disk.

    A full study overflows any RAM (VAND on ViT-L/14 at 240 px: 4.7 MB per slice and view, ~240 GB for
    BraTS 2023 with 4 views), so entries past ``memory_bytes`` are written as safetensors files under
    ``spill_dir`` (no pickle) and read back on demand; values are identical either way.

    Args:
        n_slices: Number of slices. views: Views per slice.
        memory_bytes: RAM budget (None: :func:`default_memory_budget`).
        spill_dir: Folder for entries past the budget (None: keep everything in RAM). Emptied on start.
    """

    def __init__(self, n_slices: int, views: int, memory_bytes: int | None = None, spill_dir: Path | None = None) -> None:
        self.n_slices, self.views = n_slices, views
        self.memory_bytes = default_memory_budget() if memory_bytes is None else int(memory_bytes)
        self.spill_dir = spill_dir
        self._store: dict[tuple[int, int], Tree] = {}
        self._spilled: set[tuple[int, int]] = set()
        self._template: Tree = None
        self._held = 0
        if spill_dir is not None and spill_dir.is_dir():
            shutil.rmtree(spill_dir)

    def __contains__(self, key: tuple[int, int]) -> bool:
        return key in self._store or key in self._spilled

    def __len__(self) -> int:
        return len(self._store) + len(self._spilled)

    @property
    def n_spilled(self) -> int:
        """Entries kept on disk."""
        return len(self._spilled)

    def _path(self, key: tuple[int, int]) -> Path:
        assert self.spill_dir is not None
        return self.spill_dir / f"{key[0]}_{key[1]}.safetensors"

    def put(self, keys: Sequence[tuple[int, int]], batch: Tree) -> None:
        """Store a batch of encoder outputs, one entry per key."""
        cpu = map_tree(lambda t: t.detach().to("cpu"), batch)
        for row, key in enumerate(keys):
            entry = map_tree(lambda t, row=row: t[row : row + 1].clone(), cpu)
            size = _nbytes(entry)
            if self._template is None:
                self._template = entry
            if self.spill_dir is None or self._held + size <= self.memory_bytes:
                self._store[key] = entry
                self._held += size
            else:
                self.spill_dir.mkdir(parents=True, exist_ok=True)
                save_file({str(i): t.contiguous() for i, t in enumerate(_leaves(entry))}, str(self._path(key)))
                self._spilled.add(key)

    def _entry(self, key: tuple[int, int]) -> Tree:
        if key in self._store:
            return self._store[key]
        stored = load_file(str(self._path(key)))
        leaves = iter(stored[str(i)] for i in range(len(stored)))
        return map_tree(lambda _: next(leaves), self._template)

    def get(self, keys: Sequence[tuple[int, int]], device: torch.device) -> Tree:
        """A batch of stored outputs, in key order, on ``device``."""
        return map_tree(lambda t: t.to(device, non_blocking=True), cat_trees([self._entry(k) for k in keys]))

    def nbytes(self) -> int:
        """RAM held by the cache (entries on disk not counted)."""
        return self._held

    def close(self) -> None:
        """Drop every entry and delete the spilled files."""
        self._store.clear()
        self._spilled.clear()
        self._held = 0
        if self.spill_dir is not None and self.spill_dir.is_dir():
            shutil.rmtree(self.spill_dir)


def _leaves(tree: Tree) -> list[torch.Tensor]:
    """The tensors of a tree in :func:`map_tree` order."""
    found: list[torch.Tensor] = []
    map_tree(lambda t: found.append(t) or t, tree)
    return found


def _nbytes(tree: Tree) -> int:
    return sum(t.numel() * t.element_size() for t in _leaves(tree))
