"""Offline out of the box, remembered choices, backbone kept across method changes, device auto."""

from __future__ import annotations

import json
import socket
from typing import Any

import pytest

from napari_clip_ad.backbones.availability import (
    backbone_availability,
    weights_availability,
)

pytestmark = pytest.mark.gui

PLUGIN = "napari-clip-ad"


def _docked(viewer: Any) -> Any:
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Detect anomalies")
    return widget


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Every attempt to open a network connection fails at once and is recorded."""
    attempts: list[tuple] = []

    def refuse(address: Any, *args: Any, **kwargs: Any) -> None:
        attempts.append(address)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # the check must not rely on it
    monkeypatch.setenv("HF_HOME", "/nonexistent-hf-home")
    monkeypatch.setenv("NAPARI_CLIP_AD_CACHE", "/nonexistent-weights-cache")
    return attempts


def test_offline_default_says_what_is_missing_and_runs_random_in_one_click(make_napari_viewer, no_network,
                                                                          add_cropped_case, wait_until_idle) -> None:
    viewer = make_napari_viewer()
    add_cropped_case(viewer)
    detect = _docked(viewer)
    assert detect.backbone.value == "openai-vit-l-14-336"  # the method's default, not downloaded here
    assert not detect.available and "Missing" in detect.availability.value
    assert "openai-vit-l-14-336 is not downloaded" in detect.availability.value
    assert not detect.use_random.native.isHidden()
    detect.use_random.native.click()
    assert detect.backbone.value == "tiny-test" and detect.available and "random weights" in detect.availability.value
    assert detect.use_random.native.isHidden()
    detect.batch_size.value = 6
    detect.run_button.native.click()
    wait_until_idle(detect)
    anomaly = next(layer for layer in viewer.layers if layer.metadata.get("kind") == "anomaly_map")
    assert anomaly.metadata["random_weights"] and no_network == []


def test_availability_is_local_only(no_network, tmp_path) -> None:
    assert not backbone_availability("openai-vit-l-14-336").available
    assert not backbone_availability("pmc-vit-l-14").available
    assert backbone_availability("tiny-test").random
    missing = weights_availability("vand-mvtec")
    assert not missing.available and "napari-clip-ad weights fetch vand-mvtec" in missing.message
    file = tmp_path / "w.pth"
    file.write_bytes(b"x")
    assert weights_availability(str(file)).available and not weights_availability(str(tmp_path / "no.pth")).available
    assert no_network == []


def test_choices_persist_across_two_viewers_and_method_change_keeps_backbone(make_napari_viewer, config_home) -> None:
    first = _docked(make_napari_viewer())
    first.backbone.value = "tiny-test"
    first.method.value = "anovl"  # its default backbone differs, the user's choice is kept
    assert first.backbone.value == "tiny-test"
    first.advanced["views"].value = "all"
    first.advanced["smooth3d_mm"].value = 2.0
    first.advanced["restrict_to_brain"].value = True
    first.device.value = "cpu"
    saved = json.loads((config_home / "napari-clip-ad" / "settings.json").read_text())
    assert saved["detect"]["method"] == "anovl" and saved["detect"]["backbone"] == "tiny-test"

    second = _docked(make_napari_viewer())
    assert (second.method.value, second.backbone.value, second.device.value) == ("anovl", "tiny-test", "cpu")
    assert second.advanced["views"].value == "all" and second.advanced["smooth3d_mm"].value == 2.0
    assert second.advanced["restrict_to_brain"].value is True


def test_untouched_backbone_follows_the_method_default_and_device_auto(make_napari_viewer) -> None:
    detect = _docked(make_napari_viewer())
    assert detect.backbone.value == "openai-vit-l-14-336"
    detect.method.value = "anovl"
    assert detect.backbone.value == "vit-b-16-plus-240"
    assert detect.device.choices[0] == "auto" and detect.device.value == "auto"
    assert "CUDA, then Apple MPS, then the CPU" in detect.device.tooltip
    shown = [detect.backbone.native.itemText(i) for i in range(detect.backbone.native.count())]
    assert "tiny-test (random weights)" in shown
