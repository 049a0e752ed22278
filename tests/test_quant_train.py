"""Fine-tuning over a quantized base, end to end through `petformers run`: resume after a kill ends
bitwise equal to an uninterrupted run, accumulation equals one big batch, and the dry run counts the
quantized weights (the seed's Llama2-7B config with quantization_bit: 4)."""

from __future__ import annotations

import json
import re
import signal

import torch

from petformers.cli.main import main
from petformers.checkpoint import training as checkpointing

from test_train import REPO, _run_cli, _wait_for_checkpoint, adapter_tensors, alpaca_small, metrics, write_config  # noqa: F401

NF4 = {"model.model_config.quantization_bit": 4, "model.model_config.quantization_type": "nf4",
       "model.model_config.double_quantization": True}


def test_quantized_run_killed_then_resumed_is_bitwise_identical(tmp_path, tiny_model_dir, alpaca_small):
    """NF4 base with packing, accumulation, recompute, dropout and eval: every path of a real run."""
    extra = {**NF4, "runner_config.batch_size": 1, "runner_config.gradient_accumulation_steps": 2, "max_steps": 6,
             "packing": True, "recompute_config.recompute": True, "model.model_config.seq_length": 256,
             "model.model_config.pet_config.lora_dropout": 0.1, "do_eval": True, "eval_step_interval": 100,
             "eval_dataset.data_loader.dataset_dir": str(alpaca_small)}  # eval once, at the end
    full = tmp_path / "full"
    assert main(["run", "--config", str(write_config(tmp_path / "full.yaml", tiny_model_dir, alpaca_small, full,
                                                     **extra))]) == 0
    killed = tmp_path / "killed"
    cfg = write_config(tmp_path / "killed.yaml", tiny_model_dir, alpaca_small, killed, **extra)
    proc = _run_cli(cfg)
    _wait_for_checkpoint(killed / "checkpoint", proc, timeout=600)  # a busy machine: imports alone take long
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = checkpointing.list_checkpoints(killed / "checkpoint")
    assert done and not (killed / "adapter").exists()
    assert main(["run", "--config", str(cfg), "--resume_training", "True"]) == 0
    newest = int(done[-1].name.split("_")[1])
    assert newest > 0 and json.loads((killed / "run_summary.json").read_text())["resumed_from"] == newest
    a, b = adapter_tensors(full), adapter_tensors(killed)
    assert any(v.abs().max() > 0 for k, v in a.items() if "lora_B" in k)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    losses = [m["loss"] for m in metrics(full) if "loss" in m]
    evals = [m["eval_loss"] for m in metrics(full) if "eval_loss" in m]
    assert evals and all(map(lambda v: v == v, losses + evals))  # finite, not NaN
    assert "quantization_bit: 4" in (full / "resolved_config.yaml").read_text()


def test_quantized_accumulation_equals_one_big_batch(tmp_path, tiny_model_dir, alpaca_small):
    results = []
    for name, batch, accum in (("big", 8, 1), ("accum", 2, 4)):
        out = tmp_path / name
        cfg = write_config(tmp_path / f"{name}.yaml", tiny_model_dir, alpaca_small, out,
                           **{**NF4, "runner_config.batch_size": batch, "model.model_config.seq_length": 128,
                              "runner_config.gradient_accumulation_steps": accum, "max_steps": 1})
        assert main(["run", "--config", str(cfg)]) == 0
        results.append(adapter_tensors(out))
    big, accum = results
    assert any(v.abs().max() > 0 for k, v in big.items() if "lora_B" in k)
    for key in big:
        torch.testing.assert_close(accum[key], big[key], atol=1e-6, rtol=0)


def _weights_gib(out: str) -> float:
    return float(re.search(r"weights ([0-9.]+) GiB", out).group(1))


