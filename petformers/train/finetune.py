"""The fine-tune, top to bottom: model -> adapters -> data -> optimizer -> loop -> eval -> outputs.

`finetune` is run_mode finetune (LoRA) and train (every weight); read it first. `train_step` is one
optimizer step: it consumes a global batch of `batch_size x data_parallel x gradient_accumulation_steps`
rows, and its loss is the sum of token losses over every micro-batch (and rank) divided by the number
of trained tokens in all of them, so accumulated micro-batches give exactly the update of one big
batch. The data order is a pure function of (seed, epoch) (train/plan.py): resuming at step k replays
nothing and skips nothing, whatever the world size. Checkpoints (checkpoint/training.py, and
checkpoint/dcp.py under FSDP) are written every save_checkpoint_steps, at the end, and when a signal
asks the run to stop.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from petformers import allocator, atomic
from petformers.peak_rss import peak_rss_bytes
from petformers.checkpoint import dcp
from petformers.checkpoint import training as checkpointing
from petformers.checkpoint.gguf_export import export_run_gguf
from petformers.checkpoint.hf import save_model_dir
from petformers.checkpoint.peft import load_peft_adapter, save_peft_adapter
from petformers.data.loader import collate, open_dataset
from petformers.data.packing import IGNORE_INDEX
from petformers.distributed.env import DistEnv, all_reduce_sum, fail_if_asked, timeout_error
from petformers.distributed.parallel import clip_grad_norm, is_sharded, plain_model, unshard_model, wrap_model
from petformers.errors import ConfigError, TrainingError
from petformers.faults import kill_point
from petformers.models.config import parse_dtype
from petformers.pet.config import PetConfig
from petformers.pet.fused import fuse_projections
from petformers.pet.inject import apply_lora, load_trainable_state, trainable_parameters, trainable_state
from petformers.pet.merge import merge_and_unload
from petformers.train.evaluate import evaluate_loss
from petformers.train.loss import chunked_cross_entropy_sum
from petformers.monitor.tensorboard import with_tensorboard
from petformers.train.metrics_log import MetricsLog, plot_loss
from petformers.train.optimizer import build_optimizer
from petformers.train.plan import StepPlan, micro_batches, step_plan
from petformers.train.schedule import Schedule, build_schedule
from petformers.train.setup import (checkpoint_lora, data_pad_id, load_checkpoint_lora, load_model_for_run,
                                    pet_config_of, return_freed_memory_to_os)

log = logging.getLogger("petformers")


def finetune(cfg, env: DistEnv, out: Path) -> dict:
    """The whole run: returns its summary (also written to output_dir/run_summary.json by rank 0)."""
    started = time.perf_counter()
    if env.device.type == "cpu" and os.environ.get("PETFORMERS_LOW_RSS") == "1":
        return_freed_memory_to_os()  # ~0.7x the peak RSS for ~1.5x the step time (docs/benchmarks.md)
    # 1. model: the base weights in compute_dtype (random weights for run_mode train without a checkpoint)
    model, tokenizer = load_model_for_run(cfg, env)
    # 2. adapters: LoRA as pet_config says, started from the checkpoint's mindpet LoRA or `adapter`;
    # q/k/v and w1/w3 of each layer as one matmul over the frozen base (fused_projections)
    pet = add_adapters(cfg, model)
    fuse_for_training(cfg, model, pet, env)
    # 3. data: token rows of seq_length, from a prepared dataset, a MindRecord or a raw file
    train_ds, eval_ds = open_data(cfg, model, tokenizer, env, out)
    # 4. optimizer, schedule and, under torchrun, the DDP / FSDP wrapper; resume when asked
    job = build_job(cfg, model, pet, train_ds, env, out)
    # 5. the loop (with eval every eval_step_interval and checkpoints), 6. eval at the end
    # (metrics.jsonl, teed into TensorBoard event files by rank 0 when tensorboard_dir is set)
    tb = cfg.tensorboard
    with with_tensorboard(MetricsLog(out / "metrics.jsonl"), tb.tensorboard_dir, tb.tensorboard_queue_size,
                          _resolved_text(out), enabled=env.is_main) as metrics:
        summary = train(job, train_ds, eval_ds, metrics)
    # 7. outputs: adapter/ (PEFT), merged/, run_summary.json, loss.png
    if env.is_main:
        write_outputs(cfg, model, tokenizer, pet, out, summary, started)
        plot_loss(out / "metrics.jsonl", out / "loss.png")
    return summary


def add_adapters(cfg, model) -> PetConfig | None:
    """Inject LoRA (run_mode finetune) or make every weight trainable (run_mode train); the adapter config."""
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
    return pet


def fuse_for_training(cfg, model, pet: PetConfig | None, env: DistEnv):
    """fused_projections: each layer's q/k/v (and w1/w3) as one matmul (pet/fused.py), over a frozen base
    (LoRA) that FSDP does not shard weight by weight; one line in the log says what it did."""
    if not cfg.model.fused_projections or pet is None:
        return
    if env.enabled and cfg.parallel.parallel_strategy == "fsdp":
        if env.is_main:
            log.info("petformers: fused projections off: FSDP shards each weight on its own")
        return
    fused = fuse_projections(model)
    if env.is_main:
        log.info("petformers: fused projections on: %d of %d groups (q/k/v, w1/w3) run as one matmul each%s",
                 fused, 2 * len(model.layers), "" if fused else " (a quantized base or DoRA: none can)")


def open_data(cfg, model, tokenizer, env: DistEnv, out: Path):
    """(train rows, eval rows or None); rank 0 writes output_dir/data_summary.json for prepared data."""
    if not cfg.data.train_dataset_dir:
        raise ConfigError("train_dataset.data_loader.dataset_dir: no training data (or pass --train_dataset_dir)")
    data = cfg.data
    pad_id = data_pad_id(cfg, model, tokenizer)
    train_ds = open_dataset(data.train_dataset_dir, tokenizer, cfg.model.seq_length, data.template, data.packing,
                            data.drop_long, cfg.run_mode, pad_id=pad_id, progress=env.is_main,
                            shared_prefix=data.shared_prefix)
    eval_ds = None
    if cfg.eval.do_eval and data.eval_dataset_dir:
        eval_ds = open_dataset(data.eval_dataset_dir, tokenizer, cfg.model.seq_length, data.template, False,
                               data.drop_long, cfg.run_mode, pad_id=pad_id, progress=False)
    if env.is_main and getattr(train_ds, "meta", None):
        atomic.write_json(out / "data_summary.json", train_ds.meta)
    return train_ds, eval_ds


@dataclass
class Job:
    """What the loop, train_step and the checkpoints share."""
    cfg: object  # the RunConfig
    model: torch.nn.Module  # the model with its adapters (FSDP: its parameters are shards)
    train_model: torch.nn.Module  # what computes hidden states: `model`, or its DDP / FSDP wrapper
    sharded: bool  # FSDP: every rank writes its shards of a checkpoint
    params: list  # the trainable parameters (shards under FSDP)
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    plan: StepPlan
    total: int  # optimizer steps of the run
    env: DistEnv
    pet: PetConfig | None
    ckpt_root: Path
    start_step: int = 0


def build_job(cfg, model, pet: PetConfig | None, train_ds, env: DistEnv, out: Path) -> Job:
    """The step plan, the DDP / FSDP wrapper, the optimizer and schedule; the checkpoint state when resuming."""
    plan = step_plan(cfg.runner, len(train_ds), env.world_size)
    if plan.steps_per_epoch == 0:
        raise TrainingError(f"{cfg.data.train_dataset_dir}: {plan.rows} rows are fewer than one global batch "
                            f"({plan.global_batch} = batch_size {cfg.runner.batch_size} x data_parallel "
                            f"{env.world_size} x gradient_accumulation_steps {cfg.runner.gradient_accumulation_steps})")
    total = plan.schedule_steps(cfg.schedule.total_steps)
    s = cfg.schedule
    schedule = build_schedule(s.type, s.learning_rate, total, s.warmup_ratio, s.warmup_steps, s.lr_end,
                              s.warmup_lr_init)
    if not trainable_parameters(model):
        raise TrainingError("no trainable parameters: check pet_config.target_modules")
    train_model = wrap_model(model, cfg.parallel.parallel_strategy, env) if env.enabled else model
    params = [p for _, p in trainable_parameters(model)]  # after wrapping: FSDP replaced them by their shards
    optimizer = build_optimizer(cfg.optimizer, cfg.schedule.learning_rate, params)
    job = Job(cfg, model, train_model, is_sharded(train_model), params, optimizer, schedule, plan, total, env, pet,
              out / "checkpoint")
    if env.is_main:
        for left in checkpointing.remove_partial(job.ckpt_root):
            log.info("petformers: removed %s, left by an interrupted save", left)
    if cfg.resume_training:
        job.start_step = resume(job)
    if env.is_main:
        log.info("petformers: %d rows, global batch %d (%d x %d ranks x %d accumulation), %d steps/epoch, "
                 "%d steps", plan.rows, plan.global_batch, plan.micro_batch, env.world_size, plan.accumulation,
                 plan.steps_per_epoch, total)
    return job


def train(job: Job, train_ds, eval_ds, metrics) -> dict:
    """The optimizer steps from job.start_step to job.total; returns the run summary."""
    cfg, env, plan, total = job.cfg, job.env, job.plan, job.total
    packed = bool(getattr(train_ds, "packing", False))
    stop = StopFlag()
    stop.install()
    job.model.train()
    started = time.perf_counter()
    history, trained_tokens, last_eval = [], 0, {}
    bar = tqdm(total=total, initial=job.start_step, desc="train", disable=not env.is_main, dynamic_ncols=True)
    try:
        for step in range(job.start_step, total):
            step_start = time.perf_counter()
            fail_if_asked(step, env)
            batches = [collate([train_ds[i] for i in rows], train_ds.pad_id, packed, env.device)
                       for rows in micro_batches(plan, step, cfg.seed, cfg.data.shuffle, env.rank)]
            result = train_step(job, batches, job.schedule.lr_at(step), step)
            done = step + 1
            trained_tokens += result.tokens
            record = {"step": done, "epoch": step // plan.steps_per_epoch, "loss": result.loss, "lr": result.lr,
                      "grad_norm": result.grad_norm, "trained_tokens": result.tokens,
                      "tokens_per_s": result.tokens / (time.perf_counter() - step_start),
                      "peak_memory_mib": _peak_memory_mib(), "elapsed_s": time.perf_counter() - started}
            history.append(result.loss)
            if env.is_main:
                metrics.write(record)
                bar.set_postfix(loss=f"{result.loss:.4f}", lr=f"{result.lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
                bar.update(1)
            interval = cfg.eval.eval_step_interval
            if eval_ds is not None and cfg.eval.do_eval and interval > 0 and done % interval == 0 and done != total:
                last_eval = evaluate(job, eval_ds, metrics, done)
                if env.is_main:
                    bar.write(f"step {done}: eval_loss {last_eval['eval_loss']:.4f} ppl {last_eval['eval_ppl']:.2f}")
            if done % cfg.checkpoint.save_checkpoint_steps == 0 and done != total:
                save(job, done)
            if _stop_requested(stop, env):
                save(job, done, f"stopped by {stop.signal_name or 'a signal'}")
                return {"stopped": True, "step": done, "total_steps": total, "signal": stop.signal_name}
    except RuntimeError as e:
        raise timeout_error(e, env, checkpointing.list_checkpoints(job.ckpt_root)) from None
    finally:
        stop.restore()
        bar.close()
    if total > job.start_step:
        save(job, total, "end of training")
    elapsed = time.perf_counter() - started
    if eval_ds is not None and cfg.eval.do_eval:
        last_eval = evaluate(job, eval_ds, metrics, total)
    if job.sharded:  # rank 0 gets a plain model back for the final artefacts (adapter, merged)
        unshard_model(job.model, job.pet, compute_dtype_of(cfg), env)
    return {"stopped": False, "steps": total, "resumed_from": job.start_step,
            "final_loss": history[-1] if history else None, "first_loss": history[0] if history else None,
            "train_seconds": elapsed, "trained_tokens": trained_tokens,
            "trained_tokens_per_s": trained_tokens / elapsed if elapsed > 0 else None,
            "global_batch": plan.global_batch, "steps_per_epoch": plan.steps_per_epoch, **last_eval}


@dataclass
class StepResult:
    loss: float  # mean loss per trained token of the global batch
    lr: float
    grad_norm: float | None  # before clipping; None without use_clip_grad
    tokens: int  # trained tokens of the global batch (every rank)


def train_step(job: Job, batches: list[dict], lr: float, step: int) -> StepResult:
    """One optimizer step over this rank's micro-batches: token-normalised loss, backward, clip, update.

    A non-finite loss stops the run before the update, naming the last good checkpoint."""
    env, model = job.env, job.model
    tokens = sum((b["targets"] != IGNORE_INDEX).sum() for b in batches).to(torch.float32)
    tokens = all_reduce_sum(tokens.clone(), env).clamp(min=1)
    for group in job.optimizer.param_groups:
        group["lr"] = lr
    loss_sum = torch.zeros((), dtype=torch.float32, device=env.device)
    for i, b in enumerate(batches):
        sync = (i == len(batches) - 1) or not env.enabled  # DDP all-reduces gradients once, after the last
        with _no_sync(job.train_model, sync):
            if job.train_model is model:
                hidden = model.hidden_states(b["input_ids"], b["position_ids"], b["segment_ids"])
            else:
                hidden = job.train_model(b["input_ids"], b["position_ids"], b["segment_ids"])
            loss = chunked_cross_entropy_sum(model.lm_head, hidden, b["targets"])
            (loss / tokens).backward()
        loss_sum += loss.detach()
    step_loss = (all_reduce_sum(loss_sum, env) / tokens).item()
    if not math.isfinite(step_loss):
        last = checkpointing.list_checkpoints(job.ckpt_root)
        raise TrainingError(f"loss is {step_loss} at step {step + 1}; the update was not applied; last good "
                            f"checkpoint: {last[-1] if last else 'none'} (lower the learning rate or check the data)")
    grad_norm = None
    clip = job.cfg.optimizer
    if clip.use_clip_grad:
        grad_norm = clip_grad_norm(job.params, clip.max_grad_norm) if job.sharded else \
            float(torch.nn.utils.clip_grad_norm_(job.params, clip.max_grad_norm))
    job.optimizer.step()
    job.optimizer.zero_grad(set_to_none=True)
    kill_point("step")  # fault injection (petformers/faults.py); a no-op unless PETFORMERS_KILL_AT is set
    return StepResult(step_loss, lr, grad_norm, int(tokens.item()))


def evaluate(job: Job, eval_ds, metrics: MetricsLog, step: int) -> dict:
    """Eval loss and perplexity at `step`, recorded in metrics.jsonl (FSDP: the wrapper's collective forward)."""
    forward = job.train_model if job.sharded else None
    result = evaluate_loss(job.model, eval_ds, job.cfg.runner.batch_size, job.env.device, job.env, forward=forward)
    if job.env.is_main:
        metrics.write({"step": step, **result})
    return result


# ---- checkpoints ----------------------------------------------------------------------------------------


def save(job: Job, step: int, reason: str = ""):
    """A training checkpoint of `step` (every rank writes its shards under FSDP, else rank 0 alone)."""
    env, plan = job.env, job.plan
    state = {"epoch": step // plan.steps_per_epoch, "data_position": step * plan.global_batch,
             "global_batch": plan.global_batch, "total_steps": job.total, "reason": reason,
             "world_size": env.world_size}
    meta = {"model_config.json": job.model.config.to_dict()}
    if job.pet is not None:
        meta["pet_config.json"] = job.pet.to_dict()
    write_adapter = (lambda path, tensors=None: _write_adapter(job, path, tensors)) if job.pet is not None else None
    keep = job.cfg.checkpoint.keep_checkpoint_max
    path = None
    if job.sharded:
        path = dcp.save_sharded_checkpoint(job.ckpt_root, step, job.model, job.optimizer, state, keep, env,
                                           write_adapter, meta)
    elif env.is_main:
        path = checkpointing.save_checkpoint(job.ckpt_root, step, trainable_state(job.model),
                                             job.optimizer.state_dict(), state, keep, write_adapter, meta)
    if env.is_main:
        log.info("petformers: checkpoint %s%s", path, f" ({reason})" if reason else "")
    if env.enabled:
        torch.distributed.barrier()


def _write_adapter(job: Job, path: Path, tensors: dict | None = None):
    """The PEFT adapter of the model, or (sharded) of the whole `tensors` gathered on rank 0."""
    model = job.model
    source = model if tensors is None else plain_model(model.config, job.pet, tensors, compute_dtype_of(job.cfg))
    save_peft_adapter(source, job.pet, path, getattr(model, "name_or_path", ""))


def resume(job: Job) -> int:
    """Load the newest intact checkpoint (resharded to this world size when needed); the step to start at.
    Newer damaged checkpoints are skipped with one warning (checkpoint/training.py's manifest)."""
    good = checkpointing.latest_good_checkpoint(job.ckpt_root, warn=job.env.is_main)
    if good is None:
        if job.env.is_main:
            log.info("petformers: resume_training set but no checkpoint in %s: starting from step 0", job.ckpt_root)
        return 0
    if job.sharded or dcp.is_sharded_checkpoint(good):  # resharded to this world size (auto_trans_ckpt)
        rng, state = dcp.restore_checkpoint(good, job.model, job.optimizer)
    else:
        saved = checkpointing.load_checkpoint(good)
        load_trainable_state(job.model, saved.trainable, str(good))
        job.optimizer.load_state_dict(saved.optimizer)
        rng, state = saved.rng, saved.state
    checkpointing.set_rng_state(rng)
    step = int(state["step"])
    if job.env.is_main:
        log.info("petformers: resumed from %s (step %d of %d, saved by %s rank(s))", good, step, job.total,
                 state.get("world_size", 1))
    return step


# ---- outputs ---------------------------------------------------------------------------------------------


def write_outputs(cfg, model, tokenizer, pet, out: Path, summary: dict, started: float):
    """adapter/ (PEFT), merged/ (save_merged, or full training), gguf/ (save_gguf), run_summary.json, and the
    summary in the log."""
    artefacts = {"metrics": str(out / "metrics.jsonl"), "loss_curve": str(out / "loss.png"),
                 "checkpoints": str(out / "checkpoint")}
    if not summary.get("stopped"):
        if pet is not None:
            save_peft_adapter(model, pet, out / "adapter", getattr(model, "name_or_path", ""))
            artefacts["adapter"] = str(out / "adapter")
        merged = None
        if cfg.checkpoint.save_merged or pet is None:
            merged = model if pet is None else merge_and_unload(copy.deepcopy(model))
            save_model_dir(merged.state_dict(), merged.config, out / "merged", tokenizer)
            artefacts["merged"] = str(out / "merged")
        if cfg.checkpoint.save_gguf:
            artefacts["gguf"] = str(export_run_gguf(model, tokenizer, cfg.load_checkpoint, out,
                                                    cfg.checkpoint.save_gguf, merged=merged,
                                                    fully_trained=pet is None))
    peak = _peak_memory_mib()
    summary = summary | {"wall_seconds": time.perf_counter() - started, "peak_rss_mib": peak,
                         "allocator": allocator.current(), "artefacts": artefacts, "run_mode": cfg.run_mode}
    atomic.write_json(out / "run_summary.json", summary)
    lines = [f"steps: {summary.get('steps', summary.get('step'))}",
             f"loss: {summary.get('first_loss')} -> {summary.get('final_loss')}"]
    if "eval_loss" in summary:
        lines.append(f"eval loss: {summary['eval_loss']:.4f} (ppl {summary['eval_ppl']:.2f})")
    if summary.get("trained_tokens_per_s"):
        lines.append(f"trained tokens/s: {summary['trained_tokens_per_s']:.1f}")
    lines.append(f"peak RSS: {peak:.0f} MiB ({summary['allocator']} malloc), wall: {summary['wall_seconds']:.1f} s")
    lines += [f"{k}: {v}" for k, v in artefacts.items()]
    log.info("petformers: run summary\n  " + "\n  ".join(lines))


def _resolved_text(out: Path) -> str:
    """The resolved config run() wrote (rank 0), for TensorBoard's text tab."""
    path = out / "resolved_config.yaml"
    return path.read_text(encoding="utf-8") if path.is_file() else ""


def _peak_memory_mib() -> float:
    """Peak memory so far: CUDA memory allocated by tensors, else the process's peak RSS (MiB)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return peak_rss_bytes() / 2**20


# ---- signals and DDP ---------------------------------------------------------------------------------------


@dataclass
class StopFlag:
    """Set by SIGTERM / Ctrl-C: the loop finishes the current step, checkpoints and exits cleanly."""
    requested: bool = False
    signal_name: str = ""
    previous: dict = field(default_factory=dict)

    def install(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.requested, self.signal_name = True, signal.Signals(signum).name

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _stop_requested(stop: StopFlag, env: DistEnv) -> bool:
    """Every rank agrees to stop if any rank received the signal (so they checkpoint together), and
    learns which signal it was (rank 0 names it in the checkpoint)."""
    if not env.enabled:
        return stop.requested
    signum = signal.Signals[stop.signal_name].value if stop.requested and stop.signal_name else 0
    flag = torch.tensor([1.0 if stop.requested else 0.0, float(signum)], device=env.device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    if flag[0].item() > 0 and not stop.signal_name and flag[1].item() > 0:
        stop.signal_name = signal.Signals(int(flag[1].item())).name
    return bool(flag[0].item() > 0)


class _no_sync:
    """DDP's no_sync() for all but the last micro-batch; a no-op otherwise."""

    def __init__(self, model, sync: bool):
        self.ctx = model.no_sync() if (not sync and hasattr(model, "no_sync")) else None

    def __enter__(self):
        return self.ctx.__enter__() if self.ctx else None

    def __exit__(self, *exc):
        return self.ctx.__exit__(*exc) if self.ctx else False


def compute_dtype_of(cfg) -> torch.dtype:
    return parse_dtype(cfg.model.compute_dtype, "model.model_config.compute_dtype")
