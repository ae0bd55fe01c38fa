"""Folder layouts of brain-tumour MRI datasets, as data.

A :class:`Layout` says where each modality, the segmentation and the brain mask of one case are
found. Patterns are globs relative to the case folder, written without the NIfTI extension
(``.nii.gz`` and ``.nii`` are both tried); ``{id}`` stands for the case id. Add your own layout with
:func:`register_layout`; modalities are always addressed by the BraTS 2023 names.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MODALITIES: tuple[str, ...] = ("t1n", "t1c", "t2w", "t2f")
"""BraTS 2023 modality names: native T1, contrast T1, T2, T2-FLAIR."""

NIFTI_EXTENSIONS: tuple[str, ...] = (".nii.gz", ".nii")


@dataclass(frozen=True)
class Layout:
    """Where the files of one case are, for one dataset convention.

    Attributes:
        name: Short name shown to users.
        modalities: Modality name -> glob patterns of its 3D file (first pattern that matches wins).
        seg: Patterns of the label volume.
        brain_mask: Patterns of a provided brain mask (else the nonzero voxels are used).
        stacked: Patterns of one 4D file holding every modality (Decathlon style).
        channels: Modality name -> channel index in the 4D file.
        label_values: The label values this layout may contain (others are refused).
        description: One line for error messages and docs.
    """

    name: str
    modalities: dict[str, tuple[str, ...]] = field(default_factory=dict)
    seg: tuple[str, ...] = ()
    brain_mask: tuple[str, ...] = ()
    stacked: tuple[str, ...] = ()
    channels: dict[str, int] = field(default_factory=dict)
    label_values: tuple[int, ...] = (0, 1, 2, 3, 4)
    description: str = ""


BRATS_2023 = Layout(
    name="brats2023",
    modalities={m: (f"*-{m}",) for m in MODALITIES},
    seg=("*-seg",),
    label_values=(0, 1, 2, 3),
    description="BraTS 2023: <id>-t1n/-t1c/-t2w/-t2f/-seg.nii.gz",
)

BRATS_2020 = Layout(
    name="brats2020",
    modalities={"t1n": ("*_t1",), "t1c": ("*_t1ce", "*_t1Gd"), "t2w": ("*_t2",), "t2f": ("*_flair",)},
    seg=("*_seg", "*_Segm"),  # BraTS20_Training_355 ships its labels as W39_1998.09.19_Segm.nii
    description="BraTS 2020/2021: <id>_t1/_t1ce/_t2/_flair/_seg.nii.gz",
)

BRATS_2013_DEEPMEDIC = Layout(
    name="brats2013-deepmedic",
    modalities={"t2f": ("Flair*",), "t1c": ("T1c*",), "t1n": ("T1_*", "T1.*"), "t2w": ("T2_*", "T2.*")},
    seg=("OTMultiClass*", "OT*"),
    brain_mask=("brainmask*",),
    description="BraTS 2013/2015 (DeepMedic examples): Flair*, T1c*, OTMultiClass, brainmask",
)

MSD_TASK01 = Layout(
    name="msd-task01",
    stacked=("imagesTr/{id}", "imagesTs/{id}"),
    seg=("labelsTr/{id}",),
    # Task01_BrainTumour dataset.json: 0 FLAIR, 1 T1w, 2 t1gd, 3 T2w; labels 1 edema, 2 non-enh., 3 enh.
    channels={"t2f": 0, "t1n": 1, "t1c": 2, "t2w": 3},
    label_values=(0, 1, 2, 3),
    description="Medical Segmentation Decathlon Task01: imagesTr/<id>.nii.gz (4D) + labelsTr/<id>.nii.gz",
)

LAYOUTS: list[Layout] = [BRATS_2023, BRATS_2020, BRATS_2013_DEEPMEDIC, MSD_TASK01]
"""Known layouts, tried in order; the one matching the most modalities wins."""


def register_layout(layout: Layout, first: bool = True) -> None:
    """Add a dataset layout (replacing one of the same name).

    Args:
        layout: The layout to add.
        first: Try it before the built-in layouts.
    """
    LAYOUTS[:] = [known for known in LAYOUTS if known.name != layout.name]
    LAYOUTS.insert(0 if first else len(LAYOUTS), layout)


def expected_names() -> str:
    """One line listing the known layouts, for error messages."""
    return "; ".join(layout.description or layout.name for layout in LAYOUTS)
