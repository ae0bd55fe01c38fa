"""The authors' released checkpoints (the study's 'industrial' setup) and a local cache for them."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ReleasedWeights:
    """One released checkpoint.

    Attributes:
        name: Name users type (``vand-mvtec``).
        method: Method it belongs to.
        trained_on: Auxiliary training data (MVTec AD, VisA, ...).
        backbone: Backbone registry name it was trained with.
        filename: File name in the cache.
        url: Direct download address, or "" when the authors publish it only on a page.
        page: Where the authors publish it.
    """

    name: str
    method: str
    trained_on: str
    backbone: str
    filename: str
    url: str
    page: str


RELEASED: dict[str, ReleasedWeights] = {
    w.name: w
    for w in (
        ReleasedWeights(
            "vand-mvtec", "vand", "MVTec AD", "openai-vit-l-14-336", "vand_mvtec_pretrained.pth",
            "https://github.com/ByChelsea/VAND-APRIL-GAN/raw/master/exps/pretrained/mvtec_pretrained.pth",
            "https://github.com/ByChelsea/VAND-APRIL-GAN (exps/pretrained/mvtec_pretrained.pth)",
        ),
        ReleasedWeights(
            "vand-visa", "vand", "VisA", "openai-vit-l-14-336", "vand_visa_pretrained.pth",
            "https://github.com/ByChelsea/VAND-APRIL-GAN/raw/master/exps/pretrained/visa_pretrained.pth",
            "https://github.com/ByChelsea/VAND-APRIL-GAN (exps/pretrained/visa_pretrained.pth)",
        ),
        ReleasedWeights(
            "anomalyclip-mvtec", "anomalyclip", "MVTec AD", "openai-vit-l-14-336", "anomalyclip_mvtec_epoch_15.pth",
            "https://github.com/zqhang/AnomalyCLIP/raw/main/checkpoints/9_12_4_multiscale/epoch_15.pth",
            "https://github.com/zqhang/AnomalyCLIP (checkpoints/9_12_4_multiscale/epoch_15.pth)",
        ),
        ReleasedWeights(
            "anomalyclip-visa", "anomalyclip", "VisA", "openai-vit-l-14-336", "anomalyclip_visa_epoch_15.pth",
            "https://github.com/zqhang/AnomalyCLIP/raw/main/checkpoints/9_12_4_multiscale_visa/epoch_15.pth",
            "https://github.com/zqhang/AnomalyCLIP (checkpoints/9_12_4_multiscale_visa/epoch_15.pth)",
        ),
        ReleasedWeights(
            "adaclip-mvtec-colondb", "adaclip", "MVTec AD + ColonDB", "openai-vit-l-14-336", "adaclip_pretrained_mvtec_colondb.pth",
            "", "https://github.com/caoyunkang/AdaCLIP (README: pretrained_mvtec_colondb.pth, Google Drive)",
        ),
        ReleasedWeights(
            "adaclip-visa-clinicdb", "adaclip", "VisA + ClinicDB", "openai-vit-l-14-336", "adaclip_pretrained_visa_clinicdb.pth",
            "", "https://github.com/caoyunkang/AdaCLIP (README: pretrained_visa_clinicdb.pth, Google Drive)",
        ),
        ReleasedWeights(
            "adaclip-all", "adaclip", "MVTec AD + VisA + ColonDB + ClinicDB", "openai-vit-l-14-336", "adaclip_pretrained_all.pth",
            "", "https://github.com/caoyunkang/AdaCLIP (README: pretrained_all.pth, Google Drive)",
        ),
    )
}


def cache_dir() -> Path:
    """Folder of downloaded method weights: ``$NAPARI_CLIP_AD_CACHE`` or ``~/.cache/napari-clip-ad/weights``."""
    root = os.environ.get("NAPARI_CLIP_AD_CACHE")
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache"))
    return Path(xdg) / "napari-clip-ad" / "weights"


def local_path(weights: ReleasedWeights) -> Path:
    """Where the released file is (or would be) in the cache."""
    return cache_dir() / weights.filename


def default_weights(method: str, trained_on: str = "MVTec AD") -> ReleasedWeights | None:
    """The released checkpoint of a method trained on ``trained_on`` (first match), if any."""
    for weights in RELEASED.values():
        if weights.method == method and weights.trained_on.startswith(trained_on):
            return weights
    return None
