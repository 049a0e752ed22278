"""Meta's original checkpoint layout: consolidated.NN.pth + params.json + tokenizer.model.

The checkpoints are made here from a tiny transformers Llama the way Meta's weights relate to
Hugging Face's: q/k rows in Meta's interleaved rope order, model-parallel shards split along the
dimension each layer is parallel in. Loading must give transformers' logits, and must never unpickle
anything but tensors."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
import torch

from petformers.checkpoint.load import load_pretrained
from petformers.errors import CheckpointError

# Meta's model-parallel layers (llama/model.py): ColumnParallelLinear splits the output dimension
# (weight dim 0), RowParallelLinear and ParallelEmbedding the input/embedding dimension (dim 1).
SHARD_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1, "tok_embeddings": 1}
HF_TO_META = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
              "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
              "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
              "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm",
              "post_attention_layernorm": "ffn_norm"}


def to_meta_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of transformers' convert_llama_weights_to_hf permute: HF rotate-half -> Meta interleaved."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def reference_llama(theta: float = 10000.0, scaled_rope: bool = False, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192, "rope_theta": theta} if scaled_rope else None
    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=theta,
                      rope_scaling=scaling, max_position_embeddings=16384, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def meta_state_dict(ref, dtype=torch.float32) -> dict[str, torch.Tensor]:
    sd = {}
    for name, w in ref.state_dict().items():
        if name == "model.embed_tokens.weight":
            key = "tok_embeddings.weight"
        elif name == "model.norm.weight":
            key = "norm.weight"
        elif name == "lm_head.weight":
            key = "output.weight"
        else:
            _, _, layer, rest = name.split(".", 3)
            module, param = rest.rsplit(".", 1)
            key = f"layers.{layer}.{HF_TO_META[module]}.{param}"
        if key.endswith("attention.wq.weight"):
            w = to_meta_rows(w, 4)
        elif key.endswith("attention.wk.weight"):
            w = to_meta_rows(w, 2)
        sd[key] = w.to(dtype).clone()
    sd["rope.freqs"] = torch.ones(8, dtype=dtype)  # present in Meta's Llama-2 files, not a parameter
    return sd


def write_meta_dir(out: Path, sd: dict, params: dict, tokenizer_model: bytes, shards: int = 1) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for rank in range(shards):
        part = {}
        for key, w in sd.items():
            kind = key.split(".")[-2] if "." in key else key
            dim = SHARD_DIM.get(kind)
            part[key] = w.chunk(shards, dim=dim)[rank].clone() if dim is not None and shards > 1 else w
        torch.save(part, out / f"consolidated.{rank:02d}.pth")
    (out / "params.json").write_text(json.dumps(params))
    (out / "tokenizer.model").write_bytes(tokenizer_model)
    return out


PARAMS = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": -1, "multiple_of": 32,
          "ffn_dim_multiplier": 0.5, "norm_eps": 1e-5}  # 2*4*64/3 = 170 -> *0.5 = 85 -> multiple of 32 = 96


def train_sentencepiece(alpaca_json: Path, vocab_size: int = 512) -> bytes:
    """A real SentencePiece BPE model trained with Llama 2's settings (identity normalisation, digits
    split, byte fallback; ids unk 0, bos 1, eos 2, no pad)."""
    import sentencepiece as spm

    records = json.loads(alpaca_json.read_text(encoding="utf-8"))
    lines = [r["instruction"] + " " + r["output"] for r in records[:400]]
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buffer, model_type="bpe",
                                   vocab_size=vocab_size, character_coverage=0.9995, byte_fallback=True,
                                   split_digits=True, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
                                   unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def sentencepiece_model(alpaca_demo) -> bytes:
    return train_sentencepiece(alpaca_demo)


@pytest.fixture(scope="module")
def meta_ref():
    return reference_llama()


@pytest.fixture(scope="module")
def meta_dir(tmp_path_factory, meta_ref, sentencepiece_model):
    return write_meta_dir(tmp_path_factory.mktemp("meta"), meta_state_dict(meta_ref), PARAMS, sentencepiece_model)


IDS = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))


def _max_diff(model, ref) -> float:
    with torch.no_grad():
        return (model(IDS) - ref(IDS).logits).abs().max().item()


def test_meta_checkpoint_logits_equal_transformers(meta_dir, meta_ref):
    model, tokenizer = load_pretrained(meta_dir)
    assert _max_diff(model, meta_ref) <= 1e-5
    cfg = model.config
    assert (cfg.vocab_size, cfg.intermediate_size, cfg.n_kv_heads, cfg.head_dim) == (512, 96, 2, 16)
    assert tokenizer.kind == "sentencepiece" and tokenizer.vocab_size == 512


def test_two_model_parallel_shards(tmp_path, meta_ref, sentencepiece_model):
    path = write_meta_dir(tmp_path / "mp2", meta_state_dict(meta_ref), PARAMS, sentencepiece_model, shards=2)
    shard0 = torch.load(path / "consolidated.00.pth", weights_only=True)
    assert shard0["layers.0.attention.wq.weight"].shape == (32, 64)  # really split
    assert shard0["layers.0.attention.wo.weight"].shape == (64, 32)
    assert shard0["tok_embeddings.weight"].shape == (512, 32)
    model, _ = load_pretrained(path, with_tokenizer=False)
    assert _max_diff(model, meta_ref) <= 1e-5


def test_llama3_params_with_scaled_rope(tmp_path, sentencepiece_model):
    """params.json `use_scaled_rope` + rope_theta (Llama 3.1) against transformers' llama3 rope."""
    ref = reference_llama(theta=500000.0, scaled_rope=True, seed=1)
    params = PARAMS | {"rope_theta": 500000.0, "use_scaled_rope": True, "vocab_size": 512}
    path = write_meta_dir(tmp_path / "llama31", meta_state_dict(ref), params, sentencepiece_model)
    model, _ = load_pretrained(path, with_tokenizer=False)
    assert model.config.rope_scaling["rope_type"] == "llama3"
    assert _max_diff(model, ref) <= 1e-5


