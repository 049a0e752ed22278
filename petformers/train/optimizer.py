"""The optimizer: AdamW with float32 states, under the names MindFormers gives it."""

from __future__ import annotations

import torch

OPTIMIZERS = ("FP32StateAdamWeightDecay", "AdamWeightDecay", "AdamW")


def check_optimizer(name: str) -> str:
    """The canonical spelling of an optimizer petformers offers (any case), else a ValueError."""
    match = next((c for c in OPTIMIZERS if c.lower() == str(name).lower()), None)
    if match is None:
        raise ValueError(f"{name!r} is not supported (petformers trains with AdamW and float32 states); "
                         f"use one of {', '.join(OPTIMIZERS)}")
    return match


def build_optimizer(section, learning_rate: float, params) -> torch.optim.Optimizer:
    """AdamW for the config's optimizer section (its `type` already checked by check_optimizer).

    Trainable parameters are float32 (adapters), so AdamW keeps float32 states, as MindFormers'
    FP32StateAdamWeightDecay does; decoupled weight decay as AdamWeightDecay."""
    return torch.optim.AdamW(params, lr=learning_rate, betas=(section.beta1, section.beta2), eps=section.eps,
                             weight_decay=section.weight_decay, foreach=True)
