"""torchrun FSDP2 (2 CPU ranks, gloo) on a tiny Qwen3 with every new switch at once: q/k norms, an explicit
head_dim, q/k/v/o biases and tied embeddings. The adapter equals the one-process run of the same global
batch, and the merged model written at the end is a Qwen3ForCausalLM for transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from family_models import reference, write_family
from safetensors.torch import load_file
from test_qwen_tokenizer import QWEN3_TEMPLATE, train_qwen_style

from petformers.cli.main import main

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PETFORMERS_PYTHON": sys.executable}
RECORDS = [{"instruction": f"Count to {i}.", "input": "", "output": " ".join(str(k) for k in range(1, i + 1))}
           for i in range(1, 9)]


def test_fsdp_on_qwen3_matches_one_process(tmp_path):
    tok_dir = train_qwen_style(tmp_path / "tok", template=QWEN3_TEMPLATE, vocab_size=400)
    model_dir = write_family(tmp_path / "model", "qwen3", seed=17, tokenizer_dir=tok_dir, tie_word_embeddings=True,
                             attention_bias=True)
    data = tmp_path / "train.json"
    data.write_text(json.dumps(RECORDS), encoding="utf-8")
    cfg = {
        "seed": 3, "load_checkpoint": str(model_dir), "run_mode": "finetune", "max_steps": 2,
        "runner_config": {"epochs": 1, "batch_size": 2, "gradient_accumulation_steps": 1},
        "optimizer": {"type": "AdamW", "learning_rate": 5e-3, "weight_decay": 0.01},
        "lr_schedule": {"type": "ConstantWarmUpLR", "learning_rate": 5e-3, "warmup_steps": 0, "total_steps": -1},
        "train_dataset": {"data_loader": {"dataset_dir": str(data), "shuffle": True}},
        "model": {"model_config": {"seq_length": 160, "compute_dtype": "float32", "pet_config": {
            "pet_type": "lora", "lora_rank": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": "all-linear"}}},
        "template": "chat", "save_merged": True,
    }
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    assert main(["run", "--config", str(config), "--output_dir", str(tmp_path / "one")]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "petformers",
           "run", "--config", str(config), "--output_dir", str(tmp_path / "two"), "--use_parallel", "True",
           "runner_config.batch_size=1", "parallel_strategy=fsdp"]
    done = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    one, two = (load_file(str(tmp_path / d / "adapter" / "adapter_model.safetensors")) for d in ("one", "two"))
    assert sorted(one) == sorted(two) and any("o_proj.lora_B" in k for k in one)
    assert max(one[k].abs().max().item() for k in one if "lora_B" in k) > 0  # trained
    assert max((one[k] - two[k]).abs().max().item() for k in one) <= 1e-5

    merged = tmp_path / "two" / "merged"
    assert json.loads((merged / "config.json").read_text())["architectures"] == ["Qwen3ForCausalLM"]
    ids = torch.randint(4, 300, (1, 16), generator=torch.Generator().manual_seed(0))
    from peft import PeftModel

    with torch.no_grad():
        merged_logits = reference(merged)(ids).logits
        adapted = PeftModel.from_pretrained(reference(model_dir), str(tmp_path / "one" / "adapter")).eval()(ids).logits
        base_logits = reference(model_dir)(ids).logits
    assert (merged_logits - adapted).abs().max().item() <= 1e-5
    assert (merged_logits - base_logits).abs().max().item() > 1e-4
