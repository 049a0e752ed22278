"""`petformers run` end to end on a tiny real model: loss falls, accumulation = big batch, resume after
SIGKILL is bitwise identical, SIGTERM checkpoints, NaN stops cleanly, MindFormers YAML runs, dry run sizes."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from petformers.cli.main import main
from petformers.checkpoint import training as checkpointing
from petformers.train.schedule import build_schedule

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def alpaca_small(tmp_path_factory, alpaca_demo) -> Path:
    records = json.loads(alpaca_demo.read_text(encoding="utf-8"))
    short = [r for r in records if len(r["instruction"]) + len(r["input"]) + len(r["output"]) < 300][:48]
    path = tmp_path_factory.mktemp("data") / "train.json"
    path.write_text(json.dumps(short, ensure_ascii=False), encoding="utf-8")
    return path


def write_config(path: Path, model_dir: Path, data: Path, out: Path, **extra) -> Path:
    cfg = {
        "seed": 3, "output_dir": str(out), "load_checkpoint": str(model_dir), "run_mode": "finetune",
        "runner_config": {"epochs": 1, "batch_size": 4, "gradient_accumulation_steps": 1},
        "optimizer": {"type": "FP32StateAdamWeightDecay", "learning_rate": 5e-3, "weight_decay": 0.01},
        "lr_schedule": {"type": "ConstantWarmUpLR", "learning_rate": 5e-3, "warmup_steps": 0, "total_steps": -1},
        "train_dataset": {"data_loader": {"type": "MindDataset", "dataset_dir": str(data), "shuffle": True}},
        "callbacks": [{"type": "CheckpointMonitor", "save_checkpoint_steps": 2, "keep_checkpoint_max": 3}],
        "model": {"model_config": {"seq_length": 192, "compute_dtype": "float32",
                                   "pet_config": {"pet_type": "lora", "lora_rank": 4, "lora_alpha": 8,
                                                  "lora_dropout": 0.0, "target_modules": ".*wq|.*wk|.*wv|.*wo"}}},
        "template": "chat", "packing": False,
    }
    for key, value in extra.items():
        node = cfg
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def adapter_tensors(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_loss_falls_and_outputs_written(tmp_path, tiny_model_dir, alpaca_small):
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", tiny_model_dir, alpaca_small, out,
                       **{"runner_config.epochs": 4, "do_eval": True, "eval_step_interval": 6, "packing": True,
                          "eval_dataset.data_loader.dataset_dir": str(alpaca_small), "save_merged": True,
                          "model.model_config.pet_config.target_modules": "all-linear",
                          "model.model_config.pet_config.modules_to_save": ["lm_head"],
                          "optimizer.learning_rate": 1e-2, "lr_schedule.learning_rate": 1e-2})
    assert main(["run", "--config", str(cfg)]) == 0
    losses = [m["loss"] for m in metrics(out) if "loss" in m]
    assert sum(losses[-4:]) / 4 < losses[0] - 0.5, losses
    evals = [m for m in metrics(out) if "eval_loss" in m]
    assert evals and all(math.isclose(e["eval_ppl"], math.exp(e["eval_loss"]), rel_tol=1e-9) for e in evals)
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "merged/config.json",
                 "metrics.jsonl", "loss.png", "run_summary.json", "resolved_config.yaml"):
        assert (out / name).exists(), name
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["steps"] == len(losses) and summary["final_loss"] == losses[-1]
    assert len(checkpointing.list_checkpoints(out / "checkpoint")) <= 3


def test_accumulated_micro_batches_equal_one_big_batch(tmp_path, tiny_model_dir, alpaca_small):
    results = []
    for name, batch, accum in (("big", 8, 1), ("accum", 2, 4)):
        out = tmp_path / name
        cfg = write_config(tmp_path / f"{name}.yaml", tiny_model_dir, alpaca_small, out,
                           **{"runner_config.batch_size": batch, "runner_config.gradient_accumulation_steps": accum,
                              "max_steps": 1})
        assert main(["run", "--config", str(cfg)]) == 0
        results.append(adapter_tensors(out))
    big, accum = results
    assert big.keys() == accum.keys()
    assert any(v.abs().max() > 0 for k, v in big.items() if "lora_B" in k)  # the step did something
    for key in big:
        torch.testing.assert_close(accum[key], big[key], atol=1e-6, rtol=0)


def _run_cli(cfg: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "petformers", "run", "--config", str(cfg), *extra], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_checkpoint(root: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if checkpointing.list_checkpoints(root):
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended before its first checkpoint: {proc.stderr.read()[-2000:]}")
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared")


def test_sigkill_mid_epoch_then_resume_is_bitwise_identical(tmp_path, tiny_model_dir, alpaca_small):
    extra = {"runner_config.epochs": 2, "model.model_config.pet_config.lora_dropout": 0.1}  # dropout: RNG restored
    full = tmp_path / "full"
    assert main(["run", "--config", str(write_config(tmp_path / "full.yaml", tiny_model_dir, alpaca_small, full,
                                                     **extra))]) == 0
    killed = tmp_path / "killed"
    cfg = write_config(tmp_path / "killed.yaml", tiny_model_dir, alpaca_small, killed, **extra)
    proc = _run_cli(cfg)
    _wait_for_checkpoint(killed / "checkpoint", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = checkpointing.list_checkpoints(killed / "checkpoint")
    assert done and not (killed / "adapter").exists()
    # A half-written checkpoint (temp dir, or a step dir without trainer_state.json) is never picked.
    (killed / "checkpoint" / ".tmp_step_00000099_1").mkdir()
    (killed / "checkpoint" / "step_00000098").mkdir()
    assert checkpointing.list_checkpoints(killed / "checkpoint") == done
    assert main(["run", "--config", str(cfg), "--resume_training", "True"]) == 0
    newest = int(done[-1].name.split("_")[1])
    assert newest > 0 and json.loads((killed / "run_summary.json").read_text())["resumed_from"] == newest
    # metrics.jsonl is appended to: a restart from step 0 would have logged step 1 a second time.
    assert [m["step"] for m in metrics(killed) if "loss" in m].count(1) == 1
    a, b = adapter_tensors(full), adapter_tensors(killed)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    resumed = [m["step"] for m in metrics(killed) if "loss" in m]
    assert resumed[-1] == [m["step"] for m in metrics(full) if "loss" in m][-1]


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path, tiny_model_dir, alpaca_small):
    out = tmp_path / "term"
    cfg = write_config(tmp_path / "t.yaml", tiny_model_dir, alpaca_small, out,
                       **{"runner_config.epochs": 20, "callbacks": [{"type": "CheckpointMonitor",
                                                                     "save_checkpoint_steps": 1000}]})
    proc = _run_cli(cfg)
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text().strip():
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-2000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    saved = checkpointing.list_checkpoints(out / "checkpoint")
    assert saved and "SIGTERM" in json.loads((saved[-1] / "trainer_state.json").read_text())["reason"]


def test_nan_loss_stops_with_a_clear_error(tmp_path, tiny_model_dir, alpaca_small, capsys):
    from safetensors.torch import load_file as load, save_file

    bad = tmp_path / "bad_model"
    bad.mkdir()
    for f in tiny_model_dir.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    weights = load(str(bad / "model.safetensors"))
    weights["model.norm.weight"][0] = float("nan")
    save_file(weights, str(bad / "model.safetensors"), metadata={"format": "pt"})
    cfg = write_config(tmp_path / "n.yaml", bad, alpaca_small, tmp_path / "nan")
    assert main(["run", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "loss is nan at step 1" in err and "last good checkpoint" in err


def test_mindformers_yaml_with_every_section_runs_on_a_tiny_model(tmp_path, tiny_model_dir, alpaca_small, capsys):
    seed = yaml.safe_load((REPO / "configs/llama2/lora_llama2_7b.yaml").read_text())
    out = tmp_path / "mf"
    cfg = tmp_path / "mf.yaml"
    cfg.write_text(yaml.safe_dump(seed), encoding="utf-8")
    code = main(["run", "--config", str(cfg), "--load_checkpoint", str(tiny_model_dir), "--train_dataset_dir",
                 str(alpaca_small), "--output_dir", str(out), "--use_parallel", "False",
                 "runner_config.epochs=1", "runner_config.batch_size=8", "model.model_config.seq_length=128",
                 "model.model_config.compute_dtype=float32", "template=chat"])
    assert code == 0
    err = capsys.readouterr().err
    assert "ignored" in err and "context" in err
    assert (out / "adapter" / "adapter_model.safetensors").exists()


def test_dry_run_on_the_seed_config_reports_16777216_trainable(capsys):
    assert main(["run", "--config", str(REPO / "configs/llama2/lora_llama2_7b.yaml"), "--dry_run"]) == 0
    out = capsys.readouterr().out
    assert "trainable parameters: 16,777,216" in out
    assert "global batch: 16" in out  # batch_size 2 x data_parallel 8 x accumulation 1


def test_schedules_match_their_formulas_at_every_step():
    total, warm, lr, end = 50, 5, 1e-3, 1e-5
    cos = build_schedule("CosineWithWarmUpLR", lr, total, warmup_steps=warm, lr_end=end)
    lin = build_schedule("LinearWithWarmUpLR", lr, total, warmup_ratio=0.1, lr_end=end)
    const = build_schedule("ConstantWarmUpLR", lr, total, warmup_steps=warm)
    for step in range(total):
        if step < warm:
            expected = lr * step / warm
            for s in (cos, lin, const):
                assert math.isclose(s.lr_at(step), expected, rel_tol=1e-12, abs_tol=1e-15)
            continue
        p = (step - warm) / (total - warm)
        assert math.isclose(cos.lr_at(step), end + (lr - end) * 0.5 * (1 + math.cos(math.pi * p)), rel_tol=1e-12)
        assert math.isclose(lin.lr_at(step), end + (lr - end) * (1 - p), rel_tol=1e-12)
        assert const.lr_at(step) == lr


def test_activation_checkpointing_gives_the_same_lora_update(tmp_path, tiny_model_dir, alpaca_small):
    results = []
    for name, recompute in (("plain", False), ("recompute", True)):
        out = tmp_path / name
        cfg = write_config(tmp_path / f"{name}.yaml", tiny_model_dir, alpaca_small, out,
                           **{"max_steps": 2, "recompute_config.recompute": recompute})
        assert main(["run", "--config", str(cfg)]) == 0
        results.append(adapter_tensors(out))
    plain, recomputed = results
    assert any(v.abs().max() > 0 for k, v in plain.items() if "lora_B" in k)
    for key in plain:
        torch.testing.assert_close(recomputed[key], plain[key], atol=1e-6, rtol=0)


def test_fused_projections_give_the_same_lora_update(tmp_path, tiny_model_dir, alpaca_small, capsys):
    """The recipe with fused_projections on and off: the same adapter after two steps, and the merged model of
    the fused run (written from views of one block) reads back with the same weights."""
    results = {}
    for fused in (False, True):
        out = tmp_path / str(fused)
        cfg = write_config(tmp_path / f"{fused}.yaml", tiny_model_dir, alpaca_small, out,
                           **{"max_steps": 2, "save_merged": True, "model.model_config.fused_projections": fused,
                              "model.model_config.pet_config.target_modules": "all-linear"})
        assert main(["run", "--config", str(cfg)]) == 0
        on = [line for line in capsys.readouterr().err.splitlines() if "fused projections" in line]
        assert on == (["petformers: fused projections on: 4 of 4 groups (q/k/v, w1/w3) run as one matmul each"]
                      if fused else [])
        results[fused] = adapter_tensors(out), load_file(str(out / "merged" / "model.safetensors"))
    (plain, plain_merged), (fused, fused_merged) = results[False], results[True]
    assert any(v.abs().max() > 0 for k, v in plain.items() if "lora_B" in k)
    for key in plain:
        torch.testing.assert_close(fused[key], plain[key], atol=1e-6, rtol=1e-5)
    assert plain_merged.keys() == fused_merged.keys()
    for key in plain_merged:
        torch.testing.assert_close(fused_merged[key], plain_merged[key], atol=1e-6, rtol=1e-5)
