"""`petformers run`: a resolved RunConfig -> dry run, fine-tuning, evaluation or prediction, with outputs.

Outputs in output_dir: resolved_config.yaml, metrics.jsonl, loss.png, checkpoint/step_N/,
adapter/ (PEFT format), merged/ (when save_merged), run_summary.json, eval_results.json (run_mode eval).
Only rank 0 writes them.
"""

from __future__ import annotations

import json
import logging
import random
import os
import time
from pathlib import Path

import numpy as np
import torch

from petformers.distributed.env import DistEnv, init_distributed, shutdown
from petformers.errors import ConfigError, TrainingError
from petformers.models.config import LlamaConfig, parse_dtype
from petformers.monitor.state import RunState

log = logging.getLogger("petformers")

RUN_MODES = ("finetune", "train", "eval", "predict")

# LlamaConfig fields that a checkpoint's own config decides (the YAML may describe another model).
_ARCH_KEYS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "n_kv_heads", "intermediate_size",
              "multiple_of", "ffn_dim_multiplier", "head_dim", "qkv_has_bias", "attn_proj_has_bias", "qk_norm",
              "sliding_window", "tie_word_embeddings", "theta")


def check_run_mode(name: str) -> str:
    """`name` in lower case when it is a run_mode petformers runs, else a ValueError."""
    mode = str(name).lower()
    if mode not in RUN_MODES:
        raise ValueError(f"must be one of {', '.join(RUN_MODES)}, got {mode!r}")
    return mode


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def model_config_from_yaml(cfg) -> LlamaConfig:
    mc = {k: v for k, v in cfg.model.model_config.items() if k != "pet_config"}
    return LlamaConfig.from_mindformers(mc)


def resolve_model_config(cfg) -> tuple[LlamaConfig, str]:
    """The architecture: the checkpoint's own config when it has one, else the YAML's model_config."""
    if cfg.load_checkpoint:
        from petformers.checkpoint.load import load_config

        try:
            config, fmt = load_config(cfg.load_checkpoint)
            return config, fmt
        except Exception as e:  # MindSpore .ckpt carries no config: fall through to the YAML
            if "MindSpore" not in str(e):
                raise
    return model_config_from_yaml(cfg), "yaml"


def pet_config_of(cfg):
    if not cfg.model.pet_config:
        return None
    from petformers.pet.config import PetConfig

    return PetConfig.from_dict(cfg.model.pet_config)


def estimate_memory(config: LlamaConfig, total: int, trainable: int, cfg) -> dict:
    """Rough peak bytes per device: frozen weights + fp32 adapters with grads and Adam states + activations."""
    bytes_per = torch.empty((), dtype=parse_dtype(cfg.model.compute_dtype)).element_size()
    weights = (total - trainable) * bytes_per
    adapters = trainable * 4 * 4  # param, grad, exp_avg, exp_avg_sq in float32
    tokens = cfg.runner.batch_size * cfg.model.seq_length
    h = config.hidden_size
    # Per layer: ~34 bytes*h per token at 16-bit without recompute (SDPA keeps no s^2 scores); only the
    # layer input with recompute. Plus one 1024-row chunk of float32 logits and its gradient.
    per_layer = tokens * h * (2 * bytes_per if cfg.model.recompute else 17 * bytes_per)
    activations = per_layer * config.num_layers + 1024 * config.vocab_size * 4 * 2
    return {"weights": weights, "adapters_and_optimizer": adapters, "activations": activations,
            "total": weights + adapters + activations}


