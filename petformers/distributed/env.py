"""The process group: torchrun's environment -> (rank, world size, device); gloo on CPU, nccl on CUDA.

Collectives time out after PETFORMERS_DIST_TIMEOUT seconds (default 600) instead of torch's 30
minutes, so that a rank waiting for a vanished peer fails and torchrun ends the job. Ranks other
than 0 log warnings and errors only: rank 0 alone prints progress.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from petformers.distributed import leave
from petformers.errors import TrainingError


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(use_parallel: bool) -> DistEnv:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if not use_parallel or world == 1:
        return DistEnv(device=torch.device("cuda" if cuda else "cpu"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        timeout = timedelta(seconds=dist_timeout_s())
        dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=timeout)
    leave.joined_a_process_group = True
    device = torch.device(f"cuda:{local}") if cuda else torch.device("cpu")
    env = DistEnv(dist.get_rank(), dist.get_world_size(), local, device)
    if not env.is_main:
        logging.getLogger("petformers").setLevel(logging.WARNING)
    return env


def fail_if_asked(step: int, env: DistEnv):
    """Test hook: PETFORMERS_FAIL_AT_STEP=N makes rank PETFORMERS_FAIL_RANK (default 1) raise at step N
    (1-based), to check that one failing rank ends the whole job quickly with its message."""
    at = os.environ.get("PETFORMERS_FAIL_AT_STEP")
    if at and step + 1 == int(at) and env.rank == int(os.environ.get("PETFORMERS_FAIL_RANK", "1")):
        raise RuntimeError(f"PETFORMERS_FAIL_AT_STEP: rank {env.rank} fails at step {step + 1} as asked")


def dist_timeout_s() -> float:
    return float(os.environ.get("PETFORMERS_DIST_TIMEOUT", "600"))


def timeout_error(error: RuntimeError, env: DistEnv, checkpoints: list) -> Exception:
    """A collective that timed out (a peer hung or vanished) as one clear line; other errors unchanged."""
    if not env.enabled or "timed out" not in str(error).lower():
        return error

    return TrainingError(f"rank {env.rank}: no answer from the other ranks within PETFORMERS_DIST_TIMEOUT="
                         f"{dist_timeout_s():g} s (a rank hung or died); last good checkpoint: "
                         f"{checkpoints[-1] if checkpoints else 'none'}")


def all_reduce_sum(value: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.enabled:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def shutdown(env: DistEnv):
    if env.enabled and dist.is_initialized():
        dist.destroy_process_group()

