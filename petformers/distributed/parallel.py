"""How the model is spread over ranks under torchrun: `parallel_strategy: ddp` or `fsdp`.

Both wrap `HiddenStates(model)`, whose forward is `model.hidden_states(...)`: the loop applies
`model.lm_head` itself, in chunks, outside the wrapper (see petformers.train.loss).

- ddp: PyTorch's DistributedDataParallel. Every rank holds the whole model; only the trainable
  parameters (the adapters) are registered with DDP, so only their gradients are all-reduced. The
  frozen base is never broadcast nor all-reduced (each rank loads the same base from disk).
- fsdp: FSDP2 (`fully_shard`) per decoder layer, then the root (embeddings, final norm, lm_head).
  Every parameter, frozen or not, is sharded over the ranks and all-gathered for each layer's
  forward and backward. The frozen base keeps its compute dtype (bf16) and the adapters stay
  float32, in the same shard group: FSDP2 (torch >= 2.8) requires one dtype among the *trainable*
  parameters of a group only, and all-gathers a mixed group through a byte buffer. No
  MixedPrecisionPolicy: it would cast the adapters to bf16, where their updates round away.

Gradients are *summed* over ranks, not averaged: the loop already divides the loss by the number
of trained tokens of the whole global batch (all ranks), so a sum gives exactly the single-process
gradient of the same global batch.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from petformers.distributed.env import DistEnv
from petformers.errors import CheckpointError, ConfigError
from petformers.models.llama import build_model
from petformers.pet.inject import apply_lora


class HiddenStates(nn.Module):
    """model -> final hidden states [B, T, hidden]: the part of a training step the wrapper runs.

    When lm_head is trainable (modules_to_save), it is used outside this forward by the loss. A
    zero-weighted use of it here puts it in every rank's graph even when a micro-batch has no
    trained token (then the loss never touches lm_head): DDP and FSDP must reduce the same
    gradients on every rank, or the next collective fails or hangs.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, position_ids=None, segment_ids=None):
        hidden = self.model.hidden_states(input_ids, position_ids, segment_ids)
        # Looked up at every call: FSDP swaps the registered parameters between sharded and whole.
        for p in self.model.lm_head.parameters():
            if p.requires_grad:
                hidden = hidden + 0.0 * p.reshape(-1)[0].to(hidden.dtype)
        return hidden


STRATEGIES = ("ddp", "fsdp")


