"""compute_dtype: auto picks bf16 only where the hardware multiplies bf16 fast."""

from __future__ import annotations

import time

import pytest
import torch

from petformers import hardware
from petformers.train.config import load_config


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
    assert cfg.compute_dtype == hardware.auto_compute_dtype()
    assert cfg.compute_dtype in ("float32", "bfloat16")
    path.write_text("model:\n  model_config:\n    compute_dtype: float16\n")
    cfg = load_config(path, ["model.model_config.compute_dtype=auto"])
    assert cfg.compute_dtype == hardware.auto_compute_dtype()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU's choice")
def test_auto_agrees_with_what_is_faster_on_this_cpu():
    """Where auto says float32, bf16 matmul really is slower here (and the other way round)."""
    torch.manual_seed(0)
    a32, b32 = torch.randn(256, 256), torch.randn(256, 256)

    def best(a, b):
        torch.mm(a, b)
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            torch.mm(a, b)
            times.append(time.perf_counter() - t0)
        return min(times)

    fp32, bf16 = best(a32, b32), best(a32.bfloat16(), b32.bfloat16())
    if hardware.auto_compute_dtype("cpu") == "float32":
        assert bf16 > fp32
    else:
        assert bf16 < 2 * fp32
