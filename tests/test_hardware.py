"""compute_dtype: auto picks bf16 only where the hardware multiplies bf16 fast."""

from __future__ import annotations

import pytest
import torch

from petformers import hardware
from petformers.config.load import load_run_config as load_config


def test_cpu_flags_come_from_this_machine():
    flags = hardware.cpu_flags()
    cpuinfo = open("/proc/cpuinfo").read() if hardware.Path("/proc/cpuinfo").exists() else ""
    if "flags" in cpuinfo:
        assert flags and all(f in cpuinfo for f in list(flags)[:20])
    else:
        assert flags == set()


@pytest.mark.parametrize("flags, expected", [
    ({"avx2", "fma"}, "float32"),
    ({"avx2", "avx512f", "avx512bw"}, "float32"),  # AVX512 without bf16 instructions
    ({"avx512f", "avx512_bf16"}, "bfloat16"),
    ({"amx_tile", "amx_bf16"}, "bfloat16"),
])
def test_auto_follows_the_cpu_bf16_instructions(monkeypatch, flags, expected):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: set(flags))
    assert hardware.auto_compute_dtype("cpu") == expected


def test_auto_in_a_run_config_resolves_to_a_concrete_dtype(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  model_config:\n    compute_dtype: auto\n")
    cfg = load_config(path)
    assert cfg.model.compute_dtype == hardware.auto_compute_dtype()
    assert cfg.model.compute_dtype in ("float32", "bfloat16")
    path.write_text("model:\n  model_config:\n    compute_dtype: float16\n")
    cfg = load_config(path, ["model.model_config.compute_dtype=auto"])
    assert cfg.model.compute_dtype == hardware.auto_compute_dtype()


@pytest.mark.skipif(not hasattr(torch.cpu, "_is_avx512_bf16_supported"),
                    reason="this torch does not expose its CPU feature detection")
def test_auto_agrees_with_torchs_own_cpu_detection():
    """/proc/cpuinfo (what auto reads) and torch's CPUID-based detection name the same bf16 instructions.
    (Which dtype is faster is measured in `make bench`, never timed in a test on a shared CPU.)"""
    torch_bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    if hardware.cpu_flags():
        assert hardware.auto_compute_dtype("cpu") == ("bfloat16" if torch_bf16 else "float32")
