"""Every supported family (Llama 3.x, Mistral, Qwen2/2.5, Qwen3) against transformers, in float32.

For each family a tiny random model is built and saved by transformers (tests/family_models.py: 2 layers,
GQA, the family's switches on) and checked end to end: logits, greedy and left-padded batched
generation, PEFT adapters both ways, the merged export, and the same weights as a GGUF file.
"""

from __future__ import annotations

import json

import pytest
import torch
from family_models import EOS, FAMILIES, GGUF_ARCH, PAD, llama3_rope_factors, reference, write_family, write_gguf

from petformers.checkpoint.load import load_pretrained
from petformers.cli.main import main
from petformers.generate import GenerationConfig, generate
from petformers.checkpoint.peft import load_peft_adapter, save_peft_adapter
from petformers.pet import PetConfig, apply_lora, lora_state_dict

TOL = 1e-5
MAX_ID = 300  # token ids drawn below this: inside the tiny tokenizer's vocabulary (358 tokens without the shared Alpaca text, 512 with it)
# 40 tokens: longer than Mistral's window of 8 and than Llama 3's original_max_position_embeddings of 32
IDS = torch.randint(4, MAX_ID, (2, 40), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory, tiny_tokenizer_dir):
    """(family name, model directory, transformers model, petformers model)."""
    name = request.param
    path = write_family(tmp_path_factory.mktemp(name), name, seed=len(name), tokenizer_dir=tiny_tokenizer_dir)
    model, _ = load_pretrained(path, with_tokenizer=False)
    return name, path, reference(path), model


def logits_of(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return out if torch.is_tensor(out) else out.logits


def test_logits_equal_transformers(family):
    name, path, ref, model = family
    expected = logits_of(ref)
    assert (logits_of(model) - expected).abs().max().item() <= TOL
    cfg = model.config
    assert cfg.family == ("llama" if name == "llama3" else name)
    assert (cfg.num_heads, cfg.n_kv_heads) == (4, 2)
    assert cfg.qkv_has_bias == (name == "qwen2") and cfg.qk_norm == (name == "qwen3")
    assert cfg.head_dim == {"llama3": 24, "qwen3": 32}.get(name, 16)
    assert cfg.sliding_window == (8 if name == "mistral" else None)
    assert (model.lm_head.weight is model.tok_embeddings.weight) == (name == "qwen2")


def test_the_switches_matter(family):
    """Without its switch the model is not the family's: each check above could fail."""
    name, path, ref, model = family
    expected = logits_of(ref)
    if name == "qwen3":
        for layer in model.layers:
            layer.attention.q_norm.weight.data, saved = torch.ones_like(layer.attention.q_norm.weight), \
                layer.attention.q_norm.weight.data
            layer.attention.q_norm.saved = saved
        try:
            assert (logits_of(model) - expected).abs().max().item() > 1e-3
        finally:
            for layer in model.layers:
                layer.attention.q_norm.weight.data = layer.attention.q_norm.saved
    elif name == "mistral":
        model.config.sliding_window = None
        try:
            assert (logits_of(model) - expected).abs().max().item() > 1e-3
        finally:
            model.config.sliding_window = 8
    elif name == "qwen2":
        bias = model.layers[0].attention.wq.bias
        saved = bias.data.clone()
        bias.data.zero_()
        try:
            assert (logits_of(model) - expected).abs().max().item() > 1e-3
        finally:
            bias.data.copy_(saved)
    else:
        saved = model.config.rope_scaling
        model.config.rope_scaling = None
        try:
            assert (logits_of(model) - expected).abs().max().item() > 1e-3
        finally:
            model.config.rope_scaling = saved
    assert (logits_of(model) - expected).abs().max().item() <= TOL


def _prompt(length: int, seed: int) -> list[int]:
    return torch.randint(4, MAX_ID, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_greedy_generation_equals_transformers(family):
    name, path, ref, model = family
    prompt = _prompt(11, 1)
    x = torch.tensor([prompt])
    theirs = ref.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=16, do_sample=False,
                          eos_token_id=None, pad_token_id=PAD)[0, len(prompt):].tolist()
    ours = generate(model, [prompt], GenerationConfig(max_new_tokens=16), [], PAD)[0]
    assert ours == theirs and len(ours) == 16


def test_left_padded_batch_generation_equals_transformers(family):
    name, path, ref, model = family
    prompts = [_prompt(n, 20 + n) for n in (13, 4, 9)]  # 13 + 12 new tokens: past Mistral's window of 8
    longest = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    theirs = ref.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=None,
                          pad_token_id=PAD)[:, longest:].tolist()
    ours = generate(model, prompts, GenerationConfig(max_new_tokens=12), [], PAD)
    assert ours == theirs


