"""Sharded training checkpoints with torch.distributed.checkpoint (DCP), loadable at any world size.

Two layouts live under `output_dir/checkpoint/step_N/` (see petformers.checkpoint.training):
- full: `trainable.safetensors` + `optimizer.pt`, written by rank 0 alone (single process, DDP);
- sharded: `dcp/` (one `__R_0.distcp` file per rank + `.metadata`), written by every rank (FSDP).
Both hold the trainable tensors and the optimizer state under petformers parameter names, plus
`rng_state.pt`, `trainer_state.json` and, for LoRA, `adapter/` in PEFT format.

Either layout resumes at any world size and with either strategy (MindFormers' auto_trans_ckpt is
always on): DCP reads, for each rank, the pieces of the saved shards that this rank's layout needs,
and a full checkpoint is split into this run's shards by `set_state_dict`. A sharded checkpoint also
loads in a single process without a process group (`read_trainable`, `petformers ckpt consolidate`).
"""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from petformers.checkpoint import training as checkpointing
from petformers.distributed.env import DistEnv
from petformers.distributed.parallel import gather_full_state
from petformers.errors import CheckpointError
from petformers.faults import kill_point

DCP_DIR = "dcp"


def is_sharded_checkpoint(path: Path) -> bool:
    return (Path(path) / DCP_DIR).is_dir()


def _options(full: bool = False):
    # torch.distributed.checkpoint is heavy to import and only sharded (FSDP) checkpoints need it
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # Trainable tensors only: the frozen base comes from load_checkpoint, never from a training
    # checkpoint. Not strict, as the frozen keys are absent; _check_keys checks the trainable ones.
    return StateDictOptions(ignore_frozen_params=True, full_state_dict=full, strict=False)


def _no_dist() -> bool:
    return not (dist.is_available() and dist.is_initialized())


