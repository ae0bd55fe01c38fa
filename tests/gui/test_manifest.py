"""The npe2 manifest is valid, installed under the package's entry point, and names every contribution."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

NPE2 = Path(sys.executable).parent / "npe2"


@pytest.mark.parametrize("imports", [False, True], ids=["manifest", "python-names-import"])
def test_npe2_validate_passes(imports: bool) -> None:
    if not NPE2.exists():
        pytest.skip(f"npe2 command not found beside {sys.executable}")
    command = [str(NPE2), "validate", "napari_clip_ad"] + (["--imports"] if imports else [])
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "valid!" in done.stdout


def test_manifest_contributions() -> None:
    from npe2 import PluginManifest

    manifest = PluginManifest.from_distribution("napari-clip-ad")
    contributions = manifest.contributions
    reader, = contributions.readers
    assert reader.accepts_directories and set(reader.filename_patterns) == {"*.nii", "*.nii.gz"}
    single = [w for w in contributions.writers if len(w.layer_types) == 1]
    assert sorted(t for w in single for t in w.layer_types) == ["image", "labels"]
    assert all(".nii.gz" in w.filename_extensions for w in single)
    several, = (w for w in contributions.writers if len(w.layer_types) > 1)  # several layers -> one file each
    assert sorted(several.layer_types) == ["image*", "labels*"] and several.filename_extensions == []
    assert [s.key for s in contributions.sample_data] == ["synthetic-case"]
    assert sorted(w.display_name for w in contributions.widgets) == ["Cohort", "Detect anomalies", "Threshold and metrics"]
