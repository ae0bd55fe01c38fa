"""Resumable training state without pickle: optimizer tensors + RNG in safetensors, scalars in JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_path, write_json
from ..errors import InputError


def save_train_state(path: Path, optimizer: torch.optim.Optimizer, scalars: dict[str, Any]) -> None:
    """Write ``path`` (.safetensors: optimizer state tensors, torch RNG) and its ``.json`` (everything else).

    ``scalars`` epoch and step are also stamped into the safetensors header, so a pair torn by a kill
    between the two writes (or against ``last.safetensors``) is detected on resume.
    """
    from safetensors.torch import save_file

    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {"rng.torch": torch.get_rng_state()}
    plain: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                plain.setdefault(str(index), {})[name] = value
    stamp = {key: str(scalars[key]) for key in STAMP_KEYS if key in scalars}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=stamp)
    write_json(path.with_suffix(".json"), {**scalars, "param_groups": state["param_groups"], "optim_plain": plain})


STAMP_KEYS = ("epoch", "step")
"""Fields every checkpoint file of one save carries, so files of different saves are never mixed."""


def read_stamp(path: Path) -> dict[str, int] | None:
    """The epoch and step in a safetensors file's header (None for files written before the stamps)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
    except Exception as exc:
        raise InputError(f"{path}: damaged ({_first_line(exc)}); the checkpoint cannot be resumed: restart with "
                         "--overwrite, or keep checkpoints/best.safetensors as the trained weights") from None
    if not all(key in meta for key in STAMP_KEYS):
        return None
    try:
        return {key: int(meta[key]) for key in STAMP_KEYS}
    except ValueError:
        raise InputError(f"{path}: header epoch/step are not numbers; the file is damaged: restart with --overwrite") from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:160]


def load_train_state(path: Path, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore optimizer and torch RNG from :func:`save_train_state` files; returns the scalars.

    Raises:
        InputError: A missing or damaged file (named), or a torn pair (epochs of the two files differ).
    """
    from safetensors.torch import load_file

    side = path.with_suffix(".json")
    if not path.is_file() or not side.is_file():
        raise InputError(f"{path}: training state missing; cannot --resume (start a new run without --resume)")
    damaged = "the run cannot be resumed exactly: restart it with --overwrite (checkpoints/best.safetensors keeps the best weights)"
    try:
        tensors = load_file(str(path))
    except Exception as exc:
        raise InputError(f"{path}: damaged ({_first_line(exc)}); {damaged}") from None
    try:
        scalars = json.loads(side.read_text(encoding="utf-8"))
        for key in ("epoch", "step", "best_val_dice", "param_groups"):
            scalars[key]  # noqa: B018 - every key must be there
        if "rng.torch" not in tensors:
            raise KeyError("rng.torch")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{side}: damaged ({type(exc).__name__}: {_first_line(exc)}); {damaged}") from None
    stamp = read_stamp(path)
    if stamp is not None and any(stamp[key] != scalars[key] for key in STAMP_KEYS):
        raise InputError(f"{path.parent}: torn training state: {path.name} is epoch {stamp['epoch']} but {side.name} is epoch "
                         f"{scalars['epoch']} (the run was killed while saving); {damaged}")
    per_param: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            per_param.setdefault(int(index), {})[name] = value
    for index, values in scalars.pop("optim_plain", {}).items():
        per_param.setdefault(int(index), {}).update(values)
    try:
        optimizer.load_state_dict({"state": per_param, "param_groups": scalars.pop("param_groups")})
        torch.set_rng_state(tensors["rng.torch"])
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise InputError(f"{path}: does not fit this run's optimizer ({_first_line(exc)}); {damaged}") from None
    return scalars
