"""Per-slice Dice plot (matplotlib in the threshold dock): slices along the viewing axis, click to jump."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure


class DicePlot(FigureCanvasQTAgg):
    """2D Dice of every slice of the map's grid, the slice on screen marked; a click calls ``on_pick(index)``."""

    def __init__(self, on_pick: Callable[[int], None]) -> None:
        self.figure = Figure(figsize=(3.2, 1.8), dpi=90)
        self.figure.subplots_adjust(left=0.16, right=0.97, top=0.95, bottom=0.25)  # fixed: no layout pass per draw
        super().__init__(self.figure)
        self.axes = self.figure.add_subplot()
        self.setMinimumHeight(140)
        self.setToolTip("2D Dice of each slice along the viewing axis at the current threshold; click to go there")
        self._on_pick = on_pick
        self.dices: np.ndarray = np.zeros(0)
        self.current: int | None = None
        self._line = None
        self._marker = None
        self.mpl_connect("button_press_event", self._clicked)
        self.clear_plot("no ground truth")

    def clear_plot(self, message: str = "") -> None:
        """Empty the plot (e.g. after an error, so no stale figure stays)."""
        self.dices, self.current = np.zeros(0), None
        self.axes.clear()
        self.axes.set_xlabel("slice")
        self.axes.set_ylabel("Dice")
        self.axes.set_ylim(0, 1.02)
        if message:
            self.axes.text(0.5, 0.5, message, ha="center", va="center", transform=self.axes.transAxes, fontsize=8)
        self._line = self._marker = None
        self.draw_idle()

    def set_dices(self, dices: np.ndarray, axis_name: str, current: int | None) -> None:
        """Plot ``dices`` (NaN = slice empty in both) and mark ``current``; the line is updated in place when it can."""
        dices = np.asarray(dices, dtype=float)
        if self._line is not None and dices.size == self.dices.size:
            self.dices = dices
            self._line.set_ydata(dices)
            self.axes.set_xlabel(f"{axis_name} slice (map grid)")
            self.mark(current)
            return
        self.dices = dices
        self.axes.clear()
        x = np.arange(self.dices.size)
        self._line, = self.axes.plot(x, self.dices, ".-", color="tab:purple", markersize=2, linewidth=1)
        self.axes.set_xlim(-0.5, max(self.dices.size - 0.5, 0.5))
        self.axes.set_ylim(0, 1.02)
        self.axes.set_xlabel(f"{axis_name} slice (map grid)")
        self.axes.set_ylabel("2D Dice")
        self._marker = self.axes.axvline(0, color="tab:orange", linewidth=1)
        self.mark(current)

    def mark(self, current: int | None) -> None:
        """Move the current-slice marker (hidden when the slice lies outside the map)."""
        self.current = current
        if self._marker is not None:
            inside = current is not None and 0 <= current < self.dices.size
            self._marker.set_visible(inside)
            if inside:
                self._marker.set_xdata([current, current])
        self.draw_idle()

    def _clicked(self, event) -> None:
        if event.inaxes is not self.axes or event.xdata is None or not self.dices.size:
            return
        self._on_pick(int(np.clip(np.round(event.xdata), 0, self.dices.size - 1)))
