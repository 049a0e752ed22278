"""torchrun on the CPU (gloo, 2 processes) with a tiny real model: DDP and FSDP2 end with the adapter of a
single-process run of the same global batch; checkpoints saved by 2 ranks resume on 1 and 2 ranks and a
1-rank checkpoint on 2; a failing rank ends the job within seconds with its message; the MindFormers-style
launcher writes per-rank logs; `ckpt consolidate` turns FSDP shards into an adapter and a merged model.

The adapter trains lm_head too (modules_to_save), which the loss applies outside the DDP/FSDP wrapper.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from petformers.cli.main import main

REPO = Path(__file__).resolve().parents[1]
STEPS = 4  # global batch 4 = 2 rows x 1 rank x 2 accumulation = 1 row x 2 ranks x 2 accumulation
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PETFORMERS_PYTHON": sys.executable}


@pytest.fixture(scope="module")
def config(tmp_path_factory, tiny_model_dir, alpaca_demo) -> Path:
    tmp = tmp_path_factory.mktemp("dist")
    records = json.loads(alpaca_demo.read_text(encoding="utf-8"))
    short = [r for r in records if len(r["instruction"]) + len(r["input"]) + len(r["output"]) < 300][:24]
    data = tmp / "train.json"
    data.write_text(json.dumps(short, ensure_ascii=False), encoding="utf-8")
    cfg = {
        "seed": 3, "load_checkpoint": str(tiny_model_dir), "run_mode": "finetune", "max_steps": STEPS,
        "runner_config": {"epochs": 1, "batch_size": 2, "gradient_accumulation_steps": 2},
        "optimizer": {"type": "AdamW", "learning_rate": 5e-3, "weight_decay": 0.01},
        "lr_schedule": {"type": "CosineWithWarmUpLR", "learning_rate": 5e-3, "warmup_steps": 1, "total_steps": -1},
        "train_dataset": {"data_loader": {"dataset_dir": str(data), "shuffle": True}},
        "callbacks": [{"type": "CheckpointMonitor", "save_checkpoint_steps": 2, "keep_checkpoint_max": 5}],
        "runner_wrapper": {"use_clip_grad": True, "max_grad_norm": 0.5},  # clips every step (norms ~0.6-1)
        "model": {"model_config": {"seq_length": 192, "compute_dtype": "float32", "pet_config": {
            "pet_type": "lora", "lora_rank": 4, "lora_alpha": 8, "lora_dropout": 0.0,
            "target_modules": ".*wq|.*wv", "modules_to_save": ["lm_head"]}}},
        "template": "chat",
    }
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def single(config: Path, out: Path, *extra: str):
    assert main(["run", "--config", str(config), "--output_dir", str(out), *extra]) == 0


def torchrun(config: Path, out: Path, *extra: str, env=None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "petformers", "run", "--config", str(config), "--output_dir", str(out), "--use_parallel", "True",
           "runner_config.batch_size=1", *extra]
    done = subprocess.run(cmd, cwd=REPO, env=env or ENV, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def assert_same_adapter(a: dict, b: dict, tol: float = 1e-5):
    assert sorted(a) == sorted(b)
    assert any("lm_head" in k for k in a)
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= tol, worst


def interrupted_copy(out: Path, dest: Path) -> Path:
    """The run as if stopped right after its step-2 checkpoint."""
    shutil.copytree(out, dest)
    shutil.rmtree(dest / "checkpoint" / f"step_{STEPS:08d}")
    shutil.rmtree(dest / "adapter")
    return dest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def with_eval(config: Path) -> list[str]:
    """Evaluation at steps 2 and 4 on the 21 training rows (odd: one rank runs an uncounted batch) + merged/."""
    data = yaml.safe_load(config.read_text())["train_dataset"]["data_loader"]["dataset_dir"]
    return ["do_eval=True", f"eval_dataset_dir={data}", "eval_step_interval=2", "save_merged=True"]


def eval_losses(out: Path) -> list[float]:
    return [m["eval_loss"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if "eval_loss" in m]


@pytest.fixture(scope="module")
def reference(config, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "out"
    single(config, out, *with_eval(config))
    return out


@pytest.fixture(scope="module")
def fsdp_run(config, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp") / "out"
    torchrun(config, out, "parallel_strategy=fsdp", "recompute_config.recompute=True", *with_eval(config))
    return out


def test_ddp_through_the_launcher_matches_one_process_and_logs_per_rank(config, reference, tmp_path):
    out, logs = tmp_path / "out", tmp_path / "msrun_log"
    command = f"petformers run --config {config} --output_dir {out} runner_config.batch_size=1"
    done = subprocess.run(["bash", str(REPO / "scripts" / "msrun_launcher.sh"), command, "2", "2", "127.0.0.1",
                           str(free_port()), "0", str(logs)], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert_same_adapter(adapter(reference), adapter(out))
    state = json.loads((out / "checkpoint" / "step_00000002" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and (out / "checkpoint" / "step_00000002" / "trainable.safetensors").exists()
    rank0, rank1 = (logs / "worker_0.log").read_text(), (logs / "worker_1.log").read_text()
    assert "run summary" in rank0 and "global batch 4 (1 x 2 ranks x 2 accumulation)" in rank0
    assert "petformers:" not in rank1  # rank 0 alone prints progress


def test_fsdp_matches_one_process_and_writes_sharded_checkpoints(reference, fsdp_run):
    assert_same_adapter(adapter(reference), adapter(fsdp_run))
    ref_eval, fsdp_eval = eval_losses(reference), eval_losses(fsdp_run)
    assert len(ref_eval) == len(fsdp_eval) == 2 and all(abs(a - b) < 1e-5 for a, b in zip(ref_eval, fsdp_eval))
    merged = load_file(str(fsdp_run / "merged" / "model.safetensors"))  # gathered to rank 0, then merged
    ref_merged = load_file(str(reference / "merged" / "model.safetensors"))
    assert sorted(merged) == sorted(ref_merged)
    assert max((merged[k] - ref_merged[k]).abs().max().item() for k in merged) < 1e-5
    step2 = fsdp_run / "checkpoint" / "step_00000002"
    assert sorted(p.name for p in (step2 / "dcp").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert json.loads((step2 / "trainer_state.json").read_text())["layout"] == "sharded"
    # The checkpoint's own PEFT adapter (gathered on rank 0) equals the one-process run's at the same step.
    assert_same_adapter(load_file(str(reference / "checkpoint" / "step_00000002" / "adapter" /
                                      "adapter_model.safetensors")),
                        load_file(str(step2 / "adapter" / "adapter_model.safetensors")))


def resumed_from(out: Path) -> int:
    return json.loads((out / "run_summary.json").read_text())["resumed_from"]


def test_two_rank_sharded_checkpoint_resumes_on_one_rank(config, reference, fsdp_run, tmp_path):
    out = interrupted_copy(fsdp_run, tmp_path / "out")
    single(config, out, "--resume_training", "True")
    assert resumed_from(out) == 2
    assert_same_adapter(adapter(reference), adapter(out))


def test_two_rank_sharded_checkpoint_resumes_on_two_ranks(config, reference, fsdp_run, tmp_path):
    out = interrupted_copy(fsdp_run, tmp_path / "out")
    done = torchrun(config, out, "parallel_strategy=fsdp", "--resume_training", "True", "--auto_trans_ckpt", "True")
    assert "resumed from" in done.stderr and "step 2 of 4, saved by 2 rank(s)" in done.stderr
    assert resumed_from(out) == 2
    assert_same_adapter(adapter(reference), adapter(out))


def test_a_damaged_shard_of_the_newest_sharded_checkpoint_falls_back_to_the_previous_one(config, reference, fsdp_run,
                                                                                         tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(fsdp_run, out)
    shutil.rmtree(out / "adapter")
    shard = out / "checkpoint" / f"step_{STEPS:08d}" / "dcp" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit in rank 1's shard
    shard.write_bytes(bytes(data))
    capsys.readouterr()
    single(config, out, "--resume_training", "True")
    warning = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warning) == 1 and "dcp/__1_0.distcp" in warning[0] and "step_00000002" in warning[0], warning
    assert resumed_from(out) == 2
    assert_same_adapter(adapter(reference), adapter(out))


def killed_run(config: Path, out: Path, kill: str, *extra: str) -> subprocess.CompletedProcess:
    """A 2-rank run whose rank 1 SIGKILLs itself at `kill` (petformers/faults.py); torchrun ends the job."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "petformers", "run", "--config", str(config), "--output_dir", str(out), "--use_parallel", "True",
           "runner_config.batch_size=1", *extra]
    done = subprocess.run(cmd, cwd=REPO, env=ENV | {"PETFORMERS_KILL_AT": kill, "PETFORMERS_KILL_RANK": "1"},
                          capture_output=True, text=True, timeout=240)
    assert done.returncode != 0 and "Signal 9 (SIGKILL)" in done.stderr, done.stderr[-3000:]
    return done


