"""Loading a CLIP backbone from a local checkpoint file without executing untrusted code."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

from ..errors import WeightsError


def is_torchscript(path: Path) -> bool:
    """True for a TorchScript archive (a zip holding compiled code)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in archive.namelist())


def read_state_dict(path: Path, trusted: bool = False) -> dict[str, torch.Tensor]:
    """Read a tensor dict from safetensors, a weights-only torch pickle, or (trusted) TorchScript.

    Raises:
        WeightsError: Unreadable file, a pickle that would run code, or TorchScript when not trusted.
    """
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:
            raise WeightsError(f"{path}: not a readable safetensors file ({exc})") from None
    if is_torchscript(path):
        if not trusted:
            raise WeightsError(f"{path}: TorchScript archive (can run code when loaded); pass it as trusted only if you trust its source")
        try:
            return torch.jit.load(str(path), map_location="cpu").state_dict()
        except Exception as exc:
            raise WeightsError(f"{path}: TorchScript archive could not be loaded ({exc})") from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "forbidden object"
        raise WeightsError(f"{path}: refused: the pickle would run code or build objects other than tensors ({first[:160]}); convert it to safetensors") from None
    except Exception as exc:
        raise WeightsError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''})") from None
    return unwrap_state_dict(obj, path)


def unwrap_state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """Find the tensor dict inside a checkpoint (``state_dict`` / ``model`` keys, ``module.`` prefixes)."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: no tensor state dict found in the checkpoint")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def load_local_checkpoint(path: Path, trusted: bool = False):
    """Build an open_clip CLIP model from an OpenAI-format or open_clip state dict file.

    The architecture (widths, depths, patch size, grid) is inferred from the tensor shapes; the
    number of attention heads is width / 64, as in every OpenAI and open_clip CLIP ViT.
    """
    import open_clip
    from open_clip.model import build_model_from_openai_state_dict

    from .loading import Backbone

    state = read_state_dict(path, trusted=trusted)
    from .dinov2 import is_dinov2_state

    if is_dinov2_state(state):
        from .loading import dinov2_backbone

        return dinov2_backbone(state, str(path), str(path))
    if "visual.proj" not in state or "token_embedding.weight" not in state:
        raise WeightsError(
            f"{path}: not a CLIP ViT checkpoint in OpenAI/open_clip format (no visual.proj or token_embedding.weight); "
            "for hub models use 'hf-hub:org/repo'"
        )
    try:
        model = build_model_from_openai_state_dict(dict(state), quick_gelu=False, cast_dtype=None)
        # open_clip builds through fp16 (OpenAI files are half precision): reload the tensors as stored.
        model = model.float()
        model.load_state_dict({k: v for k, v in state.items() if k not in ("input_resolution", "context_length", "vocab_size")})
    except Exception as exc:
        raise WeightsError(f"{path}: could not infer a CLIP architecture from its keys ({str(exc).splitlines()[0][:200]})") from None
    width = state["visual.conv1.weight"].shape[0]
    patch = state["visual.conv1.weight"].shape[-1]
    layers = len([k for k in state if k.startswith("visual.") and k.endswith(".attn.in_proj_weight")])
    arch = f"ViT(width={width},layers={layers},patch={patch})"
    return Backbone(str(path), model, open_clip.get_tokenizer("ViT-B-16"), arch, str(path))
