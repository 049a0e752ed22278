"""`petformers run`: a resolved RunConfig -> dry run, fine-tuning, evaluation or prediction, with outputs.

Outputs in output_dir: resolved_config.yaml, metrics.jsonl, loss.png, checkpoint/step_N/,
adapter/ (PEFT format), merged/ (when save_merged), run_summary.json, eval_results.json (run_mode eval).
Only rank 0 writes them.
"""

from __future__ import annotations

import copy
import logging
import os
import resource
import time
from pathlib import Path

import torch

from petformers import atomic
from petformers.checkpoint.hf import save_model_dir
from petformers.checkpoint.peft import load_peft_adapter, save_peft_adapter
from petformers.data.loader import open_dataset
from petformers.distributed.env import DistEnv, init_distributed, shutdown
from petformers.errors import ConfigError, TrainingError
from petformers.monitor.state import RunState
from petformers.pet.inject import apply_lora
from petformers.pet.merge import merge_and_unload
from petformers.train.dry_run import dry_run
from petformers.train.evaluate import run_eval, run_predict
from petformers.train.finetune import train
from petformers.train.metrics_log import MetricsLog, plot_loss
from petformers.train.setup import (checkpoint_lora, data_pad_id, load_checkpoint_lora, load_model_for_run,
                                    pet_config_of, seed_everything)

log = logging.getLogger("petformers")

RUN_MODES = ("finetune", "train", "eval", "predict")


def check_run_mode(name: str) -> str:
    """`name` in lower case when it is a run_mode petformers runs, else a ValueError."""
    mode = str(name).lower()
    if mode not in RUN_MODES:
        raise ValueError(f"must be one of {', '.join(RUN_MODES)}, got {mode!r}")
    return mode


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
                atomic.write_text(out / "resolved_config.yaml", resolved)
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
        return run_eval(cfg, env, out)
    return run_predict(cfg, env, out)  # run_mode was checked when the config was read


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


def _finetune(cfg, env: DistEnv, out: Path) -> dict:
    started = time.perf_counter()
    if env.device.type == "cpu" and os.environ.get("PETFORMERS_LOW_RSS") == "1":
        return_freed_memory_to_os()  # ~0.7x the peak RSS for ~1.5x the step time (docs/benchmarks.md)
    model, tokenizer = load_model_for_run(cfg, env)
    pet = pet_config_of(cfg)
    if pet is not None:
        apply_lora(model, pet)  # logs the trainable / total parameter report
        load_checkpoint_lora(cfg, model)
        if cfg.adapter:  # replaces a checkpoint's LoRA
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
        atomic.write_json(out / "data_summary.json", train_ds.meta)
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
            save_peft_adapter(model, pet, out / "adapter", getattr(model, "name_or_path", ""))
            artefacts["adapter"] = str(out / "adapter")
        if cfg.checkpoint.save_merged or pet is None:
            merged = model
            if pet is not None:
                merged = merge_and_unload(copy.deepcopy(model))
            save_model_dir(merged.state_dict(), merged.config, out / "merged", tokenizer)
            artefacts["merged"] = str(out / "merged")
    peak = _peak_memory_mib()
    summary = summary | {"wall_seconds": time.perf_counter() - started, "peak_rss_mib": peak,
                         "artefacts": artefacts, "run_mode": cfg.run_mode}
    atomic.write_json(out / "run_summary.json", summary)
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
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


__all__ = ["run", "dry_run", "TrainingError"]
