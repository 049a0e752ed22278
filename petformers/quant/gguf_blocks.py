"""llama.cpp's quantized block formats, dequantized with vectorised torch ops.

The one owner of the GGUF dequantization rule in petformers: the GGUF reader (float loading) and the
quantized linear layer (blocks kept as stored) both call `dequantize`. Each format follows the byte
layout of ggml-quants (and the arithmetic of the `gguf` package's numpy reference, in the same order,
so the results are equal bit for bit: tested for every type). Rows are whole blocks, so a tensor is
stored as uint8 [rows, bytes_per_row] and rows can be permuted (llama.cpp's q/k order) without
decoding. Hand-written because the `gguf` package's dequantization is numpy-only (no CUDA, no torch
tensors, a copy per call).
"""

from __future__ import annotations

import torch

QK_K = 256
# ggml type id -> (name, values per block, bytes per block)
BLOCK_TYPES = {
    2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34), 10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210),
}
TYPE_IDS = {name: tid for tid, (name, _, _) in BLOCK_TYPES.items()}


def _f16(b: torch.Tensor) -> torch.Tensor:
    """uint8 [n, 2] (little-endian half) -> float32 [n, 1]."""
    return b.contiguous().view(torch.float16).float()


def _bits(b: torch.Tensor, shifts) -> torch.Tensor:
    """Each byte of b [..., k] shifted right by each of `shifts`: [..., len(shifts), k] (uint8)."""
    s = torch.tensor(shifts, dtype=torch.uint8, device=b.device).view(len(shifts), 1)
    return b.unsqueeze(-2) >> s


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[n, 16] bytes -> [n, 32]: the 16 low nibbles, then the 16 high ones (ggml's order)."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=1)


def _high_bits32(qh: torch.Tensor) -> torch.Tensor:
    """[n, 4] bytes = a little-endian uint32 -> its 32 bits, bit i for value i: [n, 32] uint8."""
    return (_bits(qh, range(8)) & 1).transpose(1, 2).reshape(-1, 32)


def _q4_0(b):
    d = _f16(b[:, :2])
    q = _nibbles(b[:, 2:]).to(torch.int8) - 8
    return d * q.float()


def _q4_1(b):
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    return d * _nibbles(b[:, 4:]).float() + m


def _q5_0(b):
    d = _f16(b[:, :2])
    q = (_nibbles(b[:, 6:]) | (_high_bits32(b[:, 2:6]) << 4)).to(torch.int8) - 16
    return d * q.float()


def _q5_1(b):
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    q = _nibbles(b[:, 8:]) | (_high_bits32(b[:, 4:8]) << 4)
    return d * q.float() + m


def _q8_0(b):
    d = _f16(b[:, :2])
    return b[:, 2:].contiguous().view(torch.int8).float() * d


def _q2_k(b):
    n = b.shape[0]
    scales, qs = b[:, :16], b[:, 16:80]
    d, dmin = _f16(b[:, 80:82]), _f16(b[:, 82:84])
    dl = (d * (scales & 0x0F).float()).view(n, 16, 1)
    ml = (dmin * (scales >> 4).float()).view(n, 16, 1)
    q = (_bits(qs.reshape(n, 2, 32), (0, 2, 4, 6)) & 3).reshape(n, 16, 16).float()
    return (dl * q - ml).reshape(n, QK_K)


def _q3_k(b):
    n = b.shape[0]
    hmask, qs, scales, d = b[:, :32], b[:, 32:96], b[:, 96:108], _f16(b[:, 108:110])
    low = _bits(scales[:, :8], (0, 4)).reshape(n, 16)
    high = _bits(scales[:, 8:12], (0, 2, 4, 6)).reshape(n, 16)
    sc = ((low & 0x0F) | ((high & 0x03) << 4)).to(torch.int8) - 32
    dl = (d * sc.float()).view(n, 16, 1)
    ql = (_bits(qs.reshape(n, 2, 32), (0, 2, 4, 6)) & 3).reshape(n, 16, 16)
    qh = ((_bits(hmask.reshape(n, 1, 32), range(8)) & 1) ^ 1).reshape(n, 16, 16)  # bit set: no offset
    q = (ql.to(torch.int8) - (qh << 2).to(torch.int8)).float()
    return (dl * q).reshape(n, QK_K)


def _scale_min_k4(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: 12 bytes -> 8 six-bit scales and 8 six-bit mins."""
    n = scales.shape[0]
    s = scales.reshape(n, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=1)
    return sc, mn


def _q4_k(b):
    n = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = _scale_min_k4(b[:, 4:16])
    dl = (d * sc.float()).view(n, 8, 1)
    ml = (dmin * mn.float()).view(n, 8, 1)
    q = (_bits(b[:, 16:].reshape(n, 4, 32), (0, 4)) & 0x0F).reshape(n, 8, 32).float()
    return (dl * q - ml).reshape(n, QK_K)


def _q5_k(b):
    n = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = _scale_min_k4(b[:, 4:16])
    dl = (d * sc.float()).view(n, 8, 1)
    ml = (dmin * mn.float()).view(n, 8, 1)
    ql = (_bits(b[:, 48:].reshape(n, 4, 32), (0, 4)) & 0x0F).reshape(n, 8, 32)
    qh = (_bits(b[:, 16:48].reshape(n, 1, 32), range(8)) & 1).reshape(n, 8, 32)
    q = (ql | (qh << 4)).float()
    return (dl * q - ml).reshape(n, QK_K)


def _q6_k(b):
    n = b.shape[0]
    ql, qh, scales, d = b[:, :128], b[:, 128:192], b[:, 192:208], _f16(b[:, 208:210])
    dl = (d * scales.contiguous().view(torch.int8).float()).view(n, 16, 1)
    low = (_bits(ql.reshape(n, 2, 64), (0, 4)) & 0x0F).reshape(n, 8, 32)
    high = (_bits(qh.reshape(n, 2, 32), (0, 2, 4, 6)) & 3).reshape(n, 8, 32)
    q = ((low | (high << 4)).to(torch.int8) - 32).reshape(n, 16, 16).float()
    return (dl * q).reshape(n, QK_K)


_DEQUANT = {2: _q4_0, 3: _q4_1, 6: _q5_0, 7: _q5_1, 8: _q8_0, 10: _q2_k, 11: _q3_k, 12: _q4_k,
            13: _q5_k, 14: _q6_k}


def is_block_type(type_id: int) -> bool:
    return int(type_id) in BLOCK_TYPES


def type_name(type_id: int) -> str:
    return BLOCK_TYPES[int(type_id)][0] if int(type_id) in BLOCK_TYPES else f"type {int(type_id)}"


def row_bytes(type_id: int, cols: int) -> int:
    _, block, size = BLOCK_TYPES[int(type_id)]
    if cols % block:
        raise ValueError(f"{type_name(type_id)} rows hold whole blocks of {block} values, not {cols}")
    return cols // block * size


def dequantize(data: torch.Tensor, type_id: int, shape: tuple[int, ...],
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 blocks (any shape holding whole blocks, in order) -> float tensor of `shape` in `dtype`."""
    type_id = int(type_id)
    if type_id not in _DEQUANT:
        raise NotImplementedError(f"GGUF quantization {type_name(type_id)} is not supported "
                                  f"(supported: {', '.join(n for n, _, _ in BLOCK_TYPES.values())})")
    _, _, size = BLOCK_TYPES[type_id]
    blocks = data.reshape(-1, size)
    return _DEQUANT[type_id](blocks).reshape(shape).to(dtype)
