"""The frozen base weight of a linear layer held quantized: a small module of buffers that knows how to
give back the float [out, in] matrix (`dequantize(dtype)`), never keeping that float copy.

Buffers are non-persistent: the quantized base is never part of a model's state dict, so training
checkpoints (DCP included) hold only the adapter, as they do over a float base, and a base is always
rebuilt from its source file. Under DDP and FSDP2 every rank holds the whole quantized base
(FSDP2 shards parameters, and these are buffers): storage is replicated, ~0.56 bytes per weight for NF4.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from petformers.quant import blockwise, gguf_blocks, int8


class QuantizedWeight(nn.Module):
    """Base of the formats: `shape` (out, in), `compute_dtype` (what forward dequantizes to by default)."""

    format = "?"

    def __init__(self, shape: tuple[int, int], compute_dtype: torch.dtype):
        super().__init__()
        self.shape = tuple(int(d) for d in shape)
        self.compute_dtype = compute_dtype

    def _buffer(self, name: str, tensor: torch.Tensor | None):
        self.register_buffer(name, tensor, persistent=False)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        raise NotImplementedError

    def _apply(self, fn, recurse=True):
        """Device moves apply; dtype casts (model.to(bf16), .half()) do not: the float32 block scales
        travel as raw bytes, so a cast model keeps its exact quantized base."""
        for key, buf in self._buffers.items():
            if buf is not None:
                self._buffers[key] = fn(buf.view(torch.uint8)).view(buf.dtype) if buf.is_floating_point() else fn(buf)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.buffers()).device

    @property
    def dtype(self) -> torch.dtype:
        return self.compute_dtype

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def extra_repr(self) -> str:
        return f"{self.format}, shape={self.shape}, {self.nbytes() / self.numel():.3f} bytes/weight"


class FourBitWeight(QuantizedWeight):
    """NF4 or FP4 in blocks of 64, absmax float32 or double quantized (8 bits, blocks of 256)."""

    def __init__(self, q: blockwise.Quantized4bit, compute_dtype: torch.dtype = torch.float32):
        super().__init__(q.shape, compute_dtype)
        self.format, self.blocksize = q.quant_type, q.blocksize
        self.double_quant = q.absmax_scale is not None
        self._buffer("packed", q.packed)
        self._buffer("absmax", q.absmax)
        self._buffer("absmax_scale", q.absmax_scale)
        self._buffer("absmax_offset", None if q.absmax_offset is None else q.absmax_offset.reshape(1))

    @classmethod
    def quantize(cls, w: torch.Tensor, quant_type: str = "nf4", double_quant: bool = True,
                 compute_dtype: torch.dtype = torch.float32) -> "FourBitWeight":
        return cls(blockwise.quantize_4bit(w, quant_type, blockwise.BLOCK_4BIT, double_quant), compute_dtype)

    def quantized(self) -> blockwise.Quantized4bit:
        return blockwise.Quantized4bit(self.packed, self.absmax, self.shape, self.format, self.blocksize,
                                       self.absmax_scale, self.absmax_offset)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or self.compute_dtype
        if self.packed.is_cuda and fused_4bit_available():
            return self.dequantize_fused(dtype)
        return blockwise.dequantize_4bit(self.quantized(), dtype)

    def dequantize_fused(self, dtype: torch.dtype) -> torch.Tensor:
        """bitsandbytes' fused dequantization kernel (CUDA; on CPU its C kernel): the same blocks, the
        same values (tests/test_quant.py compares them on CPU)."""
        import bitsandbytes.functional as bnb  # optional: called only when fused_4bit_available()

        nested = None
        if self.double_quant:
            nested = bnb.QuantState(absmax=self.absmax_scale, code=blockwise.dynamic_code_8bit(self.packed.device),
                                    blocksize=blockwise.BLOCK_ABSMAX, dtype=torch.float32)
        state = bnb.QuantState(
            absmax=self.absmax, shape=torch.Size(self.shape), code=blockwise.code_4bit(self.format, self.packed.device),
            blocksize=self.blocksize, quant_type=self.format, dtype=torch.float32,
            offset=None if nested is None else self.absmax_offset.reshape(()), state2=nested)
        return bnb.dequantize_4bit(self.packed.view(-1, 1), state).to(dtype)


_FUSED: bool | None = None


def fused_4bit_available() -> bool:
    """bitsandbytes importable (it brings a fused CUDA dequantization kernel)."""
    global _FUSED
    if _FUSED is None:
        try:
            import bitsandbytes.functional  # noqa: F401
            _FUSED = True
        except Exception:  # not installed, or no build for this platform
            _FUSED = False
    return _FUSED


class Int8Weight(QuantizedWeight):
    format = "int8"

    def __init__(self, q: torch.Tensor, absmax: torch.Tensor, compute_dtype: torch.dtype = torch.float32):
        super().__init__(tuple(q.shape), compute_dtype)
        self._buffer("q", q)
        self._buffer("absmax", absmax)

    @classmethod
    def quantize(cls, w: torch.Tensor, compute_dtype: torch.dtype = torch.float32) -> "Int8Weight":
        return cls(*int8.quantize_int8(w), compute_dtype)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return int8.dequantize_int8(self.q, self.absmax, dtype or self.compute_dtype)


class GGUFWeight(QuantizedWeight):
    """A GGUF tensor's blocks as stored in the file: uint8 [out, bytes per row] of ggml type `type_id`."""

    def __init__(self, blocks: torch.Tensor, type_id: int, shape: tuple[int, int],
                 compute_dtype: torch.dtype = torch.float32):
        super().__init__(shape, compute_dtype)
        self.type_id = int(type_id)
        self.format = gguf_blocks.type_name(type_id)
        if tuple(blocks.shape) != (self.shape[0], gguf_blocks.row_bytes(type_id, self.shape[1])):
            raise ValueError(f"{self.format} blocks of shape {tuple(blocks.shape)} do not hold a {self.shape} matrix")
        self._buffer("blocks", blocks)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return gguf_blocks.dequantize(self.blocks, self.type_id, self.shape, dtype or self.compute_dtype)
