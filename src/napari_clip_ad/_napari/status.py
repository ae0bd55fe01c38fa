"""Status labels that wrap long text instead of widening the dock."""

from __future__ import annotations

from magicgui.widgets import Label
from qtpy.QtWidgets import QSizePolicy


def wrapping(label: Label) -> Label:
    """Make ``label`` wrap its text and never ask for more width than the dock has (returns it)."""
    native = label.native
    native.setWordWrap(True)
    policy = native.sizePolicy()
    policy.setHorizontalPolicy(QSizePolicy.Policy.Ignored)
    native.setSizePolicy(policy)
    native.setMinimumWidth(1)
    return label
