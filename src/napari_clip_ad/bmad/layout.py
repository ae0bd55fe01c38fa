"""The released BMAD Brain folder (BraTS2021 FLAIR slices as PNG), read as MVFA-AD's and AA-CLIP's loaders read it.

Layout (``/work/shared/docs/bmad.md``; MVFA-AD ``dataset/medical_few.py``, AA-CLIP ``dataset/__init__.py``)::

    DATA/ (or DATA/Brain_AD/, MVFA-AD's name)
      train/good/img/*.png          (or train/good/*.png, as BMAD's bras.py writes it)
      valid/good/img/*.png, valid/Ungood/{img, anomaly_mask | label}/*.png
      test/good/img/*.png           label 0, mask all zero (both loaders ignore any file)
      test/Ungood/img/*.png         label 1, mask: same file name in anomaly_mask/ (MVFA-AD) or label/ (AA-CLIP)

Test order as MVFA-AD's ``load_dataset_folder``: sorted ``good`` images, then sorted ``Ungood`` ones.
Images: ``PIL.Image.open(...).convert('RGB')`` (both loaders). Masks: ``convert('L')`` then nonzero
= anomalous (AA-CLIP's ``mask != 0``; MVFA-AD's ``> 0.5`` after ``ToTensor`` differs only on masks
that are not 0/255, see ``docs/benchmarks_literature.md``); a mask of another size than its image is
resized to it with nearest-neighbour, as both loaders resize masks (NEAREST).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
MASK_FOLDERS = ("anomaly_mask", "label")
"""Mask folder names: ``anomaly_mask`` (MVFA-AD, BMAD README), ``label`` (BMAD bras.py, AA-CLIP)."""


@dataclass(frozen=True)
class BmadImage:
    """One test image: its class folder (``good``/``Ungood``), file, mask file and label (1 = anomalous)."""

    group: str
    image: Path
    mask: Path | None
    label: int

    @property
    def name(self) -> str:
        """``<group>/<file stem>``, unique in the test split."""
        return f"{self.group}/{self.image.stem}"


def find_root(data: Path) -> Path:
    """The folder holding ``test/``: ``data`` itself or ``data/Brain_AD`` (MVFA-AD's name).

    Raises:
        InputError: Neither holds ``test/good/img`` and ``test/Ungood/img``.
    """
    for root in (data, data / "Brain_AD"):
        if (root / "test" / "good" / "img").is_dir() and (root / "test" / "Ungood" / "img").is_dir():
            return root
    raise InputError(f"{data}: not a BMAD Brain folder; expected test/good/img and test/Ungood/img "
                     "(with masks in test/Ungood/anomaly_mask or test/Ungood/label) here or in Brain_AD/")


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def read_test_split(root: Path) -> list[BmadImage]:
    """Sorted ``test/good`` images (label 0, no mask), then sorted ``test/Ungood`` ones with their masks.

    Raises:
        InputError: An anomalous image without a mask, or an empty split.
    """
    items = [BmadImage("good", path, None, 0) for path in _images(root / "test" / "good" / "img")]
    ungood = root / "test" / "Ungood"
    mask_dirs = [ungood / name for name in MASK_FOLDERS if (ungood / name).is_dir()]
    for path in _images(ungood / "img"):
        mask = next((d / path.name for d in mask_dirs if (d / path.name).is_file()), None)
        if mask is None:
            raise InputError(f"{path}: no mask {path.name} in {ungood}/anomaly_mask or {ungood}/label; "
                             "every test/Ungood image needs its mask")
        items.append(BmadImage("Ungood", path, mask, 1))
    if not any(i.label == 0 for i in items) or not any(i.label == 1 for i in items):
        raise InputError(f"{root / 'test'}: needs images in both good/img and Ungood/img")
    return items


def reference_images(root: Path, k_shot: int, seed: int, split: str = "train") -> list[Path]:
    """``k_shot`` normal images drawn without replacement from ``<split>/good`` (sorted, then seeded).

    ``train/good/img/`` or ``train/good/`` (bras.py writes no ``img/`` there) are both read.

    Raises:
        InputError: Fewer normal images than ``k_shot``.
    """
    folder = root / split / "good"
    folder = folder / "img" if (folder / "img").is_dir() else folder
    pool = _images(folder) if folder.is_dir() else []
    if len(pool) < k_shot:
        raise InputError(f"{folder}: {len(pool)} normal images but --k-shot {k_shot}; "
                         f"give a smaller --k-shot or check the {split} split")
    return random.Random(seed).sample(pool, k_shot)


def read_image(path: Path) -> np.ndarray:
    """An image as ``(3, H, W)`` float32 RGB values 0..255 (``convert('RGB')`` as both loaders)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return np.ascontiguousarray(np.asarray(img.convert("RGB"), dtype=np.float32).transpose(2, 0, 1))
    except (OSError, UnidentifiedImageError) as exc:
        raise InputError(f"{path}: not a readable image ({exc})") from None


def read_mask(path: Path | None, size: tuple[int, int]) -> np.ndarray:
    """Bool ``(H, W)`` mask (nonzero gray = anomalous); all False without a file; resized NEAREST to ``size``."""
    from PIL import Image, UnidentifiedImageError

    if path is None:
        return np.zeros(size, dtype=bool)
    try:
        with Image.open(path) as img:
            gray = img.convert("L")
            if gray.size != (size[1], size[0]):
                gray = gray.resize((size[1], size[0]), Image.NEAREST)
            return np.asarray(gray) != 0
    except (OSError, UnidentifiedImageError) as exc:
        raise InputError(f"{path}: not a readable mask image ({exc})") from None
