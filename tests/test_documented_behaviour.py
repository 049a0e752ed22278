"""Behaviour the docs promise that had no test: `petformers chat` (a conversation, /reset, /exit) and
`run_mode: train` (every weight trained, from a checkpoint or from random weights built from model_config)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from petformers.cli.main import main


def _reference_reply(model_dir: Path, messages: list[dict], max_new_tokens: int) -> str:
    """transformers' greedy continuation of the chat template: the oracle for petformers chat."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32).eval()
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=False)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_chat_keeps_the_conversation_resets_and_exits(tiny_model_dir, monkeypatch, capsys):
    turns = ["Name a colour.", "And another one?", "/reset", "Name a colour.", "/exit", "never read"]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(turns) + "\n"))
    assert main(["chat", "--load_checkpoint", str(tiny_model_dir), "--max_new_tokens", "6", "--system",
                 "Be brief."]) == 0
    captured = capsys.readouterr()
    replies = [part.split("\n")[0] for part in captured.out.split("assistant> ")[1:]]
    assert len(replies) == 3, captured.out  # /reset and /exit are commands, the line after /exit is never read
    system = {"role": "system", "content": "Be brief."}
    first = _reference_reply(tiny_model_dir, [system, {"role": "user", "content": turns[0]}], 6)
    assert replies[0] == first
    second = _reference_reply(tiny_model_dir, [system, {"role": "user", "content": turns[0]},
                                               {"role": "assistant", "content": first},
                                               {"role": "user", "content": turns[1]}], 6)
    assert replies[1] == second  # the first exchange was part of the prompt
    assert replies[2] == first  # /reset forgot it
    assert "/reset" in captured.err  # the help line


def _train_config(tmp_path: Path, data: Path, **extra) -> Path:
    cfg = {"seed": 5, "output_dir": str(tmp_path / "out"), "run_mode": "train", "max_steps": 4,
           "runner_config": {"epochs": 1, "batch_size": 2, "gradient_accumulation_steps": 1},
           "optimizer": {"type": "AdamW", "learning_rate": 3e-3, "weight_decay": 0.0},
           "lr_schedule": {"type": "ConstantWarmUpLR", "learning_rate": 3e-3, "warmup_steps": 0},
           "train_dataset": {"data_loader": {"dataset_dir": str(data), "shuffle": False}},
           "callbacks": [{"type": "CheckpointMonitor", "save_checkpoint_steps": 2, "keep_checkpoint_max": 2}],
           "model": {"model_config": {"seq_length": 128, "compute_dtype": "float32"}}, "template": "chat"}
    cfg.update(extra)
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture()
def short_data(tmp_path, alpaca_demo) -> Path:
    records = [r for r in json.loads(alpaca_demo.read_text(encoding="utf-8"))
               if len(r["instruction"]) + len(r["input"]) + len(r["output"]) < 150][:8]
    path = tmp_path / "train.json"
    path.write_text(json.dumps(records))
    return path


def _losses(out: Path) -> list[float]:
    return [m["loss"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in m]


def test_run_mode_train_updates_every_weight_of_a_checkpoint(tmp_path, tiny_model_dir, short_data):
    cfg = _train_config(tmp_path, short_data, load_checkpoint=str(tiny_model_dir),
                        runner_config={"epochs": 4, "batch_size": 2, "gradient_accumulation_steps": 1})
    assert main(["run", "--config", str(cfg)]) == 0
    out = tmp_path / "out"
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    trained = load_file(str(out / "merged" / "model.safetensors"))
    assert sorted(trained) == sorted(k for k in base if not k.endswith("rotary_emb.inv_freq"))
    unchanged = [k for k in trained if torch.equal(trained[k], base[k])]
    assert not unchanged, unchanged  # full training: no frozen tensor, no adapter
    assert not (out / "adapter").exists()
    assert len(_losses(out)) == 4
    state = json.loads((out / "checkpoint" / "step_00000004" / "trainer_state.json").read_text())
    assert state["step"] == 4


def test_run_mode_train_from_random_weights_learns(tmp_path, tiny_tokenizer_dir, short_data):
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(tiny_tokenizer_dir / "tokenizer.json")).get_vocab_size()
    model_config = {"seq_length": 128, "compute_dtype": "float32", "vocab_size": vocab, "hidden_size": 64,
                    "num_layers": 2, "num_heads": 4, "n_kv_heads": 2, "intermediate_size": 96}
    cfg = _train_config(tmp_path, short_data, tokenizer=str(tiny_tokenizer_dir), max_steps=12,
                        model={"model_config": model_config},
                        runner_config={"epochs": 6, "batch_size": 2, "gradient_accumulation_steps": 1},
                        optimizer={"type": "AdamW", "learning_rate": 1e-2, "weight_decay": 0.0},
                        lr_schedule={"type": "ConstantWarmUpLR", "learning_rate": 1e-2, "warmup_steps": 0})
    assert main(["run", "--config", str(cfg)]) == 0
    out = tmp_path / "out"
    losses = _losses(out)
    assert len(losses) == 12 and sum(losses[-4:]) / 4 < losses[0] - 0.5, losses
    hf_config = json.loads((out / "merged" / "config.json").read_text())
    assert (hf_config["hidden_size"], hf_config["num_hidden_layers"], hf_config["vocab_size"]) == (64, 2, vocab)