def test_dry_run_counts_quantized_weights_on_the_seed_config(capsys):
    seed = str(REPO / "configs/llama2/lora_llama2_7b.yaml")
    assert main(["run", "--config", seed, "--dry_run"]) == 0
    float_out = capsys.readouterr().out
    assert main(["run", "--config", seed, "--dry_run", "model.model_config.quantization_bit=4"]) == 0
    out = capsys.readouterr().out
    assert "quantization: nf4 4-bit, double quantization" in out
    # Llama2-7B: 32 x (4 x 4096^2 + 3 x 4096 x 11008) linear weights in NF4 with double-quantized scales,
    # the embeddings, lm_head and norms in the config's float16.
    per_matrix = lambda n: n // 2 + n // 64 + 4 * -(-(n // 64) // 256) + 4  # noqa: E731
    linear = 32 * (4 * per_matrix(4096 * 4096) + 3 * per_matrix(4096 * 11008))
    rest = 2 * (2 * 32000 * 4096 + (2 * 32 + 1) * 4096)
    assert _weights_gib(out) == round((linear + rest) / 2**30, 2)  # 3.51 GiB
    assert _weights_gib(float_out) > 3.4 * _weights_gib(out)  # 2 bytes (float16) against ~0.52 per weight
    assert "quantization: none (float base)" in float_out


def test_fsdp2_over_a_quantized_base_matches_one_process(tmp_path, tiny_model_dir, alpaca_demo):
    """FSDP2 on 2 CPU ranks (gloo) over an NF4 base: the quantized blocks are buffers, replicated on every
    rank (docs/quantization.md); the adapter ends equal to the single-process run's."""
    from test_distributed import adapter, assert_same_adapter, config as _config, single, torchrun  # noqa: F401
    import yaml

    records = json.loads(alpaca_demo.read_text(encoding="utf-8"))
    short = [r for r in records if len(r["instruction"]) + len(r["input"]) + len(r["output"]) < 300][:16]
    data = tmp_path / "train.json"
    data.write_text(json.dumps(short, ensure_ascii=False), encoding="utf-8")
    cfg = {
        "seed": 3, "load_checkpoint": str(tiny_model_dir), "run_mode": "finetune", "max_steps": 2,
        "runner_config": {"epochs": 1, "batch_size": 2, "gradient_accumulation_steps": 1},
        "optimizer": {"type": "AdamW", "learning_rate": 5e-3},
        "train_dataset": {"data_loader": {"dataset_dir": str(data), "shuffle": True}},
        "model": {"model_config": {"seq_length": 128, "compute_dtype": "float32", "quantization_bit": 4,
                                   "pet_config": {"pet_type": "lora", "lora_rank": 4, "lora_alpha": 8,
                                                  "lora_dropout": 0.0, "target_modules": ".*wq|.*wv",
                                                  "modules_to_save": ["lm_head"]}}},
        "template": "chat",
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    single(path, tmp_path / "one")
    torchrun(path, tmp_path / "two", "parallel_strategy=fsdp")
    assert_same_adapter(adapter(tmp_path / "one"), adapter(tmp_path / "two"))


def test_board_chat_holds_a_quantized_runs_base_quantized(tmp_path, tiny_model_dir, alpaca_small):
    """The board's chat panel loads a run trained over NF4 over that NF4 base (adapter unmerged), not
    over the float base the adapter was not trained against."""
    from petformers.board.chat import ChatModels
    from petformers.pet.lora import LoRALinear
    from petformers.quant.weight import QuantizedWeight

    out = tmp_path / "run"
    cfg = write_config(tmp_path / "run.yaml", tiny_model_dir, alpaca_small, out,
                       **{**NF4, "runner_config.batch_size": 2, "model.model_config.seq_length": 128, "max_steps": 1})
    assert main(["run", "--config", str(cfg)]) == 0
    chat = ChatModels()
    items = list(chat.stream(out, [{"role": "user", "content": "Hello"}], max_new_tokens=3))
    kinds = [k for k, _ in items]
    assert "error" not in kinds, items
    assert kinds[0] == "info" and "nf4" in items[0][1] and kinds[-1] == "done"
    model, _ = chat._loaded
    assert any(isinstance(m, QuantizedWeight) for m in model.modules()), "the base was loaded in float"
    assert any(isinstance(m, LoRALinear) and isinstance(m.weight, QuantizedWeight) for m in model.modules())
