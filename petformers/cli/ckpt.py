"""`petformers ckpt consolidate`: a training checkpoint (sharded or full) -> one PEFT adapter (+ a merged model).

    petformers ckpt consolidate --checkpoint DIR --output_dir OUT [--load_checkpoint BASE --merged]

DIR is a checkpoint (`output_dir/checkpoint/step_N`), or a run's output_dir / checkpoint directory
(its newest complete checkpoint is used). Runs in one process, no torchrun: the shards of an FSDP
checkpoint, written by any number of ranks, are read whole. Writes OUT/adapter
(adapter_config.json + adapter_model.safetensors, loadable by PEFT and `--adapter`), and with
`--merged` OUT/merged, a Hugging Face model with the adapter folded into BASE. A checkpoint of full
training (no pet_config) is written as the model itself, OUT/merged.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from petformers.checkpoint import training as checkpointing
from petformers.checkpoint.dcp import read_trainable
from petformers.checkpoint.hf import save_model_dir
from petformers.checkpoint.load import load_config, load_pretrained, load_tokenizer
from petformers.checkpoint.peft import merge_adapter, read_adapter_config, save_peft_adapter
from petformers.distributed.parallel import plain_model
from petformers.errors import CheckpointError
from petformers.models.config import LlamaConfig, parse_dtype
from petformers.pet.config import PetConfig

log = logging.getLogger("petformers")


def register(subparsers):
    parser = subparsers.add_parser("ckpt", help="training checkpoints: consolidate shards into an adapter",
                                   description="Work with training checkpoints (output_dir/checkpoint/step_N).")
    kinds = parser.add_subparsers(dest="ckpt_kind", metavar="ACTION", required=True)
    p = kinds.add_parser(
        "consolidate", help="turn a (sharded) training checkpoint into a PEFT adapter and optionally a merged model",
        description="Read a training checkpoint of any layout (FSDP shards from any number of ranks, or rank 0's "
                    "full tensors) and write OUT/adapter in PEFT format; with --load_checkpoint and --merged also "
                    "OUT/merged, the base model with the adapter merged in.")
    p.add_argument("--checkpoint", required=True,
                   help="a checkpoint directory (step_N), or a run's output_dir / checkpoint dir (newest is used)")
    p.add_argument("--output_dir", required=True, help="where to write adapter/ (and merged/)")
    p.add_argument("--load_checkpoint", help="the base model the run fine-tuned (needed for --merged)")
    p.add_argument("--merged", action="store_true", help="also write OUT/merged: the base with the adapter merged in")
    p.add_argument("--dtype", default="float32",
                   help="dtype of the merged weights: float32 (default), bfloat16 or float16")
    p.set_defaults(func=run_consolidate)


def find_checkpoint(path: Path) -> Path:
    """A complete checkpoint directory from a step dir, a checkpoint root or a run's output_dir."""
    if (path / checkpointing.STATE_FILE).exists():
        return path
    for root in (path / "checkpoint", path):
        found = checkpointing.latest_good_checkpoint(root)
        if found is not None:
            return found
    raise CheckpointError(f"{path}: no complete training checkpoint (a step_N directory with "
                          f"{checkpointing.STATE_FILE}) here or under {path / 'checkpoint'}")


def _read_configs(step: Path, base: str | None):
    """(LlamaConfig, PetConfig or None, base model name) as the training run saved them."""
    if (step / "model_config.json").exists():
        config = LlamaConfig(**json.loads((step / "model_config.json").read_text(encoding="utf-8")))
    elif base:
        config = load_config(base)[0]
    else:
        raise CheckpointError(f"{step}: no model_config.json; pass --load_checkpoint with the base model")
    base_name = base or ""
    adapter_cfg = step / "adapter" / "adapter_config.json"
    if adapter_cfg.exists():
        base_name = base_name or json.loads(adapter_cfg.read_text(encoding="utf-8")).get("base_model_name_or_path") or ""
    if (step / "pet_config.json").exists():
        pet = PetConfig.from_dict(json.loads((step / "pet_config.json").read_text(encoding="utf-8")),
                                  key_path=str(step / "pet_config.json"))
    elif adapter_cfg.exists():
        pet = read_adapter_config(step / "adapter")
    else:
        pet = None  # full training: the trainable tensors are the whole model
    return config, pet, base_name


def run_consolidate(args: argparse.Namespace) -> int:
    dtype = parse_dtype(args.dtype, key="--dtype")
    if args.merged and not args.load_checkpoint:
        raise CheckpointError("--merged needs --load_checkpoint (the base model the adapter was trained on)")
    step = find_checkpoint(Path(args.checkpoint))
    config, pet, base_name = _read_configs(step, args.load_checkpoint)
    tensors = read_trainable(step)
    out = Path(args.output_dir)
    if pet is None:
        tokenizer = None
        if args.load_checkpoint:
            tokenizer = load_tokenizer(args.load_checkpoint)
        save_model_dir(tensors, config, out / "merged", tokenizer=tokenizer, dtype=dtype)
        log.info("petformers: %s (full training) -> %s", step, out / "merged")
        return 0

    adapter_only = plain_model(config, pet, tensors, parse_dtype(config.compute_dtype))  # base on meta: no memory
    save_peft_adapter(adapter_only, pet, out / "adapter", base_name)
    log.info("petformers: %s -> %s", step, out / "adapter")
    if args.merged:
        model, tokenizer = load_pretrained(args.load_checkpoint, dtype=dtype)
        model, _ = merge_adapter(model, out / "adapter")
        save_model_dir(model.state_dict(), model.config, out / "merged", tokenizer=tokenizer, dtype=dtype)
        log.info("petformers: merged into %s -> %s", args.load_checkpoint, out / "merged")
    return 0
