"""Tiny random models of each supported family, built and saved by transformers (the reference), and the
same weights written as GGUF the way llama.cpp's converter writes them.

Each family has its switches on: GQA (4 query heads, 2 key/value heads), and
- llama3: Llama 3.x rope scaling, rope theta 5e5, an explicit head_dim (24, not 64/4);
- mistral: a sliding window of 8 keys (shorter than the test sequences, so it matters);
- qwen2: q/k/v biases, tied embeddings, rope theta 1e6;
- qwen3: per-head q/k RMSNorm, an explicit head_dim (32), rope theta 1e6.
Biases and norm weights are randomised (transformers initialises them to 0 and 1), so a loader that
dropped them, or a model that skipped them, would give different logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

VOCAB = 512
BOS, EOS, PAD = 1, 2, 3
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 32}
FAMILIES = {
    "llama3": ("LlamaConfig", "LlamaForCausalLM",
               dict(head_dim=24, rope_scaling=LLAMA3_SCALING, rope_theta=500000.0)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=8)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True, rope_theta=1000000.0)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=32, rope_theta=1000000.0)),
}
# GGUF general.architecture llama.cpp's converter writes for each family
GGUF_ARCH = {"llama3": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}


def write_family(out_dir: Path, family: str, seed: int = 0, tokenizer_dir: Path | None = None,
                 **overrides) -> Path:
    """The tiny model saved by transformers in `out_dir`, with the tokenizer files of `tokenizer_dir`."""
    import transformers

    vocab = VOCAB
    if tokenizer_dir is not None:
        from tokenizers import Tokenizer

        vocab = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).get_vocab_size()
    config_cls, model_cls, kwargs = FAMILIES[family]
    torch.manual_seed(seed)
    cfg = getattr(transformers, config_cls)(
        vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6, bos_token_id=BOS,
        eos_token_id=EOS, pad_token_id=PAD, **(kwargs | overrides))
    model = getattr(transformers, model_cls)(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.5)
            elif "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    model.save_pretrained(str(out_dir))
    if tokenizer_dir is not None:
        for f in tokenizer_dir.iterdir():
            if f.is_file():
                (out_dir / f.name).write_bytes(f.read_bytes())
    return out_dir


def reference(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


# ---- GGUF, as llama.cpp's convert_hf_to_gguf.py names and lays out tensors ----------------------

_GGUF_LAYER = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
               "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.down_proj": "ffn_down",
               "mlp.up_proj": "ffn_up", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
_GGUF_TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}


def gguf_tensor_name(hf_name: str) -> str:
    if hf_name in _GGUF_TOP:
        return _GGUF_TOP[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    module, param = rest.rsplit(".", 1)
    return f"blk.{layer}.{_GGUF_LAYER[module]}.{param}"


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute: rotate-half rows -> interleaved rows (weights and biases)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(scaling: dict, theta: float, head_dim: int) -> np.ndarray:
    """LlamaModel.generate_extra_tensors: llama.cpp divides each rope frequency by these factors."""
    import math

    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def write_gguf(out_file: Path, model_dir: Path, arch: str, tokenizer=None) -> Path:
    """`model_dir` as an F32 GGUF of architecture `arch` (q/k permuted for `llama` only, as llama.cpp does).
    `tokenizer`: a callable adding tokenizer metadata to the writer (default: a byte vocabulary)."""
    import gguf
    from safetensors.numpy import load_file

    cfg = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    theta = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    writer = gguf.GGUFWriter(str(out_file), arch)
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(float(theta))
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_vocab_size(cfg["vocab_size"])
    if cfg.get("head_dim"):  # TextModel.set_gguf_parameters
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if arch == "llama":
        writer.add_rope_dimension_count(head_dim)
    if cfg.get("sliding_window") and cfg.get("model_type") == "mistral":
        writer.add_sliding_window(cfg["sliding_window"])
    if tokenizer is None:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("qwen2" if arch.startswith("qwen") else "llama-bpe")
        writer.add_token_list([f"<t{i}>" for i in range(cfg["vocab_size"])])
        writer.add_token_types([1] * cfg["vocab_size"])
        writer.add_token_merges([])
        writer.add_bos_token_id(BOS)
        writer.add_eos_token_id(EOS)
    else:
        tokenizer(writer)
    scaling = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if scaling.get("rope_type") == "llama3":
        writer.add_tensor("rope_freqs.weight", llama3_rope_factors(scaling, float(theta), head_dim))
    for hf_name, w in sorted(load_file(str(model_dir / "model.safetensors")).items()):
        name = gguf_tensor_name(hf_name)
        w = w.astype(np.float32)
        if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
            w = _permute(w, heads if ".attn_q." in name else kv_heads)
        writer.add_tensor(name, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out_file
