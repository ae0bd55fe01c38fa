"""Fig. 1-3 of the study, drawn (matplotlib, Agg backend) from the rows of :mod:`.tables` as PNG bytes."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

DPI = 120


def _runs(rows: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    """(method, setup) pairs in first-seen order."""
    return list(dict.fromkeys((row["method"], row["setup"]) for row in rows))


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def _grid(n: int, width: float, height: float) -> tuple[Figure, np.ndarray]:
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.ravel()[n:]:
        ax.set_visible(False)
    return fig, axes.ravel()


def fig1_png(rows: Sequence[dict[str, Any]], seed: int = 0) -> bytes:
    """3D Dice per case: a box and jittered points per method x setup, grouped by method, coloured by setup."""
    runs = _runs(rows)
    setups = list(dict.fromkeys(setup for _, setup in runs))
    colours = {setup: plt.cm.tab10(i % 10) for i, setup in enumerate(setups)}
    rng = np.random.default_rng(seed)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(runs) + 1.5), 4.0))
    positions, labels, previous = [], [], None
    for i, (method, setup) in enumerate(runs):
        x = i + (0.5 * len({m for m, _ in runs[:i + 1]}) - 0.5)
        values = np.array([r["dice"] for r in rows if (r["method"], r["setup"]) == (method, setup)], dtype=float)
        box = ax.boxplot([values], positions=[x], widths=0.6, patch_artist=True, showfliers=False)
        box["boxes"][0].set(facecolor=(*colours[setup][:3], 0.35), edgecolor=colours[setup])
        ax.scatter(x + rng.uniform(-0.18, 0.18, values.size), values, s=12, color=colours[setup], zorder=3)
        positions.append(x)
        labels.append(method if method != previous else "")
        previous = method
    ax.set_xticks(positions, labels)
    ax.set_ylabel("3D Dice")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=colours[s]) for s in setups], labels=setups,
              title="setup", fontsize=8, loc="upper right")
    ax.set_title("3D Dice by method and setup")
    return _png(fig)


def fig2_png(rows: Sequence[dict[str, Any]]) -> bytes:
    """Per-subject boxplots of 2D slice Dice, 3D Dice as red crosses; one panel per method x setup."""
    runs = _runs(rows)
    cases = list(dict.fromkeys(row["case_id"] for row in rows))
    fig, axes = _grid(max(len(runs), 1), max(3.5, 0.3 * len(cases) + 1.5), 3.2)
    for ax, (method, setup) in zip(axes, runs):
        mine = [r for r in rows if (r["method"], r["setup"]) == (method, setup)]
        ids = list(dict.fromkeys(r["case_id"] for r in mine))
        slices = [[r["slice_dice"] for r in mine if r["case_id"] == case] for case in ids]
        dice_3d = [next(r["dice_3d"] for r in mine if r["case_id"] == case) for case in ids]
        x = np.arange(1, len(ids) + 1)
        ax.boxplot(slices, positions=x, widths=0.6, showfliers=False,
                   boxprops={"color": "tab:blue"}, medianprops={"color": "tab:blue"})
        ax.scatter(x, dice_3d, marker="x", color="red", s=30, zorder=3, label="3D Dice")
        ax.set_xticks(x, [str(i) for i in x], fontsize=7)
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"{method} / {setup}", fontsize=9)
        ax.set_ylabel("2D Dice")
        ax.set_xlabel("subject (order of fig2.csv)")
    fig.suptitle("Per-subject 2D Dice (boxes) and 3D Dice (red crosses)")
    fig.tight_layout()
    return _png(fig)


def fig3_png(rows: Sequence[dict[str, Any]]) -> bytes:
    """Mean 2D Dice per distance bin (-1 inferior .. 1 superior), lesion-slice counts as bars on a twin axis."""
    runs = _runs(rows)
    fig, axes = _grid(max(len(runs), 1), 3.8, 3.0)
    for ax, (method, setup) in zip(axes, runs):
        mine = [r for r in rows if (r["method"], r["setup"]) == (method, setup)]
        centres = np.array([r["bin_centre"] for r in mine])
        widths = np.array([r["bin_high"] - r["bin_low"] for r in mine])
        twin = ax.twinx()
        twin.bar(centres, [r["n_lesion_slices"] for r in mine], width=0.9 * widths, color="gold", alpha=0.6)
        twin.set_ylabel("lesion slices", fontsize=8)
        ax.set_zorder(twin.get_zorder() + 1)
        ax.patch.set_visible(False)
        ax.plot(centres, [r["mean_dice"] for r in mine], marker="o", color="tab:blue")
        ax.set_xlim(-1, 1)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("distance from brain centre (-1 inferior, 1 superior)", fontsize=8)
        ax.set_ylabel("mean 2D Dice")
        ax.set_title(f"{method} / {setup}", fontsize=9)
    fig.tight_layout()
    return _png(fig)
