"""Numeric precision of the frozen backbone: fp32, or bf16 where the hardware runs it natively.

Only the frozen visual tower runs in low precision; its weights are cast ONCE when the precision is
set (not per batch). Text features, the methods' heads, logits, softmax, interpolation and the
engine's smoothing stay float32 (each method leaves autocast inside its head).

``auto`` is a documented rule, not a timing taken at run time (so a result never depends on the
machine's momentary load):

- CUDA: bf16 when the GPU supports it, else fp16 autocast with fp32 weights (the engine's long-
  standing default).
- CPU: bf16 when the CPU has native bf16 matrix instructions (AVX512-BF16 or AMX, as reported by
  torch) AND the visual tower is at least :data:`MIN_BF16_WIDTH` wide; fp32 otherwise. On the
  2-core AVX512-BF16 CPU of docs/benchmarks.md ("Precision"), bf16 made ViT-B/16+ and ViT-L/14
  volumes faster for every method, while on the width-64 test backbone the casts cost more than
  the matmuls gain. CPUs without native bf16 emulate it (slower than fp32), so they stay fp32.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from ..errors import InputError

PRECISIONS = ("auto", "fp32", "bf16")
"""What users may ask for."""
MIN_BF16_WIDTH = 512
"""Narrowest visual tower for which ``auto`` picks bf16 on a CPU (ViT-B/16: 768, ViT-L/14: 1024)."""


def cpu_bf16_supported() -> bool:
    """True when this CPU has native bf16 matrix instructions (AVX512-BF16 or AMX tiles) and oneDNN."""
    cpu = torch.cpu
    native = False
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        check = getattr(cpu, probe, None)
        if check is not None:
            try:
                native = native or bool(check())
            except RuntimeError:
                pass
    return native and torch.backends.mkldnn.is_available()


def device_precision_line(device: torch.device) -> str:
    """One line for device reports, e.g. 'cpu (bf16 matmul: yes, AVX512-BF16/AMX)'."""
    if device.type == "cuda":
        bf16 = torch.cuda.is_bf16_supported()
        return f"{device} ({torch.cuda.get_device_name(device)}; bf16: {'yes' if bf16 else 'no, fp16 autocast'})"
    return f"{device} (bf16 matmul: {'yes, native' if cpu_bf16_supported() else 'no, fp32'})"


def visual_width(visual: nn.Module) -> int:
    """Width of the visual tower's residual stream (0 when unknown)."""
    transformer = getattr(visual, "transformer", None)
    return int(getattr(transformer, "width", 0) or 0)


def resolve_precision(precision: str | None, device: torch.device, visual: nn.Module, official_fp32: bool = False) -> str:
    """The precision a method will run with: 'fp32', 'bf16', or 'fp16' (CUDA autocast, fp32 weights).

    Args:
        precision: 'auto', 'fp32', 'bf16', or None: the long-standing default (fp32 on the CPU;
            on CUDA bf16/fp16 autocast, or fp32 for methods whose official code runs fp32).
        device: Where the method runs.
        visual: The visual tower (its width decides ``auto`` on the CPU).
        official_fp32: The method's official test runs in fp32 (AnoVL): None keeps it fp32.

    Raises:
        InputError: Unknown precision, or bf16 requested where it cannot run.
    """
    if precision is not None and precision not in PRECISIONS:
        raise InputError(f"precision {precision!r} is unknown; use one of {', '.join(PRECISIONS)}")
    if device.type == "cuda":
        bf16 = torch.cuda.is_bf16_supported()
        if precision == "bf16" and not bf16:
            raise InputError(f"precision bf16 requested but GPU {torch.cuda.get_device_name(device)} has no bf16; use auto or fp32")
        if precision == "fp32" or (precision is None and official_fp32):
            return "fp32"
        return "bf16" if bf16 else "fp16"
    if precision == "bf16":
        if device.type != "cpu":
            raise InputError(f"precision bf16 is supported on cpu and cuda, not {device.type}; use fp32")
        return "bf16"
    if precision == "auto" and device.type == "cpu" and cpu_bf16_supported() and visual_width(visual) >= MIN_BF16_WIDTH:
        return "bf16"
    return "fp32"


def cast_visual(visual: nn.Module, precision: str) -> None:
    """Cast the frozen visual tower's weights once: bf16 for 'bf16', unchanged otherwise."""
    if precision == "bf16":
        visual.to(torch.bfloat16)


def backbone_autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """Autocast for the frozen backbone: bf16/fp16 for those precisions; no change for fp32."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "fp16":
        return torch.autocast(device.type, dtype=torch.float16)
    return contextlib.nullcontext()


def head_fp32(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """fp32 for heads, logits, softmax and interpolation: autocast switched off."""
    return torch.autocast(device.type, enabled=False)
