"""The run's model and tokenizer: what `load_checkpoint`, `model.model_config` and `pet_config` describe.

Shared by the fine-tune recipe, evaluation, prediction and the dry run: the model is loaded (or, for
run_mode train without a checkpoint, built from the YAML with random weights) in compute_dtype on this
rank's device; a MindSpore checkpoint's mindpet LoRA is loaded or merged as MindFormers does.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import torch

from petformers.checkpoint import download
from petformers.checkpoint.load import detect_format, load_config, load_pretrained, load_tokenizer
from petformers.checkpoint.mindspore_lora import mindpet_lora_tensors
from petformers.data.loader import dataset_kind
from petformers.distributed.env import DistEnv
from petformers.errors import CheckpointError, ConfigError
from petformers.models.config import LlamaConfig, parse_dtype
from petformers.models.llama import build_model
from petformers.pet.config import PetConfig
from petformers.pet.inject import apply_lora, load_lora_state_dict
from petformers.pet.merge import merge_and_unload
from petformers.quant.model import KEYS as QUANTIZATION_KEYS, QuantConfig, quant_config_of, quantized_bytes

log = logging.getLogger("petformers")

# LlamaConfig fields that a checkpoint's own config decides (the YAML may describe another model).
_ARCH_KEYS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "n_kv_heads", "intermediate_size",
              "multiple_of", "ffn_dim_multiplier", "head_dim", "qkv_has_bias", "attn_proj_has_bias", "qk_norm",
              "sliding_window", "tie_word_embeddings", "theta")


def seed_everything(seed: int):
    """Python's, numpy's and torch's generators, from the run's seed."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def model_config_from_yaml(cfg) -> LlamaConfig:
    """The architecture the YAML's model.model_config describes."""
    mc = {k: v for k, v in cfg.model.model_config.items()
          if k not in ("pet_config", "fused_projections") and k not in QUANTIZATION_KEYS}
    return LlamaConfig.from_mindformers(mc)


def quantization_of(cfg) -> QuantConfig | None:
    """The run's quantized base (model_config's quantization keys; None: a float base). A quantized base
    is frozen, so it needs an adapter."""
    quant = quant_config_of(cfg.model.model_config)
    if quant is not None and not cfg.model.pet_config:
        raise ConfigError("model.model_config.quantization_bit: a quantized base is frozen; it needs "
                          "model.model_config.pet_config (an adapter to train)")
    return quant


def base_path(cfg) -> Path:
    """The run's load_checkpoint as a path (a known model name downloaded); a missing one is named with
    the config file and key it came from."""
    try:
        return download.resolve(cfg.load_checkpoint)
    except CheckpointError as e:
        if not getattr(cfg, "source", ""):
            raise
        raise CheckpointError(f"{cfg.source}: load_checkpoint: {e}") from None


def resolve_model_config(cfg) -> tuple[LlamaConfig, str]:
    """The architecture: the checkpoint's own config when it has one, else the YAML's model_config."""
    if cfg.load_checkpoint and detect_format(base_path(cfg)) != "mindspore":
        return load_config(cfg.load_checkpoint)
    return model_config_from_yaml(cfg), "yaml"  # a MindSpore .ckpt carries no config: the YAML describes it


def pet_config_of(cfg) -> PetConfig | None:
    """The run's adapter config (model.model_config.pet_config), None for full training."""
    if not cfg.model.pet_config:
        return None
    return PetConfig.from_dict(cfg.model.pet_config)


def tokenizer_for(cfg):
    """The run's tokenizer when it has one to load (the `tokenizer` key, else the checkpoint's), else None."""
    source = cfg.data.tokenizer or cfg.load_checkpoint
    if not source:
        return None
    try:
        return with_template_options(load_tokenizer(source), cfg.data)
    except Exception:
        if cfg.data.tokenizer:
            raise
        return None


def with_template_options(tokenizer, data):
    """The data section's chat template variables (enable_thinking) set on the tokenizer, so that every
    prompt it renders in this run honours them; a template without such a switch is named in the log."""
    if tokenizer is not None and data.enable_thinking is not None:
        if tokenizer.set_chat_template_kwargs(enable_thinking=data.enable_thinking):
            log.warning("petformers: enable_thinking %s changes nothing: the chat template of %s has no "
                        "enable_thinking switch", str(data.enable_thinking).lower(), tokenizer.source)
    return tokenizer