def dry_run(cfg) -> dict:
    from petformers.models.llama import build_model

    config, source = resolve_model_config(cfg)
    dtype = parse_dtype(cfg.model.compute_dtype, "model.model_config.compute_dtype")
    model = build_model(config, device="meta", dtype=dtype)
    pet = pet_config_of(cfg)
    if pet is not None:
        from petformers.pet.inject import apply_lora

        apply_lora(model, pet)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) if pet is not None else \
        sum(p.numel() for p in model.parameters())
    total = sum(p.numel() for p in model.parameters())
    world = max(cfg.parallel.data_parallel, 1) if cfg.parallel.use_parallel else 1
    global_batch = cfg.runner.batch_size * world * cfg.runner.gradient_accumulation_steps
    rows = _count_rows(cfg)
    steps_per_epoch = rows // global_batch if rows is not None else None
    total_steps = steps_per_epoch * cfg.runner.epochs if steps_per_epoch is not None else None
    if total_steps is not None and cfg.runner.max_steps > 0:
        total_steps = min(total_steps, cfg.runner.max_steps)
    mem = estimate_memory(config, total, trainable, cfg)
    gib = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
    lines = [
        f"model: {config.num_layers} layers, hidden {config.hidden_size}, heads {config.num_heads}/{config.n_kv_heads}, "
        f"vocab {config.vocab_size} (config from {source})",
        f"family: {config.describe()}",
        f"parameters: {total:,}",
        f"trainable parameters: {trainable:,} ({100 * trainable / total:.4f}%)",
        f"global batch: {global_batch} (batch_size {cfg.runner.batch_size} x data_parallel {world} x "
        f"gradient_accumulation_steps {cfg.runner.gradient_accumulation_steps})",
        f"steps per epoch: {steps_per_epoch if steps_per_epoch is not None else 'unknown (no train dataset)'}",
        f"total steps: {total_steps if total_steps is not None else 'unknown (no train dataset)'}",
        f"peak memory per device ({cfg.model.compute_dtype}, seq_length {cfg.model.seq_length}, recompute {cfg.model.recompute}): "
        f"~{gib(mem['total'])} (weights {gib(mem['weights'])}, adapters+grads+AdamW "
        f"{gib(mem['adapters_and_optimizer'])}, activations {gib(mem['activations'])})",
    ]
    print("\n".join(lines))
    return {"parameters": total, "trainable_parameters": trainable, "global_batch": global_batch,
            "steps_per_epoch": steps_per_epoch, "total_steps": total_steps, "memory_bytes": mem}


def _count_rows(cfg) -> int | None:
    if not cfg.data.train_dataset_dir:
        return None
    path = Path(cfg.data.train_dataset_dir)
    if (path / "meta.json").exists():
        return int(json.loads((path / "meta.json").read_text())["counts"]["rows"])
    if not path.exists():
        return None
    tokenizer = _tokenizer_for(cfg)
    from petformers.data.loader import open_dataset

    return len(open_dataset(str(path), tokenizer, cfg.model.seq_length, cfg.data.template, cfg.data.packing, cfg.data.drop_long,
                            cfg.run_mode, progress=False))


def _tokenizer_for(cfg):
    from petformers.checkpoint.load import load_tokenizer

    source = cfg.data.tokenizer or cfg.load_checkpoint
    if not source:
        return None
    try:
        return load_tokenizer(source)
    except Exception:
        if cfg.data.tokenizer:
            raise
        return None


def load_model_for_run(cfg, env: DistEnv):
    """(model, tokenizer) in compute_dtype on this rank's device: pretrained, or random init for run_mode train."""
    from petformers.checkpoint.load import load_pretrained
    from petformers.models.llama import build_model

    dtype = parse_dtype(cfg.model.compute_dtype, "model.model_config.compute_dtype")
    # Training under FSDP loads on the CPU: fully_shard moves each layer's shard to the device, so no
    # device ever holds the whole model.
    sharding = env.enabled and cfg.parallel.parallel_strategy == "fsdp" and cfg.run_mode in ("finetune", "train")
    device = torch.device("cpu") if sharding else env.device
    if cfg.load_checkpoint:
        yaml_config = model_config_from_yaml(cfg) if cfg.model.model_config else None
        model, tokenizer = load_pretrained(cfg.load_checkpoint, dtype=dtype, device=device, config=yaml_config)
        if cfg.data.tokenizer:
            from petformers.checkpoint.load import load_tokenizer

            tokenizer = load_tokenizer(cfg.data.tokenizer)
        _report_arch_overrides(cfg, model.config, env)
    else:
        if cfg.run_mode not in ("train",):
            raise ConfigError("load_checkpoint: required for run_mode "
                              f"{cfg.run_mode!r} (only run_mode train starts from random weights)")
        config = model_config_from_yaml(cfg)
        model = build_model(config, device=device, dtype=torch.float32)
        model.init_weights(generator=torch.Generator(device=device).manual_seed(cfg.seed))
        model.to(dtype)
        tokenizer = _tokenizer_for(cfg)
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
    from petformers.data.loader import dataset_kind

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
    from petformers.checkpoint import download
    from petformers.checkpoint.load import detect_format

    path = download.resolve(cfg.load_checkpoint)
    if detect_format(path) != "mindspore":
        return {}
    from petformers.checkpoint.mindspore_load import mindpet_lora_tensors

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
        from petformers.pet.inject import load_lora_state_dict

        load_lora_state_dict(model, lora, source=str(cfg.load_checkpoint))
        log.info("petformers: LoRA initialised from the %d mindpet tensors of %s", len(lora), cfg.load_checkpoint)
    return bool(lora)


