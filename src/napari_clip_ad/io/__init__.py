"""Case IO: BraTS-style folders in several real layouts, canonical orientation, aligned saving."""

from .case import Case, case_id_of, find_cases, load_case, save_volume
from .layouts import LAYOUTS, MODALITIES, Layout, register_layout
from .nifti import CANONICAL_AXCODES, Geometry, read_nifti
from .split import Split, load_split, patient_id, save_split, split_cases

__all__ = [
    "CANONICAL_AXCODES", "LAYOUTS", "MODALITIES", "Case", "Geometry", "Layout", "Split", "case_id_of",
    "find_cases", "load_case", "load_split", "patient_id", "read_nifti", "register_layout", "save_split",
    "save_volume", "split_cases",
]
