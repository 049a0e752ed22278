"""Helpers shared by the board tests: a tiny fine-tune config on short synthetic instruction records."""

from __future__ import annotations

import json
from pathlib import Path

import yaml


WORDS = ["satchel", "lantern", "harbour", "quartz", "meadow", "copper", "violet", "glacier"]


def write_tickets(path: Path, rows: int = 48) -> Path:
    """Chat records (OpenAI messages): a sentence about an order in, a ticket line out."""
    records = [{"messages": [
        {"role": "user", "content": f"Customer {i} ordered {i % 9 + 1} {WORDS[i % len(WORDS)]}s."},
        {"role": "assistant", "content": f"ORDER={1000 + i}|QTY={i % 9 + 1}|ITEM={WORDS[i % len(WORDS)]}"}]}
        for i in range(rows)]
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def write_run_config(path: Path, model_dir: Path, data_dir: Path, out: Path, *, max_steps: int,
                     lr: float = 5e-3, eval_every: int = 0, **extra) -> Path:
    """A LoRA fine-tune of the tiny model on 48 short ticket records, `max_steps` steps of 4 rows."""
    data = data_dir / "tickets.json"
    if not data.exists():
        write_tickets(data)
    cfg = {
        "seed": 3, "output_dir": str(out), "load_checkpoint": str(model_dir), "run_mode": "finetune",
        "runner_config": {"epochs": 1000, "batch_size": 4}, "max_steps": max_steps,
        "optimizer": {"type": "AdamW", "learning_rate": lr},
        "lr_schedule": {"type": "ConstantWarmUpLR", "learning_rate": lr, "warmup_steps": 0},
        "train_dataset": {"data_loader": {"dataset_dir": str(data), "shuffle": True}},
        "callbacks": [{"type": "CheckpointMonitor", "save_checkpoint_steps": 10_000, "keep_checkpoint_max": 1}],
        "model": {"model_config": {"seq_length": 256, "compute_dtype": "float32",
                                   "pet_config": {"pet_type": "lora", "lora_rank": 4, "lora_alpha": 8,
                                                  "lora_dropout": 0.0, "target_modules": ".*wq|.*wv"}}},
        "template": "chat", "packing": False,
    }
    if eval_every:
        cfg.update(do_eval=True, eval_step_interval=eval_every)
        cfg["eval_dataset"] = {"data_loader": {"dataset_dir": str(data)}}
    cfg.update(extra)
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path
