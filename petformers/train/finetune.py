"""The training run, top to bottom: model -> adapters -> data -> optimizer -> steps -> checkpoints -> outputs.

One optimizer step consumes a global batch of `batch_size x data_parallel x gradient_accumulation_steps`
rows. The loss of the step is the sum of token losses over every micro-batch (and rank) divided by the
number of trained tokens in all of them, so accumulated micro-batches give exactly the update of one
big batch. The data order is a pure function of (seed, epoch): resuming at step k replays nothing and
skips nothing, whatever the world size.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from petformers.checkpoint import dcp, training as checkpointing
from petformers.checkpoint.peft import save_peft_adapter
from petformers.data.loader import collate
from petformers.data.packing import IGNORE_INDEX
from petformers.distributed.env import DistEnv, all_reduce_sum, fail_if_asked, timeout_error
from petformers.distributed.parallel import clip_grad_norm, is_sharded, plain_model, unshard_model, wrap_model
from petformers.errors import TrainingError
from petformers.faults import kill_point
from petformers.models.config import parse_dtype
from petformers.pet.inject import load_trainable_state, trainable_parameters, trainable_state
from petformers.train.evaluate import evaluate_loss
from petformers.train.loss import chunked_cross_entropy_sum
from petformers.train.optimizer import build_optimizer
from petformers.train.plan import micro_batches, step_plan
from petformers.train.schedule import build_schedule

log = logging.getLogger("petformers")


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


def train(cfg, model, tokenizer, train_ds, eval_ds, env: DistEnv, out: Path, metrics, pet_config=None) -> dict:
    """Run the optimizer steps; returns the run summary. `model` already carries its adapters."""
    device = env.device
    pad_id = train_ds.pad_id  # what the rows are padded with: collate trims those columns
    packed = bool(getattr(train_ds, "packing", False))
    plan = step_plan(cfg.runner, len(train_ds), env.world_size)
    if plan.steps_per_epoch == 0:
        raise TrainingError(f"{cfg.data.train_dataset_dir}: {plan.rows} rows are fewer than one global batch "
                            f"({plan.global_batch} = batch_size {cfg.runner.batch_size} x data_parallel {env.world_size} "
                            f"x gradient_accumulation_steps {cfg.runner.gradient_accumulation_steps})")
    total = plan.schedule_steps(cfg.schedule.total_steps)
    schedule = build_schedule(cfg.schedule.type, cfg.schedule.learning_rate, total, cfg.schedule.warmup_ratio, cfg.schedule.warmup_steps,
                              cfg.schedule.lr_end, cfg.schedule.warmup_lr_init)
    named = trainable_parameters(model)
    if not named:
        raise TrainingError("no trainable parameters: check pet_config.target_modules")
    train_model, sharded = model, False
    if env.enabled:
        train_model = wrap_model(model, cfg.parallel.parallel_strategy, env)
        sharded = is_sharded(train_model)
        named = trainable_parameters(model)  # FSDP replaced them by their shards
    optimizer = build_optimizer(cfg.optimizer, cfg.schedule.learning_rate, [p for _, p in named])
    hidden_fn = train_model if sharded else None  # for evaluate_loss: FSDP's forward is collective
    ckpt_root = out / "checkpoint"
    ckpt_meta = {"model_config.json": model.config.to_dict()}
    if pet_config is not None:
        ckpt_meta["pet_config.json"] = pet_config.to_dict()

    def write_adapter(path, tensors=None):
        """PEFT adapter of `model`, or (sharded) of whole `tensors` gathered on rank 0."""
        if pet_config is not None:
            source = model if tensors is None else plain_model(model.config, pet_config, tensors,
                                                                compute_dtype_of(cfg))
            save_peft_adapter(source, pet_config, path, getattr(model, "name_or_path", ""))

    start_step, history = 0, []
    if env.is_main:
        for left in checkpointing.remove_partial(ckpt_root):
            log.info("petformers: removed %s, left by an interrupted save", left)
    if cfg.resume_training:
        good = checkpointing.latest_good_checkpoint(ckpt_root, warn=env.is_main)
        if good is not None:
            if sharded or dcp.is_sharded_checkpoint(good):  # resharded to this world size (auto_trans_ckpt)
                rng, state = dcp.restore_checkpoint(good, model, optimizer)
            else:
                tensors, opt_state, rng, state = checkpointing.load_checkpoint(good)
                load_trainable_state(model, tensors, str(good))
                optimizer.load_state_dict(opt_state)
            checkpointing.set_rng_state(rng)
            start_step = int(state["step"])
            if env.is_main:
                log.info("petformers: resumed from %s (step %d of %d, saved by %s rank(s))", good, start_step,
                         total, state.get("world_size", 1))
        elif env.is_main:
            log.info("petformers: resume_training set but no checkpoint in %s: starting from step 0", ckpt_root)

    if env.is_main:
        log.info("petformers: %d rows, global batch %d (%d x %d ranks x %d accumulation), %d steps/epoch, "
                 "%d steps", plan.rows, plan.global_batch, plan.micro_batch, env.world_size, plan.accumulation,
                 plan.steps_per_epoch, total)

    def save(step, reason=""):
        state = {"epoch": step // plan.steps_per_epoch, "data_position": step * plan.global_batch,
                 "global_batch": plan.global_batch, "total_steps": total, "reason": reason,
                 "world_size": env.world_size}
        if sharded:  # every rank writes its shards

            path = dcp.save_sharded_checkpoint(ckpt_root, step, model, optimizer, state, cfg.checkpoint.keep_checkpoint_max,
                                               env, write_adapter if pet_config is not None else None, ckpt_meta)
        elif env.is_main:
            path = checkpointing.save_checkpoint(ckpt_root, step, trainable_state(model), optimizer.state_dict(),
                                                 state, cfg.checkpoint.keep_checkpoint_max, write_adapter, ckpt_meta)
        if env.is_main:
            log.info("petformers: checkpoint %s%s", path, f" ({reason})" if reason else "")
        if env.enabled:
            torch.distributed.barrier()

    stop = StopFlag()
    stop.install()
    model.train()
    started = time.perf_counter()
    trained_tokens_run, last_eval = 0, {}
    bar = tqdm(total=total, initial=start_step, desc="train", disable=not env.is_main, dynamic_ncols=True)
    step = start_step
    try:
        for step in range(start_step, total):
            step_start = time.perf_counter()
            fail_if_asked(step, env)
            batches = [collate([train_ds[i] for i in idx], pad_id, packed, device)
                       for idx in micro_batches(plan, step, cfg.seed, cfg.data.shuffle, env.rank)]
            n_tokens = sum((b["targets"] != IGNORE_INDEX).sum() for b in batches).to(torch.float32)
            n_tokens = all_reduce_sum(n_tokens.clone(), env).clamp(min=1)
            lr = schedule.lr_at(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), dtype=torch.float32, device=device)
            for i, b in enumerate(batches):
                sync = (i == len(batches) - 1) or not env.enabled
                with _no_sync(train_model, sync):
                    hidden = train_model(b["input_ids"], b["position_ids"], b["segment_ids"]) \
                        if train_model is not model else \
                        model.hidden_states(b["input_ids"], b["position_ids"], b["segment_ids"])
                    loss = chunked_cross_entropy_sum(model.lm_head, hidden, b["targets"])
                    (loss / n_tokens).backward()
                loss_sum += loss.detach()
            step_loss = (all_reduce_sum(loss_sum, env) / n_tokens).item()
            if not math.isfinite(step_loss):
                last = checkpointing.list_checkpoints(ckpt_root)
                raise TrainingError(f"loss is {step_loss} at step {step + 1}; the update was not applied; last good "
                                    f"checkpoint: {last[-1] if last else 'none'} (lower the learning rate or check "
                                    "the data)")
            grad_norm = None
            if cfg.optimizer.use_clip_grad:
                params = [p for _, p in named]
                grad_norm = clip_grad_norm(params, cfg.optimizer.max_grad_norm) if sharded else \
                    float(torch.nn.utils.clip_grad_norm_(params, cfg.optimizer.max_grad_norm))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            kill_point("step")
            done = step + 1
            trained_tokens_run += int(n_tokens.item())
            dt = time.perf_counter() - step_start
            record = {"step": done, "epoch": step // plan.steps_per_epoch, "loss": step_loss, "lr": lr,
                      "grad_norm": grad_norm, "trained_tokens": int(n_tokens.item()),
                      "tokens_per_s": n_tokens.item() / dt, "elapsed_s": time.perf_counter() - started}
            history.append(step_loss)
            if env.is_main:
                metrics.write(record)
                bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
                bar.update(1)
            if eval_ds is not None and cfg.eval.do_eval and cfg.eval.eval_step_interval > 0 \
                    and done % cfg.eval.eval_step_interval == 0 and done != total:
                last_eval = evaluate_loss(model, eval_ds, cfg.runner.batch_size, device, env, forward=hidden_fn)
                if env.is_main:
                    metrics.write({"step": done, **last_eval})
                    bar.write(f"step {done}: eval_loss {last_eval['eval_loss']:.4f} ppl {last_eval['eval_ppl']:.2f}")
            if cfg.checkpoint.save_checkpoint_steps > 0 and done % cfg.checkpoint.save_checkpoint_steps == 0 and done != total:
                save(done)
            if _stop_requested(stop, env):
                save(done, f"stopped by {stop.signal_name or 'a signal'}")
                bar.close()
                return {"stopped": True, "step": done, "total_steps": total, "signal": stop.signal_name}
        step = total
    except RuntimeError as e:
        raise timeout_error(e, env, checkpointing.list_checkpoints(ckpt_root)) from None
    finally:
        stop.restore()
        bar.close()
    if total > start_step:
        save(total, "end of training")
    elapsed = time.perf_counter() - started
    if eval_ds is not None and cfg.eval.do_eval:
        last_eval = evaluate_loss(model, eval_ds, cfg.runner.batch_size, device, env, forward=hidden_fn)
        if env.is_main:
            metrics.write({"step": total, **last_eval})
    if sharded:  # rank 0 gets a plain model back for the final artefacts (adapter, merged)

        unshard_model(model, pet_config, compute_dtype_of(cfg), env)
    return {"stopped": False, "steps": total, "resumed_from": start_step, "final_loss": history[-1] if history else None,
            "first_loss": history[0] if history else None, "train_seconds": elapsed,
            "trained_tokens": trained_tokens_run,
            "trained_tokens_per_s": trained_tokens_run / elapsed if elapsed > 0 else None,
            "global_batch": plan.global_batch, "steps_per_epoch": plan.steps_per_epoch, **last_eval}


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
