"""Disk full while saving: the write fails (here RLIMIT_FSIZE with SIGXFSZ ignored, so a write past the
limit fails with EFBIG as a full disk fails with ENOSPC) -> one line naming the file, exit 2, no partial
checkpoint directory left, the previous checkpoint intact and resumable."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from petformers.cli.main import main
from petformers.checkpoint import training as checkpointing

LIMIT = 16 * 1024  # bytes per file: metrics and configs fit, the step's trainable tensors (~30 KiB) do not


def _limited():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, LIMIT))


def test_a_full_disk_while_saving_leaves_the_previous_checkpoint_resumable(tmp_path, tiny_model_dir, alpaca_demo):
    records = [r for r in json.loads(alpaca_demo.read_text(encoding="utf-8"))
               if len(r["instruction"]) + len(r["input"]) + len(r["output"]) < 200][:12]
    data = tmp_path / "train.json"
    data.write_text(json.dumps(records))
    cfg = {"seed": 2, "load_checkpoint": str(tiny_model_dir), "run_mode": "finetune", "max_steps": 4,
           "runner_config": {"epochs": 4, "batch_size": 2, "gradient_accumulation_steps": 1},
           "optimizer": {"type": "AdamW", "learning_rate": 5e-3},
           "lr_schedule": {"type": "ConstantWarmUpLR", "learning_rate": 5e-3, "warmup_steps": 0},
           "train_dataset": {"data_loader": {"dataset_dir": str(data), "shuffle": True}},
           "callbacks": [{"type": "CheckpointMonitor", "save_checkpoint_steps": 2, "keep_checkpoint_max": 3}],
           "model": {"model_config": {"seq_length": 128, "compute_dtype": "float32", "pet_config": {
               "pet_type": "lora", "lora_rank": 4, "lora_alpha": 8, "target_modules": "all-linear"}}},
           "template": "chat"}
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(cfg))
    full, out = tmp_path / "full", tmp_path / "out"
    assert main(["run", "--config", str(config), "--output_dir", str(full)]) == 0
    assert (full / "checkpoint" / "step_00000002" / "trainable.safetensors").stat().st_size > LIMIT
    # The step-2 checkpoint of a run that stopped there, then a resumed run on a "full disk".
    assert main(["run", "--config", str(config), "--output_dir", str(out), "max_steps=2"]) == 0
    step2 = out / "checkpoint" / "step_00000002"
    before = {p.relative_to(step2): p.read_bytes() for p in step2.rglob("*") if p.is_file()}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "petformers", "run", "--config", str(config), "--output_dir",
                           str(out), "--resume_training", "True"], env=env, capture_output=True, text=True,
                          preexec_fn=_limited, timeout=300)
    err = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert err[-1].startswith("petformers: error: ") and "step 4 checkpoint" in err[-1] and "File too large" in err[-1]
    assert str(out / "checkpoint") in err[-1] and "step_00000002" in err[-1]
    assert sorted(p.name for p in (out / "checkpoint").iterdir()) == ["step_00000002"]  # no partial directory
    assert {p.relative_to(step2): p.read_bytes() for p in step2.rglob("*") if p.is_file()} == before
    assert checkpointing.damage(step2) is None
    # Space freed: the run resumes from step 2 and ends where the run that never hit a full disk ended.
    assert main(["run", "--config", str(config), "--output_dir", str(out), "--resume_training", "True"]) == 0
    assert json.loads((out / "run_summary.json").read_text())["resumed_from"] == 2
    a = load_file(str(full / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
