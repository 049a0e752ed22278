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

import numpy as np
import torch
from tqdm import tqdm

from petformers.distributed.env import DistEnv, all_reduce_sum, fail_if_asked, timeout_error
from petformers.distributed.parallel import clip_grad_norm
from petformers.errors import TrainingError
from petformers.faults import kill_point
from petformers.models.config import parse_dtype
from petformers.checkpoint import training as checkpointing
from petformers.train.loss import chunked_cross_entropy_sum
from petformers.train.optimizer import build_optimizer
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


def epoch_order(num_rows: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    if not shuffle:
        return np.arange(num_rows)
    return np.random.default_rng([seed, epoch]).permutation(num_rows)


def trainable_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in trainable_parameters(model)}


def load_trainable_state(model, tensors: dict[str, torch.Tensor], source: str):
    params = dict(trainable_parameters(model))
    if set(params) != set(tensors):
        missing = sorted(set(params) - set(tensors))[:3]
        raise checkpointing.CheckpointError(f"{source}: trainable tensors do not match this run's model/adapter "
                                            f"config (missing e.g. {missing})")
    with torch.no_grad():
        for name, p in params.items():
            if p.shape != tensors[name].shape:
                raise checkpointing.CheckpointError(f"{source}: {name} has shape {tuple(tensors[name].shape)}, "
                                                    f"expected {tuple(p.shape)}")
            p.copy_(tensors[name])


@dataclass
class StepPlan:
    """How the dataset maps onto optimizer steps."""
    rows: int
    micro_batch: int
    data_parallel: int
    accumulation: int
    epochs: int
    max_steps: int = -1

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.data_parallel * self.accumulation

    @property
    def steps_per_epoch(self) -> int:
        return self.rows // self.global_batch

    @property
    def total_steps(self) -> int:
        total = self.steps_per_epoch * self.epochs
        return min(total, self.max_steps) if self.max_steps > 0 else total


def micro_batches(plan: StepPlan, step: int, seed: int, shuffle: bool, env: DistEnv) -> list[np.ndarray]:
    """Row indices of this rank's micro-batches for optimizer step `step`."""
    epoch, within = divmod(step, plan.steps_per_epoch)
    order = epoch_order(plan.rows, seed, epoch, shuffle)
    rows = order[within * plan.global_batch:(within + 1) * plan.global_batch]
    mine = rows.reshape(plan.accumulation, plan.data_parallel, plan.micro_batch)[:, env.rank]
    return list(mine)


def evaluate_loss(model, dataset, batch_size: int, pad_id: int, device, env: DistEnv, progress: bool = False,
                  forward=None) -> dict:
    """Mean token loss and perplexity (= exp(mean token loss)) over the whole eval set.

    `forward` gives hidden states (default `model.hidden_states`; the FSDP wrapper when sharded).
    Every rank runs the same number of batches (a rank out of rows repeats row 0, uncounted):
    under FSDP each forward is a collective."""
    from petformers.data.loader import collate

    was_training = model.training
    model.eval()
    packed = bool(getattr(dataset, "packing", False))
    loss_sum = torch.zeros((), dtype=torch.float64)
    tokens = torch.zeros((), dtype=torch.float64)
    indices = list(range(env.rank, len(dataset), env.world_size))
    forward = forward or model.hidden_states
    per_rank = math.ceil(len(dataset) / env.world_size)
    with torch.no_grad():
        for start in tqdm(range(0, per_rank, batch_size), desc="eval", disable=not progress, leave=False):
            kill_point("eval")
            chunk = indices[start:start + batch_size]
            batch = collate([dataset[i] for i in chunk or [0]], pad_id, packed, device)
            hidden = forward(batch["input_ids"], batch["position_ids"], batch["segment_ids"])
            if not chunk:
                continue
            loss_sum += chunked_cross_entropy_sum(model.lm_head, hidden, batch["targets"]).double().cpu()
            tokens += (batch["targets"] != -100).sum().double().cpu()
    loss_sum, tokens = all_reduce_sum(loss_sum, env), all_reduce_sum(tokens, env)
    model.train(was_training)
    mean = (loss_sum / tokens.clamp(min=1)).item()
    return {"eval_loss": mean, "eval_ppl": math.exp(min(mean, 700)), "eval_tokens": int(tokens.item())}


def train(cfg, model, tokenizer, train_ds, eval_ds, env: DistEnv, out: Path, metrics, pet_config=None) -> dict:
    """Run the optimizer steps; returns the run summary. `model` already carries its adapters."""
    from petformers.data.loader import collate

    device = env.device
    pad_id = tokenizer.pad_id if tokenizer is not None else (model.config.pad_token_id or 0)
    packed = bool(getattr(train_ds, "packing", False))
    plan = StepPlan(len(train_ds), cfg.runner.batch_size, env.world_size, cfg.runner.gradient_accumulation_steps,
                    cfg.runner.epochs, cfg.runner.max_steps)
    if plan.steps_per_epoch == 0:
        raise TrainingError(f"{cfg.data.train_dataset_dir}: {plan.rows} rows are fewer than one global batch "
                            f"({plan.global_batch} = batch_size {cfg.runner.batch_size} x data_parallel {env.world_size} "
                            f"x gradient_accumulation_steps {cfg.runner.gradient_accumulation_steps})")
    total = plan.total_steps if cfg.schedule.total_steps in (-1, None) else min(plan.total_steps, cfg.schedule.total_steps)
    schedule = build_schedule(cfg.schedule.type, cfg.schedule.learning_rate, total, cfg.schedule.warmup_ratio, cfg.schedule.warmup_steps,
                              cfg.schedule.lr_end, cfg.schedule.warmup_lr_init)
    named = trainable_parameters(model)
    if not named:
        raise TrainingError("no trainable parameters: check pet_config.target_modules")
    train_model, sharded = model, False
    if env.enabled:
        from petformers.distributed.parallel import is_sharded, wrap_model

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
            from petformers.distributed.parallel import plain_model
            from petformers.checkpoint.peft import save_peft_adapter

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
            from petformers.checkpoint import dcp

            if sharded or dcp.is_sharded(good):  # resharded to this world size (auto_trans_ckpt)
                rng, state = dcp.load_checkpoint(good, model, optimizer)
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
            from petformers.checkpoint import dcp

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
                       for idx in micro_batches(plan, step, cfg.seed, cfg.data.shuffle, env)]
            n_tokens = sum((b["targets"] != -100).sum() for b in batches).to(torch.float32)
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
                last_eval = evaluate_loss(model, eval_ds, cfg.runner.batch_size, pad_id, device, env, forward=hidden_fn)
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
        last_eval = evaluate_loss(model, eval_ds, cfg.runner.batch_size, pad_id, device, env, forward=hidden_fn)
        if env.is_main:
            metrics.write({"step": total, **last_eval})
    if sharded:  # rank 0 gets a plain model back for the final artefacts (adapter, merged)
        from petformers.distributed.parallel import unshard_model

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
