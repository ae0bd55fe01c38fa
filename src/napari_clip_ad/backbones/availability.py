"""Whether a backbone's and a method's weights files are here, decided from local files only (no network).

The napari widget shows this before Run: a missing file is said at once (with what to download)
instead of after a hub time-out, and the tiny random backbone is offered in its place.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import WeightsError
from .biomedclip import missing_hub_text_repos
from .loading import _cached_hub_file, _cached_model_cfg, _offline_hint, _spec_for


@dataclass(frozen=True)
class Availability:
    """Whether a weights file can be loaded without a download.

    Attributes:
        available: True when nothing has to be downloaded.
        random: True for random-weights backbones (results mean nothing).
        message: One line for the user: where the file is, or what to download.
    """

    available: bool
    random: bool = False
    message: str = ""


def backbone_availability(name: str) -> Availability:
    """Whether backbone ``name`` (registry name, ``ARCH:TAG``, ``hf-hub:`` name or file) is here, offline.

    Only the local Hugging Face cache is looked at (``huggingface_hub.try_to_load_from_cache``):
    this never waits on the network, whatever ``HF_HUB_OFFLINE`` says.
    """
    if Path(name).expanduser().is_file():
        return Availability(True, message=f"backbone file {name}")
    try:
        spec = _spec_for(name)
    except WeightsError as exc:
        return Availability(False, message=str(exc))
    if spec.random_weights:
        return Availability(True, random=True, message=f"{name}: random weights, built here (results mean nothing)")
    if spec.model.startswith("hf-hub:"):
        from huggingface_hub import try_to_load_from_cache

        repo = spec.model[len("hf-hub:"):]
        if isinstance(try_to_load_from_cache(repo, "open_clip_config.json"), str):
            missing = missing_hub_text_repos(_cached_model_cfg(repo))
            if missing:
                return Availability(False, message=f"{name}'s text tower is not downloaded: download {', '.join(missing)} "
                                    "(config.json, vocab.txt, tokenizer_config.json) into ~/.cache/huggingface/hub")
            return Availability(True, message=f"{name}: in the local Hugging Face cache")
        return Availability(False, message=f"{name} is not downloaded: {_offline_hint(spec.model, '')}")
    if spec.pretrained:
        path = _cached_hub_file(spec.model, spec.pretrained)
        if path is not None:
            return Availability(True, message=f"{name}: {path}")
        return Availability(False, message=f"{name} is not downloaded: {_offline_hint(spec.model, spec.pretrained)}")
    return Availability(False, message=f"{name}: no pretrained weights named; give a checkpoint file")


def weights_availability(weights: str | None) -> Availability:
    """Whether method weights (None, a released name or a file) are here (no network)."""
    if weights is None:
        return Availability(True, message="no method weights (backbone only)")
    from ..methods.released import RELEASED, local_path

    if weights in RELEASED:
        released = RELEASED[weights]
        path = local_path(released)
        if path.is_file():
            return Availability(True, message=f"{weights}: {path}")
        how = f"napari-clip-ad weights fetch {weights}" if released.url else f"download it from {released.page}"
        return Availability(False, message=f"{weights} is not downloaded: {how} (saved to {path})")
    if Path(weights).expanduser().is_file():
        return Availability(True, message=f"weights file {weights}")
    return Availability(False, message=f"weights file {weights} not found; choose an existing file")
