"""The literature's table form: this run's numbers (%) beside the published ones, labelled."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .published import METRIC_KEYS, METRIC_LABELS, PublishedRow


def _percent(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{100.0 * float(value):.2f}"


def comparison_markdown(metrics: dict[str, Any], label: str, published: Sequence[PublishedRow]) -> str:
    """Markdown table: a ``this run`` row and one ``published`` row per source (values in %, 2 decimals).

    Args:
        metrics: This run's :data:`~napari_clip_ad.bmad.published.METRIC_KEYS` as fractions.
        label: What the run is (method, shots, backbone).
        published: Published rows of the same method and setting (may be empty).
    """
    lines = ["| | " + " | ".join(METRIC_LABELS) + " | source |", "|---|" + "---|" * (len(METRIC_KEYS) + 1)]
    lines.append(f"| **this run**: {label} | " + " | ".join(_percent(metrics.get(k)) for k in METRIC_KEYS) + " | this run |")
    for row in published:
        cells = ["–" if row.values[k] is None else f"{row.values[k]:.2f}" for k in METRIC_KEYS]
        lines.append(f"| **published**: {row.method} {row.setting} | " + " | ".join(cells) + f" | {row.source} |")
    if not published:
        lines.append("| **published**: none found for this method and setting | " + " | ".join("–" for _ in METRIC_KEYS)
                     + " | see docs/benchmarks_literature.md |")
    return "\n".join(lines) + "\n"
