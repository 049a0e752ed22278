"""MindFormers Llama parameter names <-> petformers names, and the order MindFormers writes them in.

MindFormers (mindformers/models/llama) names a Llama's parameters
`model.tok_embeddings.embedding_weight`, `model.layers.N.attention.{wq,wk,wv,wo}.weight`,
`model.layers.N.feed_forward.{w1,w2,w3}.weight`, `model.layers.N.{attention_norm,ffn_norm}.weight`,
`model.norm_out.weight` and `lm_head.weight`. mindpet's LoRA adds `<module>.mindpet_delta_lora_a` [r, in]
and `<module>.mindpet_delta_lora_b` [out, r], which are petformers' `<module>.lora_a.weight` /
`<module>.lora_b.weight`.
"""

from __future__ import annotations

import re

from petformers.errors import CheckpointError

_TOP = {
    "model.tok_embeddings.embedding_weight": "tok_embeddings.weight",
    "model.norm_out.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
}
_TOP_BACK = {v: k for k, v in _TOP.items()}
# attention.q_norm / k_norm: Qwen3's per-head norms, under the names petformers writes them (so that a
# Qwen3 round-trips through a .ckpt; MindFormers' own Qwen3 is a different, mcore-style model).
_LAYER = re.compile(r"^model\.(layers\.\d+\.(?:attention\.w[qkvo]\.(?:weight|bias)|feed_forward\.w[123]\.weight"
                    r"|attention_norm\.weight|ffn_norm\.weight|attention\.[qk]_norm\.weight))$")
_MINDPET = re.compile(r"^(.+)\.mindpet_delta_lora_([ab])$")
PF_LORA = re.compile(r"^(.+)\.lora_([ab])\.weight$")
# Order of a decoder layer's parameters in MindFormers checkpoints (as in the MindSpore-written
# fixtures), so that files written here match MindSpore's byte for byte.
_LAYER_ORDER = ["ffn_norm", "attention_norm", "attention.wq", "attention.wk", "attention.wv", "attention.wo",
                "attention.q_norm", "attention.k_norm",
                "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"]
_SUFFIX_ORDER = ["weight", "bias", "lora_a.weight", "lora_b.weight"]


def from_mindformers(name: str) -> str | None:
    """MindFormers name -> petformers name; None for what is not a model weight (optimizer states, counters)."""
    if name in _TOP:
        return _TOP[name]
    m = _LAYER.match(name)
    if m:
        return m.group(1)
    m = _MINDPET.match(name)
    if m:
        module, ab = m.groups()
        return f"{module.removeprefix('model.')}.lora_{ab}.weight"
    if name.startswith("model.") or name.startswith("lm_head."):
        return ""  # a model tensor petformers does not know: the caller reports it
    return None


def to_mindformers(name: str) -> str:
    """petformers name (base or LoRA) -> MindFormers / mindpet name."""
    name = name.replace(".base_layer.", ".")
    m = PF_LORA.match(name)
    if m:
        module, ab = m.groups()
        module = module if module.startswith("lm_head") else f"model.{module}"
        return f"{module}.mindpet_delta_lora_{ab}"
    if name in _TOP_BACK:
        return _TOP_BACK[name]
    if name.startswith("layers."):
        return f"model.{name}"
    raise CheckpointError(f"{name!r} has no MindFormers Llama name")


def is_lora(name: str) -> bool:
    return PF_LORA.match(name) is not None


def order_key(pf_name: str):
    """Sort key giving MindFormers' parameter order (so written files match MindSpore's own)."""
    name = pf_name.replace(".base_layer.", ".")
    if name.startswith("tok_embeddings"):
        return (0, 0, 0, 0)
    m = re.match(r"^layers\.(\d+)\.(.+)$", name)
    if m:
        layer, rest = int(m.group(1)), m.group(2)
        for i, module in enumerate(_LAYER_ORDER):
            if rest.startswith(module + "."):
                suffix = rest[len(module) + 1:]
                return (1, layer, i, _SUFFIX_ORDER.index(suffix) if suffix in _SUFFIX_ORDER else 9)
        return (1, layer, 99, 0)
    if name.startswith("norm."):
        return (2, 0, 0, 0)
    return (3, 0, 0, _SUFFIX_ORDER.index(name[len("lm_head."):]) if name.startswith("lm_head.") else 9)
