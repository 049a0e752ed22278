"""Reading MindFormers Llama checkpoints (`.ckpt`): the model's tensors under petformers names.

Linear weights are [out, in] and q/k rows use the Hugging Face "rotate half" layout, as petformers
does, so only the names change (mindspore_names.py). The mindpet LoRA tensors are read by
mindspore_lora.py, and models are written back by mindspore_save.py; the file codec is mindspore_ckpt.py.

`--load_checkpoint` may be
- one `.ckpt` file;
- a directory of `.ckpt` files, all read and combined into one model (e.g. a base model file and
  a LoRA file); a model tensor present in two files is an error, since which one wins is unclear;
- a directory of `rank_N/` subdirectories (per-rank checkpoints of a parallel run; the newest
  `.ckpt` of each, as MindFormers picks). Under data parallelism every rank holds a full copy and
  rank_0's is used. A tensor whose rank_0 shape is a fraction of the configured shape along one
  axis is a model-parallel slice: the slices of ranks 0..k-1 holding it are concatenated along
  that axis, which assumes MindSpore's default device order (model_parallel varies fastest). Other
  layouts need MindFormers' strategy-based `transform_checkpoints` first.
Optimizer states (`adam_m.*`, `adam_v.*`, `accu_grads.*`) and step counters are skipped.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

import torch

from petformers.checkpoint.mindspore_ckpt import read_ckpt
from petformers.checkpoint.mindspore_names import PF_LORA, from_mindformers, is_lora, to_mindformers
from petformers.errors import CheckpointError
from petformers.models.config import LlamaConfig
from petformers.models.llama import build_model

def _model_tensors(entries: dict, source: Path) -> dict[str, torch.Tensor]:
    out = {}
    for name, value in entries.items():
        if isinstance(value, str):
            continue
        pf = from_mindformers(name)
        if pf is None:
            continue
        if pf == "":
            raise CheckpointError(f"{source}: {name!r} is not a MindFormers Llama parameter petformers knows "
                                  "(qkv_concat / w_gate_hidden checkpoints are not supported: save with "
                                  "qkv_concat: False)")
        out[pf] = value
    return out


def _rank_dirs(path: Path) -> list[Path]:
    dirs = [d for d in path.iterdir() if d.is_dir() and re.fullmatch(r"rank_\d+", d.name)]
    return sorted(dirs, key=lambda d: int(d.name[5:]))


def _newest_ckpt(folder: Path) -> Path:
    files = list(folder.glob("*.ckpt"))
    if not files:
        raise CheckpointError(f"{folder}: no .ckpt file in this rank directory")
    return max(files, key=lambda f: (f.stat().st_mtime, f.name))


def _fits(tensors: dict, expected: dict) -> bool:
    return all(n in tensors and tuple(tensors[n].shape) == s for n, s in expected.items()
               if not is_lora(n))


def lora_expected(name: str, tensor: torch.Tensor, expected: dict) -> tuple | None:
    module, ab = PF_LORA.match(name).groups()
    base = expected.get(f"{module}.weight")
    if base is None:
        return None
    return (tensor.shape[0], base[1]) if ab == "a" else (base[0], tensor.shape[1])


def _merge_ranks(per_rank: list[dict], expected: dict) -> dict[str, torch.Tensor]:
    names = list(dict.fromkeys(n for tensors in per_rank for n in tensors))
    out = {}
    for name in names:
        pieces = [tensors[name] for tensors in per_rank if name in tensors]
        first = pieces[0]
        want = lora_expected(name, first, expected) if is_lora(name) else expected.get(name)
        out[name] = first
        if want is None or tuple(first.shape) == tuple(want) or first.dim() != len(want):
            continue
        axes = [a for a in range(first.dim()) if first.shape[a] != want[a]]
        if len(axes) == 1 and first.shape[axes[0]] and want[axes[0]] % first.shape[axes[0]] == 0:
            k = want[axes[0]] // first.shape[axes[0]]
            if len(pieces) >= k:
                out[name] = torch.cat(pieces[:k], dim=axes[0])
    return out


def read_model_tensors(path, expected: dict | None = None) -> dict[str, torch.Tensor]:
    """Every model tensor (base and LoRA) under petformers names, from a file, a directory or rank_N/.

    `expected` (petformers name -> shape, from the config) lets model-parallel slices of a rank_N
    layout be recognised and concatenated.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_file():
        return _model_tensors(read_ckpt(path), path)
    direct = sorted(path.glob("*.ckpt"))
    if direct:
        out, origin = {}, {}
        for f in direct:
            for name, tensor in _model_tensors(read_ckpt(f), f).items():
                if name in out:
                    raise CheckpointError(f"{path}: {to_mindformers(name)!r} is in both {origin[name].name} and "
                                          f"{f.name}; keep one file per tensor in a --load_checkpoint directory")
                out[name], origin[name] = tensor, f
        return out
    ranks = _rank_dirs(path)
    if not ranks:
        raise CheckpointError(f"{path}: no .ckpt file and no rank_N/ directory: not a MindSpore checkpoint")
    def rank_tensors(rank_dir: Path) -> dict[str, torch.Tensor]:
        file = _newest_ckpt(rank_dir)
        return _model_tensors(read_ckpt(file), file)

    first = rank_tensors(ranks[0])
    if expected is None or len(ranks) == 1 or _fits(first, expected):
        return first  # data parallel: rank_0 holds a full copy
    return _merge_ranks([first] + [rank_tensors(r) for r in ranks[1:]], expected)


def expected_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """petformers parameter name -> shape for `config`, without allocating any weight."""
    return {n: tuple(t.shape) for n, t in build_model(config, device="meta").state_dict().items()}


def config_hint(config: LlamaConfig) -> str:
    return (f"vocab_size {config.vocab_size}, hidden_size {config.hidden_size}, num_layers {config.num_layers}, "
            f"num_heads {config.num_heads}, n_kv_heads {config.n_kv_heads}, ffn width {config.intermediate_size}")


def iter_base_tensors(path, config: LlamaConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """(petformers name, tensor) for every base weight of a MindFormers Llama checkpoint.

    Tensors keep the file's dtype and view its memory map. Everything is checked against `config`
    before the first tensor is yielded: a name or shape that does not fit, or a missing tensor,
    is one CheckpointError naming the MindFormers parameter and the model_config.
    """
    path = Path(path)
    expected = expected_shapes(config)
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    tensors = read_model_tensors(path, expected)
    base = {n: t for n, t in tensors.items() if not is_lora(n)}
    if config.tie_word_embeddings:
        base.pop("lm_head.weight", None)
    for name, tensor in base.items():
        if name not in expected:
            raise CheckpointError(f"{path}: {to_mindformers(name)!r} does not exist in a model with "
                                  f"model_config {config_hint(config)}")
        if tuple(tensor.shape) != expected[name]:
            raise CheckpointError(f"{path}: {to_mindformers(name)!r} has shape {list(tensor.shape)} but "
                                  f"model_config ({config_hint(config)}) gives {list(expected[name])}")
    missing = [to_mindformers(n) for n in expected if n not in base]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CheckpointError(f"{path}: missing {', '.join(missing[:3])}{more} (is this a LoRA-only checkpoint? "
                              "pass the base model too, e.g. a directory holding both .ckpt files)")
    yield from base.items()
