"""Causal attention in training pads its length to a multiple of 64 on CPU in bf16/fp16 (models/llama.py,
PAD_LENGTH_TO): the same outputs and gradients as unpadded attention, and memory that stops growing with
the number of distinct sample lengths (torch's CPU flash-attention backward keeps ~6 MiB per length)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from petformers.models.llama import PAD_LENGTH_TO, causal_attention, segment_attention


def _qkv(length: int, dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(1, heads, length, 64, generator=g) * 0.5).to(dtype).requires_grad_(True)
            for heads in (9, 3, 3)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("length", [1, 37, 64, 130])
def test_padded_causal_attention_equals_unpadded(dtype, length):
    q, k, v = _qkv(length, dtype)
    out = causal_attention(q, k, v, enable_gqa=True)
    assert out.shape == q.shape
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    q32, k32, v32 = (x.detach().float().requires_grad_(True) for x in (q, k, v))
    ref = F.scaled_dot_product_attention(q32, k32, v32, is_causal=True, enable_gqa=True)
    ref_grads = torch.autograd.grad(ref.square().sum(), (q32, k32, v32))
    tol = 2e-2 if dtype == torch.bfloat16 else 3e-3
    assert (out.float() - ref).abs().max() < tol
    for g, r in zip(grads, ref_grads):
        assert (g.float() - r).abs().max() < tol * max(1.0, r.abs().max().item())


def test_segments_padded_one_by_one():
    """segment_attention pads each sample on its own: samples still never see each other."""
    q, k, v = _qkv(100, torch.bfloat16)
    layout = [[(30, 0), (45, 0), (25, 0)]]  # (length, shared prefix seen)
    out = segment_attention(q, k, v, layout, enable_gqa=True)
    start = 0
    for n, _ in layout[0]:
        part = F.scaled_dot_product_attention(*(x[:, :, start:start + n].float() for x in (q, k, v)), is_causal=True,
                                              enable_gqa=True)
        assert (out[:, :, start:start + n].float() - part).abs().max() < 2e-2
        start += n


MEASURE = """
import sys, torch
from petformers.models.llama import segment_attention
def rss():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) // 1024
lengths = list(range(40, 1000, 16))  # 60 distinct sample lengths
def run(n):
    q = torch.randn(1, 9, n, 64, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, 3, n, 64, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, 3, n, 64, dtype=torch.bfloat16, requires_grad=True)
    segment_attention(q, k, v, [[(n, 0)]], enable_gqa=True).sum().backward()
for n in (64, 128):  # warm up the kernels of a few lengths
    run(n)
before = rss()
for n in lengths:
    run(n)
print(rss() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_memory_does_not_grow_with_distinct_lengths():
    """60 distinct lengths through bf16 attention, forward and backward. Unpadded (PAD_LENGTH_TO = 1) this grew
    the RSS by ~360 MiB on a CPU with AVX512-BF16 (torch 2.13); padded, the 60 lengths are 16 shapes. On CPUs
    whose bf16 attention keeps nothing per length, both stay low."""
    assert PAD_LENGTH_TO == 64
    out = subprocess.run([sys.executable, "-c", MEASURE], capture_output=True, text=True, timeout=300,
                         env={"OMP_NUM_THREADS": "2", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    grown = int(out.stdout.split()[-1])
    assert grown < 150, f"RSS grew {grown} MiB over 60 distinct lengths"
