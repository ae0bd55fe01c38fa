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


ACCEPTED_FORMATS = ("safetensors (.safetensors)", "a PyTorch checkpoint of tensors (.pth/.pt/.bin: zip or legacy pickle), "
                    "as the authors released it")
"""What a weights or backbone file may be (shown when a file is none of them)."""

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INTEGER_BUFFERS = ("input_resolution", "context_length", "vocab_size", "position_ids", "num_batches_tracked")
"""Keys of whole-number buffers found in CLIP checkpoints (the only non-float tensors accepted)."""


def check_tensors(tensors: dict[str, torch.Tensor], path: Path | str, expected: dict[str, torch.Tensor] | None = None) -> None:
    """Refuse non-finite values and non-float tensors where floats belong, naming the file and tensor.

    Args:
        tensors: Name -> tensor, as read from ``path``.
        path: The file (for the message).
        expected: The tensors they will be loaded into: a non-float tensor is refused where the target is a float
            (loading would cast it silently). Without it, only :data:`INTEGER_BUFFERS` may be whole numbers.

    Raises:
        WeightsError: A NaN/inf value, or an int8/uint8/bool/complex... tensor where weights are floats.
    """
    for key, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            continue
        if value.dtype in FLOAT_DTYPES:
            if key.endswith("attn_mask"):
                continue  # causal masks hold -inf by design
            # A NaN or inf anywhere makes the sum non-finite: one cheap pass (benchmarks/bench_weight_checks.py);
            # only then (or when finite values overflow the sum) the exact, slower element check.
            if bool(torch.isfinite(value.sum())):
                continue
            finite = torch.isfinite(value)
            if not bool(finite.all()):
                bad = int((~finite).sum())
                raise WeightsError(f"{path}: tensor {key!r} has {bad} NaN/inf value(s) of {value.numel()}; the weights are "
                                   "damaged (or from a diverged training) and would give NaN maps: use another file")
            continue
        wanted = None if expected is None or key not in expected else expected[key].dtype
        allowed = (wanted is not None and not wanted.is_floating_point and not value.is_complex()) or (
            wanted is None and key.rsplit(".", 1)[-1] in INTEGER_BUFFERS and value.dtype in (torch.int32, torch.int64))
        if not allowed:
            raise WeightsError(f"{path}: tensor {key!r} is {str(value.dtype).replace('torch.', '')}, not a float; weights must be "
                               "float16, bfloat16 or float32 (quantised or mask tensors are not weights): use the original file")


def unreadable(path: Path, exc: BaseException) -> WeightsError:
    """The one-line error for a file that no accepted reader could open: what it is not, what is accepted."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(16)
    except OSError as error:
        return WeightsError(f"{path}: cannot read the file ({error.strerror or error})")
    reason = (str(exc).splitlines() or [type(exc).__name__])[0][:120]
    if not head:
        what = "an empty file"
    elif head[:4] == b"PK\x03\x04":
        what = f"a zip archive but not a PyTorch checkpoint ({reason})"
    elif head[:1] == b"\x80":
        what = f"a pickle that is not a readable PyTorch checkpoint ({reason})"
    elif len(head) >= 9 and head[8:9] == b"{":
        what = "a safetensors file with another extension: rename it to .safetensors"
    else:
        what = f"neither a PyTorch checkpoint (zip or pickle) nor safetensors (it starts with {head[:8]!r})"
    return WeightsError(f"{path}: not a weights file: {what}; accepted: {'; or '.join(ACCEPTED_FORMATS)}")


def not_a_torch_file(path: Path) -> WeightsError | None:
    """The :func:`unreadable` error when ``path`` is neither a zip nor a pickle (checked before unpickling)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
    except OSError as error:
        return WeightsError(f"{path}: cannot read the file ({error.strerror or error})")
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        return None
    return unreadable(path, ValueError("no zip or pickle header"))


def read_state_dict(path: Path, trusted: bool = False) -> dict[str, torch.Tensor]:
    """Read a tensor dict from safetensors, a weights-only torch pickle, or (trusted) TorchScript.

    Raises:
        WeightsError: Unreadable file, a pickle that would run code, or TorchScript when not trusted.
    """
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as exc:
            raise WeightsError(f"{path}: not a readable safetensors file ({(str(exc).splitlines() or [''])[0][:160]}); "
                               f"accepted: {'; or '.join(ACCEPTED_FORMATS)}") from None
        check_tensors(state, path)
        return state
    if is_torchscript(path):
        if not trusted:
            raise WeightsError(f"{path}: TorchScript archive (can run code when loaded); pass it as trusted only if you trust its source")
        try:
            state = torch.jit.load(str(path), map_location="cpu").state_dict()
        except Exception as exc:
            raise WeightsError(f"{path}: TorchScript archive could not be loaded ({exc})") from None
        check_tensors(state, path)
        return state
    if (error := not_a_torch_file(path)) is not None:
        raise error
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "forbidden object"
        raise WeightsError(f"{path}: refused: the pickle would run code or build objects other than tensors ({first[:160]}); convert it to safetensors") from None
    except Exception as exc:
        raise unreadable(path, exc) from None
    state = unwrap_state_dict(obj, path)
    check_tensors(state, path)
    return state


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
    from .biomedclip import is_biomedclip_state, load_biomedclip_file

    if is_biomedclip_state(state):
        return load_biomedclip_file(path, state)
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