def test_bfloat16_files_load_as_float32(tmp_path, meta_ref, sentencepiece_model):
    """Meta ships bf16 weights; loading them in float32 is exact (bf16 -> fp32 is lossless)."""
    path = write_meta_dir(tmp_path / "bf16", meta_state_dict(meta_ref, torch.bfloat16), PARAMS, sentencepiece_model)
    model, _ = load_pretrained(path, with_tokenizer=False)
    rounded = reference_llama()
    rounded.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in meta_ref.state_dict().items()})
    assert model.tok_embeddings.weight.dtype == torch.float32
    assert _max_diff(model, rounded) <= 1e-5


def test_sentencepiece_tokenizer(meta_dir, sentencepiece_model):
    import sentencepiece as spm

    _, tok = load_pretrained(meta_dir)
    sp = spm.SentencePieceProcessor(model_proto=sentencepiece_model)
    text = "Give three tips for staying healthy. 你好 🎉"
    assert tok.encode(text) == sp.encode(text)
    assert tok.encode(text, add_special_tokens=True) == [1, *sp.encode(text)]
    assert (tok.bos_id, tok.eos_id, tok.eos_ids) == (1, 2, [2])
    assert tok.decode(tok.encode(text, add_special_tokens=True)) == text


# ---- never unpickle arbitrary objects ----------------------------------------------------------

class Payload:
    """Stands for any pickled object that is not a tensor."""

    def __init__(self, marker: str):
        self.marker = marker


class Exploit:
    """Runs code when unpickled: what a malicious checkpoint does."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.mark.parametrize("obj", [Payload, Exploit])
def test_pickled_objects_are_refused(tmp_path, meta_ref, sentencepiece_model, obj):
    marker = tmp_path / "code-ran"
    sd = meta_state_dict(meta_ref)
    sd["layers.0.attention.wq.weight_extra"] = obj(str(marker))
    path = write_meta_dir(tmp_path / "evil", sd, PARAMS, sentencepiece_model)
    with pytest.raises(CheckpointError) as err:
        load_pretrained(path)
    assert str(path / "consolidated.00.pth") in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists()


def test_missing_shards_and_bad_params(tmp_path, meta_dir):
    empty = tmp_path / "no-shards"
    empty.mkdir()
    (empty / "params.json").write_text(json.dumps(PARAMS))
    (empty / "tokenizer.model").write_bytes((meta_dir / "tokenizer.model").read_bytes())
    with pytest.raises(CheckpointError, match="consolidated"):
        load_pretrained(empty)
    (empty / "params.json").write_text(json.dumps({"n_layers": 2}))
    with pytest.raises(CheckpointError) as err:
        load_pretrained(empty)
    assert str(empty / "params.json") in str(err.value) and "dim" in str(err.value)


def test_missing_tokenizer_model_is_named(tmp_path, meta_dir):
    import shutil

    from petformers.errors import TokenizerError

    path = shutil.copytree(meta_dir, tmp_path / "no-tokenizer")
    (path / "tokenizer.model").unlink()
    with pytest.raises(TokenizerError) as err:
        load_pretrained(path)
    assert str(path / "tokenizer.model") in str(err.value) and "no such file" in str(err.value)


@pytest.mark.parametrize("keep", [0.5, 0.01])
def test_truncated_pth_is_refused(tmp_path, meta_dir, keep):
    import shutil

    path = shutil.copytree(meta_dir, tmp_path / "truncated")
    shard = path / "consolidated.00.pth"
    data = shard.read_bytes()
    shard.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(CheckpointError) as err:
        load_pretrained(path)
    assert str(shard) in str(err.value) and "\n" not in str(err.value)
