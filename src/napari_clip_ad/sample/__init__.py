"""Embedded demo data: deterministic synthetic BraTS-like cases with brain metastases (no download).

Built from nilearn's bundled MNI152 template; see ``docs/sample_data.md`` for what is realistic.
"""

from .cohort import write_case, write_cohort
from .phantom import brats_geometry, sample_case, synthetic_case_id

__all__ = ["brats_geometry", "sample_case", "synthetic_case_id", "write_case", "write_cohort"]
