"""MindFormers' Qwen2.5 YAML (type LlamaConfig + qkv_has_bias + tie_word_embeddings + theta 1e6 +
n_kv_heads, Qwen2Tokenizer vocab_file / merges_file) runs as it is: the shipped config dry-runs at
Qwen2.5-0.5B's size, and the same file shrunk to a tiny Qwen2 (built by transformers, converted to a
MindSpore .ckpt by name) fine-tunes; its adapter loads in PEFT over transformers' Qwen2ForCausalLM."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from family_models import reference, write_family
from test_qwen_tokenizer import as_vocab_merges, train_qwen_style

from petformers.checkpoint.load import load_pretrained
from petformers.cli.main import main
from petformers.models.config import LlamaConfig
from petformers.checkpoint.peft import load_peft_adapter

REPO = Path(__file__).resolve().parents[1]
QWEN_YAML = REPO / "configs/qwen2_5/lora_qwen2_5_0_5b.yaml"

RECORDS = [{"instruction": f"Translate number {i} into words.", "input": "", "output": w}
           for i, w in enumerate(["zero", "one", "two", "three", "four", "five", "six", "seven"])] + \
          [{"instruction": "把这句话翻译成英文。", "input": "你好，世界！", "output": "Hello, world!"},
           {"instruction": "Reply with an emoji.", "input": "party", "output": "🎉"}] * 3


def test_shipped_qwen25_yaml_dry_runs_at_its_real_size(capsys):
    assert main(["run", "--config", str(QWEN_YAML), "--dry_run"]) == 0
    out = capsys.readouterr().out
    # Qwen2.5-0.5B has 494,032,768 parameters (q/k/v biases, tied embeddings); LoRA r=8 on wq/wk/wv/wo of
    # its 24 layers adds 24 x 8 x ((896+896) + 2 x (896+128) + (896+896)) = 1,081,344
    assert "parameters: 495,114,112" in out and "trainable parameters: 1,081,344" in out
    assert "family: qwen2 (q/k/v bias, tied embeddings, theta 1e+06)" in out


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory):
    """(tokenizer dir as vocab.json + merges.txt, HF model dir, MindSpore .ckpt of the same weights)."""
    root = tmp_path_factory.mktemp("tiny_qwen25")
    tok_dir = as_vocab_merges(train_qwen_style(root / "tok_json", vocab_size=500), root / "tokenizer")
    model_dir = write_family(root / "hf", "qwen2", seed=7, tokenizer_dir=root / "tok_json")
    assert main(["convert", str(model_dir), "--from", "hf", "--to", "mindspore", "--output_dir",
                 str(root / "ckpt")]) == 0
    return tok_dir, model_dir, root / "ckpt" / "hf.ckpt"


def tiny_yaml(path: Path, model_dir: Path, tok_dir: Path, out: Path) -> Path:
    """The shipped YAML with only the shapes, the paths and the schedule changed."""
    cfg = yaml.safe_load(QWEN_YAML.read_text(encoding="utf-8"))
    hf = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    cfg["model"]["model_config"].update(
        seq_length=256, hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"], n_kv_heads=hf["num_key_value_heads"], vocab_size=hf["vocab_size"],
        intermediate_size=hf["intermediate_size"], eos_token_id=hf["eos_token_id"], pad_token_id=hf["pad_token_id"],
        bos_token_id=hf["bos_token_id"], compute_dtype="float32")
    cfg["model"]["model_config"]["pet_config"]["lora_dropout"] = 0.0
    cfg["processor"]["tokenizer"].update(vocab_file=str(tok_dir / "vocab.json"), merges_file=str(tok_dir / "merges.txt"))
    cfg["runner_config"].update(epochs=1, batch_size=2, gradient_accumulation_steps=1)
    cfg["optimizer"]["learning_rate"] = cfg["lr_schedule"]["learning_rate"] = 1e-2
    cfg["output_dir"] = str(out)
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    return path


def test_qwen25_yaml_fine_tunes_a_mindspore_ckpt_and_its_adapter_loads_in_peft(tiny_qwen, tmp_path, capsys):
    from peft import PeftModel

    tok_dir, model_dir, ckpt = tiny_qwen
    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps(RECORDS, ensure_ascii=False), encoding="utf-8")
    out = tmp_path / "out"
    cfg = tiny_yaml(tmp_path / "qwen.yaml", model_dir, tok_dir, out)
    assert main(["run", "--config", str(cfg), "--dry_run"]) == 0
    assert main(["run", "--config", str(cfg), "--load_checkpoint", str(ckpt), "--train_dataset_dir", str(data),
                 "--use_parallel", "False", "--run_mode", "finetune"]) == 0
    err = capsys.readouterr().err
    for key in ("rotary_emb_base", "rotary_pct", "emb_dropout_prob", "initializer_range"):  # Qwen's leftovers
        assert f"model.model_config.{key}" in err
    assert "MindFormers' LlamaConfig does not read them either" in err
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) >= 2 and losses[-1] < losses[0]

    adapter = out / "adapter"
    peft = PeftModel.from_pretrained(reference(model_dir), str(adapter)).eval()
    assert type(peft.base_model.model).__name__ == "Qwen2ForCausalLM"
    model, _ = load_pretrained(model_dir, with_tokenizer=False)
    assert model.config.qkv_has_bias and model.config.tie_word_embeddings
    load_peft_adapter(model, adapter)
    ids = torch.randint(4, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs, base = model(ids), peft(ids).logits, reference(model_dir)(ids).logits
    assert (ours - theirs).abs().max().item() <= 1e-5
    assert (theirs - base).abs().max().item() > 1e-4  # the adapter was trained: B is not zero

    # The YAML alone (no config.json) describes the same model as transformers' config.json.
    yaml_cfg = LlamaConfig.from_mindformers({k: v for k, v in yaml.safe_load(cfg.read_text())["model"]["model_config"]
                                             .items() if k != "pet_config"})
    assert yaml_cfg.hf_family == "qwen2" and yaml_cfg.to_hf()["architectures"] == ["Qwen2ForCausalLM"]


def test_qwen25_yaml_with_a_hf_dir_or_a_gguf_takes_their_config(tiny_qwen, tmp_path, capsys):
    """--load_checkpoint a Hugging Face directory or a GGUF: the checkpoint's own config (a Qwen2) decides."""
    from family_models import write_gguf

    tok_dir, model_dir, _ = tiny_qwen
    cfg = tiny_yaml(tmp_path / "qwen.yaml", model_dir, tok_dir, tmp_path / "out")
    gguf_file = write_gguf(tmp_path / "tiny.gguf", model_dir, "qwen2")
    for checkpoint, source in ((model_dir, "hf"), (gguf_file, "gguf")):
        assert main(["run", "--config", str(cfg), "--load_checkpoint", str(checkpoint), "--dry_run"]) == 0
        out = capsys.readouterr().out
        assert f"(config from {source})" in out and "family: qwen2 (q/k/v bias, tied embeddings, theta 1e+06)" in out


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_mindspore_ckpt_round_trip_keeps_biases_norms_and_the_architecture(family, tmp_path):
    """HF -> MindSpore .ckpt -> HF (convert --config YAML): q/k/v biases (Qwen2) and q/k norms (Qwen3) survive,
    and the YAML's switches alone make the written config.json the family's own architecture."""
    src = write_family(tmp_path / "hf", family, seed=13)
    assert main(["convert", str(src), "--from", "hf", "--to", "mindspore", "--output_dir", str(tmp_path / "ms")]) == 0
    hf = json.loads((src / "config.json").read_text(encoding="utf-8"))
    model_config = {"type": "LlamaConfig", "hidden_size": 64, "num_layers": 2, "num_heads": 4, "n_kv_heads": 2,
                    "vocab_size": hf["vocab_size"], "intermediate_size": 96, "rms_norm_eps": 1e-6, "theta": 1e6,
                    "seq_length": 512, "tie_word_embeddings": hf["tie_word_embeddings"]}
    model_config |= {"qkv_has_bias": True} if family == "qwen2" else {"qk_norm": True, "head_dim": 32}
    cfg = tmp_path / "model.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"model_config": model_config}}), encoding="utf-8")
    out = tmp_path / "back"
    assert main(["convert", str(tmp_path / "ms" / "hf.ckpt"), "--from", "mindspore", "--to", "hf", "--config",
                 str(cfg), "--output_dir", str(out)]) == 0
    written = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert written["architectures"] == hf["architectures"] and written["model_type"] == family
    ids = torch.randint(4, 300, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (reference(out)(ids).logits - reference(src)(ids).logits).abs().max().item() == 0.0
