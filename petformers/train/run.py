"""`petformers run`: a resolved RunConfig -> dry run (train/dry_run.py), fine-tuning (train/finetune.py, the
recipe), evaluation or prediction (train/evaluate.py).

Outputs in output_dir: resolved_config.yaml, metrics.jsonl, loss.png, checkpoint/step_N/,
adapter/ (PEFT format), merged/ (when save_merged), run_summary.json, eval_results.json (run_mode eval).
Only rank 0 writes them.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from petformers import atomic
from petformers.distributed.env import DistEnv, init_distributed, shutdown
from petformers.errors import ConfigError, TrainingError
from petformers.monitor.state import RunState
from petformers.train.dry_run import dry_run
from petformers.train.evaluate import run_eval, run_predict
from petformers.train.finetune import finetune
from petformers.train.setup import seed_everything

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
        return finetune(cfg, env, out)
    if cfg.run_mode == "eval":
        return run_eval(cfg, env, out)
    return run_predict(cfg, env, out)  # run_mode was checked when the config was read


__all__ = ["run", "dry_run", "TrainingError"]
