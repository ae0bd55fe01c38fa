"""Reading and writing method weights: our safetensors files and the authors' released checkpoints."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..atomic import atomic_path, write_json
from ..backbones.local_file import ACCEPTED_FORMATS, check_tensors, is_torchscript, not_a_torch_file, unreadable
from ..errors import WeightsError
from .base import AnomalyMethod
from .released import RELEASED, local_path

FORMAT = "napari-clip-ad"


@dataclass
class WeightsFile:
    """A weights file read once: ours (safetensors ``state`` + header ``meta``) or a released ``obj``.

    Attributes:
        path: The resolved file.
        ours: True for our safetensors files, False for the authors' released checkpoints.
        state: Our flat state dict (ours only).
        meta: Our safetensors header metadata (ours only).
        obj: The object ``torch.load(weights_only=True)`` returned (released only).
    """

    path: Path
    ours: bool
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, str] = field(default_factory=dict)
    obj: Any = None


def read_weights_file(weights: str | Path) -> WeightsFile:
    """Resolve a weights name or path and read it (safely) without building a method."""
    path = resolve_weights(weights)
    if path.suffix == ".safetensors":
        state, meta = read_our_weights(path)
        return WeightsFile(path, True, state=state, meta=meta)
    return WeightsFile(path, False, obj=with_companions(path, read_released(path)))


def with_companions(path: Path, obj: Any) -> Any:
    """Add the checkpoint files the official test script reads beside the one given.

    AA-CLIP's train.py writes ``image_adapter[_N].pth`` and ``text_adapter.pth`` into one folder and
    test.py reads both: given an image-adapter file, the folder's ``text_adapter.pth`` (read the same
    safe way) is merged in as ``obj["text_adapter"]``.
    """
    if isinstance(obj, dict) and "image_adapter" in obj and "text_adapter" not in obj:
        companion = path.parent / "text_adapter.pth"
        if companion.is_file():
            text = read_released(companion)
            if isinstance(text, dict) and "text_adapter" in text:
                obj = {**obj, "text_adapter": text["text_adapter"]}
    return obj


def official_layers(n_heads: int, n_blocks: int) -> list[int]:
    """Blocks the official test scripts tap for a checkpoint with ``n_heads`` per-layer heads.

    AdaCLIP test.py: ``substage = n_layers // 4; features_list = [substage, 2 * substage, ...]``; VAND's
    and MVFA-AD's released runs use the same 6 12 18 24 on ViT-L (24 blocks). Generalised to n heads.
    """
    step = n_blocks // n_heads
    if step < 1:
        raise WeightsError(f"checkpoint has {n_heads} per-layer heads but the backbone has only {n_blocks} blocks")
    return [step * (i + 1) for i in range(n_heads)]


def checkpoint_layers(cls: type[AnomalyMethod], loaded: WeightsFile, n_blocks: int) -> tuple[list[int], str] | None:
    """The tapped blocks a checkpoint fixes, and how they were found; None when it fixes none.

    Our files record their blocks in the header (``layers``; older files: None, the method default they
    were trained with); released checkpoints are read by their number of per-layer heads and the
    official tapping rule (:func:`official_layers`) when their head count differs from the method's
    default (AdaCLIP: 4 released heads vs the study's 3 blocks); an equal count keeps the default blocks.
    """
    if loaded.ours:
        if loaded.meta.get("layers"):
            try:
                layers = [int(i) for i in json.loads(loaded.meta["layers"])]
            except (ValueError, TypeError):
                raise WeightsError(f"{loaded.path}: header field 'layers' is not a list of block numbers; re-save the weights") from None
            return layers, f"checkpoint header (blocks {' '.join(map(str, layers))})"
        return None  # files saved before the header recorded blocks: the method's default, as when they were made
    n_heads = cls.checkpoint_head_count(loaded.obj, ours=False)
    if not n_heads or n_heads == len(cls.default_layers):
        return None  # the method's default blocks have that many heads: keep them (outputs as before)
    layers = official_layers(n_heads, n_blocks)
    return layers, f"checkpoint: {n_heads} per-layer heads -> blocks {' '.join(map(str, layers))} (official rule n_blocks // {n_heads} x 1..{n_heads})"


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


def save_method_weights(method: AnomalyMethod, path: str | Path, metadata: dict[str, Any] | None = None,
                        header: dict[str, str] | None = None) -> Path:
    """Write the trainable parts as safetensors (atomically) plus a ``.json`` sidecar.

    The safetensors header records format, method, backbone architecture and image size, so a file
    for another method or backbone is refused when loaded; ``header`` adds fields (training: epoch, step).
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
    if getattr(method, "layers", None):
        meta["layers"] = json.dumps([int(i) for i in method.layers])
    meta.update({str(k): str(v) for k, v in (header or {}).items()})
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
        raise WeightsError(f"{path}: not a readable safetensors file ({(str(exc).splitlines() or [''])[0][:160]}); "
                           f"accepted: {'; or '.join(ACCEPTED_FORMATS)}") from None
    return state, meta


def read_released(path: Path) -> Any:
    """Load an authors' checkpoint with ``weights_only=True`` (never runs code)."""
    import pickle

    if is_torchscript(path):
        raise WeightsError(f"{path}: TorchScript archive, not a method checkpoint")
    if (error := not_a_torch_file(path)) is not None:
        raise error
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = (str(exc).splitlines() or ["forbidden object"])[0]
        raise WeightsError(f"{path}: refused: unpickling would run code or build non-tensor objects ({first[:160]})") from None
    except Exception as exc:
        raise unreadable(path, exc) from None


def load_method_weights(method: AnomalyMethod, weights: str | Path | WeightsFile) -> Path:
    """Load trained parts into ``method`` from our safetensors or the authors' released format.

    Args:
        method: The built method.
        weights: A released-weights name, a path, or a file already read by :func:`read_weights_file`.

    Raises:
        WeightsError: Missing or unreadable file, unsafe pickle, or a checkpoint of another
            method, backbone or shape.
    """
    loaded = weights if isinstance(weights, WeightsFile) else read_weights_file(weights)
    path = loaded.path
    if loaded.ours:
        state, meta = loaded.state, loaded.meta
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
        state = method.convert_official_checkpoint(loaded.obj, str(path))
    # Both formats (and every caller: build_method, training, resume) pass here with the tensors to load.
    check_tensors(state, path, expected=method.trainable_state_dict())
    method.load_trainable_state(state, str(path))
    method.weights_source = str(path)
    return path


def sidecar(path: str | Path) -> dict[str, Any]:
    """The JSON sidecar of a weights file ({} if none)."""
    side = Path(path).with_suffix(".json")
    return json.loads(side.read_text()) if side.is_file() else {}
