"""Conversions between MindSpore / MindFormers `.ckpt`, Hugging Face model directories and PEFT adapters.

The `petformers convert` command (petformers/cli/convert.py) reads the MindFormers YAML and calls these:

    petformers convert --from mindspore X.ckpt --config YAML --to hf --output_dir OUT
    petformers convert --from hf DIR --to mindspore --output_dir OUT
    petformers convert --from peft ADAPTER_DIR --to mindspore --output_dir OUT
    petformers convert --from peft ADAPTER_DIR --to mindspore --output_dir OUT --merged \
        --load_checkpoint BASE.ckpt --config YAML

A `.ckpt` carries no shapes' meaning, so the caller gives the architecture (a MindFormers YAML's
`model.model_config`, read by petformers.config.load.read_model_section); a checkpoint holding mindpet LoRA tensors is merged with its
`pet_config` (W + alpha/r·B@A, as transform_ckpt_lora does). The Hugging Face directory written
loads in transformers; the `.ckpt` written has MindFormers' names and loads in MindFormers.

A PEFT adapter (what `petformers run` writes to output_dir/adapter) goes back to Ascend as
`OUT/<adapter dir name>.ckpt` holding only the LoRA tensors under mindpet's names, as MindFormers
saves trainable parameters (load it beside the base .ckpt), or with `--merged` as
`OUT/<adapter dir name>_merged.ckpt`: the base weights with W + scaling·B@A folded in, as
MindFormers' transform_ckpt_lora writes them, for a plain (non-PET) MindFormers Llama.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from petformers.checkpoint import hf, mindspore_load
from petformers.checkpoint.download import resolve
from petformers.checkpoint.hf import save_model_dir
from petformers.checkpoint.load import detect_format, load_pretrained, load_tokenizer
from petformers.checkpoint.mindspore_load import expected_shapes, iter_base_tensors
from petformers.checkpoint.mindspore_lora import merge_lora_tensors, mindpet_lora_tensors
from petformers.checkpoint.mindspore_save import save_mindformers_ckpt
from petformers.checkpoint.peft import (CONFIG_FILE, load_peft_adapter, peft_key, read_adapter_config,
                                       read_adapter_state)
from petformers.errors import AdapterError, CheckpointError, ConfigError
from petformers.models.config import LlamaConfig
from petformers.pet.config import PetConfig

log = logging.getLogger(__name__)


def mindspore_to_hf(source: Path, config: LlamaConfig, pet: dict | None, out_dir: Path, dtype=None,
                    tokenizer_path=None, config_source: str = "the YAML") -> Path:
    """A MindFormers checkpoint (LoRA merged with `pet`, the YAML's pet_config) -> a Hugging Face model
    directory; returns the directory. `config_source` names the YAML in errors."""
    state = dict(iter_base_tensors(source, config))
    lora = mindpet_lora_tensors(source, config)
    if lora:
        if not pet:
            raise ConfigError(f"{config_source}: {source} holds mindpet LoRA tensors but model.model_config has no "
                              "pet_config (its lora_alpha is needed to merge them)")
        pet_config = PetConfig.from_dict(pet)
        ranks = {t.shape[0] for n, t in lora.items() if ".lora_a." in n}
        if not pet_config.rank_pattern and ranks != {pet_config.lora_rank}:
            raise AdapterError(f"{source}: LoRA rank {sorted(ranks)} in the checkpoint, but "
                               f"model.model_config.pet_config.lora_rank is {pet_config.lora_rank}")
        state = merge_lora_tensors(state, lora, pet_config)
        log.info("petformers: merged %d mindpet LoRA pairs (r=%d, alpha=%g)", len(lora) // 2,
                 pet_config.lora_rank, pet_config.lora_alpha)
    if dtype is None:
        dtype = state["tok_embeddings.weight"].dtype
    tokenizer = None
    if tokenizer_path:
        tokenizer = load_tokenizer(tokenizer_path)
    save_model_dir(state, config, out_dir, tokenizer=tokenizer, dtype=dtype)
    log.info("petformers: wrote Hugging Face model to %s", out_dir)
    return out_dir


def hf_to_mindspore(source: Path, out_dir: Path, dtype=None) -> Path:
    """A Hugging Face Llama directory -> `OUT/<source name>.ckpt` with MindFormers names; returns the file."""
    config = hf.read_config(source)
    expected = expected_shapes(config)
    state = {}
    for name, tensor in hf.iter_tensors(source):
        if name not in expected:
            raise CheckpointError(f"{source}: tensor {name!r} is not a parameter of a Llama model")
        if tuple(tensor.shape) != expected[name]:
            raise CheckpointError(f"{source}: tensor {name!r} has shape {list(tensor.shape)}, "
                                  f"config.json gives {list(expected[name])}")
        state[name] = tensor
    if config.tie_word_embeddings and "lm_head.weight" not in state and "tok_embeddings.weight" in state:
        # MindFormers' Llama YAMLs are untied: write lm_head so the model loads whatever the YAML says.
        state["lm_head.weight"] = state["tok_embeddings.weight"]
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(f"{source}: missing tensor {missing[0]!r}" +
                              (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = save_mindformers_ckpt(state, out_dir / f"{source.resolve().name}.ckpt", mode="full", dtype=dtype)
    log.info("petformers: wrote %s; its model.model_config: vocab_size %d, hidden_size %d, num_layers %d, "
             "num_heads %d, n_kv_heads %d, intermediate_size %d, rms_norm_eps %g, theta %g",
             path, config.vocab_size, config.hidden_size, config.num_layers, config.num_heads,
             config.n_kv_heads, config.intermediate_size, config.rms_norm_eps, config.theta)
    return path


def peft_adapter_tensors(adapter_dir: Path) -> dict:
    """A PEFT adapter's tensors under petformers names, for mindpet (which has no place for DoRA)."""
    state = read_adapter_state(adapter_dir)
    dora = next((name for name in state if name.endswith(".magnitude")), None)
    if dora:
        raise AdapterError(f"{adapter_dir}: {peft_key(dora)!r} is a DoRA magnitude, which mindpet has no place for: "
                           "use --merged, or train plain LoRA")
    return state


def peft_to_mindspore(adapter_dir: Path, out_dir: Path, dtype=None, merged: bool = False, base: str | None = None,
                      base_config: LlamaConfig | None = None) -> Path:
    """A PEFT adapter -> a MindFormers `.ckpt`: the adapter alone (mindpet names), or merged into its base model
    (`base_config`: the architecture of a MindSpore base, which carries none)."""
    if not merged:
        if base:
            raise ConfigError("--load_checkpoint: a base model is used with --merged only (the adapter alone "
                              "needs none)")
        path = save_mindformers_ckpt(peft_adapter_tensors(adapter_dir), out_dir / f"{adapter_dir.resolve().name}.ckpt",
                                     mode="trainable", dtype=dtype)
        log.info("petformers: wrote %s (LoRA tensors only: load it beside the base .ckpt)", path)
        return path

    read_adapter_config(adapter_dir)
    base = base or json.loads((adapter_dir / CONFIG_FILE).read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not base:
        raise ConfigError(f"--load_checkpoint: {adapter_dir / CONFIG_FILE} names no base model; pass the base")
    config = None
    if detect_format(resolve(base)) == "mindspore":
        if base_config is None:
            raise ConfigError(f"--config: the base {base} is a MindSpore checkpoint; pass the MindFormers YAML whose "
                              "model.model_config describes it")
        config = base_config
    stored = _stored_dtype(base, config)  # merge in the base's own dtype: a bf16 7B stays bf16
    model, _ = load_pretrained(base, dtype=stored, config=config, with_tokenizer=False)
    load_peft_adapter(model, adapter_dir)
    path = save_mindformers_ckpt(model, out_dir / f"{adapter_dir.resolve().name}_merged.ckpt", mode="merged",
                                 dtype=dtype)
    log.info("petformers: wrote %s (base %s with the adapter merged)", path, base)
    return path


def _stored_dtype(base: str, config):
    """The floating dtype the base model's weights are stored in."""
    path = resolve(base)
    fmt = detect_format(path)
    tensors = mindspore_load.iter_base_tensors(path, config) if fmt == "mindspore" else \
        hf.iter_tensors(path) if fmt == "hf" else iter(())
    for _, tensor in tensors:
        if tensor.is_floating_point():
            return tensor.dtype

    return torch.float32
