"""Meta's original checkpoints: consolidated.NN.pth (model-parallel shards) + params.json + tokenizer.model.

Read with `torch.load(weights_only=True)`: never unpickle arbitrary objects from downloaded files.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Iterator

import torch

from petformers.jsonio import read_json
from petformers.errors import CheckpointError, ConfigError
from petformers.models.config import LlamaConfig

# Dimension along which Meta's model-parallel shards split each weight (None: replicated).
_SPLIT_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1, "tok_embeddings": 1}


def read_config(path: Path) -> LlamaConfig:
    file = path / "params.json"
    params = read_json(file, CheckpointError)
    try:
        return LlamaConfig.from_meta(params)
    except ConfigError as e:
        raise CheckpointError(f"{file}: {str(e).removeprefix('params.json: ')}") from None


def shard_files(path: Path) -> list[Path]:
    files = sorted(path.glob("consolidated.*.pth"))
    if not files:
        raise CheckpointError(f"{path}: params.json found but no consolidated.*.pth")
    return files


def _permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's interleaved rope rows -> Hugging Face rotate-half rows (as transformers' converter does)."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _load(file: Path) -> dict:
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:  # an object other than tensors: refused, never executed
        raise CheckpointError(f"{file}: refused: it pickles objects other than tensors ({_reason(e)}); "
                              "petformers loads weights only") from None
    except Exception as e:
        raise CheckpointError(f"{file}: cannot be read as a weights-only checkpoint ({_reason(e)}); "
                              "is it truncated?") from None


def _reason(e: Exception) -> str:
    """torch's multi-line message reduced to its telling line (the blocked GLOBAL, when there is one)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    telling = [line for line in lines if "GLOBAL" in line or "Unsupported" in line]
    return (telling or lines or [type(e).__name__])[0]


def iter_tensors(path: Path, config: LlamaConfig) -> Iterator[tuple[str, torch.Tensor]]:
    shards = [_load(f) for f in shard_files(path)]  # memory-mapped: nothing is read until used
    for key in shards[0]:
        if key.startswith("rope.freqs"):
            continue
        parts = key.split(".")
        kind = parts[-2] if len(parts) >= 2 else parts[0]
        pieces = [s[key] for s in shards]
        dim = _SPLIT_DIM.get(kind) if len(pieces) > 1 and pieces[0].dim() > 1 else None
        tensor = torch.cat(pieces, dim=dim) if dim is not None else pieces[0]
        name = "lm_head.weight" if key == "output.weight" else key
        if name.endswith("attention.wq.weight"):
            tensor = _permute(tensor, config.num_heads)
        elif name.endswith("attention.wk.weight"):
            tensor = _permute(tensor, config.n_kv_heads)
        yield name, tensor
