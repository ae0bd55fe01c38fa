"""The BMAD Brain benchmark (BraTS2021 FLAIR slices): folder reading, a run through the engine, published numbers."""

from .layout import BmadImage, find_root, read_image, read_mask, read_test_split, reference_images
from .published import METRIC_KEYS, METRIC_LABELS, PUBLISHED, PublishedRow, published_rows
from .report import comparison_markdown

__all__ = [
    "METRIC_KEYS", "METRIC_LABELS", "PUBLISHED", "BmadImage", "PublishedRow", "comparison_markdown", "find_root",
    "published_rows", "read_image", "read_mask", "read_test_split", "reference_images",
]
