"""The plugin's remembered choices: a small JSON file in the user config dir (no napari import).

``$XDG_CONFIG_HOME/napari-clip-ad/settings.json`` (``~/.config`` when the variable is unset). A
missing or unreadable file means "no remembered choices"; writes are atomic.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from .atomic import write_json

log = logging.getLogger(__name__)


def settings_path() -> Path:
    """Where the settings live (respects ``XDG_CONFIG_HOME``)."""
    root = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(root) / "napari-clip-ad" / "settings.json"


def load_settings(section: str) -> dict[str, Any]:
    """The remembered values of one widget (empty when none or the file is unreadable)."""
    path = settings_path()
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable settings %s (%s)", path, exc)
        return {}
    value = data.get(section) if isinstance(data, dict) else None
    return dict(value) if isinstance(value, dict) else {}


def save_settings(section: str, values: dict[str, Any]) -> None:
    """Remember one widget's values (other sections are kept); failures are logged, never raised."""
    path = settings_path()
    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
        if not isinstance(data, dict):
            data = {}
    except (OSError, ValueError):
        data = {}
    data[section] = values
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, data)
    except OSError as exc:
        log.warning("cannot save settings to %s (%s)", path, exc)
