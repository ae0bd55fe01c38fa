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

MVFA_DATASETS: dict[str, tuple[str, str]] = {
    # Official object name (checkpoint file <name>.pth in each zip) -> (our name part, BMAD dataset).
    "Brain": ("brain", "BMAD Brain (BraTS2021 FLAIR slices)"),
    "Liver": ("liver", "BMAD Liver CT"),
    "Retina_RESC": ("retina-resc", "BMAD Retina OCT (RESC)"),
    "Retina_OCT2017": ("retina-oct2017", "BMAD Retina OCT2017"),
    "Chest": ("chest", "BMAD Chest X-ray"),
    "Histopathology": ("histopathology", "BMAD Histopathology"),
}
"""MVFA-AD's six BMAD objects (``prompt.py`` REAL_NAME, ``dataset/medical_*.py`` CLASS_NAMES)."""

MVFA_ZIPS = {
    "zero": ("zero-shot.zip", "https://drive.google.com/file/d/1nGhcK32CrkgTR5Rav6rNfptUHaASfRnU/view?usp=sharing"),
    "few": ("few-shot.zip", "https://drive.google.com/file/d/1bV1yzPxJarTRfd8liMIwyHcGywTTEL2k/view?usp=sharing"),
}
"""README (MediaBrain-SJTU/MVFA-AD, commit a30bf7b): two Google Drive zips, one ``<object>.pth`` per object."""


def _mvfa_release(mode: str, obj: str) -> ReleasedWeights:
    short, dataset = MVFA_DATASETS[obj]
    if mode == "zero":  # train_zero.py --obj X trains on the other five objects (leave-one-out)
        trained_on = f"BMAD leave-{obj}-out (the 5 other sets)"
    else:  # train_few.py --obj X --shot 4: 4 normal + 4 abnormal valid images of X, augmented x11
        trained_on = f"{dataset}, 4 normal + 4 abnormal"
    archive, link = MVFA_ZIPS[mode]
    folder = archive.removesuffix(".zip")
    page = (f"{archive} from {link} (Google Drive, needs a browser; linked in the README of "
            f"https://github.com/MediaBrain-SJTU/MVFA-AD), unzip it, take {folder}/{obj}.pth")
    return ReleasedWeights(f"mvfa-{mode}-{short}", "mvfa", trained_on, "openai-vit-l-14-336",
                           f"mvfa_{folder}_{obj}.pth", "", page)


RELEASED.update({w.name: w for w in (_mvfa_release(m, o) for m in MVFA_ZIPS for o in MVFA_DATASETS)})


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
