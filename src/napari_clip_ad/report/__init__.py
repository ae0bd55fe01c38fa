"""Study report: Table 1, Fig. 1-3 and Table 3 from inference runs, and lesion-wise Dice.

Kept light on import (no matplotlib): figures are drawn by :mod:`napari_clip_ad.report.figures`.
"""

from .collect import CaseScore, MapPair, RunScores, match_maps, parse_threshold, score_maps, summarise
from .lesionwise import LesionWiseResult, lesion_wise_dice

__all__ = [
    "CaseScore", "LesionWiseResult", "MapPair", "RunScores", "lesion_wise_dice", "match_maps", "parse_threshold",
    "score_maps", "summarise",
]
