"""GGUF files (llama.cpp): metadata and tokenizer (read with the `gguf` package) and weights.

Block-quantized tensors (Q4_0 ... Q6_K) are dequantized by `petformers.quant.gguf_blocks` (the one owner
of that rule, equal to the `gguf` package bit for bit), or handed over as their blocks (`Blocks`) for a
base kept quantized; other types (F16, BF16, F32, IQ*) are dequantized by the `gguf` package.

Architectures `llama` (Llama 2/3.x, Mistral, SmolLM), `qwen2` and `qwen3`. llama.cpp's converter
permutes the q/k rows of `llama` files (its rope is interleaved there) and of no other; Qwen files
keep Hugging Face's layout (llama.cpp ropes them in "neox" order).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from petformers.checkpoint.gguf_header import locate_problem
from petformers.errors import CheckpointError, ConfigError
from petformers.models.config import LlamaConfig
from petformers.models.llama import rope_inv_freq
from petformers.quant import gguf_blocks

_LAYER_NAMES = {
    "attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv",
    "attn_output": "attention.wo", "attn_q_norm": "attention.q_norm", "attn_k_norm": "attention.k_norm",
    "ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2",
    "ffn_up": "feed_forward.w3", "attn_norm": "attention_norm", "ffn_norm": "ffn_norm",
}
_TOP_NAMES = {"token_embd": "tok_embeddings", "output_norm": "norm", "output": "lm_head"}


def open_reader(path: Path):
    import gguf  # gguf imports its whole writer and quant tables: only .gguf users pay for it

    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # truncated or foreign files raise ValueError / struct errors
        where = locate_problem(Path(path).read_bytes()) if Path(path).is_file() else "the path"
        raise CheckpointError(f"{path}: not a readable GGUF file ({where}; {type(e).__name__}: {e})") from None


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
    """The model config from GGUF metadata and tensor names (biases, q/k norms); embeddings are tied
    when the file has no output.weight."""
    tensor_names = {t.name for t in reader.tensors}
    try:
        config = LlamaConfig.from_gguf(metadata, tensor_names)
    except ConfigError as e:  # another architecture (gpt2, phi3, ...) or keys missing: name the file
        raise CheckpointError(f"{source}: {e}") from None
    config.tie_word_embeddings = "output.weight" not in tensor_names
    freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if freqs is not None and config.rope_scaling is None:
        config.rope_scaling = rope_scaling_from_factors(config, np.array(freqs.data, dtype=np.float64).ravel(), source)
    return config


def rope_scaling_from_factors(config: LlamaConfig, factors: np.ndarray, source: str) -> dict | None:
    """Llama 3.x rope scaling from llama.cpp's `rope_freqs` tensor (inv_freq[i] / factors[i]).

    The converter computes the factors from `factor`, `low_freq_factor`, `high_freq_factor` and
    `original_max_position_embeddings`; the factors fix only the ratios of the last three, so
    low_freq_factor is taken as 1 and the others solved for (what Llama 3.1-3.3 use), then checked by
    recomputing every factor."""
    plain = dataclasses.replace(config, rope_scaling=None)
    inv_freq = rope_inv_freq(plain).double().numpy()
    if factors.shape != inv_freq.shape:
        raise CheckpointError(f"{source}: rope_freqs has {factors.size} values, the model's head_dim "
                              f"{config.head_dim} needs {inv_freq.size}")
    factor = float(factors.max())
    if np.allclose(factors, 1.0):
        return None
    wavelen = 2 * math.pi / inv_freq
    if np.allclose(factors, factor):
        scaling = {"rope_type": "linear", "factor": factor}
    else:
        medium = (factors > 1 + 1e-6) & (factors < factor * (1 - 1e-6))
        s = (1 / factors - 1 / factor) / (1 - 1 / factor)  # (old / wavelen - 1) / (high - 1) where interpolated
        high_band = float(wavelen[factors <= 1 + 1e-6].max(initial=0.0))
        low_band = float(wavelen[factors >= factor * (1 - 1e-6)].min(initial=np.inf))
        if medium.sum() >= 2:
            a = np.stack([1 / wavelen[medium], -s[medium]], axis=1)
            old, high_minus_1 = np.linalg.lstsq(a, np.ones(int(medium.sum())), rcond=None)[0]
            high = high_minus_1 + 1
        else:  # one point or none: any thresholds that put each frequency in its band
            lo = max(high_band, float(wavelen[medium].max(initial=0.0))) * (1 + 1e-6)
            old = float(np.sqrt(lo * low_band)) if np.isfinite(low_band) else lo * 2
            if medium.any():
                high = 1 + (old / float(wavelen[medium][0]) - 1) / float(s[medium][0])
            else:
                high = old / (high_band * (1 + 1e-6)) if high_band else 1e6
        scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
                   "high_freq_factor": float(high), "original_max_position_embeddings": float(old)}
    fitted = rope_inv_freq(dataclasses.replace(config, rope_scaling=scaling)).double().numpy()
    if not np.allclose(fitted, inv_freq / factors, rtol=1e-4, atol=0):
        raise CheckpointError(f"{source}: rope_freqs is not a Llama 3 or linear rope scaling petformers knows")
    return scaling


def permuted_qk(metadata: dict) -> bool:
    """Whether llama.cpp's converter permuted this file's q/k rows (architecture `llama` only)."""
    return metadata.get("general.architecture") == "llama"


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


def iter_tensors(reader, n_heads: int, n_kv_heads: int, source: str, keep_blocks: bool = False,
                 permuted: bool = True) -> Iterator[tuple[str, "torch.Tensor | Blocks"]]:
    """(petformers name, float32 tensor) pairs; with keep_blocks, 2-D block-quantized tensors come as
    `Blocks` instead (q/k rows un-permuted like the float ones: rows are whole blocks). `permuted`: undo
    llama.cpp's q/k row permutation (see permuted_qk)."""
    from gguf.quants import dequantize  # as in open_reader: only .gguf users pay for it

    for t in reader.tensors:
        name = gguf_name(t.name)
        if name is None:
            continue
        shape = tuple(int(d) for d in reversed(t.shape))
        if gguf_blocks.is_block_type(t.tensor_type):
            data = torch.from_numpy(np.array(t.data, dtype=np.uint8)).reshape(shape[0], -1)  # a writable copy
            blocks = Blocks(_unpermute_named(name, data, n_heads, n_kv_heads, permuted), t.tensor_type, shape)
            yield name, (blocks if keep_blocks and len(shape) == 2 else blocks.dequantize())
            continue
        try:
            array = dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise CheckpointError(f"{source}: tensor {t.name} has quantization {t.tensor_type.name}, "
                                  "which the gguf package cannot dequantize") from None
        tensor = torch.from_numpy(np.array(array, dtype=np.float32)).reshape(shape)  # a writable copy
        yield name, _unpermute_named(name, tensor, n_heads, n_kv_heads, permuted)


def _unpermute_named(name: str, tensor: torch.Tensor, n_heads: int, n_kv_heads: int,
                     permuted: bool = True) -> torch.Tensor:
    if permuted and name.endswith(("attention.wq.weight", "attention.wq.bias")):
        return _unpermute(tensor, n_heads)
    if permuted and name.endswith(("attention.wk.weight", "attention.wk.bias")):
        return _unpermute(tensor, n_kv_heads)
    return tensor


def gguf_tensor_bytes(path) -> dict[str, int]:
    """Bytes of each block-quantized 2-D tensor of a GGUF file, by petformers name (for the dry run)."""
    reader = open_reader(path)
    out = {}
    for t in reader.tensors:
        name = gguf_name(t.name)
        if name is not None and gguf_blocks.is_block_type(t.tensor_type) and len(t.shape) == 2:
            out[name] = int(t.n_bytes)
    return out
