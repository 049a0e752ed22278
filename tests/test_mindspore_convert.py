"""`petformers convert`: MindSpore .ckpt -> Hugging Face directories that transformers loads with
MindFormers' logits, and Hugging Face -> .ckpt with MindSpore's own bytes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from conftest import MINDSPORE_FIXTURES
from petformers.checkpoint.mindspore_ckpt import read_ckpt
from petformers.cli.main import main

pytestmark = pytest.mark.skipif(not MINDSPORE_FIXTURES.exists(), reason="MindSpore fixtures not present")

META = json.loads((MINDSPORE_FIXTURES / "tiny_llama.json").read_text()) if MINDSPORE_FIXTURES.exists() else {}


def write_yaml(path, pet: bool = True, **changes):
    """A MindFormers-style YAML (the seed's layout) describing the fixture model."""
    mc = {"type": "LlamaConfig", "batch_size": 1, "compute_dtype": "float32", "param_init_type": "float32",
          "use_past": False, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2} | META["config"] | changes
    if pet:
        lora = META["lora"]
        mc["pet_config"] = {"pet_type": "lora", "lora_rank": lora["lora_rank"], "lora_alpha": lora["lora_alpha"],
                            "lora_dropout": 0.05, "target_modules": lora["target_modules"]}
    cfg = {"seed": 0, "run_mode": "finetune", "context": {"device_target": "Ascend"},
           "model": {"model_config": mc, "arch": {"type": "LlamaForCausalLM"}}}
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


@torch.no_grad()
def transformers_logits(model_dir) -> np.ndarray:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(model_dir)).eval()
    return model(torch.tensor(META["logits"]["input_ids"])).logits.float().numpy()


@pytest.mark.parametrize("ckpt,reference", [("tiny_llama.ckpt", "tiny_llama_logits.npy"),
                                            ("tiny_llama_lora.ckpt", "tiny_llama_lora_logits.npy")])
def test_mindspore_to_hf_loads_in_transformers_with_mindformers_logits(tmp_path, capsys, ckpt, reference):
    out = tmp_path / "hf"
    code = main(["convert", "--from", "mindspore", str(MINDSPORE_FIXTURES / ckpt),
                 "--config", str(write_yaml(tmp_path / "c.yaml")), "--to", "hf", "--output_dir", str(out)])
    assert code == 0 and capsys.readouterr().out.strip() == str(out)
    config = json.loads((out / "config.json").read_text())
    assert config["intermediate_size"] == 192 and config["num_key_value_heads"] == 2
    assert config["torch_dtype"] == "float32"
    diff = np.abs(transformers_logits(out) - np.load(MINDSPORE_FIXTURES / reference)).max()
    assert diff < 1e-4


def test_round_trip_back_to_mindspore_gives_the_original_bytes(tmp_path, capsys):
    main(["convert", "--from", "mindspore", str(MINDSPORE_FIXTURES / "tiny_llama.ckpt"),
          "--config", str(write_yaml(tmp_path / "c.yaml", pet=False)), "--to", "hf",
          "--output_dir", str(tmp_path / "llama")])
    capsys.readouterr()
    assert main(["convert", "--from", "hf", str(tmp_path / "llama"), "--to", "mindspore",
                 "--output_dir", str(tmp_path / "ms")]) == 0
    written = tmp_path / "ms" / "llama.ckpt"
    assert capsys.readouterr().out.strip() == str(written)
    assert written.read_bytes() == (MINDSPORE_FIXTURES / "tiny_llama.ckpt").read_bytes()


def test_transformers_model_to_mindspore_and_back_into_petformers(tmp_path, tiny_model_dir, capsys):
    from transformers import LlamaForCausalLM

    from petformers.checkpoint.load import load_pretrained
    from petformers.checkpoint.hf import read_config

    assert main(["convert", "--from", "hf", str(tiny_model_dir), "--to", "mindspore",
                 "--output_dir", str(tmp_path), "--dtype", "bfloat16"]) == 0
    ckpt = tmp_path / f"{tiny_model_dir.name}.ckpt"
    entries = read_ckpt(ckpt)
    assert "model.tok_embeddings.embedding_weight" in entries and "model.norm_out.weight" in entries
    assert entries["model.layers.1.feed_forward.w2.weight"].dtype == torch.bfloat16
    hf_model = LlamaForCausalLM.from_pretrained(str(tiny_model_dir))
    want = hf_model.model.layers[1].mlp.down_proj.weight.detach().to(torch.bfloat16)
    assert torch.equal(entries["model.layers.1.feed_forward.w2.weight"], want)
    model, _ = load_pretrained(ckpt, config=read_config(tiny_model_dir), with_tokenizer=False)
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        ref = hf_model(ids).logits
        got = model(ids)
    assert (got - ref).abs().max() < 0.05  # bf16 weights


def test_tokenizer_is_saved_beside_the_weights(tmp_path, tiny_tokenizer_dir, capsys):
    assert main(["convert", "--from", "mindspore", str(MINDSPORE_FIXTURES / "tiny_llama.ckpt"),
                 "--config", str(write_yaml(tmp_path / "c.yaml")), "--to", "hf", "--output_dir",
                 str(tmp_path / "hf"), "--tokenizer", str(tiny_tokenizer_dir), "--dtype", "bfloat16"]) == 0
    assert (tmp_path / "hf" / "tokenizer.json").exists()
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_bad_input_gives_one_line_errors(tmp_path, capsys):
    ckpt = str(MINDSPORE_FIXTURES / "tiny_llama_lora.ckpt")
    assert main(["convert", "--from", "mindspore", ckpt, "--to", "hf", "--output_dir", str(tmp_path)]) == 2
    assert "--config: converting a MindSpore checkpoint needs the MindFormers YAML" in capsys.readouterr().err

    no_pet = write_yaml(tmp_path / "nopet.yaml", pet=False)
    assert main(["convert", "--from", "mindspore", ckpt, "--config", str(no_pet), "--to", "hf",
                 "--output_dir", str(tmp_path / "o")]) == 2
    assert "holds mindpet LoRA tensors but model.model_config has no pet_config" in capsys.readouterr().err

    wrong = write_yaml(tmp_path / "wrong.yaml", hidden_size=128)
    assert main(["convert", "--from", "mindspore", ckpt, "--config", str(wrong), "--to", "hf",
                 "--output_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "'model.tok_embeddings.embedding_weight' has shape [256, 64]" in err and len(err.strip().splitlines()) == 1

    (tmp_path / "empty.yaml").write_text("model: {}\n")
    assert main(["convert", "--from", "mindspore", ckpt, "--config", str(tmp_path / "empty.yaml"), "--to", "hf",
                 "--output_dir", str(tmp_path / "o")]) == 2
    assert "no model.model_config section" in capsys.readouterr().err

    assert main(["convert", "--from", "hf", str(tmp_path), "--to", "hf", "--output_dir", str(tmp_path / "o")]) == 2
    assert "nothing to convert" in capsys.readouterr().err
