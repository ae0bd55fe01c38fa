"""The detect widget's collapsible "Advanced" section, generated from :data:`OPTION_SPECS`.

Every pipeline option gets one control with the CLI flag's name (as label), default and help line
(as tooltip), so the widget, ``napari-clip-ad infer`` and the study offer the same options.
"""

from __future__ import annotations

from typing import Any

from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FloatSpinBox,
    LineEdit,
    PushButton,
    SpinBox,
    Widget,
)

from ..case_options import OPTION_SPECS, CaseOptions, OptionSpec
from ..errors import InputError

CHOOSE_MODALITY = "choose..."
"""The modality entry of a layer without plugin metadata: the user must say what it is."""
SMOOTH3D_MAX_MM = 50.0
MIN_COMPONENT_MAX = 10_000_000


def _control(spec: OptionSpec, default: Any, batch_default: int, modalities: Any) -> Widget:
    """One magicgui control for an option (label = the spec's label, tooltip = its help)."""
    common = {"label": spec.label, "tooltip": f"{spec.help} ({spec.flag})"}
    if spec.name == "modality":
        return ComboBox(choices=modalities, **common)
    if spec.choices:
        return ComboBox(choices=list(spec.choices), value=default if default in spec.choices else spec.choices[0], **common)
    if spec.name in ("sigma", "references"):
        # sigma: empty = the method's official one; references: empty = zero-shot, 'auto' or a folder.
        return LineEdit(value="" if default is None else str(default), **common)
    if spec.name == "k_shot":
        return SpinBox(value=-1 if default is None else default, min=-1, max=1024,
                       label=spec.label, tooltip=f"{spec.help}; -1 = the mode's default ({spec.flag})")
    if isinstance(default, bool):
        return CheckBox(value=default, **common)
    if spec.name == "smooth3d_mm":
        return FloatSpinBox(value=default, min=0.0, max=SMOOTH3D_MAX_MM, step=0.5, **common)
    if spec.name == "threshold":
        return FloatSpinBox(value=default, min=0.0, max=1.0, step=0.01, **common)
    if spec.name == "batch_size":
        return SpinBox(value=batch_default, min=1, max=512, **common)
    if spec.name == "min_component":
        return SpinBox(value=default, min=0, max=MIN_COMPONENT_MAX, **common)
    raise ValueError(f"no widget control for option {spec.name!r}: add one in _napari/advanced.py")  # pragma: no cover


class AdvancedOptions(Container):
    """A toggle button and, under it, one control per pipeline option (hidden until expanded)."""

    def __init__(self, batch_default: int) -> None:
        super().__init__(labels=False)
        defaults = CaseOptions()
        self.toggle = PushButton(text="Advanced ▸", tooltip="show or hide every pipeline option (as the CLI flags)")
        self.body = Container(labels=True)
        self.controls: dict[str, Widget] = {}
        self._modalities: list[str] = [CHOOSE_MODALITY]
        for spec in OPTION_SPECS:
            control = _control(spec, getattr(defaults, spec.name), batch_default, lambda *_: list(self._modalities))
            self.controls[spec.name] = control
            self.body.append(control)
        self.extend([self.toggle, self.body])
        self.body.visible = False
        self.toggle.changed.connect(lambda *_: self.set_expanded(not self.expanded))

    @property
    def expanded(self) -> bool:
        """True while the options are shown."""
        return not self.body.native.isHidden()

    def set_expanded(self, expanded: bool) -> None:
        """Show or hide the options."""
        self.body.visible = expanded
        self.toggle.text = "Advanced ▾" if expanded else "Advanced ▸"

    def set_modalities(self, choices: list[str], value: str) -> None:
        """Offer ``choices`` in the modality control (kept when the viewer's layers change) and pick ``value``."""
        self._modalities = list(choices)
        self.controls["modality"].reset_choices()
        self.controls["modality"].value = value

    def __getitem__(self, name: str) -> Widget:  # type: ignore[override]
        return self.controls[name]

    def options(self) -> CaseOptions:
        """The :class:`CaseOptions` shown (raises a readable :class:`InputError` for a bad value)."""
        values: dict[str, Any] = {}
        for name, control in self.controls.items():
            value = control.value
            if name == "modality" and value in (None, CHOOSE_MODALITY):
                raise InputError("this layer has no modality in its metadata: choose it under Advanced > modality "
                                 "(t1n, t1c, t2w or t2f = FLAIR)")
            if name == "sigma":
                text = str(value).strip()
                try:
                    value = None if text == "" else float(text)
                except ValueError:
                    raise InputError(f"sigma {text!r}: give a number of pixels >= 0, or leave it empty for the "
                                     "method's official one") from None
            if name == "references":
                value = str(value).strip() or None
            if name == "k_shot":
                value = None if int(value) < 0 else int(value)
            if name in ("min_component", "batch_size"):
                value = int(value)
            if name in ("smooth3d_mm", "threshold"):
                value = float(value)
            values[name] = value
        return CaseOptions(**values)

    def remembered(self) -> dict[str, Any]:
        """The values to keep across launches (modality depends on the layer and is not kept)."""
        return {name: control.value for name, control in self.controls.items() if name != "modality"}

    def restore(self, values: dict[str, Any]) -> None:
        """Put remembered values back, skipping any that no longer fit their control."""
        for name, value in values.items():
            control = self.controls.get(name)
            if control is None or name == "modality":
                continue
            try:
                control.value = value
            except (ValueError, TypeError):
                continue
