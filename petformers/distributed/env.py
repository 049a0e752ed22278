"""The process group: torchrun's environment -> (rank, world size, device); gloo on CPU, nccl on CUDA."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


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
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    device = torch.device(f"cuda:{local}") if cuda else torch.device("cpu")
    return DistEnv(dist.get_rank(), dist.get_world_size(), local, device)


def all_reduce_sum(value: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.enabled:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def shutdown(env: DistEnv):
    if env.enabled and dist.is_initialized():
        dist.destroy_process_group()