def _merge_checkpoint_lora(cfg, model):
    """For eval / predict: the checkpoint's mindpet LoRA folded into the base (W + scaling·B@A)."""
    lora = checkpoint_lora(cfg, model.config)
    if not lora:
        return model
    from petformers.pet.inject import apply_lora, load_lora_state_dict
    from petformers.pet.merge import merge_and_unload

    apply_lora(model, pet_config_of(cfg))
    load_lora_state_dict(model, lora, source=str(cfg.load_checkpoint))
    return merge_and_unload(model)


def _report_arch_overrides(cfg, config: LlamaConfig, env: DistEnv):
    differing = [k for k in _ARCH_KEYS if k in cfg.model.model_config and cfg.model.model_config[k] not in (None, "")
                 and getattr(config, k) != cfg.model.model_config[k]]
    if differing and env.is_main:
        log.info("petformers: model_config keys %s differ from the checkpoint's own config; the checkpoint's are used",
                 ", ".join(differing))


def run(cfg, dry: bool = False, resolved: str = "", ignored: dict[str, str] | None = None) -> dict:
    """Dispatch on run_mode. `resolved` is written as output_dir/resolved_config.yaml; `ignored` (key ->
    why it is not acted on) is named in the log."""
    if dry:
        _log_ignored(ignored or {})
        return dry_run(cfg)
    if cfg.parallel.use_parallel and "WORLD_SIZE" not in os.environ:
        raise ConfigError(f"use_parallel: True, but this process was not started by torchrun (no WORLD_SIZE in the "
                          f"environment): launch `torchrun --nproc-per-node {max(cfg.parallel.data_parallel, 1)} -m "
                          "petformers run ...` (or scripts/msrun_launcher.sh), or set use_parallel: False for one process")
    env = init_distributed(cfg.parallel.use_parallel)
    try:
        if cfg.parallel.use_parallel and cfg.parallel.data_parallel not in (0, 1, env.world_size):
            raise ConfigError(f"parallel_config.data_parallel: {cfg.parallel.data_parallel} does not match the world "
                              f"size {env.world_size} (torchrun --nproc-per-node x nodes)")
        seed_everything(cfg.seed)
        out = Path(cfg.output_dir)
        if env.is_main:
            out.mkdir(parents=True, exist_ok=True)
            if resolved:
                (out / "resolved_config.yaml").write_text(resolved, encoding="utf-8")
            _log_ignored(ignored or {})
        with RunState(out, cfg.run_mode, enabled=env.is_main) as state:  # run_state.json, read by the board
            state.ended(summary := _run_mode(cfg, env, out))
        return summary
    finally:
        shutdown(env)


def _log_ignored(ignored: dict[str, str]):
    """One line per reason, naming every key of the config that petformers accepts but does not act on."""
    by_reason: dict[str, list[str]] = {}
    for key, reason in ignored.items():
        by_reason.setdefault(reason, []).append(key)
    if by_reason:
        log.info("petformers: ignored keys of the config (not acted on), by reason:\n  " + "\n  ".join(
            f"{', '.join(keys)}: {reason}" for reason, keys in by_reason.items()))


def _run_mode(cfg, env: DistEnv, out: Path) -> dict:
    if cfg.run_mode in ("finetune", "train"):
        return _finetune(cfg, env, out)
    if cfg.run_mode == "eval":
        from petformers.train.evaluate import run_eval

        return run_eval(cfg, env, out)
    from petformers.train.evaluate import run_predict

    return run_predict(cfg, env, out)  # run_mode was checked when the config was read


