"""Keep triton from loading next to Mesa's LLVM (software OpenGL), which crashes the process.

open_clip imports torchvision, which imports ``torch._dynamo``, which imports triton when it is
installed (CUDA builds of torch ship it). On machines rendering napari with Mesa (llvmpipe: VMs,
Xvfb, remote desktops) the process has already loaded Mesa's ``libLLVM``; loading triton's own LLVM
after it kills napari with a segmentation fault. Inference never needs triton (no ``torch.compile``),
so when Mesa's LLVM is loaded and triton is not, triton is marked as unavailable: torch then runs
without it, exactly as on a machine where it is not installed.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

_MAPS = Path("/proc/self/maps")
log = logging.getLogger(__name__)


def llvm_loaded() -> bool:
    """True when a shared LLVM library (Mesa's) is mapped into this process (Linux only)."""
    try:
        return "libLLVM" in _MAPS.read_text()
    except OSError:
        return False


def keep_triton_out() -> bool:
    """Mark triton unavailable if importing it now would crash (see module doc); True when it did so."""
    if "triton" in sys.modules or not llvm_loaded():
        return False
    sys.modules["triton"] = None  # type: ignore[assignment]  # 'import triton' now raises ImportError
    log.info("Mesa's LLVM is loaded (software OpenGL): triton disabled in this process to avoid a crash")
    return True
