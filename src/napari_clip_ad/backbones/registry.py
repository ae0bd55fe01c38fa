"""Named CLIP backbones: what each name means and where its weights come from."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BackboneSpec:
    """A named backbone.

    Attributes:
        name: Registry name users type.
        model: open_clip model name (``ViT-L-14-336``) or ``hf-hub:org/repo``.
        pretrained: open_clip pretrained tag (``openai``), or "" for hub models and random weights.
        quick_gelu: Activation the weights were trained with.
        description: One line for listings.
        random_weights: True for test architectures with no pretrained weights.
        family: "clip" (open_clip model with a text tower) or "dinov2" (vision only, ImageNet mean/std).
    """

    name: str
    model: str
    pretrained: str = ""
    quick_gelu: bool = False
    description: str = ""
    random_weights: bool = False
    family: str = "clip"


BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        BackboneSpec(
            "openai-vit-l-14-336", "ViT-L-14-336", "openai", quick_gelu=True,
            description="OpenAI CLIP ViT-L/14@336 (VAND, AnomalyCLIP, AdaCLIP backbone)",
        ),
        BackboneSpec(
            "vit-b-16-plus-240", "ViT-B-16-plus-240", "laion400m_e32",
            description="open_clip ViT-B/16-plus-240, LAION-400M epoch 32 (AnoVL backbone)",
        ),
        BackboneSpec(
            "pmc-vit-l-14", "hf-hub:ryanyip7777/pmc_vit_l_14",
            description="CLIP ViT-L/14 trained on PMC-OA (the study's 'pmc' setup), open_clip format on the HF hub",
        ),
        BackboneSpec(
            "biomedclip", "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224",
            description="BiomedCLIP ViT-B/16 + PubMedBERT (timm trunk tapped as an open_clip ViT; needs transformers)",
        ),
        BackboneSpec(
            "tiny-test", "tiny-test", random_weights=True,
            description="tiny random-weights ViT (width 64, 12 blocks, patch 14) for tests and smoke runs",
        ),
        BackboneSpec(
            "tiny-biomedclip", "tiny-biomedclip", random_weights=True,
            description="tiny random-weights BiomedCLIP layout (timm ViT width 64, 12 blocks, patch 16 + 12-layer BERT, "
            "small vocabulary) for tests",
        ),
        *(
            BackboneSpec(
                f"dinov2-vit{size}14{reg}", f"dinov2_vit{size}14{'_reg' if reg else ''}", family="dinov2",
                description=f"DINOv2 ViT-{size.upper()}/14{' with 4 registers' if reg else ''} (LVD-142M; vision only: "
                "AnomalyDINO, MuSc; torch-hub file, or timm weights in the HF cache)",
            )
            for reg in ("", "-reg")
            for size in ("s", "b", "l", "g")
        ),
        BackboneSpec(
            "tiny-dinov2", "tiny-dinov2", random_weights=True, family="dinov2",
            description="tiny random-weights DINOv2 layout (width 64, 12 blocks, patch 14, native 224 px) for tests",
        ),
    )
}

TINY_TEST_CONFIG: dict = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 224, "layers": 12, "width": 64, "head_width": 16, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
}
"""A ViT with the geometry of ViT-L/14 (patch 14, native 224 px) but tiny: 240 px gives a 17x17 grid."""