def return_freed_memory_to_os():
    """PETFORMERS_LOW_RSS=1: make glibc give freed tensors back to the OS. At the first free of a large block glibc raises
    its mmap threshold, and from then on keeps freed activations in its heaps: a CPU training step's
    RSS grows to ~1.5x the tensors alive at its peak (docs/benchmarks.md). A fixed threshold (glibc's
    default, 128 KiB) maps each large tensor on its own and unmaps it when freed. The price: every
    activation lands on fresh pages the kernel must zero, measured 1.5x slower steps on the bench (so
    off by default). glibc only; a no-op elsewhere."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError, TypeError):
        pass


def _finetune(cfg, env: DistEnv, out: Path) -> dict:
    from petformers.data.loader import open_dataset
    from petformers.train.loop import train
    from petformers.train.metrics_log import MetricsLog, plot_loss

    started = time.perf_counter()
    if env.device.type == "cpu" and os.environ.get("PETFORMERS_LOW_RSS") == "1":
        return_freed_memory_to_os()  # ~0.7x the peak RSS for ~1.5x the step time (docs/benchmarks.md)
    model, tokenizer = load_model_for_run(cfg, env)
    pet = pet_config_of(cfg)
    if pet is not None:
        from petformers.pet.inject import apply_lora

        apply_lora(model, pet)  # logs the trainable / total parameter report
        load_checkpoint_lora(cfg, model)
        if cfg.adapter:  # replaces a checkpoint's LoRA
            from petformers.checkpoint.peft import load_peft_adapter

            load_peft_adapter(model, cfg.adapter)
    elif cfg.run_mode == "finetune":
        raise ConfigError("model.model_config.pet_config: run_mode finetune needs a pet_config (LoRA); "
                          "use run_mode train for full training")
    else:
        checkpoint_lora(cfg, model.config)  # a checkpoint with LoRA needs its pet_config
        model.requires_grad_(True)
    if cfg.model.recompute:
        model.gradient_checkpointing = True
    if not cfg.data.train_dataset_dir:
        raise ConfigError("train_dataset.data_loader.dataset_dir: no training data (or pass --train_dataset_dir)")
    pad_id = data_pad_id(cfg, model, tokenizer)
    train_ds = open_dataset(cfg.data.train_dataset_dir, tokenizer, cfg.model.seq_length, cfg.data.template, cfg.data.packing,
                            cfg.data.drop_long, cfg.run_mode, pad_id=pad_id, progress=env.is_main)
    eval_ds = None
    if cfg.eval.do_eval and cfg.data.eval_dataset_dir:
        eval_ds = open_dataset(cfg.data.eval_dataset_dir, tokenizer, cfg.model.seq_length, cfg.data.template, False,
                               cfg.data.drop_long, cfg.run_mode, pad_id=pad_id, progress=False)
    if env.is_main and getattr(train_ds, "meta", None):
        (out / "data_summary.json").write_text(json.dumps(train_ds.meta, indent=2, ensure_ascii=False))
    metrics = MetricsLog(out / "metrics.jsonl")
    summary = train(cfg, model, tokenizer, train_ds, eval_ds, env, out, metrics, pet)
    if env.is_main:
        _write_outputs(cfg, model, tokenizer, pet, out, summary, started)
        plot_loss(out / "metrics.jsonl", out / "loss.png")
    return summary


def _write_outputs(cfg, model, tokenizer, pet, out: Path, summary: dict, started: float):
    artefacts = {"metrics": str(out / "metrics.jsonl"), "loss_curve": str(out / "loss.png"),
                 "checkpoints": str(out / "checkpoint")}
    if not summary.get("stopped"):
        if pet is not None:
            from petformers.checkpoint.peft import save_peft_adapter

            save_peft_adapter(model, pet, out / "adapter", getattr(model, "name_or_path", ""))
            artefacts["adapter"] = str(out / "adapter")
        if cfg.checkpoint.save_merged or pet is None:
            from petformers.checkpoint.hf import save_model_dir

            merged = model
            if pet is not None:
                import copy

                from petformers.pet.merge import merge_and_unload

                merged = merge_and_unload(copy.deepcopy(model))
            save_model_dir(merged.state_dict(), merged.config, out / "merged", tokenizer)
            artefacts["merged"] = str(out / "merged")
    peak = _peak_memory_mib()
    summary = summary | {"wall_seconds": time.perf_counter() - started, "peak_rss_mib": peak,
                         "artefacts": artefacts, "run_mode": cfg.run_mode}
    (out / "run_summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    lines = [f"steps: {summary.get('steps', summary.get('step'))}",
             f"loss: {summary.get('first_loss')} -> {summary.get('final_loss')}"]
    if "eval_loss" in summary:
        lines.append(f"eval loss: {summary['eval_loss']:.4f} (ppl {summary['eval_ppl']:.2f})")
    if summary.get("trained_tokens_per_s"):
        lines.append(f"trained tokens/s: {summary['trained_tokens_per_s']:.1f}")
    lines.append(f"peak RSS: {peak:.0f} MiB, wall: {summary['wall_seconds']:.1f} s")
    lines += [f"{k}: {v}" for k, v in artefacts.items()]
    log.info("petformers: run summary\n  " + "\n  ".join(lines))


def _peak_memory_mib() -> float:
    import resource

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


__all__ = ["run", "dry_run", "TrainingError"]
