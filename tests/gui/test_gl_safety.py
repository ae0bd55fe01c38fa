"""napari on software OpenGL (Mesa llvmpipe) must survive the first run of a method."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.gui

SCRIPT = textwrap.dedent(
    """
    import numpy as np
    import napari
    from napari_clip_ad._napari.gl_safety import keep_triton_out, llvm_loaded

    viewer = napari.Viewer(show=True)
    viewer.add_image(np.random.rand(8, 32, 32))
    viewer.screenshot(flash=False)
    print("llvm loaded:", llvm_loaded(), "guarded:", keep_triton_out())
    from napari_clip_ad.methods import build_method  # imports open_clip -> torchvision -> torch._dynamo
    build_method("vand", "tiny-test", device="cpu")
    print("built")
    viewer.close()
    """
)


def test_building_a_method_after_the_viewer_draws_does_not_crash() -> None:
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-2000:]}"
    assert "built" in done.stdout
