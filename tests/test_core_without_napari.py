"""The core library imports without napari or Qt: only napari_clip_ad._napari may use them."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

BLOCKED = ("napari", "qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "magicgui", "superqt", "vispy", "npe2")

SCRIPT = textwrap.dedent(
    """
    import importlib, pkgutil, sys

    BLOCKED = {blocked!r}

    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"blocked GUI import: {{name}}")
            return None

    sys.meta_path.insert(0, Block())
    import napari_clip_ad

    names = ["napari_clip_ad"]
    for info in pkgutil.walk_packages(napari_clip_ad.__path__, "napari_clip_ad."):
        if info.name.startswith("napari_clip_ad._napari"):
            continue
        names.append(info.name)
    for name in names:
        importlib.import_module(name)
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    assert not loaded, loaded
    print("\\n".join(names))
    """
)


def test_every_core_module_imports_with_gui_packages_blocked() -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", SCRIPT.format(blocked=BLOCKED)], capture_output=True, text=True,
                          env=env, cwd=Path(__file__).parent)
    assert done.returncode == 0, done.stderr[-3000:]
    imported = set(done.stdout.split())
    expected = {"napari_clip_ad", "napari_clip_ad.io", "napari_clip_ad.metrics", "napari_clip_ad.engine",
                "napari_clip_ad.methods", "napari_clip_ad.backbones", "napari_clip_ad.cli", "napari_clip_ad.sample",
                "napari_clip_ad.commands.infer"}
    assert expected <= imported
    assert any(name.startswith("napari_clip_ad.commands.") for name in imported)


def test_the_blocker_does_catch_a_gui_import() -> None:
    """The same hook makes importing the plugin fail, so the test above can fail."""
    script = SCRIPT.format(blocked=BLOCKED) + "\nimportlib.import_module('napari_clip_ad._napari.detect_widget')\n"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode != 0 and "blocked GUI import" in done.stderr
