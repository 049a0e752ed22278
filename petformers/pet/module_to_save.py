"""`ModuleToSave`: a module trained in full beside LoRA (PEFT's `modules_to_save`, e.g. lm_head)."""

from __future__ import annotations

import torch
import torch.nn as nn

from petformers.pet.lora import ADAPTER_DTYPE


class ModuleToSave(nn.Module):
    """A trainable float32 copy of `module`, whose parameters are saved with the adapter.

    The copy replaces the original (which is not kept: lm_head is often the largest matrix of a
    small model). It owns fresh parameters, so an lm_head tied to the embeddings is untied, as in
    PEFT. Floating inputs are cast to float32 and the output back to the base dtype, so the module
    trains in float32 inside a bf16 model.
    """

    def __init__(self, module: nn.Module):
        super().__init__()
        floating = [p for p in module.parameters() if p.is_floating_point()]
        self.base_dtype = floating[0].dtype if floating else ADAPTER_DTYPE
        self.module = module
        for sub in module.modules():
            for name, p in list(sub.named_parameters(recurse=False)):
                copy = p.detach().to(ADAPTER_DTYPE) if p.is_floating_point() else p.detach()
                setattr(sub, name, nn.Parameter(copy.clone(), requires_grad=p.is_floating_point()))

    def forward(self, *args, **kwargs):
        args = [a.to(ADAPTER_DTYPE) if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
        out = self.module(*args, **kwargs)
        return out.to(self.base_dtype) if torch.is_tensor(out) and out.is_floating_point() else out

    def unwrap(self) -> nn.Module:
        """The trained module in the base dtype, frozen, for a merged model."""
        return self.module.to(self.base_dtype).requires_grad_(False)
