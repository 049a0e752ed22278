"""One matmul for a layer's q, k and v projections (and for w1 and w3), with LoRA still per projection.

Attention multiplies the same x by wq, wk and wv, and SwiGLU by w1 and w3. On a CPU one matmul of x with
the weights stacked, [wq; wk; wv], is faster than three narrow ones, and so is its backward (one input
gradient instead of three added up). `fuse_projections` stacks each group's frozen weights (and biases)
into one storage, once: every weight Parameter stays the same object, under the same name, with the same
values, and becomes a view of its rows of the block. Nothing is kept twice, and the state dict,
`target_modules` and the PEFT adapter are unchanged. It sets the layer's `project` (models/llama.py) to
`fused_project`: W x + b of the whole group in one matmul, each projection handed its slice, to which a
LoRALinear adds its own update s·B·A·dropout(x) (LoRALinear.add_update).

The fused matmul runs only while it is exact, checked at every call: the members are plain nn.Linear or
LoRALinear without DoRA, their weights frozen float tensors that are still the rows of one block, in order
(a `.to()`, a load that assigns, a merge over a quantized base give a weight storage of its own). Otherwise
the layer computes each projection on its own, as before. A merge over a float base writes into the block,
so a merged layer stays fused, its update then being in W.

Activation memory is unchanged: the matmul's output is one [tokens, q+k+v] tensor and autograd keeps
nothing of it; a LoRA layer's update makes a new tensor of its slice, and a slice no adapter replaces is
copied out, so that no output kept for backward (v by attention) is a view that keeps the whole block.

merge_and_unload gives every weight its own storage again (`unfuse_projections`): an exported model is
the base architecture, and no writer sees views (torch.save writes a view's whole storage; safetensors
takes tensors that share one only while their bytes do not overlap). Training checkpoints and adapters
hold trained tensors only, never the frozen base (fusing skips trainable weights).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from petformers.models.llama import Attention, FeedForward, separate
from petformers.pet.lora import LoRALinear

# The projections of one input, in block order, of each module that has a `project`.
GROUPS = ((Attention, ("wq", "wk", "wv")), (FeedForward, ("w1", "w3")))


def _members(module: nn.Module) -> list[nn.Module] | None:
    for kind, names in GROUPS:
        if isinstance(module, kind):
            return [getattr(module, name) for name in names]
    return None


def fuse_projections(model: nn.Module) -> int:
    """Stack each group's frozen weights into one block and make the group one matmul; the number of groups
    fused. A group that cannot be (a quantized or trainable weight, mixed dtypes or biases) is left as it is."""
    fused = 0
    for module in model.modules():
        members = _members(module)
        if members is None or not _fusable(members):
            continue
        with torch.no_grad():
            _stack([m.weight for m in members])
            if members[0].bias is not None:
                _stack([m.bias for m in members])
        module.project = fused_project
        fused += 1
    return fused


def fused_groups(model: nn.Module) -> int:
    """How many groups run as one matmul now (fused, and still exact: see the module docstring)."""
    count = 0
    for module in model.modules():
        members = _members(module)
        if members is not None and vars(module).get("project") is fused_project and _blocks(members):
            count += 1
    return count


def unfuse_projections(model: nn.Module):
    """Give every fused weight (and bias) storage of its own again, and each projection its own matmul."""
    for module in model.modules():
        members = _members(module)
        if members is None or "project" not in vars(module):
            continue
        del module.project  # back to the class's `separate`
        with torch.no_grad():
            for m in members:
                for p in (getattr(m, "weight", None), getattr(m, "bias", None)):
                    if isinstance(p, torch.Tensor) and p.untyped_storage().nbytes() > p.numel() * p.element_size():
                        p.data = p.data.clone()


def _fusable(members: list[nn.Module]) -> bool:
    """Plain linears or LoRA without DoRA, their weights (and biases: all or none) frozen float tensors of
    one dtype and device, over the same input width."""
    if not all(type(m) is nn.Linear or (type(m) is LoRALinear and not m.use_dora) for m in members):
        return False  # DoRA needs its base output alone; a quantized base, a modules_to_save copy
    biases = [m.bias for m in members]
    if any(b is None for b in biases) and any(b is not None for b in biases):
        return False
    tensors = [m.weight for m in members] + [b for b in biases if b is not None]
    first = tensors[0]
    return (all(isinstance(t, torch.Tensor) and t.is_floating_point() and not t.requires_grad
                and t.dtype == first.dtype and t.device == first.device for t in tensors)
            and len({m.weight.shape[1] for m in members}) == 1)


def _stack(params: list[nn.Parameter]):
    """The params' values into one new block [sum of rows, ...], each param becoming a view of its rows."""
    block = torch.cat([p.detach() for p in params])
    start = 0
    for p in params:
        p.data = block[start:start + p.shape[0]]
        start += p.shape[0]


def _block(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """The block `tensors` are the consecutive rows of, as one tensor (no copy); None when they are not."""
    first = tensors[0]
    storage = first.untyped_storage().data_ptr()
    end = first.data_ptr()
    for t in tensors:
        if (not t.is_contiguous() or t.shape[1:] != first.shape[1:] or t.data_ptr() != end
                or t.untyped_storage().data_ptr() != storage):
            return None
        end += t.numel() * t.element_size()
    rows = sum(t.shape[0] for t in tensors)
    return first.detach().as_strided((rows, *first.shape[1:]), first.stride(), first.storage_offset())


def _blocks(linears) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(the weights' block, the biases' block or None) when the linears can run as one matmul now."""
    if not _fusable(linears):
        return None
    weight = _block([m.weight for m in linears])
    if linears[0].bias is None:
        return None if weight is None else (weight, None)
    bias = _block([m.bias for m in linears])
    return None if weight is None or bias is None else (weight, bias)


def fused_project(x: torch.Tensor, linears) -> list[torch.Tensor]:
    """Each linear of x, LoRA update included, from one matmul over their block; `separate` when that is
    not exact (see the module docstring)."""
    blocks = _blocks(linears)
    if blocks is None:
        return separate(x, linears)
    parts = F.linear(x, *blocks).split([m.weight.shape[0] for m in linears], dim=-1)
    out = []
    for m, part in zip(linears, parts):
        y = m.add_update(x, part) if type(m) is LoRALinear else part
        out.append(y.contiguous() if y is part else y)  # a view would keep the whole output alive
    return out
