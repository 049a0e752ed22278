"""Fold LoRA into the base weights (W <- W + s·B·A), back out again, or for good (a plain model to export)."""

from __future__ import annotations

import torch.nn as nn

from petformers.pet.fused import unfuse_projections
from petformers.pet.lora import LoRALinear
from petformers.pet.module_to_save import ModuleToSave
from petformers.quant.linear import QuantLinear


def merge_lora(model: nn.Module) -> nn.Module:
    """Merge every LoRA layer in place: the forward then costs what the base model costs."""
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo merge_lora in place (the base comes back to within float32 rounding), e.g. to train on."""
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.unmerge()
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge, then replace each LoRALinear by a plain frozen nn.Linear and each modules_to_save copy by
    the trained module in the base dtype: the model has the base architecture again (to export), fused
    projections (pet/fused.py) given storage of their own again.
    Over a quantized base: merging dequantizes (see LoRALinear.merge), and every other quantized layer
    becomes an nn.Linear with its dequantized weight, so the result is an ordinary float model."""
    replacements = []
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            module.merge()
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                               device="meta")
            linear.weight, linear.bias = module.weight, module.bias
            replacements.append((name, linear.requires_grad_(False).train(module.training)))
        elif isinstance(module, ModuleToSave):
            replacements.append((name, module.unwrap()))
        elif isinstance(module, QuantLinear):
            replacements.append((name, module.to_linear()))
    for name, new in replacements:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    unfuse_projections(model)
    config = getattr(model, "config", None)
    if getattr(config, "tie_word_embeddings", False) and model.lm_head.weight is not model.tok_embeddings.weight:
        config.tie_word_embeddings = False  # lm_head was trained apart (modules_to_save): export it apart
    return model
