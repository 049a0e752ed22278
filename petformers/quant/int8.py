"""8-bit weights: one absmax per output row, values round(w · 127 / absmax) in int8.

bitsandbytes' LLM.int8 vector-wise rule (without its fp16 outlier columns: the base is frozen and only
dequantized, so there is no int8 matmul whose outliers need a float path). Hand-written for the same
reason as `blockwise`; equal to bitsandbytes' int8_vectorwise_quant/dequant bit for bit (tested).
"""

from __future__ import annotations

import torch

_INV_127 = 7.874015718698502e-3  # bitsandbytes' 1/127 in the dequantization


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] -> (int8 [out, in], row absmax float32 [out])."""
    w = w.float()
    absmax = w.abs().amax(dim=1)
    q = torch.round(w * (127.0 / absmax.unsqueeze(1))).nan_to_num_(0.0).to(torch.int8)  # 0/0 rows -> 0
    return q, absmax


def dequantize_int8(q: torch.Tensor, absmax: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q * absmax.view(-1, 1) * _INV_127).to(dtype)