@contextlib.contextmanager
def _single_process_quiet():
    """DCP warns on every single-process save/load; in one process that is the intent, not a surprise."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is (disabled|unavailable)")
        yield


def save_sharded_checkpoint(root: Path, step: int, model: nn.Module, optimizer, trainer_state: dict, keep_max: int,
                            env: DistEnv, write_adapter=None, extra_json: dict | None = None) -> Path | None:
    """Every rank writes its shards of the trainable tensors and optimizer state; rank 0 the rest.

    Atomic as the full layout: everything goes to a hidden temp directory that rank 0 renames once
    every rank's shards and DCP's metadata are written. `write_adapter(path, tensors)` gets the whole
    trainable tensors on rank 0 (gathered from the shards; LoRA adapters are small). Returns the
    checkpoint directory on rank 0, None elsewhere.
    """
    # torch.distributed.checkpoint is heavy to import and only sharded (FSDP) checkpoints need it
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    tmp = [str(checkpointing.begin_checkpoint(root, step)) if env.is_main else None]
    if env.enabled:
        dist.broadcast_object_list(tmp, src=0)
    tmp = Path(tmp[0])
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_options())
    with _single_process_quiet():
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / DCP_DIR), no_dist=_no_dist())
    kill_point("checkpoint")
    whole = gather_full_state(model, trainable_only=True) if write_adapter is not None else {}
    if not env.is_main:
        return None
    state = trainer_state | {"layout": "sharded", "world_size": env.world_size}
    adapter = (lambda path: write_adapter(path, whole)) if write_adapter is not None else None
    return checkpointing.commit_checkpoint(root, tmp, step, state, keep_max, adapter, extra_json)


def restore_checkpoint(path: Path, model: nn.Module, optimizer) -> tuple[dict, dict]:
    """Load a checkpoint of either layout into `model` (plain or FSDP) and `optimizer`, at any world size.

    Every rank calls it. Returns (rng state, trainer state).
    """
    path = Path(path)
    try:
        rng = torch.load(path / "rng_state.pt", map_location="cpu", weights_only=True)
        state = json.loads((path / checkpointing.STATE_FILE).read_text(encoding="utf-8"))
    except Exception as e:
        raise CheckpointError(f"{path}: cannot resume from this checkpoint ({type(e).__name__}: {e})") from None
    if is_sharded_checkpoint(path):
        _load_sharded(path, model, optimizer)
    else:
        _load_full_into(path, model, optimizer)
    return rng, state


def _load_sharded(path: Path, model: nn.Module, optimizer):
    # torch.distributed.checkpoint is heavy to import and only sharded (FSDP) checkpoints need it
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    # This run's own state dicts are the template: DCP fills each rank's part of them from the files.
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_options())
    _check_keys(path, set(model_sd), set(_saved_model_keys(path)))
    target = {"model": model_sd, "optim": optim_sd}
    try:
        with _single_process_quiet():
            dcp.load(target, checkpoint_id=str(path / DCP_DIR), no_dist=_no_dist())
    except Exception as e:
        raise CheckpointError(f"{path / DCP_DIR}: cannot load this sharded checkpoint ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None
    set_state_dict(model, optimizer, model_state_dict=target["model"], optim_state_dict=target["optim"],
                   options=_options())


def _load_full_into(path: Path, model: nn.Module, optimizer):
    """A full checkpoint (rank 0's whole tensors) into this run's model, split into shards under FSDP."""
    # torch.distributed.checkpoint is heavy to import and only sharded (FSDP) checkpoints need it
    from torch.distributed.checkpoint.state_dict import set_state_dict

    saved = checkpointing.load_checkpoint(path)
    tensors, opt_state = saved.trainable, saved.optimizer
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    _check_keys(path, set(names), set(tensors))
    # The optimizer was built over the trainable parameters in named_parameters() order, so
    # its integer ids map onto these names (the form set_state_dict takes).
    optim_sd = {"state": {names[i]: s for i, s in opt_state["state"].items()},
                "param_groups": [g | {"params": [names[i] for i in g["params"]]} for g in opt_state["param_groups"]]}
    set_state_dict(model, optimizer, model_state_dict=tensors, optim_state_dict=optim_sd, options=_options(full=True))


def _check_keys(path: Path, expected: set[str], found: set[str]):
    if expected != found:
        missing = sorted(expected - found)[:2]
        extra = sorted(found - expected)[:2]
        raise CheckpointError(f"{path}: trainable tensors do not match this run's model/adapter config "
                              f"(missing e.g. {missing}, unexpected e.g. {extra})")


def _saved_model_keys(path: Path) -> dict:
    """{name: TensorStorageMetadata} of the trainable tensors in a sharded checkpoint."""
    # torch.distributed.checkpoint is heavy to import and only sharded (FSDP) checkpoints need it
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    try:
        metadata = FileSystemReader(str(path / DCP_DIR)).read_metadata()
    except Exception as e:
        raise CheckpointError(f"{path / DCP_DIR}: no readable DCP metadata ({type(e).__name__}); "
                              "is the checkpoint complete?") from None
    return {key.removeprefix("model."): meta for key, meta in metadata.state_dict_metadata.items()
            if key.startswith("model.") and isinstance(meta, TensorStorageMetadata)}


def read_trainable(path: Path) -> dict[str, torch.Tensor]:
    """The whole trainable tensors of a checkpoint of either layout, in this process (no process group)."""
    path = Path(path)
    if not is_sharded_checkpoint(path):
        return checkpointing.load_checkpoint(path).trainable
    # torch.distributed.checkpoint is heavy to import and only sharded (FSDP) checkpoints need it
    import torch.distributed.checkpoint as dcp

    tensors = {name: torch.empty(meta.size, dtype=meta.properties.dtype)
               for name, meta in _saved_model_keys(path).items()}
    with _single_process_quiet():
        dcp.load({"model": tensors}, checkpoint_id=str(path / DCP_DIR), no_dist=_no_dist())
    return tensors
