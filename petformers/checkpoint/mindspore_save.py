"""Writing petformers models as MindFormers `.ckpt` files (the adapter alone, merged, or both).

Tensors are written under MindFormers' names and in MindSpore's own parameter order, through the
codec of mindspore_ckpt.py (written atomically), so that the files match MindSpore's byte for byte.
"""

from __future__ import annotations

from pathlib import Path

import torch

from petformers.checkpoint.mindspore_ckpt import write_ckpt
from petformers.checkpoint.mindspore_lora import merge_lora_tensors
from petformers.checkpoint.mindspore_names import is_lora, order_key, to_mindformers
from petformers.errors import AdapterError


def save_mindformers_ckpt(model_or_state, path, mode: str = "trainable", pet_config=None,
                          dtype: torch.dtype | None = None, crc: bool = False) -> Path:
    """Write a petformers model (or its state dict) as a `.ckpt` MindFormers loads; returns the path.

    mode:
    - "trainable": the adapter only, mindpet names (`...wq.mindpet_delta_lora_a`), as MindFormers
      saves trainable parameters; given a model in training, every parameter with requires_grad
      is written (modules_to_save under their base names).
    - "merged": base weights with the LoRA update folded in (see `merge_lora_tensors`),
      MindFormers names, no LoRA tensors: what MindFormers' transform_ckpt_lora produces, for a
      plain (non-PET) MindFormers Llama.
    - "full": base weights and mindpet LoRA tensors side by side (a PET network's full checkpoint).
    `dtype` casts floating tensors (default: as they are). Tensors are written in MindFormers' order.
    """
    if mode not in ("trainable", "merged", "full"):
        raise AdapterError(f"save_mindformers_ckpt: mode {mode!r} is not one of trainable, merged, full")
    model = model_or_state if isinstance(model_or_state, torch.nn.Module) else None
    if model is not None and mode != "trainable" and any(getattr(m, "merged", False) is True for m in model.modules()):
        raise AdapterError(f"save_mindformers_ckpt(mode={mode!r}): the model's LoRA is merged in place; "
                           "unmerge it first")
    state = model.state_dict(keep_vars=True) if model is not None else dict(model_or_state)
    # LoRALinear keeps W as `<module>.weight`; ModuleToSave wraps its copy as `<module>.module.*`.
    state = {n.replace(".base_layer.", ".").replace(".module.", "."): t for n, t in state.items()}
    if any(n.endswith("magnitude") for n in state):
        raise AdapterError("DoRA adapters have no mindpet equivalent: save mode='merged' from a merged model, "
                           "or train plain LoRA")
    lora = {n: t for n, t in state.items() if is_lora(n)}
    if mode == "trainable":
        # A model being trained says what is trainable; a frozen one (or a state dict) gives its LoRA tensors.
        chosen = {n: t for n, t in state.items() if getattr(t, "requires_grad", False)} or lora
        if not chosen:
            raise AdapterError("save_mindformers_ckpt: nothing trainable to save (no LoRA tensors)")
    elif mode == "full":
        chosen = state
    else:
        chosen = merge_lora_tensors({n: t for n, t in state.items() if not is_lora(n)}, lora, pet_config, model)
    out = {}
    for name in sorted(chosen, key=order_key):
        tensor = chosen[name].detach()
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        out[to_mindformers(name)] = tensor
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_ckpt(path, out, crc=crc)
