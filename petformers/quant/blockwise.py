"""Blockwise absmax quantization with a code book: QLoRA's NF4 and FP4 (4 bits, blocks of 64) and the
8-bit dynamic code used for double quantization of the absmax values (blocks of 256).

Hand-written (not bitsandbytes) because bitsandbytes is an optional, platform-specific binary and
petformers must run without it; the rules below are bitsandbytes' own, bit for bit (its torch
reference kernels: `x * (1/absmax)` clamped to [-1, 1], nearest code value by the midpoints of the
sorted code book, first value of a pair in the high nibble; dequantization `code[q] * absmax`), and the
tests compare against bitsandbytes wherever it runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# QLoRA's NormalFloat4 (Dettmers et al. 2023, appendix E): quantiles of N(0, 1) normalised to [-1, 1],
# with an exact zero; 7 negative and 8 positive values. These are the float32 values bitsandbytes uses.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
# FP4 (1 sign, 2 exponent, 1 mantissa bit; bitsandbytes' bias), in bit-pattern order, divided by 12.
FP4_CODE = tuple(v / 12.0 for v in (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0,
                                     -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0))

BLOCK_4BIT = 64  # QLoRA's block for the weights
BLOCK_ABSMAX = 256  # QLoRA's block for double quantization of the absmax values


def code_4bit(quant_type: str, device=None) -> torch.Tensor:
    if quant_type == "nf4":
        return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)
    if quant_type == "fp4":
        return torch.tensor(FP4_CODE, dtype=torch.float32, device=device)
    raise ValueError(f"unknown 4-bit type {quant_type!r} (nf4 or fp4)")


def dynamic_code_8bit(device=None) -> torch.Tensor:
    """The signed 8-bit dynamic code (Dettmers 2015) with 7 exponent bits, sorted: 256 values in [-1, 1].

    Each decade 10^-6 ... 10^0 holds 2^i linearly spaced midpoints (i = 0..6), mirrored for negatives,
    plus 0 and 1, as bitsandbytes' create_dynamic_map builds it (its float32 linspace included)."""
    data: list[float] = []
    for i in range(7):
        bounds = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist()
        data += (-(10 ** (-6 + i)) * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (256 - len(data))
    data.sort()
    return torch.tensor(data, dtype=torch.float32, device=device)


def _scaled_blocks(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x (any shape) -> (x / absmax of its block clamped to [-1, 1], flat; absmax [blocks] float32).
    A last partial block has its own absmax."""
    flat = x.reshape(-1).float()
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38)).view(-1, 1), -1, 1).reshape(-1)
    if full < n:
        tail_max = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_max.view(1)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / tail_max, -1, 1)])
    return scaled, absmax


def _nearest(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index into `code` of the nearest value (a value on a midpoint goes to the lower code): the number
    of midpoints of the sorted code below the value (what torch.bucketize counts), then the code's order."""
    order = torch.argsort(code)
    sorted_code = code[order]
    bounds = (sorted_code[:-1] + sorted_code[1:]) / 2
    if len(bounds) <= 15:  # 4 bits: 15 compare-and-add passes are ~5x faster than bucketize's search
        q = torch.zeros(scaled.shape, dtype=torch.uint8, device=scaled.device)
        for b in bounds.tolist():
            q += scaled > b
    else:
        q = torch.bucketize(scaled, bounds, out_int32=True)
    if torch.equal(order, torch.arange(len(code), device=code.device)):
        return q
    return order[q.long()]


def _expand_absmax(values: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    """values (flat, float32) * the absmax of their block."""
    n = values.numel()
    full = n - n % blocksize
    if full == n:
        return (values.view(-1, blocksize) * absmax.view(-1, 1)).reshape(n)
    out = torch.empty(n, dtype=torch.float32, device=values.device)
    blocks = full // blocksize
    out[:full] = (values[:full].view(-1, blocksize) * absmax[:blocks].view(-1, 1)).reshape(full)
    out[full:] = values[full:] * absmax[blocks]
    return out


# ---- 8 bits (double quantization of the absmax values) -------------------------------------------

def quantize_8bit(x: torch.Tensor, blocksize: int = BLOCK_ABSMAX) -> tuple[torch.Tensor, torch.Tensor]:
    """x -> (uint8 codes, same shape; absmax [blocks] float32) with the dynamic 8-bit code."""
    scaled, absmax = _scaled_blocks(x, blocksize)
    q = _nearest(scaled, dynamic_code_8bit(x.device)).to(torch.uint8)
    return q.view(x.shape), absmax


def dequantize_8bit(q: torch.Tensor, absmax: torch.Tensor, blocksize: int = BLOCK_ABSMAX) -> torch.Tensor:
    values = dynamic_code_8bit(q.device)[q.reshape(-1).long()]
    return _expand_absmax(values, absmax, blocksize).view(q.shape)


# ---- 4 bits ----------------------------------------------------------------------------------------

@dataclass
class Quantized4bit:
    """A tensor in 4 bits: two codes per byte (first in the high nibble), one absmax per block, either
    float32 or, with double quantization, 8-bit codes of (absmax - offset) in blocks of 256."""
    packed: torch.Tensor  # uint8 [ceil(n / 2)]
    absmax: torch.Tensor  # float32 [blocks], or uint8 [blocks] when double quantized
    shape: tuple[int, ...]
    quant_type: str = "nf4"
    blocksize: int = BLOCK_4BIT
    absmax_scale: torch.Tensor | None = None  # float32 [ceil(blocks / 256)] (double quantization)
    absmax_offset: torch.Tensor | None = None  # float32 scalar: the mean absmax (double quantization)

    def absmax_float(self) -> torch.Tensor:
        if self.absmax_scale is None:
            return self.absmax
        return dequantize_8bit(self.absmax, self.absmax_scale) + self.absmax_offset


def quantize_4bit(x: torch.Tensor, quant_type: str = "nf4", blocksize: int = BLOCK_4BIT,
                  double_quant: bool = True) -> Quantized4bit:
    scaled, absmax = _scaled_blocks(x, blocksize)
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    q = _nearest(scaled, code_4bit(quant_type, x.device)).to(torch.uint8)
    packed = (q[0::2] << 4) | q[1::2]
    out = Quantized4bit(packed, absmax, tuple(x.shape), quant_type, blocksize)
    if double_quant:
        offset = absmax.mean()
        out.absmax, out.absmax_scale = quantize_8bit(absmax - offset, BLOCK_ABSMAX)
        out.absmax_offset = offset
    return out


def unpack_4bit(packed: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 [ceil(n/2)] -> int64 codes [n] (high nibble first)."""
    q = torch.stack([packed >> 4, packed & 0x0F], dim=1).reshape(-1)[:n]
    return q.long()


_PAIR_TABLES: dict[tuple[str, torch.device], torch.Tensor] = {}


def _pair_table(quant_type: str, device: torch.device) -> torch.Tensor:
    """[256, 2] float32: the two code values of each byte (high nibble first)."""
    key = (quant_type, device)
    if key not in _PAIR_TABLES:
        code, b = code_4bit(quant_type, device), torch.arange(256, device=device)
        _PAIR_TABLES[key] = torch.stack([code[b >> 4], code[b & 0x0F]], dim=1)
    return _PAIR_TABLES[key]


def dequantize_4bit(q: Quantized4bit, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """code[q] * absmax of the block, float32, cast to dtype. One gather per byte (both nibbles at
    once, int32 indices) and one in-place scale: ~3 float32 copies' worth of traffic per call."""
    n = 1
    for d in q.shape:
        n *= d
    values = F.embedding(q.packed.int(), _pair_table(q.quant_type, q.packed.device)).view(-1)[:n]
    absmax = q.absmax_float()
    if n % q.blocksize == 0:
        values = values.view(-1, q.blocksize).mul_(absmax.view(-1, 1))
    else:
        values = _expand_absmax(values, absmax, q.blocksize)
    return values.view(q.shape).to(dtype)
