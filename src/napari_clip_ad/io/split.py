"""Patient-level train/test splits, saved as JSON so every run uses the same one."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..atomic import write_json
from ..errors import InputError
from .case import case_id_of

_TIMEPOINT = re.compile(r"^(?P<patient>BraTS-[A-Za-z]+-\d+)-\d{3}$")


def patient_id(case_id: str) -> str:
    """The patient a case belongs to: BraTS 2023 ids drop the time-point suffix (``-000``)."""
    match = _TIMEPOINT.match(case_id)
    return match.group("patient") if match else case_id


@dataclass
class Split:
    """Case ids of a train/test split made at patient level."""

    train: list[str]
    test: list[str]
    seed: int
    test_fraction: float


def split_cases(cases: Sequence[str | Path], test_fraction: float = 0.3, seed: int = 0) -> Split:
    """Split cases into train and test with every case of one patient on the same side.

    Args:
        cases: Case ids or case paths.
        test_fraction: Fraction of patients in the test set (rounded, at least one when possible).
        seed: Seed of the shuffle.
    """
    if not 0.0 <= test_fraction <= 1.0:
        raise InputError(f"test_fraction must be in [0, 1], got {test_fraction}")
    ids = sorted({c if isinstance(c, str) else case_id_of(c) for c in cases})
    patients = sorted({patient_id(i) for i in ids})
    order = np.random.default_rng(seed).permutation(len(patients))
    n_test = int(round(test_fraction * len(patients)))
    if test_fraction > 0 and n_test == 0 and len(patients) > 1:
        n_test = 1
    test_patients = {patients[i] for i in order[:n_test]}
    return Split(
        train=[i for i in ids if patient_id(i) not in test_patients],
        test=[i for i in ids if patient_id(i) in test_patients],
        seed=seed,
        test_fraction=test_fraction,
    )


def save_split(split: Split, path: str | Path) -> Path:
    """Write a split as JSON (atomically)."""
    write_json(path, asdict(split))
    return Path(path)


def load_split(path: str | Path) -> Split:
    """Read a split JSON written by :func:`save_split`."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        split = Split(_ids(raw["train"]), _ids(raw["test"]), int(raw["seed"]), float(raw["test_fraction"]))
    except FileNotFoundError:
        raise InputError(f"{path}: split file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read the split file ({exc}); check the path") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{path}: not a split file ({exc}); expected keys train, test, seed, test_fraction") from None
    overlap = sorted({patient_id(i) for i in split.train} & {patient_id(i) for i in split.test})
    if overlap:
        raise InputError(f"{path}: patients {overlap[:5]} are in both train and test; make the split with split_cases")
    return split


def _ids(value: object) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise TypeError("train and test must be lists of case ids")
    return list(value)