def _randomise(model, scale=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in lora_state_dict(model).values():
            t.add_(torch.randn(t.shape, generator=g) * scale)


def test_petformers_adapter_loads_in_peft(family, tmp_path):
    from peft import PeftModel

    name, path, ref, _ = family
    model, _ = load_pretrained(path, with_tokenizer=False)
    config = PetConfig(lora_rank=4, lora_alpha=8, target_modules=".*wq|.*wk|.*wv|.*wo")  # MindFormers' spelling
    apply_lora(model, config)
    _randomise(model)
    assert model.layers[0].attention.wq.lora_b.weight.abs().sum() > 0
    if model.layers[0].attention.wq.bias is not None:
        assert not model.layers[0].attention.wq.bias.requires_grad  # the bias stays frozen
    save_peft_adapter(model, config, tmp_path, str(path))
    peft = PeftModel.from_pretrained(reference(path), str(tmp_path)).eval()
    assert type(peft.base_model.model).__name__ == FAMILIES[name][1]
    assert (logits_of(peft) - logits_of(model)).abs().max().item() <= TOL
    assert (logits_of(peft) - logits_of(ref)).abs().max().item() > 1e-3  # the adapter does something


def test_peft_adapter_loads_in_petformers(family, tmp_path):
    from peft import LoraConfig, get_peft_model

    name, path, ref, _ = family
    peft = get_peft_model(reference(path), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                      "gate_proj", "up_proj", "down_proj"]))
    peft.save_pretrained(str(tmp_path))
    model, _ = load_pretrained(path, with_tokenizer=False)
    load_peft_adapter(model, tmp_path)
    assert model.layers[1].feed_forward.w2.lora_b.weight.abs().sum() > 0
    assert (logits_of(model) - logits_of(peft.eval())).abs().max().item() <= TOL


def test_merged_export_is_the_same_architecture(family, tmp_path):
    name, path, ref, _ = family
    model, _ = load_pretrained(path, with_tokenizer=False)
    config = PetConfig(lora_rank=4, lora_alpha=8, target_modules=["q_proj", "wv", "down_proj"])  # both spellings
    apply_lora(model, config)
    _randomise(model, seed=1)
    adapted = logits_of(model)
    save_peft_adapter(model, config, tmp_path / "adapter", str(path))
    out = tmp_path / "merged"
    assert main(["export", "merge", "--load_checkpoint", str(path), "--adapter", str(tmp_path / "adapter"),
                 "--output_dir", str(out)]) == 0
    written = json.loads((out / "config.json").read_text(encoding="utf-8"))
    source = json.loads((path / "config.json").read_text(encoding="utf-8"))
    assert written["architectures"] == source["architectures"] == [FAMILIES[name][1]]
    assert written["model_type"] == source["model_type"]
    merged = reference(out)
    assert type(merged).__name__ == FAMILIES[name][1]
    assert (logits_of(merged) - adapted).abs().max().item() <= TOL
    assert (logits_of(merged) - logits_of(ref)).abs().max().item() > 1e-3


def test_gguf_loads_with_equal_logits(family, tmp_path):
    name, path, ref, _ = family
    gguf_file = write_gguf(tmp_path / f"{name}.gguf", path, GGUF_ARCH[name])
    model, tokenizer = load_pretrained(gguf_file)
    assert (logits_of(model) - logits_of(ref)).abs().max().item() <= TOL
    assert model.config.family == ("qwen2" if name == "qwen2" else "qwen3" if name == "qwen3" else "llama")
    assert tokenizer.eos_ids == [EOS]


