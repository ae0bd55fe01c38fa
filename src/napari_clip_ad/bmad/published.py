"""Published BMAD Brain numbers (%) for the methods this package implements, with their sources.

Only numbers read in a source named here (see ``docs/benchmarks_literature.md``); a metric a source
does not report is None. Protocols differ between papers (image size, image score, normalisation).
"""

from __future__ import annotations

from dataclasses import dataclass

METRIC_KEYS = ("image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "aupro", "dice_f1max")
METRIC_LABELS = ("image AUROC", "image AP", "pixel AUROC", "pixel AP", "AUPRO", "Dice (F1-max thr.)")


@dataclass(frozen=True)
class PublishedRow:
    """One published result: method, shots, the values in % (None: not reported) and the source."""

    method: str
    k_shot: int
    setting: str
    values: dict[str, float | None]
    source: str


def _row(method: str, k_shot: int, setting: str, source: str, **values: float) -> PublishedRow:
    return PublishedRow(method, k_shot, setting, {key: values.get(key) for key in METRIC_KEYS}, source)


PUBLISHED: tuple[PublishedRow, ...] = (
    _row("mvfa", 0, "zero-shot (trained on the other medical datasets)",
         "MVFA-AD paper (Huang et al., CVPR 2024), as quoted in the official README's zero-shot results table "
         "(MediaBrain-SJTU/MVFA-AD README.md, 'BrainMRI' row, 'Paper' columns)",
         image_auroc=78.63, pixel_auroc=90.27),
    _row("mvfa", 4, "4-shot",
         "MVFA-AD paper (Huang et al., CVPR 2024), as quoted in the official README's few-shot results table "
         "(MediaBrain-SJTU/MVFA-AD README.md, 'BrainMRI' row, 'Paper' columns)",
         image_auroc=92.44, pixel_auroc=97.30),
    _row("aaclip", 0, "zero-shot (trained on industrial data; train.py's default dataset is VisA)",
         "official repository Mwxinnn/AA-CLIP (commit 53db195) results/test.log, 'Brain' block (ViT-L-14-336, "
         "518 px, checkpoint of epoch 15); the paper (Ma et al., CVPR 2025) quotes pixel AUROC 95.7",
         image_auroc=79.26, image_ap=94.41, pixel_auroc=95.72, pixel_ap=44.91),
    _row("vand", 4, "4-shot",
         "secondary: third-party summary of DictAS (2025) quoting a 'BraTS' table (shared docs bmad.md, section 3); "
         "not checked against the paper",
         pixel_auroc=91.3, pixel_ap=40.0, aupro=63.0),
    _row("winclip", 4, "4-shot",
         "secondary: third-party summary of DictAS (2025) quoting a 'BraTS' table (shared docs bmad.md, section 3); "
         "not checked against the paper",
         pixel_auroc=93.3, pixel_ap=33.4, aupro=64.0),
)


def published_rows(method: str, k_shot: int) -> list[PublishedRow]:
    """Published rows of ``method`` in the same setting (zero-shot, or the same number of shots)."""
    return [row for row in PUBLISHED if row.method == method and row.k_shot == k_shot]
