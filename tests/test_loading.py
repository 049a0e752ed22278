"""Loading Hugging Face model directories: sharded safetensors, dtypes, writing them back, and one
clear error (type, path, tensor) for each kind of bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from petformers.checkpoint import hf
from petformers.checkpoint.load import detect_format, load_config, load_pretrained
from petformers.errors import CheckpointError, PetformersError


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()


@pytest.fixture
def model_copy(tmp_path, tiny_model_dir):
    """A private copy of the tiny model directory that a test may break."""
    return shutil.copytree(tiny_model_dir, tmp_path / "model")


IDS = torch.randint(0, 512, (2, 33), generator=torch.Generator().manual_seed(0))


def test_sharded_safetensors_with_index(tmp_path, reference):
    out = tmp_path / "sharded"
    reference.save_pretrained(str(out), max_shard_size="60KB")
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 3 and (out / "model.safetensors.index.json").exists()
    assert not (out / "model.safetensors").exists()
    model, tokenizer = load_pretrained(out, with_tokenizer=False)
    assert tokenizer is None
    with torch.no_grad():
        assert (model(IDS) - reference(IDS).logits).abs().max().item() <= 1e-5


def test_missing_shard_is_named(tmp_path, reference):
    out = tmp_path / "sharded"
    reference.save_pretrained(str(out), max_shard_size="60KB")
    victim = sorted(out.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        load_pretrained(out, with_tokenizer=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_load(tiny_model_dir, reference, dtype):
    from transformers import AutoModelForCausalLM

    model, _ = load_pretrained(tiny_model_dir, dtype=dtype, with_tokenizer=False)
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert model.config.compute_dtype == str(dtype).removeprefix("torch.")
    # Weights are the float32 ones rounded once; logits match transformers loading in the same dtype.
    assert torch.equal(model.tok_embeddings.weight, reference.model.embed_tokens.weight.to(dtype))
    ref_half = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=dtype).eval()
    with torch.no_grad():
        logits = model(IDS)
        assert logits.dtype == dtype
        assert (logits.float() - ref_half(IDS).logits.float()).abs().max().item() <= 1e-2
        assert (logits.float() - reference(IDS).logits).abs().max().item() <= 5e-2


def test_load_config_reads_no_weights(tiny_model_dir):
    cfg, fmt = load_config(tiny_model_dir)
    assert fmt == "hf"
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.n_kv_heads, cfg.intermediate_size) == (2, 64, 4, 2, 96)
    assert (cfg.bos_token_id, cfg.eos_token_ids, cfg.pad_token_id) == (1, [2], 3)


def test_save_model_dir_round_trip(tmp_path, tiny_model_dir, reference):
    """petformers' writer gives a directory transformers loads (sharded here), with the same logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = load_pretrained(tiny_model_dir)
    out = tmp_path / "exported"
    hf.save_model_dir(model.state_dict(), model.config, out, tokenizer=tokenizer, max_shard_bytes=100_000)
    assert (out / "model.safetensors.index.json").exists()
    assert not list(out.glob("*.tmp"))  # atomic writes leave no temporaries behind
    again = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        assert (again(IDS).logits - reference(IDS).logits).abs().max().item() <= 1e-5
    ref_tok = AutoTokenizer.from_pretrained(str(out))
    assert ref_tok("Hello 世界")["input_ids"] == tokenizer.encode("Hello 世界")
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2


# ---- bad input: one clear error each ---------------------------------------------------------

def _one_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message and message
    return message


def test_missing_path(tmp_path):
    missing = tmp_path / "no" / "such-model"
    with pytest.raises(CheckpointError) as err:
        load_pretrained(missing)
    assert str(missing) in _one_line(err)


def test_directory_without_any_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError) as err:
        load_pretrained(tmp_path)
    assert str(tmp_path) in _one_line(err)


def test_unknown_architecture(model_copy):
    cfg_file = model_copy / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as err:
        load_pretrained(model_copy)
    message = _one_line(err)
    assert str(cfg_file) in message and "GPT2LMHeadModel" in message


def test_config_json_missing_a_key(model_copy):
    cfg_file = model_copy / "config.json"
    cfg = json.loads(cfg_file.read_text())
    del cfg["num_hidden_layers"]
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as err:
        load_pretrained(model_copy)
    assert str(cfg_file) in _one_line(err) and "num_hidden_layers" in str(err.value)


def test_invalid_config_json(model_copy):
    (model_copy / "config.json").write_text('{"model_type": "llama",\n  "hidden_size": }')
    with pytest.raises(CheckpointError) as err:
        load_pretrained(model_copy)
    assert "config.json" in _one_line(err) and "line 2" in str(err.value)


@pytest.mark.parametrize("keep", [0.5, 0.001], ids=["in-data", "in-header"])
def test_truncated_safetensors(model_copy, keep):
    weights = model_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:max(4, int(len(data) * keep))])
    with pytest.raises(CheckpointError) as err:
        load_pretrained(model_copy)
    assert str(weights) in _one_line(err)


def test_wrong_hidden_size_in_config(model_copy):
    cfg_file = model_copy / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["hidden_size"] = 128
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as err:
        load_pretrained(model_copy)
    message = _one_line(err)
    assert str(model_copy) in message and "(512, 64)" in message and "(512, 128)" in message


def test_tensor_of_the_wrong_shape(model_copy):
    weights = model_copy / "model.safetensors"
    tensors = load_file(str(weights))
    tensors["model.layers.1.self_attn.v_proj.weight"] = torch.zeros(16, 64)
    save_file(tensors, str(weights), metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as err:
        load_pretrained(model_copy)
    message = _one_line(err)
    assert "layers.1.attention.wv.weight" in message and "(16, 64)" in message and "(32, 64)" in message


def test_missing_and_unexpected_tensors(model_copy):
    weights = model_copy / "model.safetensors"
    tensors = load_file(str(weights))
    del tensors["model.norm.weight"]
    save_file(tensors, str(weights), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="norm.weight"):
        load_pretrained(model_copy)
    tensors["model.norm.weight"] = torch.ones(64)
    tensors["model.layers.0.mlp.extra_proj.weight"] = torch.ones(2, 2)
    save_file(tensors, str(weights), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="extra_proj"):
        load_pretrained(model_copy)


def test_pickle_weights_are_never_read(model_copy):
    (model_copy / "model.safetensors").unlink()
    (model_copy / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match="safetensors"):
        load_pretrained(model_copy)


def test_bare_files_are_refused_with_advice(tmp_path, tiny_model_dir):
    with pytest.raises(CheckpointError, match="directory"):
        detect_format(tiny_model_dir / "model.safetensors")
    junk = tmp_path / "weights.bin"
    junk.write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        load_pretrained(junk)


def test_every_loader_error_is_a_petformers_error(model_copy):
    """The CLI turns PetformersError into one line + exit code 2; loaders must not leak other types."""
    (model_copy / "tokenizer.json").write_text("{ not json")
    with pytest.raises(PetformersError):
        load_pretrained(model_copy)
