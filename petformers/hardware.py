"""Which compute dtype is fastest here, for `compute_dtype: auto`.

A bf16 frozen base halves the weights' memory and, on hardware with bf16 matrix instructions (NVIDIA
Ampere and later, x86 with AVX512-BF16 or AMX), runs matmuls 2-3x faster than fp32. Without them torch
multiplies bf16 through a scalar fallback: on an AVX2-only CPU measured 20-150x slower than fp32
(docs/benchmarks.md). So `auto` picks bf16 only where the hardware has it.
"""

from __future__ import annotations

from pathlib import Path

import torch

CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is no such file)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def has_fast_bf16(device: str | torch.device) -> bool:
    """True where matmuls in bf16 are at least as fast as in fp32 on `device`."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    flags = cpu_flags()
    if flags:
        return any(f in flags for f in CPU_BF16_FLAGS)
    # No /proc/cpuinfo (macOS, Windows): Apple silicon has bf16 instructions, other CPUs we cannot tell.
    return torch.backends.mps.is_available()


def auto_compute_dtype(device: str | torch.device | None = None) -> str:
    """'bfloat16' where the hardware multiplies bf16 fast, else 'float32' (the device: CUDA if present)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return "bfloat16" if has_fast_bf16(device) else "float32"
