"""A checkpoint damaged after it was written (truncated, a flipped bit, a file missing) is never loaded:
resume falls back to the previous intact checkpoint with one warning line, and the run still ends with
the adapter of an uninterrupted run. Every checkpoint carries manifest.json (size + sha256 of each file),
written last."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from petformers.cli.main import main
from petformers.checkpoint import training as checkpointing

STEPS = 3


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir, alpaca_demo):
    tmp = tmp_path_factory.mktemp("integrity")
    records = [r for r in json.loads(alpaca_demo.read_text(encoding="utf-8"))
               if len(r["instruction"]) + len(r["input"]) + len(r["output"]) < 200][:12]
    data = tmp / "train.json"
    data.write_text(json.dumps(records))
    cfg = {"seed": 7, "load_checkpoint": str(tiny_model_dir), "run_mode": "finetune", "max_steps": STEPS,
           "runner_config": {"epochs": 4, "batch_size": 2, "gradient_accumulation_steps": 1},
           "optimizer": {"type": "AdamW", "learning_rate": 5e-3},
           "train_dataset": {"data_loader": {"dataset_dir": str(data), "shuffle": True}},
           "callbacks": [{"type": "CheckpointMonitor", "save_checkpoint_steps": 1, "keep_checkpoint_max": 5}],
           "model": {"model_config": {"seq_length": 128, "compute_dtype": "float32", "pet_config": {
               "pet_type": "lora", "lora_rank": 2, "lora_alpha": 4, "lora_dropout": 0.1,
               "target_modules": ".*wq|.*wv"}}},
           "template": "chat"}
    config = tmp / "run.yaml"
    config.write_text(yaml.safe_dump(cfg))
    full = tmp / "full"
    assert main(["run", "--config", str(config), "--output_dir", str(full)]) == 0
    return config, full


def _interrupted(full: Path, dest: Path) -> Path:
    """The run as if killed after its last checkpoint but before writing the adapter."""
    shutil.copytree(full, dest)
    shutil.rmtree(dest / "adapter")
    (dest / "run_summary.json").unlink()
    return dest


def _flip_a_bit(file: Path, offset: int):
    data = bytearray(file.read_bytes())
    data[offset % len(data)] ^= 0x10
    file.write_bytes(bytes(data))


def _truncate(file: Path, _offset: int):
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def test_every_checkpoint_has_a_manifest_of_every_file(setup):
    _, full = setup
    for step in checkpointing.list_checkpoints(full / "checkpoint"):
        files = json.loads((step / "manifest.json").read_text())["files"]
        on_disk = sorted(p.relative_to(step).as_posix() for p in step.rglob("*") if p.is_file())
        assert sorted([*files, "manifest.json"]) == sorted(on_disk)
        assert checkpointing.damage(step) is None


@pytest.mark.parametrize("name, hurt", [("trainable.safetensors", _truncate), ("optimizer.pt", _flip_a_bit),
                                        ("rng_state.pt", _flip_a_bit), ("adapter/adapter_model.safetensors",
                                                                        _flip_a_bit)])
def test_resume_skips_a_damaged_newest_checkpoint_with_one_warning(setup, tmp_path, capsys, name, hurt):
    config, full = setup
    out = _interrupted(full, tmp_path / "out")
    newest = out / "checkpoint" / f"step_{STEPS:08d}"
    hurt(newest / name, 1000)
    capsys.readouterr()
    assert main(["run", "--config", str(config), "--output_dir", str(out), "--resume_training", "True"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1, warnings
    assert f"step_{STEPS:08d} is damaged ({name}" in warnings[0] and f"step_{STEPS - 1:08d}" in warnings[0]
    assert json.loads((out / "run_summary.json").read_text())["resumed_from"] == STEPS - 1
    a = load_file(str(full / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_saved_before_manifests_is_used_with_one_warning(setup, tmp_path, capsys):
    # A step_N directory is renamed into place only after its manifest is written, so one without a
    # manifest was saved by an older petformers: its files load, so resume uses it and says so once.
    config, full = setup
    out = _interrupted(full, tmp_path / "out")
    for step in checkpointing.list_checkpoints(out / "checkpoint"):
        (step / "manifest.json").unlink()
    assert "no manifest.json" in checkpointing.damage(out / "checkpoint" / f"step_{STEPS:08d}")
    capsys.readouterr()
    assert main(["run", "--config", str(config), "--output_dir", str(out), "--resume_training", "True"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and f"step_{STEPS:08d} has no manifest.json" in warnings[0], warnings
    assert json.loads((out / "run_summary.json").read_text())["resumed_from"] == STEPS
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (full / "adapter" / "adapter_model.safetensors").read_bytes()


def test_a_checkpoint_without_a_manifest_whose_files_do_not_load_is_skipped(setup, tmp_path):
    _, full = setup
    out = _interrupted(full, tmp_path / "out")
    newest = out / "checkpoint" / f"step_{STEPS:08d}"
    (newest / "manifest.json").unlink()
    _truncate(newest / "optimizer.pt", 0)
    assert checkpointing.latest_good_checkpoint(out / "checkpoint", warn=False).name == f"step_{STEPS - 1:08d}"


def test_when_every_checkpoint_is_damaged_resume_refuses_in_one_line(setup, tmp_path, capsys):
    config, full = setup
    out = _interrupted(full, tmp_path / "out")
    for step in checkpointing.list_checkpoints(out / "checkpoint"):
        _flip_a_bit(step / "trainable.safetensors", 200)
    capsys.readouterr()
    assert main(["run", "--config", str(config), "--output_dir", str(out), "--resume_training", "True"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("petformers: error: ") and "no intact checkpoint" in err and "step_00000001" in err
    assert not (out / "adapter").exists()
