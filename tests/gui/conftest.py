"""Fixtures of the napari plugin tests: the real BraTS case, cropped layers, waiting for a run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

CASE = "BraTS-GLI-00002-000"
CROP = slice(70, 82)
"""12 axial slices through the tumour: keeps widget runs short."""


@pytest.fixture(scope="session")
def case_dir(shared_data: Path) -> Path:
    """A real BraTS 2023 case folder."""
    return shared_data / "brats2023" / CASE


@pytest.fixture(scope="session")
def case_layer_data(case_dir: Path) -> list[tuple[Any, dict, str]]:
    """The reader's layer data for the real case (read once per session)."""
    from napari_clip_ad._napari.reader import read_case_folder

    return read_case_folder(case_dir)


@pytest.fixture
def add_cropped_case(case_layer_data: list[tuple[Any, dict, str]]) -> Any:
    """A function adding the case's t2f and seg, cropped to 12 slices, where they were, to a viewer."""
    return lambda viewer: _add_cropped_case(viewer, case_layer_data)


def _add_cropped_case(viewer: Any, layer_data: list[tuple[Any, dict, str]]) -> tuple[Any, Any]:
    by_name = {kwargs["name"]: (data, kwargs) for data, kwargs, _ in layer_data}
    image, image_kwargs = by_name[f"{CASE} t2f"]
    seg, seg_kwargs = by_name[f"{CASE} seg"]
    scale = np.asarray(image_kwargs["scale"])
    translate = np.asarray(image_kwargs["translate"]) + np.array([CROP.start, 0, 0]) * scale
    image_layer = viewer.add_image(image[CROP].copy(), name="t2f crop", scale=scale, translate=translate,
                                   metadata={"modality": "t2f"})
    seg_layer = viewer.add_labels(seg[CROP].copy(), name="seg crop", scale=scale, translate=translate)
    return image_layer, seg_layer


@pytest.fixture
def wait_until_idle(qtbot: Any) -> Any:
    """A function running the event loop until a detect widget's run has finished and its results are in."""

    def wait(widget: Any) -> None:
        while widget.running:
            qtbot.wait(20)
        qtbot.wait(50)

    return wait


@pytest.fixture(autouse=True)
def config_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test remembers its widget settings in its own config dir (never the user's)."""
    home = tmp_path / "config"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home))
    return home


PIPELINE_CROP = (slice(160, 192), slice(70, 102), slice(75, 87))
"""Source (x, y, z) crop of the real case: 32 x 32 x 12 voxels with tumour and brain (as tests/test_pipeline.py)."""


@pytest.fixture(scope="session")
def small_cohort(crop_real_cohort: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Both real BraTS 2023 cases cropped to 32 x 32 x 12 voxels, every modality and seg."""
    return crop_real_cohort(tmp_path_factory.mktemp("gui") / "cohort", PIPELINE_CROP)