def test_fsdp_rank_killed_inside_a_checkpoint_write_resumes_on_two_and_on_one_rank(config, reference, fsdp_run,
                                                                                    tmp_path):
    # Rank 1 dies right after writing its shard of the step-4 checkpoint, before rank 0 commits it.
    out = tmp_path / "killed"
    fsdp = ["parallel_strategy=fsdp", "recompute_config.recompute=True", *with_eval(config)]
    killed_run(config, out, "checkpoint:2", *fsdp)
    assert sorted(p.name for p in (out / "checkpoint").glob("step_*")) == ["step_00000002"]
    assert not (out / "adapter").exists()
    one = tmp_path / "one"
    shutil.copytree(out, one)
    done = torchrun(config, out, *fsdp, "--resume_training", "True")
    assert "(step 2 of 4, saved by 2 rank(s))" in done.stderr and resumed_from(out) == 2
    assert_same_adapter(adapter(fsdp_run), adapter(out), tol=0.0)  # same world size: bit for bit
    single(config, one, "--resume_training", "True", *with_eval(config))
    assert resumed_from(one) == 2
    assert_same_adapter(adapter(reference), adapter(one))


@pytest.mark.faults
def test_ddp_rank_killed_after_a_step_resumes_on_two_and_on_one_rank(config, reference, tmp_path):
    uninterrupted = tmp_path / "ddp"
    torchrun(config, uninterrupted)
    out = tmp_path / "killed"
    killed_run(config, out, "step:3")  # after step 3: the step-2 checkpoint is the newest
    one = tmp_path / "one"
    shutil.copytree(out, one)
    done = torchrun(config, out, "--resume_training", "True")
    assert "(step 2 of 4, saved by 2 rank(s))" in done.stderr and resumed_from(out) == 2
    assert_same_adapter(adapter(uninterrupted), adapter(out), tol=0.0)
    single(config, one, "--resume_training", "True")
    assert resumed_from(one) == 2
    assert_same_adapter(adapter(reference), adapter(one))


