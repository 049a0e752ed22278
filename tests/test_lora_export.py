"""`petformers export merge` end to end: the merged directory loads in transformers with petformers' logits."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from petformers.checkpoint.load import load_pretrained
from petformers.cli.main import main
from petformers.checkpoint.peft import save_peft_adapter
from petformers.pet import PetConfig, apply_lora, lora_state_dict

IDS = torch.tensor([[5, 17, 301, 42, 9, 77, 130, 2, 64, 18]])


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory):
    """A DoRA adapter on every linear layer plus a trained lm_head, and the unmerged model's logits."""
    model = load_pretrained(tiny_model_dir, with_tokenizer=False)[0]
    config = PetConfig(lora_rank=4, lora_alpha=8, target_modules="all-linear", use_dora=True,
                       modules_to_save=["lm_head"])
    apply_lora(model, config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for t in lora_state_dict(model).values():
            t.add_(torch.randn(t.shape, generator=g) * 0.05)
        unmerged = model(IDS)
    out = tmp_path_factory.mktemp("adapter")
    save_peft_adapter(model, config, out, str(tiny_model_dir))
    return out, unmerged


def hf_logits(model_dir) -> torch.Tensor:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(IDS).logits


def test_export_merge_loads_in_transformers(tiny_model_dir, adapter, tmp_path):
    adapter_dir, unmerged = adapter
    out = tmp_path / "merged"
    rc = main(["export", "merge", "--load_checkpoint", str(tiny_model_dir), "--adapter", str(adapter_dir),
               "--output_dir", str(out)])
    assert rc == 0
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
              "generation_config.json"):
        assert (out / f).exists(), f
    with safe_open(str(out / "model.safetensors"), "pt") as st:
        keys = set(st.keys())
    assert "model.layers.0.self_attn.q_proj.weight" in keys and not any("lora" in k for k in keys)
    assert (hf_logits(out) - unmerged).abs().max() <= 1e-5


def test_export_merge_shards_and_dtype(tiny_model_dir, adapter, tmp_path):
    adapter_dir, unmerged = adapter
    out = tmp_path / "merged"
    rc = main(["export", "merge", "--load_checkpoint", str(tiny_model_dir), "--adapter", str(adapter_dir),
               "--output_dir", str(out), "--dtype", "bfloat16", "--max_shard_size_gb", str(40_000 / 1024**3)])
    assert rc == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((out / s).exists() for s in shards)
    with safe_open(str(out / shards[0]), "pt") as st:
        assert all(st.get_slice(k).get_dtype() == "BF16" for k in st.keys())
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert (hf_logits(out) - unmerged).abs().max() < 0.1  # bf16 weights: close, not equal


def test_export_merge_bad_adapter_is_one_line(tiny_model_dir, tmp_path, capsys):
    rc = main(["export", "merge", "--load_checkpoint", str(tiny_model_dir), "--adapter", str(tmp_path),
               "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err[-1] == f"petformers: error: {tmp_path}: no adapter_config.json (not a PEFT adapter directory)"
    assert not (tmp_path / "out").exists()
