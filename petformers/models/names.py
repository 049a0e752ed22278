"""Parameter-name translation between petformers (Meta/MindFormers names) and Hugging Face."""

from __future__ import annotations

import re

# petformers suffix -> Hugging Face suffix, inside `layers.N.`
_LAYER = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "attention.q_norm": "self_attn.q_norm",  # Qwen3
    "attention.k_norm": "self_attn.k_norm",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_LAYER_BACK = {v: k for k, v in _LAYER.items()}
_TOP = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "lm_head": "lm_head"}
_TOP_BACK = {v: k for k, v in _TOP.items()}
# Short module names, for target_modules given in Hugging Face terms.
HF_SHORT_TO_PETFORMERS = {hf.split(".")[-1]: pf.split(".")[-1] for pf, hf in _LAYER.items()} | {"lm_head": "lm_head"}
PETFORMERS_SHORT_TO_HF = {v: k for k, v in HF_SHORT_TO_PETFORMERS.items()}

_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def to_hf(name: str) -> str:
    """'layers.0.attention.wq.weight' -> 'model.layers.0.self_attn.q_proj.weight' (modules or params)."""
    m = _LAYER_RE.match(name)
    if m:
        layer, rest = m.groups()
        for pf, hf in _LAYER.items():
            if rest == pf or rest.startswith(pf + "."):
                return f"model.layers.{layer}.{hf}{rest[len(pf):]}"
        return f"model.layers.{layer}.{rest}"
    for pf, hf in _TOP.items():
        if name == pf or name.startswith(pf + "."):
            return hf + name[len(pf):]
    return name


def from_hf(name: str) -> str:
    """Inverse of `to_hf`; unknown names are returned unchanged."""
    m = _HF_LAYER_RE.match(name)
    if m:
        layer, rest = m.groups()
        for hf, pf in _LAYER_BACK.items():
            if rest == hf or rest.startswith(hf + "."):
                return f"layers.{layer}.{pf}{rest[len(hf):]}"
        return f"layers.{layer}.{rest}"
    for hf, pf in _TOP_BACK.items():
        if name == hf or name.startswith(hf + "."):
            return pf + name[len(hf):]
    return name
