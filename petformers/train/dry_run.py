"""`petformers run --dry_run`: what the run would build and how long it would step, without loading weights.

The model is built on the meta device with the run's adapters; the parameter count and the step
plan are the run's own (pet.inject.count_parameters, train.plan.step_plan), so the dry run and the run
cannot disagree.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from petformers.data.loader import open_dataset
from petformers.errors import ConfigError
from petformers.models.config import LlamaConfig, parse_dtype
from petformers.models.llama import build_model
from petformers.pet.inject import apply_lora, count_parameters
from petformers.checkpoint.gguf_file import gguf_tensor_bytes
from petformers.quant.model import base_weight_bytes
from petformers.train.plan import step_plan
from petformers.train.setup import base_path, pet_config_of, quantization_of, resolve_model_config, tokenizer_for


# Host memory of the process itself on a CPU run: Python, torch's libraries, petformers imported
# (ru_maxrss of `import torch, petformers.train.finetune`: 0.22 GiB; 0.29 GiB once a small model is built),
# plus the autograd engine's and the first backward's own allocations: 0.35 GiB fits the measured peaks
# of scripts/qlora_memory.py from 4 layers of hidden 1024 to the 32 layers of the 7B shape within 5%.
RUNTIME_BYTES = 350 * 2**20
# With recompute on a CPU, each layer keeps its input, and glibc's heap keeps the freed transients of
# the layer's forward that the kept inputs pin (freed, reused, not returned to the OS: malloc_trim after
# a forward gives back ~85%): measured ~9 values of the compute dtype per token x hidden per layer
# (Llama-2-7B shape, 8 and 32 layers, 256 tokens: 36 MiB per layer), not the 2 the live tensors take.
RECOMPUTE_VALUES_PER_LAYER_CPU = 9


def estimate_memory(config: LlamaConfig, total: int, trainable: int, cfg, base_bytes: int | None = None,
                    on_cpu: bool | None = None) -> dict:
    """Rough peak bytes per device: frozen weights (`base_bytes` when known, e.g. quantized) + fp32 adapters
    with grads and Adam states + activations (+ on a CPU, where the device's memory is the process's RSS,
    the process's own runtime)."""
    on_cpu = not torch.cuda.is_available() if on_cpu is None else on_cpu
    bytes_per = torch.empty((), dtype=parse_dtype(cfg.model.compute_dtype)).element_size()
    weights = (total - trainable) * bytes_per if base_bytes is None else base_bytes
    adapters = trainable * 4 * 4  # param, grad, exp_avg, exp_avg_sq in float32
    tokens = cfg.runner.batch_size * cfg.model.seq_length
    h = config.hidden_size
    # Per layer: ~34 bytes*h per token at 16-bit without recompute (SDPA keeps no s^2 scores); with
    # recompute, the layer input (what the live tensors take; more on a CPU, see above). Plus one chunk
    # of at most 1024 rows of float32 logits and its gradient.
    if cfg.model.recompute:
        per_layer = tokens * h * bytes_per * (RECOMPUTE_VALUES_PER_LAYER_CPU if on_cpu else 2)
    else:
        per_layer = tokens * h * 17 * bytes_per
    activations = per_layer * config.num_layers + min(tokens, 1024) * config.vocab_size * 4 * 2
    if base_bytes is not None:  # a quantized base: float copies of the weight being dequantized (forward and
        # backward can overlap), at most two of the largest linear weight, in the compute dtype
        largest = max(config.intermediate_size or 0, config.hidden_size) * config.hidden_size
        activations += 2 * largest * bytes_per
    runtime = RUNTIME_BYTES if on_cpu else 0
    return {"weights": weights, "adapters_and_optimizer": adapters, "activations": activations,
            "runtime": runtime, "total": weights + adapters + activations + runtime}


def dry_run(cfg) -> dict:
    """Print the model, parameter counts, step plan and memory estimate; returns them."""
    config, source = resolve_model_config(cfg)
    dtype = parse_dtype(cfg.model.compute_dtype, "model.model_config.compute_dtype")
    model = build_model(config, device="meta", dtype=dtype)
    pet = pet_config_of(cfg)
    if pet is not None:
        apply_lora(model, pet)
    trainable, total = count_parameters(model)
    if pet is None:
        trainable = total  # full training (run_mode train)
    world = max(cfg.parallel.data_parallel, 1) if cfg.parallel.use_parallel else 1
    rows = _count_rows(cfg)
    plan = step_plan(cfg.runner, rows or 0, world)
    steps_per_epoch = plan.steps_per_epoch if rows is not None else None
    total_steps = plan.schedule_steps(cfg.schedule.total_steps) if rows is not None else None
    quant = quantization_of(cfg)
    base_bytes = None
    if quant is not None:
        gguf_bytes = gguf_tensor_bytes(base_path(cfg)) \
            if quant.type == "gguf" and source == "gguf" else None
        if quant.type == "gguf" and gguf_bytes is None:
            raise ConfigError("model.model_config.quantization_type: gguf keeps a GGUF file's blocks; "
                              "load_checkpoint must be a .gguf file")
        base_bytes = base_weight_bytes(model, quant, dtype, gguf_bytes)
    mem = estimate_memory(config, total, trainable, cfg, base_bytes)
    gib = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
    unknown = "unknown (no train dataset)"
    lines = [
        f"model: {config.num_layers} layers, hidden {config.hidden_size}, heads {config.num_heads}/{config.n_kv_heads}, "
        f"vocab {config.vocab_size} (config from {source})",
        f"family: {config.describe()}",
        f"parameters: {total:,}",
        f"trainable parameters: {trainable:,} ({100 * trainable / total:.4f}%)",
        f"global batch: {plan.global_batch} (batch_size {cfg.runner.batch_size} x data_parallel {world} x "
        f"gradient_accumulation_steps {cfg.runner.gradient_accumulation_steps})",
        f"steps per epoch: {steps_per_epoch if steps_per_epoch is not None else unknown}",
        f"total steps: {total_steps if total_steps is not None else unknown}",
        f"quantization: {quant.describe() if quant is not None else 'none (float base)'}",
        f"peak memory per device ({cfg.model.compute_dtype}, seq_length {cfg.model.seq_length}, recompute "
        f"{cfg.model.recompute}): ~{gib(mem['total'])} (weights {gib(mem['weights'])}, adapters+grads+AdamW "
        f"{gib(mem['adapters_and_optimizer'])}, activations {gib(mem['activations'])}"
        + (f", process runtime {gib(mem['runtime'])})" if mem["runtime"] else ")"),
    ]
    print("\n".join(lines))
    return {"parameters": total, "trainable_parameters": trainable, "global_batch": plan.global_batch,
            "steps_per_epoch": steps_per_epoch, "total_steps": total_steps, "memory_bytes": mem}


def _count_rows(cfg) -> int | None:
    """Rows of the training set: from a prepared dataset's meta.json, else by opening it (None: no data)."""
    if not cfg.data.train_dataset_dir:
        return None
    path = Path(cfg.data.train_dataset_dir)
    if (path / "meta.json").exists():
        return int(json.loads((path / "meta.json").read_text())["counts"]["rows"])
    if not path.exists():
        return None
    return len(open_dataset(str(path), tokenizer_for(cfg), cfg.model.seq_length, cfg.data.template, cfg.data.packing,
                            cfg.data.drop_long, cfg.run_mode, progress=False, shared_prefix=cfg.data.shared_prefix))
