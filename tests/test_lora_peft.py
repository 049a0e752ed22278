"""Adapters cross between petformers and the real transformers + PEFT with the same logits (float32)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from petformers.checkpoint.load import load_pretrained
from petformers.errors import AdapterError
from petformers.models.config import LlamaConfig
from petformers.models.llama import build_model
from petformers.checkpoint.peft import load_peft_adapter, save_peft_adapter
from petformers.pet import PetConfig, apply_lora, lora_state_dict

IDS = torch.tensor([[5, 17, 301, 42, 9, 77, 130, 2, 64, 18], [400, 3, 3, 250, 11, 12, 13, 99, 7, 1]])
TOL = 1e-5


def petformers_model(model_dir):
    return load_pretrained(model_dir, with_tokenizer=False)[0]


def hf_model(model_dir):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


def logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        out = model(IDS)
    return out if torch.is_tensor(out) else out.logits


def train(model, steps=3):
    """A few AdamW steps of next-token loss on IDS, so that B != 0 (dropout on)."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        out = model(IDS)
        out = out if torch.is_tensor(out) else out.logits
        F.cross_entropy(out[:, :-1].flatten(0, 1), IDS[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def peft_model(model_dir, **lora_kwargs):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(hf_model(model_dir), LoraConfig(task_type="CAUSAL_LM", **lora_kwargs))


def load_in_peft(model_dir, adapter_dir):
    from peft import PeftModel

    return PeftModel.from_pretrained(hf_model(model_dir), str(adapter_dir)).eval()


def test_petformers_trained_adapter_loads_in_peft(tiny_model_dir, tmp_path):
    model = petformers_model(tiny_model_dir)
    config = PetConfig.from_dict({"pet_type": "lora", "lora_rank": 16, "lora_alpha": 16, "lora_dropout": 0.05,
                                  "target_modules": ".*wq|.*wk|.*wv|.*wo"})
    apply_lora(model, config)
    train(model)
    assert model.layers[0].attention.wq.lora_b.weight.abs().sum() > 0
    save_peft_adapter(model, config, tmp_path, str(tiny_model_dir))

    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["task_type"] == "CAUSAL_LM"
    assert saved["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert (saved["r"], saved["lora_alpha"], saved["lora_dropout"]) == (16, 16, 0.05)
    assert saved["base_model_name_or_path"] == str(tiny_model_dir)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as st:
        keys = set(st.keys())
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.1.self_attn.o_proj.lora_B.weight" in keys and len(keys) == 2 * 4 * 2

    assert (logits(load_in_peft(tiny_model_dir, tmp_path)) - logits(model)).abs().max() <= TOL


def test_peft_trained_adapter_loads_in_petformers(tiny_model_dir, tmp_path):
    peft = peft_model(tiny_model_dir, r=8, lora_alpha=16, lora_dropout=0.1,
                      target_modules=["q_proj", "v_proj", "gate_proj"])
    train(peft)
    peft.save_pretrained(str(tmp_path))
    model = petformers_model(tiny_model_dir)
    config = load_peft_adapter(model, tmp_path)
    assert config.lora_rank == 8 and sorted(config.target_modules) == ["gate_proj", "q_proj", "v_proj"]
    assert model.layers[1].feed_forward.w1.lora_b.weight.abs().sum() > 0
    assert (logits(model) - logits(peft)).abs().max() <= TOL


VARIANTS = {
    "rslora": dict(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj"]),
    "dora": dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "k_proj", "down_proj"]),
    "modules_to_save": dict(r=4, lora_alpha=8, target_modules=["o_proj"], modules_to_save=["lm_head"]),
    "patterns": dict(r=4, lora_alpha=8, target_modules="all-linear", rank_pattern={"o_proj": 2},
                     alpha_pattern={r"model.layers.1.self_attn.q_proj": 3}),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variants_from_peft_match_peft_forward(variant, tiny_model_dir, tmp_path):
    """PEFT builds the adapter (random, non-zero weights), petformers loads it: same logits."""
    peft = peft_model(tiny_model_dir, init_lora_weights=False, **VARIANTS[variant])
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if p.requires_grad:  # make DoRA magnitudes and modules_to_save copies differ from the base
                p.add_(torch.randn_like(p) * 0.05)
    peft.save_pretrained(str(tmp_path))
    model = petformers_model(tiny_model_dir)
    load_peft_adapter(model, tmp_path)
    assert (logits(model) - logits(peft)).abs().max() <= TOL


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variants_from_petformers_match_peft_forward(variant, tiny_model_dir, tmp_path):
    """petformers builds and saves the adapter, PEFT loads it: same logits and same trainable tensors."""
    kw = dict(VARIANTS[variant])
    config = PetConfig(lora_rank=kw.pop("r"), lora_alpha=kw.pop("lora_alpha"), lora_dropout=0.0, **kw)
    model = petformers_model(tiny_model_dir)
    apply_lora(model, config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for t in lora_state_dict(model).values():
            t.add_(torch.randn(t.shape, generator=g) * 0.05)
    save_peft_adapter(model, config, tmp_path, str(tiny_model_dir))
    peft = load_in_peft(tiny_model_dir, tmp_path)
    assert (logits(peft) - logits(model)).abs().max() <= TOL
    n_peft = sum(p.numel() for n, p in peft.named_parameters() if "lora_" in n or "modules_to_save" in n)
    assert n_peft == sum(t.numel() for t in lora_state_dict(model).values())


def test_pissa_adapter_crosses_both_ways(tiny_model_dir, tmp_path):
    """PiSSA moves the top singular part of W into A, B; both tools redo that on load, from the same base."""
    peft = peft_model(tiny_model_dir, r=4, lora_alpha=8, init_lora_weights="pissa", target_modules=["q_proj"])
    train(peft, steps=2)
    peft.save_pretrained(str(tmp_path / "from_peft"))
    model = petformers_model(tiny_model_dir)
    config = load_peft_adapter(model, tmp_path / "from_peft")
    assert config.init_lora_weights == "pissa"
    assert (logits(model) - logits(peft)).abs().max() <= TOL
    save_peft_adapter(model, config, tmp_path / "from_petformers", str(tiny_model_dir))
    assert (logits(load_in_peft(tiny_model_dir, tmp_path / "from_petformers")) - logits(model)).abs().max() <= TOL


# ---- bad adapters: one clear error each ------------------------------------------------------

@pytest.fixture
def saved_adapter(tiny_model_dir, tmp_path):
    model = petformers_model(tiny_model_dir)
    config = PetConfig(lora_rank=8, target_modules=["wq", "wv"])
    apply_lora(model, config)
    save_peft_adapter(model, config, tmp_path / "adapter", str(tiny_model_dir))
    return tmp_path / "adapter"


def test_rank_mismatch_is_named(tiny_model_dir, saved_adapter):
    cfg_file = saved_adapter / "adapter_config.json"
    cfg_file.write_text(json.dumps(json.loads(cfg_file.read_text()) | {"r": 4}))
    with pytest.raises(AdapterError, match=r"tensor 'base_model\.model\.model\.layers\.0\.self_attn\.q_proj\."
                                           r"lora_A\.weight' has shape \(8, 64\), the model expects \(4, 64\) "
                                           r"\(rank 8 in the file, but adapter_config\.json gives this "
                                           r"module rank 4\)"):
        load_peft_adapter(petformers_model(tiny_model_dir), saved_adapter)


def test_adapter_of_another_base_is_named(saved_adapter):
    other = build_model(LlamaConfig(vocab_size=512, hidden_size=48, num_layers=2, num_heads=4, n_kv_heads=2,
                                    intermediate_size=96), device="cpu")
    other.init_weights()
    with pytest.raises(AdapterError, match=r"has shape \(8, 64\), the model expects \(8, 48\) "
                                           r"\(an adapter trained for another base model"):
        load_peft_adapter(other, saved_adapter)


def test_truncated_safetensors_is_named(tiny_model_dir, saved_adapter):
    file = saved_adapter / "adapter_model.safetensors"
    file.write_bytes(file.read_bytes()[:-100])
    with pytest.raises(AdapterError, match=r"adapter_model\.safetensors: not a readable safetensors file .*truncated"):
        load_peft_adapter(petformers_model(tiny_model_dir), saved_adapter)
    file.write_bytes(b"\x00" * 10)
    with pytest.raises(AdapterError, match="not a readable safetensors file"):
        load_peft_adapter(petformers_model(tiny_model_dir), saved_adapter)


def test_missing_files_are_named(tiny_model_dir, saved_adapter):
    (saved_adapter / "adapter_model.safetensors").rename(saved_adapter / "adapter_model.bin")
    with pytest.raises(AdapterError, match=r"only adapter_model\.bin \(pickle\) found"):
        load_peft_adapter(petformers_model(tiny_model_dir), saved_adapter)
    (saved_adapter / "adapter_config.json").unlink()
    with pytest.raises(AdapterError, match=r"no adapter_config\.json \(not a PEFT adapter directory\)"):
        load_peft_adapter(petformers_model(tiny_model_dir), saved_adapter)


def test_target_matching_nothing_is_named(tiny_model_dir, saved_adapter):
    cfg_file = saved_adapter / "adapter_config.json"
    cfg_file.write_text(json.dumps(json.loads(cfg_file.read_text()) | {"target_modules": ["query_key_value"]}))
    with pytest.raises(AdapterError, match=r"matches no linear layer of this model; its linear layers are: "
                                           r"layers\.\{0\.\.1\}\.attention\.wq"):
        load_peft_adapter(petformers_model(tiny_model_dir), saved_adapter)


def test_adapter_loads_into_a_model_with_lora_from_the_yaml(tiny_model_dir, saved_adapter):
    """Continuing an adapter: LoRA is injected from the YAML's pet_config first, then the adapter fills it."""
    model = petformers_model(tiny_model_dir)
    apply_lora(model, PetConfig(lora_rank=8, target_modules=".*wq|.*wv"))
    load_peft_adapter(model, saved_adapter)
    other = petformers_model(tiny_model_dir)
    apply_lora(other, PetConfig(lora_rank=8, lora_alpha=32, target_modules=".*wq|.*wv"))
    with pytest.raises(AdapterError, match=r"scaling 2, use_dora False\) differs from the model's LoRA layer "
                                           r"\(scaling 4, use_dora False\)"):
        load_peft_adapter(other, saved_adapter)


def test_peft_key_and_its_inverse_are_one_mapping():
    from petformers.checkpoint.peft import name_of_peft_key, peft_key

    assert peft_key("layers.0.attention.wq.lora_a.weight") == \
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    for name in ("layers.0.attention.wq.lora_a.weight", "layers.1.feed_forward.w2.lora_b.weight",
                 "layers.0.attention.wo.magnitude"):
        assert name_of_peft_key(peft_key(name)) == name
    for copy in ("lm_head.module.weight", "tok_embeddings.module.weight"):  # modules_to_save copies
        assert name_of_peft_key(peft_key(copy)) == copy.replace(".module.", ".")
