"""TensorBoard event files: every scalar written is read back by TensorBoard's own EventAccumulator;
a missing tensorboard package is one clear line."""

from __future__ import annotations

import json
import math
import sys

import pytest

from petformers.errors import ConfigError
from petformers.monitor.tensorboard import TensorBoardLog, scalars_of, with_tensorboard
from petformers.train.metrics_log import MetricsLog, read_metrics

pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")


def read_events(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    scalars = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    texts = {tag: [e.tensor_proto.string_val[0].decode() for e in acc.Tensors(tag)] for tag in acc.Tags()["tensors"]}
    return scalars, texts


def test_records_become_tagged_scalars():
    step = {"step": 3, "epoch": 0, "loss": 2.5, "lr": 1e-3, "grad_norm": None, "trained_tokens": 40,
            "tokens_per_s": 812.5, "peak_memory_mib": 301.0, "elapsed_s": 1.2}
    assert scalars_of(step) == {"train/loss": 2.5, "train/lr": 1e-3, "train/tokens_per_s": 812.5,
                                "train/peak_memory_mib": 301.0}
    assert scalars_of({"step": 3, "eval_loss": 2.0, "eval_ppl": math.exp(2.0), "eval_tokens": 99,
                       "exact_match": 0.5, "eval_note": "text", "eval_nan": float("nan")}) == \
        {"eval/loss": 2.0, "eval/ppl": math.exp(2.0), "eval/exact_match": 0.5}


def test_every_scalar_written_is_read_back(tmp_path):
    records = []
    for step in range(1, 7):
        records.append({"step": step, "loss": 3.0 / step, "lr": 1e-3 * step, "grad_norm": 0.5 + step,
                        "tokens_per_s": 100.0 * step, "peak_memory_mib": 200.0 + step})
        if step % 3 == 0:
            records.append({"step": step, "eval_loss": 2.0 / step, "eval_ppl": math.exp(2.0 / step), "eval_tokens": 9})
    config = "seed: 3\noptimizer:\n  learning_rate: 0.001\n"
    with with_tensorboard(MetricsLog(tmp_path / "metrics.jsonl"), tmp_path / "tb", 2, config) as log:
        for r in records:
            log.write(r)
    assert read_metrics(tmp_path / "metrics.jsonl") == records  # the JSONL log still gets every record
    scalars, texts = read_events(tmp_path / "tb")
    expected: dict = {}
    for r in records:
        for tag, value in scalars_of(r).items():
            expected.setdefault(tag, []).append((r["step"], value))
    assert set(scalars) == {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s",
                            "train/peak_memory_mib", "eval/loss", "eval/ppl"}
    for tag, points in expected.items():  # event files hold float32
        assert [s for s, _ in scalars[tag]] == [s for s, _ in points], tag
        assert [v for _, v in scalars[tag]] == pytest.approx([v for _, v in points], rel=1e-6), tag
    assert "learning_rate: 0.001" in texts["config/text_summary"][0]


def test_no_directory_or_other_rank_writes_nothing(tmp_path):
    metrics = MetricsLog(tmp_path / "metrics.jsonl")
    assert with_tensorboard(metrics, "", 10) is metrics
    assert with_tensorboard(metrics, tmp_path / "tb", 10, enabled=False) is metrics
    metrics.close()
    assert not (tmp_path / "tb").exists()


def test_missing_tensorboard_package_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # what an environment without the package gives
    for name in [m for m in sys.modules if m.startswith("torch.utils.tensorboard")]:
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(ConfigError) as err:
        TensorBoardLog(tmp_path / "tb")
    assert "pip install 'petformers[tensorboard]'" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "tb").exists()


def test_queue_size_must_be_positive(tmp_path):
    with pytest.raises(ConfigError, match="tensorboard_queue_size: 0"):
        TensorBoardLog(tmp_path / "tb", 0)


# ---- a real run ----------------------------------------------------------------------------------

def _event_files(root):
    return sorted(p for p in root.rglob("events.out.tfevents.*"))


def test_mindformers_tensorboard_section_writes_every_metric_of_a_run(tmp_path, tiny_model_dir):
    import yaml

    from board_helpers import write_run_config
    from petformers.cli.main import main

    out, tb = tmp_path / "run", tmp_path / "worker" / "tensorboard"
    cfg = write_run_config(tmp_path / "c.yaml", tiny_model_dir, tmp_path, out, max_steps=8, eval_every=4,
                           tensorboard={"tensorboard_dir": str(tb), "tensorboard_queue_size": 3,
                                        "log_timers_to_tensorboard": True})
    assert main(["run", "--config", str(cfg)]) == 0
    records = read_metrics(out / "metrics.jsonl")
    scalars, texts = read_events(tb)
    assert len(_event_files(tb)) == 1
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    assert [s for s, _ in scalars["train/loss"]] == list(range(1, 9)) and len(evals) == 2
    for tag, key, rows in (("train/loss", "loss", steps), ("train/lr", "lr", steps),
                           ("train/grad_norm", "grad_norm", steps), ("train/tokens_per_s", "tokens_per_s", steps),
                           ("train/peak_memory_mib", "peak_memory_mib", steps), ("eval/loss", "eval_loss", evals),
                           ("eval/ppl", "eval_ppl", evals)):
        assert scalars[tag] == [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in rows], tag
    assert all(r["peak_memory_mib"] > 50 for r in steps)  # a process with torch loaded holds more than 50 MiB
    assert yaml.safe_load((out / "resolved_config.yaml").read_text())["tensorboard"]["tensorboard_dir"] == str(tb)
    assert "tensorboard_queue_size: 3" in texts["config/text_summary"][0]


def test_tensorboard_dir_flag_and_eval_metrics(tmp_path, tiny_model_dir, capsys):
    from board_helpers import write_run_config
    from petformers.cli.main import main

    out, tb = tmp_path / "run", tmp_path / "tb"
    cfg = write_run_config(tmp_path / "c.yaml", tiny_model_dir, tmp_path, out, max_steps=2)
    assert main(["run", "--config", str(cfg), "--tensorboard_dir", str(tb)]) == 0
    assert [s for s, _ in read_events(tb)[0]["train/loss"]] == [1, 2]
    eval_tb = tmp_path / "tb_eval"
    assert main(["run", "--config", str(cfg), "--run_mode", "eval", "--output_dir", str(tmp_path / "eval"),
                 "--eval_dataset_dir", str(tmp_path / "tickets.json"), "--tensorboard_dir", str(eval_tb)]) == 0
    results = json.loads((tmp_path / "eval" / "eval_results.json").read_text())["metrics"]
    scalars, _ = read_events(eval_tb)
    assert scalars["eval/loss"] == [(0, pytest.approx(results["eval_loss"], rel=1e-6))]
    assert scalars["eval/ppl"] == [(0, pytest.approx(results["eval_ppl"], rel=1e-6))]


def test_under_torchrun_only_rank_0_writes_event_files(tmp_path, tiny_model_dir):
    import os
    import subprocess

    from board_helpers import write_run_config

    out, tb = tmp_path / "run", tmp_path / "tb"
    cfg = write_run_config(tmp_path / "c.yaml", tiny_model_dir, tmp_path, out, max_steps=3,
                           use_parallel=True, tensorboard={"tensorboard_dir": str(tb)})
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "petformers", "run", "--config", str(cfg)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(_event_files(tb)) == 1
    assert [s for s, _ in read_events(tb)[0]["train/loss"]] == [1, 2, 3]
