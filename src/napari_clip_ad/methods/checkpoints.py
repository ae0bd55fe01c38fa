"""Reading and writing method weights: our safetensors files and the authors' released checkpoints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..atomic import atomic_path, write_json
from ..backbones.local_file import is_torchscript
from ..errors import WeightsError
from .base import AnomalyMethod
from .released import RELEASED, local_path

FORMAT = "napari-clip-ad"


def resolve_weights(weights: str | Path) -> Path:
    """A released-weights name (looked up in the cache) or a file path -> an existing file."""
    name = str(weights)
    if name in RELEASED:
        path = local_path(RELEASED[name])
        if not path.is_file():
            release = RELEASED[name]
            how = f"run 'napari-clip-ad weights fetch {name}'" if release.url else f"download it from {release.page}"
            raise WeightsError(f"released weights {name!r} are not in the cache ({path}); {how} and put the file there")
        return path
    path = Path(name).expanduser()
    if not path.is_file():
        raise WeightsError(f"{path}: weight file not found (or use a name from 'napari-clip-ad weights list')")
    return path


def save_method_weights(method: AnomalyMethod, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write the trainable parts as safetensors (atomically) plus a ``.json`` sidecar.

    The safetensors header records format, method, backbone architecture and image size, so a file
    for another method or backbone is refused when loaded.
    """
    from safetensors.torch import save_file

    path = Path(path)
    meta = {
        "format": FORMAT,
        "method": method.name,
        "backbone": method.backbone.name,
        "backbone_arch": method.backbone.arch,
        "image_size": str(method.image_size),
        "version": __version__,
    }
    state = {k: v.detach().cpu().contiguous() for k, v in method.trainable_state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=meta)
    sidecar = {**meta, **(metadata or {})}
    write_json(path.with_suffix(".json"), sidecar)
    return path


def read_our_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header metadata of one of our safetensors files."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            state = {k: handle.get_tensor(k) for k in handle.keys()}
    except Exception as exc:
        raise WeightsError(f"{path}: not a readable safetensors file ({str(exc).splitlines()[0][:160]})") from None
    return state, meta


def read_released(path: Path) -> Any:
    """Load an authors' checkpoint with ``weights_only=True`` (never runs code)."""
    import pickle

    if is_torchscript(path):
        raise WeightsError(f"{path}: TorchScript archive, not a method checkpoint")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = (str(exc).splitlines() or ["forbidden object"])[0]
        raise WeightsError(f"{path}: refused: unpickling would run code or build non-tensor objects ({first[:160]})") from None
    except Exception as exc:
        raise WeightsError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:160]})") from None


def load_method_weights(method: AnomalyMethod, weights: str | Path) -> Path:
    """Load trained parts into ``method`` from our safetensors or the authors' released format.

    Raises:
        WeightsError: Missing or unreadable file, unsafe pickle, or a checkpoint of another
            method, backbone or shape.
    """
    path = resolve_weights(weights)
    if path.suffix == ".safetensors":
        state, meta = read_our_weights(path)
        if meta.get("format") != FORMAT:
            raise WeightsError(f"{path}: safetensors file without napari-clip-ad metadata; save weights with napari-clip-ad")
        if meta.get("method") != method.name:
            raise WeightsError(f"{path}: weights are for method {meta.get('method')!r}, not {method.name!r}")
        if meta.get("backbone_arch") and meta["backbone_arch"] != method.backbone.arch:
            raise WeightsError(
                f"{path}: weights were trained on backbone {meta.get('backbone')!r} ({meta['backbone_arch']}), "
                f"not {method.backbone.name!r} ({method.backbone.arch}); pass the matching --backbone"
            )
    else:
        state = method.convert_official_checkpoint(read_released(path), str(path))
    method.load_trainable_state(state, str(path))
    method.weights_source = str(path)
    return path


def sidecar(path: str | Path) -> dict[str, Any]:
    """The JSON sidecar of a weights file ({} if none)."""
    side = Path(path).with_suffix(".json")
    return json.loads(side.read_text()) if side.is_file() else {}