def load_model_for_run(cfg, env: DistEnv):
    """(model, tokenizer) in compute_dtype on this rank's device: pretrained, or random init for run_mode train."""
    dtype = parse_dtype(cfg.model.compute_dtype, "model.model_config.compute_dtype")
    # Training under FSDP loads on the CPU: fully_shard moves each layer's shard to the device, so no
    # device ever holds the whole model.
    sharding = env.enabled and cfg.parallel.parallel_strategy == "fsdp" and cfg.run_mode in ("finetune", "train")
    device = torch.device("cpu") if sharding else env.device
    if cfg.load_checkpoint:
        yaml_config = model_config_from_yaml(cfg) if cfg.model.model_config else None
        quantization = quantization_of(cfg)
        model, tokenizer = load_pretrained(cfg.load_checkpoint, dtype=dtype, device=device, config=yaml_config,
                                           quantization=quantization)
        if quantization is not None and env.is_main:  # the run says what it trains over
            log.info("petformers: base held quantized (%s): %.1f MiB of linear weights", quantization.describe(),
                     quantized_bytes(model) / 2**20)
        if cfg.data.tokenizer:
            tokenizer = load_tokenizer(cfg.data.tokenizer)
        tokenizer = with_template_options(tokenizer, cfg.data)
        _report_arch_overrides(cfg, model.config, env)
    else:
        if cfg.run_mode not in ("train",):
            raise ConfigError("load_checkpoint: required for run_mode "
                              f"{cfg.run_mode!r} (only run_mode train starts from random weights)")
        if quantization_of(cfg) is not None:
            raise ConfigError("model.model_config.quantization_bit: a quantized base comes from load_checkpoint; "
                              "run_mode train from random weights trains every weight in float")
        config = model_config_from_yaml(cfg)
        model = build_model(config, device=device, dtype=torch.float32)
        model.init_weights(generator=torch.Generator(device=device).manual_seed(cfg.seed))
        model.to(dtype)
        tokenizer = tokenizer_for(cfg)
    if tokenizer is None and cfg.run_mode != "train":
        raw = _raw_inputs(cfg)
        if raw:
            raise ConfigError(f"processor.tokenizer: {cfg.load_checkpoint or 'the checkpoint'} has no tokenizer and "
                              f"{raw} needs one; set processor.tokenizer.vocab_file or tokenizer to a tokenizer.json / "
                              "tokenizer.model / model directory (MindRecord and `petformers data prepare` "
                              "datasets need none)")
    if cfg.run_mode in ("eval", "predict"):
        model = _merge_checkpoint_lora(cfg, model)
    return model, tokenizer


def _raw_inputs(cfg) -> str:
    """What in this run needs a tokenizer ('' when nothing: every dataset is already token ids)."""
    if cfg.run_mode == "predict":
        return "run_mode predict"
    if cfg.run_mode == "eval":
        if cfg.eval.eval_generation:
            return "eval_generation"
        paths = [cfg.data.eval_dataset_dir or cfg.data.train_dataset_dir]
    else:
        paths = [cfg.data.train_dataset_dir] + ([cfg.data.eval_dataset_dir] if cfg.eval.do_eval and cfg.data.eval_dataset_dir else [])
    raw = [p for p in paths if p and dataset_kind(p) == "raw"]
    return f"the raw dataset {raw[0]}" if raw else ""


def data_pad_id(cfg, model, tokenizer) -> int:
    """The pad id masked in MindRecord rows: model_config.pad_token_id as MindFormers masks it (the YAML's,
    else the checkpoint's config), else the tokenizer's, else 0."""
    for value in (cfg.model.model_config.get("pad_token_id"), model.config.pad_token_id,
                  tokenizer.pad_id if tokenizer is not None else None):
        if value is not None:
            return int(value)
    return 0


def checkpoint_lora(cfg, config: LlamaConfig) -> dict:
    """mindpet LoRA tensors of a MindSpore --load_checkpoint (one file, or base + LoRA files in a directory)
    under petformers adapter names; {} for other formats and checkpoints without LoRA."""
    if not cfg.load_checkpoint:
        return {}
    path = base_path(cfg)
    if detect_format(path) != "mindspore":
        return {}
    lora = mindpet_lora_tensors(path, config)
    if lora and not cfg.model.pet_config:
        raise ConfigError(f"model.model_config.pet_config: {cfg.load_checkpoint} holds mindpet LoRA tensors; add the "
                          "pet_config they were trained with (its lora_rank, lora_alpha and target_modules)")
    return lora


def load_checkpoint_lora(cfg, model) -> bool:
    """Start the model's (already injected) LoRA from the checkpoint's mindpet tensors, as MindFormers loads
    them into its PET network; True when there were any."""
    lora = checkpoint_lora(cfg, model.config)
    if lora:
        load_lora_state_dict(model, lora, source=str(cfg.load_checkpoint))
        log.info("petformers: LoRA initialised from the %d mindpet tensors of %s", len(lora), cfg.load_checkpoint)
    return bool(lora)


def _merge_checkpoint_lora(cfg, model):
    """For eval / predict: the checkpoint's mindpet LoRA folded into the base (W + scaling·B@A)."""
    lora = checkpoint_lora(cfg, model.config)
    if not lora:
        return model
    apply_lora(model, pet_config_of(cfg))
    load_lora_state_dict(model, lora, source=str(cfg.load_checkpoint))
    return merge_and_unload(model)


def _report_arch_overrides(cfg, config: LlamaConfig, env: DistEnv):
    differing = [k for k in _ARCH_KEYS if k in cfg.model.model_config and cfg.model.model_config[k] not in (None, "")
                 and getattr(config, k) != cfg.model.model_config[k]]
    if differing and env.is_main:
        log.info("petformers: model_config keys %s differ from the checkpoint's own config; the checkpoint's are used",
                 ", ".join(differing))


def return_freed_memory_to_os():
    """PETFORMERS_LOW_RSS=1: make glibc give freed tensors back to the OS. At the first free of a large block glibc raises
    its mmap threshold, and from then on keeps freed activations in its heaps: a CPU training step's
    RSS grows to ~1.5x the tensors alive at its peak (docs/benchmarks.md). A fixed threshold (glibc's
    default, 128 KiB) maps each large tensor on its own and unmaps it when freed. The price: every
    activation lands on fresh pages the kernel must zero, measured 1.5x slower steps on the bench (so
    off by default). glibc only; a no-op elsewhere."""
    import ctypes  # glibc only, and only with PETFORMERS_LOW_RSS=1
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError, TypeError):
        pass
