"""The pipeline's options, torch-free: one definition for the CLI flags, the widget's controls and provenance.

:class:`CaseOptions` is what :func:`napari_clip_ad.engine.pipeline.run_case` takes; :data:`OPTION_SPECS`
gives each option its CLI flag, widget label and help line, so an option added here exists in ``infer``,
the study and the napari widget with one name and one default.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from .errors import InputError
from .io.layouts import MODALITIES
from .postprocess3d import FUSION_MODES

AXES = ("axial", "coronal", "sagittal")
VIEW_CHOICES = (*AXES, "all")


def parse_modality(modality: str | Sequence[str]) -> list[str]:
    """'t2w' -> ['t2w']; 't1c+t2w+t2f' or a 3-sequence -> three modalities as the three channels."""
    names = modality.split("+") if isinstance(modality, str) else list(modality)
    if len(names) not in (1, 3):
        raise InputError(f"modality {modality!r}: give one modality or three joined by '+' (e.g. t1c+t2w+t2f)")
    for name in names:
        if name not in MODALITIES:
            raise InputError(f"unknown modality {name!r}; use one of {', '.join(MODALITIES)} (FLAIR = t2f), or three joined by '+'")
    return names


@dataclass(frozen=True)
class PostOptions:
    """What is done to a case's maps beyond the study's setup (defaults: nothing).

    Attributes:
        views: Slicing axes; more than one are fused with ``fuse``.
        fuse: ``'mean'`` or ``'max'`` voxel-wise fusion of the views.
        restrict_to_brain: Zero the map outside the case's brain mask.
        smooth3d_mm: Sigma in mm of a 3D Gaussian on the (fused) map; 0 = none.
        min_component: Smallest 26-connected component (voxels) kept in the mask; 0 = keep all.
    """

    views: tuple[str, ...] = ("axial",)
    fuse: str = "mean"
    restrict_to_brain: bool = False
    smooth3d_mm: float = 0.0
    min_component: int = 0

    def __post_init__(self) -> None:
        if not self.views or any(v not in AXES for v in self.views) or len(set(self.views)) != len(self.views):
            raise InputError(f"views {self.views!r}: give distinct views among {', '.join(AXES)}, or 'all'")
        if self.fuse not in FUSION_MODES:
            raise InputError(f"--fuse {self.fuse!r}: use one of {', '.join(FUSION_MODES)}")
        if not self.smooth3d_mm >= 0:
            raise InputError(f"--smooth3d {self.smooth3d_mm}: give a sigma in mm >= 0 (0 = no smoothing)")
        if self.min_component < 0:
            raise InputError(f"--min-component {self.min_component}: give a size in voxels >= 0 (0 = keep all)")

    @staticmethod
    def parse_views(text: str) -> tuple[str, ...]:
        """``'all'`` -> the three axes; ``'axial'`` -> ``('axial',)``; also ``'axial+coronal'``."""
        if text == "all":
            return AXES
        return tuple(text.split("+"))

    def describe(self) -> dict[str, Any]:
        """The options as JSON-ready provenance (``views`` joined by '+')."""
        return {"views": "+".join(self.views), "fuse": self.fuse if len(self.views) > 1 else None,
                "restrict_to_brain": self.restrict_to_brain, "smooth3d_mm": float(self.smooth3d_mm),
                "min_component": int(self.min_component)}


@dataclass(frozen=True)
class OptionSpec:
    """How one :class:`CaseOptions` field appears as a CLI flag and a widget control.

    Attributes:
        name: The :class:`CaseOptions` field.
        flag: The command-line flag.
        label: The widget's label (the issue's names: ``smooth 3D (mm)``, ``restrict to brain``...).
        help: One line, used as the flag's help and the control's tooltip.
        choices: Allowed values of a choice control, if any.
    """

    name: str
    flag: str
    label: str
    help: str
    choices: tuple[str, ...] = ()


OPTION_SPECS: tuple[OptionSpec, ...] = (
    OptionSpec("modality", "--modality", "modality",
               "t1n, t1c, t2w, t2f (FLAIR), or three joined by '+' as the three input channels (e.g. t1c+t2w+t2f)"),
    OptionSpec("views", "--views", "views", "slicing view; 'all' runs axial, coronal and sagittal and fuses the maps",
               VIEW_CHOICES),
    OptionSpec("fuse", "--fuse", "fuse", "voxel-wise fusion of several views (mean or max)", ("mean", "max")),
    OptionSpec("sigma", "--sigma", "sigma", "Gaussian sigma (pixels) of each slice map; empty = the method's official one"),
    OptionSpec("smooth3d_mm", "--smooth3d", "smooth 3D (mm)", "3D Gaussian of this many mm on the (fused) map; 0 = none"),
    OptionSpec("restrict_to_brain", "--restrict-to-brain", "restrict to brain", "zero the map outside the brain mask"),
    OptionSpec("min_component", "--min-component", "min component",
               "drop 26-connected mask components smaller than this many voxels; 0 = keep all"),
    OptionSpec("threshold", "--threshold", "threshold", "mask threshold on the [0, 1] map (voxel positive if >=)"),
    OptionSpec("batch_size", "--batch-size", "batch size", "slices per forward pass (default: 16 on a GPU, 8 on the CPU)"),
    OptionSpec("references", "--references", "references",
               "few-shot normal references: 'auto' (tumour-free slices of other cases: the cohort's for infer, the "
               "training split's for the study) or a folder of normal cases or PNG/JPEG slices; empty = zero-shot"),
    OptionSpec("k_shot", "--k-shot", "k-shot", "normal reference slices with --references (0 = zero-shot; default 4 few-shot, "
               "16 per target slice in the cross-subject mode of anomalydino/musc)"),
    OptionSpec("precision", "--precision", "precision",
               "frozen backbone precision: auto (bf16 where the CPU/GPU supports it and it is faster), fp32, bf16",
               ("auto", "fp32", "bf16")),
)
"""Every pipeline option, in the order the CLI and the widget show them."""


@dataclass(frozen=True)
class CaseOptions:
    """Everything the pipeline does to one case beyond choosing the method (defaults = the study's setup).

    Attributes:
        modality: One modality, or three joined by '+' used as the three input channels.
        views: Slicing axes; several are fused with ``fuse``.
        fuse: ``'mean'`` or ``'max'``.
        sigma: Per-slice Gaussian sigma in pixels; None = the method's official one.
        smooth3d_mm: Sigma in mm of a 3D Gaussian on the (fused) map; 0 = none.
        restrict_to_brain: Zero the map outside the brain mask.
        min_component: Smallest 26-connected mask component kept (voxels); 0 = all.
        threshold: Mask threshold on the [0, 1] map.
        batch_size: Slices per forward pass; None = the engine's default for the device.
        references: Few-shot normal references: 'auto' or a folder (see :mod:`napari_clip_ad.references`);
            None = zero-shot.
        k_shot: Number of reference slices (0 = zero-shot even with ``references``; None = the mode's default:
            4 few-shot references per view, 16 reference slices per target slice in cross-subject mode).
        reference_seed: Seed of the reference draw.
        precision: Frozen-backbone precision: 'auto' (bf16 where the hardware runs it natively and the model is
            wide enough, see :mod:`napari_clip_ad.methods.precision`), 'fp32', 'bf16'; None = the method's as built.
    """

    modality: str = "t2w"
    views: tuple[str, ...] = ("axial",)
    fuse: str = "mean"
    sigma: float | None = None
    smooth3d_mm: float = 0.0
    restrict_to_brain: bool = False
    min_component: int = 0
    threshold: float = 0.5
    batch_size: int | None = None
    references: str | None = None
    k_shot: int | None = None
    reference_seed: int = 0
    precision: str | None = "auto"

    def __post_init__(self) -> None:
        object.__setattr__(self, "modality", "+".join(parse_modality(self.modality)))
        views = PostOptions.parse_views(self.views) if isinstance(self.views, str) else tuple(self.views)
        object.__setattr__(self, "views", views)
        self.post  # validates views, fuse, smooth3d, min_component  # noqa: B018
        if not isinstance(self.threshold, (int, float)) or not 0.0 <= float(self.threshold) <= 1.0:
            raise InputError(f"--threshold {self.threshold!r}: give a number in [0, 1] (maps are in [0, 1])")
        if self.sigma is not None and (not isinstance(self.sigma, (int, float)) or not math.isfinite(self.sigma) or self.sigma < 0):
            raise InputError(f"--sigma {self.sigma:g}: give a finite number >= 0 (0 = no smoothing)" if isinstance(self.sigma, (int, float)) else f"--sigma {self.sigma!r}: give a number >= 0")
        if not math.isfinite(self.smooth3d_mm):
            raise InputError(f"--smooth3d {self.smooth3d_mm}: give a finite sigma in mm >= 0 (0 = no smoothing)")
        if self.k_shot is not None and (isinstance(self.k_shot, bool) or not isinstance(self.k_shot, int) or self.k_shot < 0):
            raise InputError(f"--k-shot {self.k_shot!r}: give a whole number >= 0 (0 = zero-shot)")
        if self.references is not None and not str(self.references).strip():
            object.__setattr__(self, "references", None)
        if self.precision is not None and self.precision not in ("auto", "fp32", "bf16"):
            raise InputError(f"--precision {self.precision!r}: use auto, fp32 or bf16")
        if self.batch_size is not None and (isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1):
            raise InputError(f"--batch-size {self.batch_size!r}: give a whole number >= 1")

    @property
    def modalities(self) -> list[str]:
        """The modality names (one, or the three channels)."""
        return self.modality.split("+")

    @property
    def modalities_to_load(self) -> list[str]:
        """Distinct modalities in the canonical order, for :func:`~napari_clip_ad.io.load_case`."""
        return sorted(set(self.modalities), key=MODALITIES.index)

    @property
    def post(self) -> PostOptions:
        """The views and post-processing part."""
        return PostOptions(views=self.views, fuse=self.fuse, restrict_to_brain=self.restrict_to_brain,
                           smooth3d_mm=float(self.smooth3d_mm), min_component=int(self.min_component))

    @property
    def few_shot(self) -> bool:
        """True when references are to be used (a source and k-shot >= 1)."""
        return self.references is not None and self.k_shot != 0

    def describe(self) -> dict[str, Any]:
        """JSON-ready provenance of the options (as ``infer.json`` and the layers' metadata record them)."""
        return {"modality": self.modality, "axis": "+".join(self.views), **self.post.describe(),
                "threshold": float(self.threshold), "sigma": self.sigma,
                **({"references": str(self.references), "k_shot": self.k_shot, "reference_seed": self.reference_seed}
                   if self.few_shot else {"k_shot": 0})}

    def to_json(self) -> dict[str, Any]:
        """All fields as JSON values (views as a list), e.g. for remembered settings."""
        data = asdict(self)
        data["views"] = list(self.views)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CaseOptions:
        """The inverse of :meth:`to_json`; unknown keys are ignored."""
        names = {f.name for f in fields(cls)}
        kept = {k: v for k, v in data.items() if k in names}
        if "views" in kept:
            kept["views"] = tuple(kept["views"]) if not isinstance(kept["views"], str) else kept["views"]
        return cls(**kept)

    def with_threshold(self, threshold: float) -> CaseOptions:
        """A copy with another threshold."""
        return replace(self, threshold=threshold)


def add_case_arguments(parser: argparse.ArgumentParser, skip: Sequence[str] = ()) -> None:
    """Add the pipeline's flags (from :data:`OPTION_SPECS`, same names and defaults everywhere)."""
    defaults = CaseOptions()
    for spec in OPTION_SPECS:
        if spec.name in skip:
            continue
        default = getattr(defaults, spec.name)
        if spec.name == "views":
            parser.add_argument(spec.flag, default=None, choices=list(spec.choices), help=spec.help + " (default axial)")
        elif isinstance(default, bool):
            parser.add_argument(spec.flag, action="store_true", help=spec.help)
        elif spec.choices:
            parser.add_argument(spec.flag, default=default, choices=list(spec.choices), help=spec.help + f" (default {default})")
        elif spec.name in ("sigma", "smooth3d_mm", "threshold"):
            parser.add_argument(spec.flag, type=float, default=default, help=spec.help + ("" if default is None else f" (default {default:g})"))
        elif spec.name in ("min_component", "batch_size", "k_shot"):
            parser.add_argument(spec.flag, type=int, default=default, help=spec.help)
        else:
            parser.add_argument(spec.flag, default=default, help=spec.help + f" (default {default})")


def options_from_args(args: argparse.Namespace, **overrides: Any) -> CaseOptions:
    """The :class:`CaseOptions` of parsed flags added by :func:`add_case_arguments` (``--axis`` also accepted)."""
    axis = getattr(args, "axis", None)
    views = getattr(args, "views", None)
    if views and axis and views != axis:
        raise InputError(f"--axis {axis} and --views {views} disagree; give only --views")
    values: dict[str, Any] = {"views": views or axis or "axial"}
    for spec in OPTION_SPECS:
        dest = spec.flag.lstrip("-").replace("-", "_")
        if spec.name != "views" and hasattr(args, dest):
            values[spec.name] = getattr(args, dest)
    values.update(overrides)
    return CaseOptions(**values)
