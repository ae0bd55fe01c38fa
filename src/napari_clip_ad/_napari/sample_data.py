"""napari sample data: the package's synthetic BraTS-like case (no download)."""

from __future__ import annotations

from .layers import LayerData, case_layers


def synthetic_case() -> list[LayerData]:
    """The deterministic synthetic case (seed 0): four modalities and its segmentation."""
    from ..sample import sample_case

    return case_layers(sample_case(0))
