"""How the dataset maps onto optimizer steps: the plan both the run and the dry run use.

One optimizer step consumes a global batch of `batch_size x data_parallel x gradient_accumulation_steps`
rows. The data order is a pure function of (seed, epoch): resuming at step k replays nothing and
skips nothing, whatever the world size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def epoch_order(num_rows: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    if not shuffle:
        return np.arange(num_rows)
    return np.random.default_rng([seed, epoch]).permutation(num_rows)


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

    def schedule_steps(self, schedule_total: int) -> int:
        """The steps the run makes: total_steps, capped by lr_schedule.total_steps when that is set."""
        return self.total_steps if schedule_total in (-1, None) else min(self.total_steps, schedule_total)


def step_plan(runner, rows: int, world_size: int) -> StepPlan:
    """The plan of the config's runner section over `rows` rows and `world_size` data-parallel ranks."""
    return StepPlan(rows, runner.batch_size, world_size, runner.gradient_accumulation_steps, runner.epochs,
                    runner.max_steps)


def micro_batches(plan: StepPlan, step: int, seed: int, shuffle: bool, rank: int) -> list[np.ndarray]:
    """Row indices of this rank's micro-batches for optimizer step `step`."""
    epoch, within = divmod(step, plan.steps_per_epoch)
    order = epoch_order(plan.rows, seed, epoch, shuffle)
    rows = order[within * plan.global_batch:(within + 1) * plan.global_batch]
    mine = rows.reshape(plan.accumulation, plan.data_parallel, plan.micro_batch)[:, rank]
    return list(mine)
