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


def load_train_state(path: Path, optimizer: torch.optim.Optimizer, side: Path | None = None) -> dict[str, Any]:
    """Restore optimizer and torch RNG from :func:`save_train_state` files; returns the scalars.

    Args:
        path: The ``.safetensors`` state. side: Its JSON (default: ``path`` with suffix ``.json``).

    Raises:
        InputError: A missing or damaged file (named), or a torn pair (epochs of the two files differ).
    """
    from safetensors.torch import load_file

    side = side or path.with_suffix(".json")
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


CHECKPOINT_FILES = ("train_state.safetensors", "train_state.json", "last.safetensors", "last.json")
"""The files of one resumable save, in the order they are written."""


def previous_name(name: str) -> str:
    """``last.safetensors`` -> ``last.prev.safetensors``: the save before the current one."""
    stem, suffix = name.rsplit(".", 1)
    return f"{stem}.prev.{suffix}"


def keep_previous(checkpoints: Path) -> None:
    """Hard-link the current save's files as ``*.prev.*`` before a new save replaces them.

    With the epoch/step stamps this makes a save all-or-nothing for resume: a kill while the new files
    land leaves the previous save whole (see :func:`consistent_save`). Links cost no disk space.
    """
    import os

    for name in CHECKPOINT_FILES:
        current = checkpoints / name
        if current.is_file():
            tmp = checkpoints / f".tmp-{os.getpid()}-{previous_name(name)}"
            tmp.unlink(missing_ok=True)
            try:
                os.link(current, tmp)
            except OSError:  # no hard links on this filesystem: copy
                import shutil

                shutil.copyfile(current, tmp)
            os.replace(tmp, checkpoints / previous_name(name))


def _json_stamp(path: Path) -> dict[str, int] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return {key: int(data[key]) for key in STAMP_KEYS}
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        return None


def consistent_save(checkpoints: Path) -> tuple[Path, Path, Path, bool]:
    """The newest save whose weights, state tensors and state JSON carry one epoch and step.

    Returns:
        (weights, state, state_json, fell_back): fell_back is True when the current files were torn
        by a kill while saving and the previous save (``*.prev.*``) is used.

    Raises:
        InputError: No consistent save (named files and epochs).
    """
    current = (checkpoints / "last.safetensors", checkpoints / "train_state.safetensors", checkpoints / "train_state.json")
    previous = tuple(p.with_name(previous_name(p.name)) for p in current)
    found = {}
    for label, (weights, state, side) in (("current", current), ("previous", previous)):
        if not (weights.is_file() and state.is_file() and side.is_file()):
            found[label] = None
            continue
        weights_stamp = read_stamp(weights) or _json_stamp(weights.with_suffix(".json"))
        state_stamp, side_stamp = read_stamp(state), _json_stamp(side)
        if side_stamp is None:
            if label == "current":
                raise InputError(f"{side}: damaged (no epoch/step); the run cannot be resumed exactly: restart it with "
                                 "--overwrite (checkpoints/best.safetensors keeps the best weights)")
            found[label] = None
            continue
        stamps = [s for s in (weights_stamp, state_stamp) if s is not None]  # files before the stamps: unchecked
        found[label] = side_stamp if all(s == side_stamp for s in stamps) else False
    if found["current"]:
        return (*current, False)
    if found["previous"]:
        return (*previous, True)
    if found["current"] is None and found["previous"] is None:
        missing = next(p for p in current if not p.is_file())
        raise InputError(f"{missing}: training state missing; cannot --resume (start a new run without --resume)")
    epochs = {p.name: (read_stamp(p) or {}).get("epoch") if p.suffix == ".safetensors" else (_json_stamp(p) or {}).get("epoch")
              for p in current if p.is_file()}
    raise InputError(f"{checkpoints}: torn checkpoint (epochs {epochs}; the run was killed while saving) and no whole "
                     "previous save; it cannot be resumed exactly: restart with --overwrite "
                     "(best.safetensors keeps the best weights so far)")