@pytest.mark.parametrize("scaling", [
    {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    {"factor": 4.0, "low_freq_factor": 2.0, "high_freq_factor": 6.0, "original_max_position_embeddings": 4096},
], ids=["llama3.1", "llama3.2", "other"])
def test_llama3_rope_scaling_recovered_from_gguf_rope_freqs(scaling):
    """Real Llama 3.x shapes (head_dim 128, theta 5e5): the rope frequencies from llama.cpp's rope_freqs equal
    transformers' llama3 rope."""
    import numpy as np
    from transformers import LlamaConfig as HFConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from petformers.checkpoint.gguf_file import rope_scaling_from_factors
    from petformers.models.config import LlamaConfig
    from petformers.models.llama import rope_inv_freq

    scaling = {"rope_type": "llama3"} | scaling
    config = LlamaConfig(hidden_size=4096, num_heads=32, num_layers=1, vocab_size=8, theta=500000.0)
    factors = llama3_rope_factors(scaling, 500000.0, 128).astype(np.float64)
    config.rope_scaling = rope_scaling_from_factors(config, factors, "test.gguf")
    hf = HFConfig(hidden_size=4096, num_attention_heads=32, rope_parameters={"rope_theta": 500000.0} | scaling)
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    assert torch.allclose(rope_inv_freq(config).double(), expected.double(), rtol=1e-5, atol=0)


# ---- the switches in other combinations -----------------------------------------------------

VARIANTS = {
    # Qwen2's rule: sliding window only on the layers from max_window_layers on (here layer 1, not layer 0)
    "qwen2-sliding-upper-layers": ("qwen2", dict(use_sliding_window=True, sliding_window=6, max_window_layers=1)),
    "qwen3-tied-sliding": ("qwen3", dict(tie_word_embeddings=True, use_sliding_window=True, sliding_window=5,
                                         max_window_layers=0)),
    "llama-attention-bias": ("llama3", dict(attention_bias=True, rope_scaling=None)),  # wq/wk/wv and wo biases
    "mistral-head-dim": ("mistral", dict(head_dim=32, sliding_window=None)),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_logits_equal_transformers(variant, tmp_path):
    name, overrides = VARIANTS[variant]
    path = write_family(tmp_path, name, seed=3, **overrides)
    model, _ = load_pretrained(path, with_tokenizer=False)
    assert (logits_of(model) - logits_of(reference(path))).abs().max().item() <= TOL
    if variant == "qwen2-sliding-upper-layers":
        assert (model.config.sliding_window, model.config.max_window_layers) == (6, 1)
        model.config.max_window_layers = 0  # the window on layer 0 too: no longer transformers' model
        assert (logits_of(model) - logits_of(reference(path))).abs().max().item() > 1e-3
    if variant == "llama-attention-bias":
        assert model.layers[0].attention.wo.bias is not None
        assert json.loads((path / "config.json").read_text())["attention_bias"] is True
        assert model.config.to_hf()["attention_bias"] is True and model.config.hf_family == "llama"


def test_sliding_window_packed_rows_and_training(tmp_path):
    """Mistral's window holds inside packed rows (each sample sees its own last 8 tokens) and in backward."""
    path = write_family(tmp_path, "mistral", seed=5)
    model, _ = load_pretrained(path, with_tokenizer=False)
    ref = reference(path)
    a, b = IDS[:1, :23], IDS[1:, :17]
    packed = torch.cat([a, b], dim=1)
    positions = torch.cat([torch.arange(23), torch.arange(17)])[None]
    segments = torch.cat([torch.zeros(23, dtype=torch.long), torch.ones(17, dtype=torch.long)])[None]
    with torch.no_grad():
        got = model(packed, position_ids=positions, segment_ids=segments)
    assert (got[:, :23] - logits_of(ref, a)).abs().max().item() <= TOL
    assert (got[:, 23:] - logits_of(ref, b)).abs().max().item() <= TOL
    trained, _ = load_pretrained(path, with_tokenizer=False)
    trained.layers[0].attention.wq.weight.requires_grad_(True)
    trained(packed, position_ids=positions, segment_ids=segments).float().pow(2).mean().backward()
    assert trained.layers[0].attention.wq.weight.grad.abs().sum() > 0


def test_unknown_architecture_is_one_line_naming_the_supported_ones(tmp_path, capsys):
    path = write_family(tmp_path / "model", "qwen2")
    capsys.readouterr()
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(architectures=["Phi3ForCausalLM"], model_type="phi3")
    (path / "config.json").write_text(json.dumps(cfg))
    rc = main(["export", "merge", "--load_checkpoint", str(path), "--adapter", str(tmp_path), "--output_dir",
               str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "Phi3ForCausalLM" in err and str(path / "config.json") in err
    for arch in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        assert arch in err
    assert not (tmp_path / "out").exists()
