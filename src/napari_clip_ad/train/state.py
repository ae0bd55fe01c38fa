"""Resumable training state without pickle: optimizer tensors + RNG in safetensors, scalars in JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_path, write_json
from ..errors import InputError


def save_train_state(path: Path, optimizer: torch.optim.Optimizer, scalars: dict[str, Any]) -> None:
    """Write ``path`` (.safetensors: optimizer state tensors, torch RNG) and its ``.json`` (everything else)."""
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
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))
    write_json(path.with_suffix(".json"), {**scalars, "param_groups": state["param_groups"], "optim_plain": plain})


def load_train_state(path: Path, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore optimizer and torch RNG from :func:`save_train_state` files; returns the scalars."""
    from safetensors.torch import load_file

    side = path.with_suffix(".json")
    if not path.is_file() or not side.is_file():
        raise InputError(f"{path}: training state missing; cannot --resume (start a new run without --resume)")
    tensors = load_file(str(path))
    scalars = json.loads(side.read_text(encoding="utf-8"))
    per_param: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            per_param.setdefault(int(index), {})[name] = value
    for index, values in scalars.pop("optim_plain", {}).items():
        per_param.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict({"state": per_param, "param_groups": scalars.pop("param_groups")})
    torch.set_rng_state(tensors["rng.torch"])
    return scalars
