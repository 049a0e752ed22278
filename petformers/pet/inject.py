"""Put LoRA into a model in place, freeze the rest, and move the adapter's tensors in and out.

The model file knows nothing of LoRA: matched nn.Linear modules are replaced by `LoRALinear`
(which takes over the same weight parameter, so base names are unchanged) and `modules_to_save`
by a trainable `ModuleToSave`. Works on a model built on the meta device: the adapter is then on
meta too, and sizes can be reported without allocating anything.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

from petformers.errors import AdapterError, CheckpointError
from petformers.pet.config import PetConfig
from petformers.pet.lora import LoRALinear
from petformers.pet.matching import find_targets, matches, pattern_value
from petformers.pet.module_to_save import ModuleToSave

log = logging.getLogger(__name__)


def apply_lora(model: nn.Module, pet_config: PetConfig) -> str:
    """Inject LoRA per `pet_config`, freeze everything but the adapter; returns (and logs) the size report."""
    if any(isinstance(m, (LoRALinear, ModuleToSave)) for m in model.modules()):
        raise AdapterError("the model already has LoRA layers; apply_lora once per model")
    c = pet_config
    targets = find_targets(model, c.target_modules, c.exclude_modules, c.modules_to_save)
    for name in targets:
        linear = model.get_submodule(name)
        rank = pattern_value(c.rank_pattern, name, c.lora_rank)
        alpha = pattern_value(c.alpha_pattern, name, c.lora_alpha)
        lora = LoRALinear.from_linear(linear, rank, alpha, dropout=c.lora_dropout,
                                      use_rslora=c.use_rslora, use_dora=c.use_dora)
        lora.reset_lora_parameters(c.init_lora_weights)
        _replace(model, name, lora)
    if c.modules_to_save:
        saved = [n for n, _ in model.named_modules() if n and matches(c.modules_to_save, n)]
        if not saved:
            raise AdapterError(f"modules_to_save {c.modules_to_save!r} matches no module of this model")
        for name in saved:
            _replace(model, name, ModuleToSave(model.get_submodule(name)))
    model.requires_grad_(False)
    for p in adapter_parameters(model).values():
        p.requires_grad_(True)
    trainable, total = count_parameters(model)
    report = f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"
    log.info(report)
    return report


def _replace(model: nn.Module, name: str, module: nn.Module):
    module.train(model.get_submodule(name).training)  # an eval model stays in eval mode (no dropout)
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The adapter's parameters by petformers name: LoRA A, B, DoRA magnitudes and modules_to_save copies."""
    out = {}
    for mod_name, module in model.named_modules():
        prefix = mod_name + "." if mod_name else ""
        if isinstance(module, LoRALinear):
            for name, p in module.named_parameters():
                if name not in ("weight", "bias"):
                    out[prefix + name] = p
        elif isinstance(module, ModuleToSave):
            for name, p in module.named_parameters():
                if p.is_floating_point():
                    out[prefix + name] = p
    return out


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared (tied) parameters count once; meta tensors count too."""
    params = list(model.parameters())  # deduplicated
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def trainable_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    """What the optimizer updates: the adapter, or the whole model in full training."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def trainable_state(model) -> dict[str, torch.Tensor]:
    """The trained tensors a training checkpoint saves (detached)."""
    return {n: p.detach() for n, p in trainable_parameters(model)}


def load_trainable_state(model, tensors: dict[str, torch.Tensor], source: str):
    """Copy a training checkpoint's trained tensors back; CheckpointError when they do not fit this run."""
    params = dict(trainable_parameters(model))
    if set(params) != set(tensors):
        missing = sorted(set(params) - set(tensors))[:3]
        raise CheckpointError(f"{source}: trainable tensors do not match this run's model/adapter "
                                            f"config (missing e.g. {missing})")
    with torch.no_grad():
        for name, p in params.items():
            if p.shape != tensors[name].shape:
                raise CheckpointError(f"{source}: {name} has shape {tuple(tensors[name].shape)}, "
                                                    f"expected {tuple(p.shape)}")
            p.copy_(tensors[name])


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors (petformers names, e.g. 'layers.0.attention.wq.lora_a.weight'), detached."""
    return {name: p.detach() for name, p in adapter_parameters(model).items()}


def load_lora_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str = "adapter"):
    """Copy adapter tensors into a model that already has LoRA (same names as lora_state_dict).

    Every adapter tensor must be present with the model's shape: AdapterError names the tensor,
    the expected and the found shape. Tensors on the meta device are replaced (assigned) instead.
    """
    expected = adapter_parameters(model)
    if not expected:
        raise AdapterError(f"{source}: the model has no LoRA layers; call apply_lora first")
    unexpected = sorted(set(state_dict) - set(expected))
    if unexpected:
        raise AdapterError(f"{source}: tensor {unexpected[0]!r} has no place in this model "
                           f"(adapted tensors look like {next(iter(expected))!r})")
    missing = sorted(set(expected) - set(state_dict))
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise AdapterError(f"{source}: missing tensor {missing[0]!r}{more}")
    for name, p in expected.items():
        t = state_dict[name]
        if tuple(t.shape) != tuple(p.shape):
            raise AdapterError(f"{source}: tensor {name!r} has shape {tuple(t.shape)}, "
                               f"the model expects {tuple(p.shape)}")
    with torch.no_grad():
        for name, p in expected.items():
            t = state_dict[name]
            if p.device.type == "meta":
                module_name, _, attr = name.rpartition(".")
                setattr(model.get_submodule(module_name), attr,
                        nn.Parameter(t.to(p.dtype).clone(), requires_grad=p.requires_grad))
            else:
                p.copy_(t)
