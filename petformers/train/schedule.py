"""Learning-rate schedules, as MindFormers defines them (CosineWithWarmUpLR, LinearWithWarmUpLR, ConstantWarmUpLR).

`lr_at(step)` is a pure function of the optimizer step (0-based), so that a resumed run and an
uninterrupted run compute the same rate, and tests can check every step against the formula:
- warmup (step < W): warmup_lr_init + (lr - warmup_lr_init) * step / W
- cosine: lr_end + (lr - lr_end) * 0.5 * (1 + cos(pi * p)), p = (step - W) / (T - W)
- linear: lr_end + (lr - lr_end) * (1 - p)
- constant: lr
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from petformers.errors import ConfigError

ALIASES = {
    "cosinewithwarmuplr": "cosine", "cosine": "cosine", "cosinewithrestartslr": "cosine",
    "linearwithwarmuplr": "linear", "linear": "linear", "polynomialwithwarmuplr": "linear",
    "constantwarmuplr": "constant", "constant": "constant", "constantwithwarmuplr": "constant",
}


@dataclass
class Schedule:
    kind: str  # cosine | linear | constant
    learning_rate: float
    total_steps: int
    warmup_steps: int = 0
    lr_end: float = 0.0
    warmup_lr_init: float = 0.0

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.warmup_lr_init + (self.learning_rate - self.warmup_lr_init) * step / self.warmup_steps
        if self.kind == "constant":
            return self.learning_rate
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        if self.kind == "cosine":
            return self.lr_end + (self.learning_rate - self.lr_end) * 0.5 * (1 + math.cos(math.pi * progress))
        return self.lr_end + (self.learning_rate - self.lr_end) * (1 - progress)


def check_schedule(kind: str) -> str:
    """`kind` itself when it names a schedule petformers offers (any case, `_` ignored), else a ValueError."""
    if str(kind).lower().replace("_", "") not in ALIASES:
        raise ValueError(f"unknown schedule {kind!r}; use CosineWithWarmUpLR, LinearWithWarmUpLR or ConstantWarmUpLR "
                         "(or cosine, linear, constant)")
    return kind


def build_schedule(kind: str, learning_rate: float, total_steps: int, warmup_ratio: float | None = None,
                   warmup_steps: int | None = None, lr_end: float = 0.0, warmup_lr_init: float = 0.0) -> Schedule:
    try:
        name = ALIASES[check_schedule(kind).lower().replace("_", "")]
    except ValueError as e:
        raise ConfigError(f"lr_schedule.type: {e}") from None
    if warmup_steps is None:
        warmup_steps = int(round((warmup_ratio or 0.0) * total_steps))
    return Schedule(name, float(learning_rate), int(total_steps), int(warmup_steps), float(lr_end),
                    float(warmup_lr_init))