def check_strategy(name: str) -> str:
    """`name` in lower case when it is a strategy petformers offers, else a ValueError."""
    strategy = str(name).lower()
    if strategy not in STRATEGIES:
        raise ValueError(f"must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    return strategy


def wrap_model(model: nn.Module, strategy: str, env: DistEnv) -> nn.Module:
    """The module the loop calls for hidden states: DDP or FSDP2 over HiddenStates(model).

    FSDP replaces the model's parameters by sharded ones: build the optimizer after this call.
    """
    if check_strategy(strategy) == "fsdp":
        return _wrap_fsdp(model, env)
    return _wrap_ddp(model, env)


def is_sharded(train_model: nn.Module) -> bool:
    """True when the parameters are FSDP shards (checkpoints are then written with DCP, per rank)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(train_model, FSDPModule)


# ---- DDP -------------------------------------------------------------------------------------------

def _allreduce_sum_hook(state, bucket):
    """DDP communication hook: sum the bucket over ranks (DDP's default hook averages)."""
    work = dist.all_reduce(bucket.buffer(), async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def _wrap_ddp(model: nn.Module, env: DistEnv) -> nn.Module:
    # Identical adapters on every rank (their init is random) without broadcasting the frozen base,
    # which DDP's own start-up sync (init_sync) would send in full from rank 0.
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                dist.broadcast(p.data, src=0)
    ddp = DistributedDataParallel(
        HiddenStates(model),
        device_ids=[env.device.index] if env.device.type == "cuda" else None,
        init_sync=False,
        # Every rank builds the same buffers (a quantized base's blocks are buffers: petformers.quant),
        # so DDP must not broadcast them from rank 0 before every forward.
        broadcast_buffers=False,
        gradient_as_bucket_view=True,
        # False: every trainable parameter gets a gradient on every step (lm_head included, see
        # HiddenStates), and True would mark lm_head "unused" since it runs outside forward.
        find_unused_parameters=False,
    )
    ddp.register_comm_hook(None, _allreduce_sum_hook)
    return ddp


# ---- FSDP2 -----------------------------------------------------------------------------------------

def _wrap_fsdp(model: nn.Module, env: DistEnv) -> nn.Module:
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        raise ConfigError(f"parallel_strategy fsdp needs torch >= 2.8 (installed: {torch.__version__}); "
                          "use parallel_strategy ddp") from None
    if not _fsdp_allows_frozen_dtypes():
        raise ConfigError(f"parallel_strategy fsdp needs torch >= 2.8 (installed: {torch.__version__}) to shard a "
                          "bf16 base with float32 adapters; use parallel_strategy ddp")
    mesh = init_device_mesh(env.device.type, (env.world_size,))
    root = HiddenStates(model)
    sharded = []
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)  # reshard_after_forward: the layer is all-gathered again in backward
        sharded.append(layer)
    fully_shard(root, mesh=mesh)  # embeddings, final norm and lm_head; whole from forward to backward
    sharded.append(root)
    for module in sharded:
        module.set_gradient_divide_factor(1.0)  # sum over ranks (see the module docstring)
        module.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no PREMUL_SUM
    return root


def _fsdp_allows_frozen_dtypes() -> bool:
    """torch >= 2.8: a shard group may mix dtypes among frozen parameters (pytorch/pytorch#154103)."""
    version = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    return version >= (2, 8)


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> float:
    """clip_grad_norm_ that also works on FSDP's sharded gradients; returns the global norm before clipping."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    from torch.distributed.tensor import DTensor  # FSDP only (and public from torch 2.5)

    if isinstance(norm, DTensor):  # per-shard partial norms: combine over ranks
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return float(norm)


def gather_full_state(model: nn.Module, trainable_only: bool) -> dict[str, torch.Tensor]:
    """Whole tensors (petformers names) on rank 0's CPU, {} on other ranks. Every rank must call it."""
    # torch.distributed.checkpoint is heavy to import and only sharded (FSDP) runs need it
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    return get_model_state_dict(model, options=options)


def plain_model(config, pet_config, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> nn.Module:
    """A plain (unsharded) Llama of `config`, with `pet_config`'s adapters, holding `tensors`.

    `dtype` is the base's compute dtype. Tensors not given (the frozen base, for an adapter-only
    copy) stay on the meta device: such a copy costs no memory and is enough to write the adapter
    in PEFT format.
    """
    model = build_model(config, device="meta", dtype=dtype)
    if pet_config is not None:
        inject_log = logging.getLogger("petformers.pet.inject")
        level = inject_log.level
        inject_log.setLevel(logging.WARNING)  # the run already reported the adapter's size
        try:
            apply_lora(model, pet_config)
        finally:
            inject_log.setLevel(level)
    else:
        model.requires_grad_(True)
    _, unexpected = model.load_state_dict(tensors, strict=False, assign=True)  # keeps requires_grad
    if unexpected:
        raise CheckpointError(f"tensor {unexpected[0]!r} has no place in this model/adapter config")
    if config.tie_word_embeddings and isinstance(model.lm_head, nn.Linear):
        model.tie_weights()  # assign=True untied them
    return model


def unshard_model(model: nn.Module, pet_config, dtype: torch.dtype, env: DistEnv):
    """After FSDP training: make `model` a plain model again on rank 0 (CPU), for the final artefacts.

    Every rank must call it (it all-gathers). Rank 0 gets the whole state on CPU and its model's
    children (embeddings, layers, norm, lm_head) are replaced by plain modules holding it; the
    `model` object itself, never sharded, stays the same. Other ranks keep their shards.
    """
    full = gather_full_state(model, trainable_only=False)
    if not env.is_main:
        return
    plain = plain_model(model.config, pet_config, full, dtype)
    plain.train(model.training)
    for name, child in plain.named_children():
        setattr(model, name, child)
