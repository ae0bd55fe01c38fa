"""Prompt sets: the state phrases, templates and object name of the hand-written text prompts.

A method option ``prompts`` selects them:

- ``"industrial"`` (default): each method's own official lists (VAND's, WinCLIP's, AnoVL's, AdaCLIP's
  differ), outputs unchanged;
- ``"medical"``: the shipped brain-MRI set ``napari_clip_ad/data/prompts/medical.json``;
- a path to a JSON file of the same form::

      {"object_name": "brain",                 # optional; the method's object_name otherwise
       "normal_states": ["healthy {}", ...],   # "{}" = the object name
       "abnormal_states": ["{} with a tumour", ...],
       "templates": ["a T2-weighted MRI of a {}.", ...]}   # "{}" = a state phrase

Each method combines the lists in its own official order (e.g. VAND states-major, AnoVL
templates-major) and with its own text-feature averaging; only the words change.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import InputError

INDUSTRIAL = "industrial"
"""The official, method-specific prompts (the default)."""
SHIPPED: tuple[str, ...] = ("medical",)
"""Prompt sets shipped under ``napari_clip_ad/data/prompts/<name>.json``."""
_LIST_FIELDS: tuple[str, ...] = ("normal_states", "abnormal_states", "templates")


@dataclass(frozen=True)
class PromptSet:
    """Words of one prompt set.

    Attributes:
        source: "medical" or the JSON file's path (what provenance records).
        normal_states: Phrases for a normal object, each with one ``{}`` for the object name.
        abnormal_states: Phrases for an anomalous object, each with one ``{}``.
        templates: Sentences, each with one ``{}`` for a state phrase.
        object_name: Object named in the states, or None to keep the method's ``object_name``.
    """

    source: str
    normal_states: tuple[str, ...]
    abnormal_states: tuple[str, ...]
    templates: tuple[str, ...]
    object_name: str | None = None


def _one_slot(text: str) -> bool:
    """True when ``text`` has exactly one ``{}`` and no other format field."""
    try:
        return text.count("{}") == 1 and text.format("x") is not None
    except (IndexError, KeyError, ValueError):
        return False


def parse_prompt_set(data: Any, source: str) -> PromptSet:
    """Validate a decoded JSON prompt set.

    Raises:
        InputError: One line naming ``source``, the field and what is wrong.
    """
    if not isinstance(data, dict):
        raise InputError(f"prompt set {source}: expected a JSON object with {', '.join(_LIST_FIELDS)}, found {type(data).__name__}")
    unknown = sorted(set(data) - {*_LIST_FIELDS, "object_name", "description"})
    if unknown:
        raise InputError(f"prompt set {source}: unknown field(s) {unknown}; allowed: {', '.join(_LIST_FIELDS)}, object_name, description")
    lists: dict[str, tuple[str, ...]] = {}
    for name in _LIST_FIELDS:
        value = data.get(name)
        if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
            raise InputError(f"prompt set {source}: '{name}' must be a non-empty list of non-empty strings")
        bad = [v for v in value if not _one_slot(v)]
        if bad:
            slot = "the object name" if name != "templates" else "the state phrase"
            raise InputError(f"prompt set {source}: '{name}' entry {bad[0]!r} must contain exactly one '{{}}' for {slot}")
        lists[name] = tuple(value)
    object_name = data.get("object_name")
    if object_name is not None and (not isinstance(object_name, str) or not object_name.strip()):
        raise InputError(f"prompt set {source}: 'object_name' must be a non-empty string (or left out)")
    return PromptSet(source, lists["normal_states"], lists["abnormal_states"], lists["templates"], object_name)


def load_prompt_set(value: str | Path) -> PromptSet | None:
    """The prompt set named by a method's ``prompts`` option; None for the official "industrial" prompts.

    Args:
        value: "industrial", a shipped set name ("medical") or a path to a JSON file.

    Raises:
        InputError: Unknown name, unreadable file, invalid JSON or fields (one line).
    """
    if not isinstance(value, (str, Path)) or not str(value).strip():
        raise InputError(f"prompts {value!r}: give 'industrial', one of {', '.join(SHIPPED)}, or a JSON file path")
    text = str(value)
    if text == INDUSTRIAL:
        return None
    if text in SHIPPED:
        raw = resources.files("napari_clip_ad").joinpath("data", "prompts", f"{text}.json").read_text(encoding="utf-8")
        source = text
    else:
        path = Path(text).expanduser()
        if not path.is_file():
            raise InputError(f"prompts {text!r}: no such file and not a known set; use 'industrial', {', '.join(SHIPPED)} or a JSON file")
        try:
            raw = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"prompt set {path}: cannot be read ({exc.__class__.__name__}); give a UTF-8 JSON file") from None
        source = str(path)
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InputError(f"prompt set {source}: invalid JSON at line {exc.lineno} column {exc.colno} ({exc.msg})") from None
    return parse_prompt_set(data, source)


def resolve_object_name(prompt_set: PromptSet | None, option: str, explicit: bool) -> str:
    """Object name for the prompts: an explicit ``object_name`` option wins, then the set's, then the default."""
    if prompt_set is None or explicit or prompt_set.object_name is None:
        return option
    return prompt_set.object_name