def test_one_rank_checkpoint_resumes_on_two_ranks(config, reference, tmp_path):
    out = interrupted_copy(reference, tmp_path / "out")
    done = torchrun(config, out, "parallel_strategy=fsdp", "--resume_training", "True")
    assert "(step 2 of 4, saved by 1 rank(s))" in done.stderr and resumed_from(out) == 2
    assert_same_adapter(adapter(reference), adapter(out))


def test_a_failing_rank_ends_the_job_within_seconds_with_its_message(config, reference, tmp_path):
    # FSDP with a bf16 base and float32 adapters in the same shard groups: step 1 completes, rank 1 raises at step 2.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "petformers", "run", "--config", str(config), "--output_dir", str(tmp_path / "out"),
           "--use_parallel", "True", "runner_config.batch_size=1", "parallel_strategy=fsdp",
           "model.model_config.compute_dtype=bfloat16"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV | {"PETFORMERS_FAIL_AT_STEP": "2"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines, failed_at = [], None
    for line in proc.stdout:
        lines.append(line)
        if failed_at is None and "rank 1 fails at step 2 as asked" in line:
            failed_at = time.monotonic()
    proc.wait(timeout=120)
    output = "".join(lines)
    assert proc.returncode != 0
    assert failed_at is not None, output[-3000:]
    assert time.monotonic() - failed_at < 20, "the job outlived its failed rank"
    assert "rank      : 1 (local_rank: 1)" in output.split("Root Cause")[1]
    assert not (tmp_path / "out" / "adapter").exists()
    first = json.loads((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()[0])
    reference_first = json.loads((reference / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1 and abs(first["loss"] - reference_first["loss"]) < 1e-2  # bf16 vs float32


def test_consolidate_turns_shards_into_an_adapter_and_a_merged_model(fsdp_run, tiny_model_dir, tmp_path):
    out = tmp_path / "consolidated"
    assert main(["ckpt", "consolidate", "--checkpoint", str(fsdp_run), "--output_dir", str(out),
                 "--load_checkpoint", str(tiny_model_dir), "--merged"]) == 0
    assert_same_adapter(adapter(fsdp_run), adapter(out), tol=0.0)
    assert json.loads((out / "adapter" / "adapter_config.json").read_text()) == \
        json.loads((fsdp_run / "adapter" / "adapter_config.json").read_text())
    assert main(["export", "merge", "--load_checkpoint", str(tiny_model_dir), "--adapter", str(fsdp_run / "adapter"),
                 "--output_dir", str(tmp_path / "exported")]) == 0
    merged = load_file(str(out / "merged" / "model.safetensors"))
    exported = load_file(str(tmp_path / "exported" / "model.safetensors"))
    assert sorted(merged) == sorted(exported) and all(torch.equal(merged[k], exported[k]) for k in merged)


def test_consolidate_without_a_checkpoint_names_the_directory(tmp_path, capsys):
    assert main(["ckpt", "consolidate", "--checkpoint", str(tmp_path), "--output_dir", str(tmp_path / "o")]) == 2
    assert str(tmp_path) in capsys.readouterr().err
