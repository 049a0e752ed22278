"""Hugging Face model directories: config.json + (sharded) safetensors, and writing them back."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from petformers import atomic
from petformers.atomic import replacing
from petformers.errors import CheckpointError, ConfigError
from petformers.jsonio import read_json
from petformers.models import names
from petformers.models.config import LlamaConfig
from petformers.safepath import inside, shown


def read_config(path: Path) -> LlamaConfig:
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise CheckpointError(f"{path}: no config.json (not a Hugging Face model directory)")
    cfg = read_json(cfg_file, CheckpointError)
    try:
        return LlamaConfig.from_hf(cfg)
    except ConfigError as e:  # another architecture, or keys missing: name the file
        raise CheckpointError(f"{cfg_file}: {str(e).removeprefix('config.json: ')}") from None


def weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        data = read_json(index, CheckpointError)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: weight_map: missing or empty (expected an object of tensor name -> "
                                  "shard file name)")
        shards = {inside(path, f, index, f"weight_map[{k!r}]", CheckpointError): k for k, f in weight_map.items()}
        for f, k in shards.items():
            if not f.is_file():
                raise CheckpointError(f"{index}: weight_map[{k!r}]: lists shard {shown(f.name)}, which is "
                                      + ("not a file" if f.exists() else "missing"))
        return sorted(shards)
    single = path / "model.safetensors"
    if single.exists():
        return [single]
    if list(path.glob("*.bin")):
        raise CheckpointError(f"{path}: only pickle (.bin) weights found; petformers reads safetensors only "
                              "(never unpickles downloaded files): convert them to safetensors first")
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")


def iter_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(petformers_name, tensor) for every weight, one shard at a time, memory-mapped."""
    for f in weight_files(path):
        try:
            with safe_open(str(f), framework="pt") as st:
                for key in st.keys():
                    if key.endswith("rotary_emb.inv_freq"):
                        continue
                    yield names.from_hf(key), st.get_tensor(key)
        except CheckpointError:
            raise
        except Exception as e:  # safetensors raises its own types for truncated / corrupt headers
            raise CheckpointError(f"{f}: not a readable safetensors file ({e}); is it truncated?") from None


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], file: Path, metadata: dict | None = None):
    """safetensors written to a temp file, fsynced, then renamed over `file` (petformers.atomic)."""
    with replacing(file) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def save_model_dir(state_dict: dict[str, torch.Tensor], config: LlamaConfig, out_dir: Path,
                   tokenizer=None, max_shard_bytes: int = 5 * 1024**3, dtype: torch.dtype | None = None):
    """A Hugging Face model directory transformers loads: config, shards (+ index), tokenizer, generation config."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf = {}
    for name, t in state_dict.items():
        if config.tie_word_embeddings and name == "lm_head.weight":
            continue
        hf[names.to_hf(name)] = (t.to(dtype) if dtype else t).detach().cpu().contiguous()
    shards, current, size = [], {}, 0
    for key in sorted(hf):
        nbytes = hf[key].numel() * hf[key].element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key] = hf[key]
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        save_safetensors_atomic(shards[0], out_dir / "model.safetensors", {"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_safetensors_atomic(shard, out_dir / fname, {"format": "pt"})
            weight_map.update({k: fname for k in shard})
        total = sum(t.numel() * t.element_size() for t in hf.values())
        atomic.write_json(out_dir / "model.safetensors.index.json",
                          {"metadata": {"total_size": total}, "weight_map": weight_map})
    hf_cfg = config.to_hf()
    if dtype is not None:
        hf_cfg["torch_dtype"] = str(dtype).replace("torch.", "")
    atomic.write_json(out_dir / "config.json", hf_cfg)
    gen = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
           "pad_token_id": config.pad_token_id}
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
        eos = tokenizer.eos_ids
        gen["eos_token_id"] = eos if len(eos) > 1 else (eos[0] if eos else config.eos_token_id)
    atomic.write_json(out_dir / "generation_config.json", gen)
