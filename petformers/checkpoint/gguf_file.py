"""GGUF files (llama.cpp): metadata and tokenizer (read with the `gguf` package) and weights.

Block-quantized tensors (Q4_0 ... Q6_K) are dequantized by `petformers.quant.gguf_blocks` (the one owner
of that rule, equal to the `gguf` package bit for bit), or handed over as their blocks (`Blocks`) for a
base kept quantized; other types (F16, BF16, F32, IQ*) are dequantized by the `gguf` package.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from petformers.errors import CheckpointError, ConfigError
from petformers.models.config import LlamaConfig
from petformers.quant import gguf_blocks

_LAYER_NAMES = {
    "attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv",
    "attn_output": "attention.wo", "ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2",
    "ffn_up": "feed_forward.w3", "attn_norm": "attention_norm", "ffn_norm": "ffn_norm",
}
_TOP_NAMES = {"token_embd": "tok_embeddings", "output_norm": "norm", "output": "lm_head"}


def open_reader(path: Path):
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # truncated or foreign files raise ValueError / struct errors
        raise CheckpointError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def read_metadata(reader) -> dict:
    """GGUF key/values as plain Python values (strings, numbers, lists)."""
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            meta[key] = field.contents()
        except Exception:  # unusual field types are not needed by petformers
            continue
    return meta


def read_config(reader, metadata: dict, source: str) -> LlamaConfig:
    """The model config from GGUF metadata; embeddings are tied when the file has no output.weight."""
    try:
        config = LlamaConfig.from_gguf(metadata)
    except ConfigError as e:  # another architecture (gpt2, qwen2, ...) or keys missing: name the file
        raise CheckpointError(f"{source}: {e}") from None
    config.tie_word_embeddings = not any(t.name == "output.weight" for t in reader.tensors)
    return config


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (interleaved rope -> Hugging Face rotate-half layout)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(name: str) -> str | None:
    """'blk.3.attn_q.weight' -> 'layers.3.attention.wq.weight'; None for tensors petformers ignores."""
    parts = name.split(".")
    if parts[0] == "blk" and len(parts) >= 4:
        mapped = _LAYER_NAMES.get(parts[2])
        return f"layers.{parts[1]}.{mapped}.{'.'.join(parts[3:])}" if mapped else None
    if parts[0] in _TOP_NAMES:
        return f"{_TOP_NAMES[parts[0]]}.{'.'.join(parts[1:])}"
    return None  # e.g. rope_freqs


class Blocks:
    """A block-quantized tensor as stored: uint8 [rows, bytes per row] of ggml type `type_id`, `shape` [rows, cols]."""

    def __init__(self, data: torch.Tensor, type_id: int, shape: tuple[int, ...]):
        self.data, self.type_id, self.shape = data, int(type_id), tuple(shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return gguf_blocks.dequantize(self.data, self.type_id, self.shape, dtype)


def iter_tensors(reader, n_heads: int, n_kv_heads: int, source: str,
                 keep_blocks: bool = False) -> Iterator[tuple[str, "torch.Tensor | Blocks"]]:
    """(petformers name, float32 tensor) pairs; with keep_blocks, 2-D block-quantized tensors come as
    `Blocks` instead (q/k rows un-permuted like the float ones: rows are whole blocks)."""
    from gguf.quants import dequantize

    for t in reader.tensors:
        name = gguf_name(t.name)
        if name is None:
            continue
        shape = tuple(int(d) for d in reversed(t.shape))
        if gguf_blocks.is_block_type(t.tensor_type):
            data = torch.from_numpy(np.array(t.data, dtype=np.uint8)).reshape(shape[0], -1)  # a writable copy
            blocks = Blocks(_unpermute_named(name, data, n_heads, n_kv_heads), t.tensor_type, shape)
            yield name, (blocks if keep_blocks and len(shape) == 2 else blocks.dequantize())
            continue
        try:
            array = dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise CheckpointError(f"{source}: tensor {t.name} has quantization {t.tensor_type.name}, "
                                  "which the gguf package cannot dequantize") from None
        tensor = torch.from_numpy(np.array(array, dtype=np.float32)).reshape(shape)  # a writable copy
        yield name, _unpermute_named(name, tensor, n_heads, n_kv_heads)


def _unpermute_named(name: str, tensor: torch.Tensor, n_heads: int, n_kv_heads: int) -> torch.Tensor:
    if name.endswith("attention.wq.weight"):
        return _unpermute(tensor, n_heads)
    if name.endswith("attention.wk.weight"):
        return _unpermute(tensor, n_kv_heads)
    return tensor
