"""pet_config parsing, PEFT's target_modules rule on petformers names, and sizes on the meta device."""

from __future__ import annotations

import logging
import re
import resource

import pytest
import torch

from petformers.errors import AdapterError, ConfigError
from petformers.models.config import LlamaConfig
from petformers.models.llama import build_model
from petformers.pet import LoRALinear, PetConfig, apply_lora, count_parameters
from petformers.pet.matching import find_targets, pattern_value, shorten

SEED_PET_CONFIG = {"pet_type": "lora", "lora_rank": 16, "lora_alpha": 16, "lora_dropout": 0.05,
                   "target_modules": ".*wq|.*wk|.*wv|.*wo"}


def tiny(num_layers=2, **kw):
    return build_model(LlamaConfig(vocab_size=64, hidden_size=32, num_layers=num_layers, num_heads=4,
                                   n_kv_heads=2, intermediate_size=48, **kw), device="cpu")


# ---- PetConfig -------------------------------------------------------------------------------

def test_seed_pet_config_loads():
    c = PetConfig.from_dict(SEED_PET_CONFIG)
    assert (c.lora_rank, c.lora_alpha, c.lora_dropout, c.target_modules) == (16, 16, 0.05, ".*wq|.*wk|.*wv|.*wo")
    assert c.scaling(16, 16) == 1.0
    assert PetConfig(lora_rank=16, lora_alpha=16, use_rslora=True).scaling(16, 16) == 4.0


def test_unknown_key_names_path_and_nearest():
    with pytest.raises(ConfigError, match=r"model\.model_config\.pet_config\.lora_rnak: unknown key; "
                                          r"did you mean 'lora_rank'\?"):
        PetConfig.from_dict(SEED_PET_CONFIG | {"lora_rnak": 8})


def test_bad_values_name_the_key():
    with pytest.raises(ConfigError, match=r"model\.model_config\.pet_config\.lora_rank: must be a positive"):
        PetConfig.from_dict(SEED_PET_CONFIG | {"lora_rank": 0})
    with pytest.raises(ConfigError, match=r"pet_config\.lora_dropout"):
        PetConfig.from_dict(SEED_PET_CONFIG | {"lora_dropout": 1.5})
    with pytest.raises(ConfigError, match=r"pet_config\.init_lora_weights"):
        PetConfig.from_dict(SEED_PET_CONFIG | {"init_lora_weights": "olora"})
    with pytest.raises(ConfigError, match=r"pet_config\.pet_type: 'ptuning2' is not supported"):
        PetConfig.from_dict(SEED_PET_CONFIG | {"pet_type": "ptuning2"})


def test_mindformers_only_keys_are_reported_not_errors(caplog):
    from petformers.pet import config as config_module

    config_module._reported.clear()  # each ignored key is reported once per process
    with caplog.at_level(logging.INFO):
        c = PetConfig.from_dict(SEED_PET_CONFIG | {"param_init_type": "float16", "compute_dtype": "float16",
                                                   "lora_a_init": "normal", "exclude_layers": ".*layers\\.0\\..*"})
    assert "param_init_type ignored" in caplog.text
    assert c.exclude_modules == ".*layers\\.0\\..*"
    with pytest.raises(ConfigError, match="freeze_exclude: not supported"):
        PetConfig.from_dict(SEED_PET_CONFIG | {"freeze_exclude": ["norm"]})


def test_peft_config_dict_round_trip():
    c = PetConfig(lora_rank=8, lora_alpha=32, lora_dropout=0.1, target_modules=["q_proj", "v_proj"],
                  use_rslora=True, use_dora=True, modules_to_save=["lm_head"], rank_pattern={"v_proj": 4},
                  alpha_pattern={"q_proj": 8}, init_lora_weights="gaussian")
    d = c.to_peft_config_dict("base/model")
    assert d["peft_type"] == "LORA" and d["task_type"] == "CAUSAL_LM" and d["r"] == 8
    assert d["base_model_name_or_path"] == "base/model"
    assert PetConfig.from_peft_config_dict(d) == c


def test_peft_options_petformers_cannot_reproduce_are_errors():
    d = PetConfig(target_modules=["q_proj"]).to_peft_config_dict(None)
    with pytest.raises(AdapterError, match="lora_bias=True is not supported"):
        PetConfig.from_peft_config_dict(d | {"lora_bias": True})
    with pytest.raises(AdapterError, match="peft_type 'IA3'"):
        PetConfig.from_peft_config_dict(d | {"peft_type": "IA3"})


# ---- matching --------------------------------------------------------------------------------

def test_seed_regex_matches_exactly_the_attention_projections():
    model = tiny(num_layers=3)
    targets = find_targets(model, SEED_PET_CONFIG["target_modules"])
    assert targets == [f"layers.{i}.attention.{w}" for i in range(3) for w in ("wq", "wk", "wv", "wo")]


@pytest.mark.parametrize("pattern", [
    ["q_proj", "k_proj", "v_proj", "o_proj"],  # Hugging Face names in a list
    ["wq", "wk", "wv", "wo"],  # petformers names in a list
    ["attention.wq", "self_attn.k_proj", "wv", "o_proj"],  # dotted suffixes, mixed
    r".*\.(q_proj|k_proj|v_proj|o_proj)",  # Hugging Face names inside a regex
    r"model\.layers\.\d+\.self_attn\.(q|k|v|o)_proj",  # a full Hugging Face regex
])
def test_hugging_face_and_petformers_names_select_the_same_layers(pattern):
    model = tiny()
    assert find_targets(model, pattern) == find_targets(model, SEED_PET_CONFIG["target_modules"])


def test_all_linear_excludes_lm_head_and_exclude_modules_is_honoured():
    model = tiny()
    targets = find_targets(model, "all-linear")
    assert len(targets) == 2 * 7 and "lm_head" not in targets
    kept = find_targets(model, "all-linear", exclude_modules=["w2", "layers.0.attention.wq"])
    assert len(kept) == 2 * 7 - 3 and "layers.1.attention.wq" in kept
    assert find_targets(model, "all-linear", exclude_modules=r".*layers\.1\..*") == targets[:7]


def test_regex_matching_nothing_lists_the_linear_layers():
    with pytest.raises(AdapterError) as e:
        find_targets(tiny(), ".*query")
    msg = str(e.value)
    assert "matches no linear layer" in msg and "\n" not in msg
    assert "layers.{0..1}.attention.wq" in msg and "layers.{0..1}.feed_forward.w2" in msg and "lm_head" in msg


def test_matching_a_non_linear_module_is_an_error():
    with pytest.raises(AdapterError, match=r"'layers\.0\.attention_norm', a RMSNorm; LoRA applies to linear"):
        find_targets(tiny(), ".*attention_norm|.*wq")


def test_invalid_regex_is_a_config_error():
    with pytest.raises(ConfigError, match="invalid regex"):
        find_targets(tiny(), ".*(wq")


def test_shorten():
    assert shorten(["layers.0.a", "layers.1.a", "layers.3.b", "layers.5.b", "lm_head"]) == \
        "layers.{0..1}.a, layers.{3,5}.b, lm_head"


def test_rank_and_alpha_patterns_follow_peft():
    assert pattern_value({"wo": 4}, "layers.0.attention.wo", 8) == 4
    assert pattern_value({"o_proj": 4}, "layers.0.attention.wo", 8) == 4  # Hugging Face name
    assert pattern_value({"wo": 4}, "layers.0.attention.wq", 8) == 8
    assert pattern_value({r"layers\.1\.attention\.wq": 2}, "layers.1.attention.wq", 8) == 2
    assert pattern_value({r"layers\.1\.attention\.wq": 2}, "layers.11.attention.wq", 8) == 8
    model = tiny()
    apply_lora(model, PetConfig(lora_rank=8, lora_alpha=16, target_modules=["wq", "wo"],
                                rank_pattern={"wo": 4}, alpha_pattern={r"layers\.1\.attention\.wq": 2}))
    assert model.layers[0].attention.wo.lora_a.weight.shape == (4, 32)
    assert model.layers[1].attention.wq.scaling == 2 / 8
    assert model.layers[0].attention.wq.scaling == 16 / 8


# ---- injection -------------------------------------------------------------------------------

def test_injection_freezes_the_base_and_keeps_its_names():
    model = tiny()
    base_names = set(model.state_dict())
    report = apply_lora(model, PetConfig.from_dict(SEED_PET_CONFIG))
    names = set(model.state_dict())
    assert base_names <= names
    assert {n for n, p in model.named_parameters() if p.requires_grad} == names - base_names
    assert all(re.fullmatch(r"layers\.\d\.attention\.w[qkvo]\.lora_[ab]\.weight", n) for n in names - base_names)
    trainable, total = count_parameters(model)
    assert trainable == 2 * (16 * 32 * 2 + 16 * 32 * 2 + 16 * (32 + 16) * 2)  # wq, wo: 32->32; wk, wv: 32->16
    assert report == f"trainable params: {trainable:,} || all params: {total:,} || " \
                     f"trainable%: {100 * trainable / total:.4f}"
    lora = model.layers[0].attention.wq
    assert isinstance(lora.dropout, torch.nn.Dropout) and lora.dropout.p == 0.05
    assert torch.all(lora.lora_b.weight == 0)
    with pytest.raises(AdapterError, match="already has LoRA"):
        apply_lora(model, PetConfig.from_dict(SEED_PET_CONFIG))


def test_llama2_7b_on_meta_reports_the_seed_count_without_memory():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    config = LlamaConfig(vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32, multiple_of=256)
    model = build_model(config, device="meta")
    report = apply_lora(model, PetConfig.from_dict(SEED_PET_CONFIG))
    assert report.startswith("trainable params: 16,777,216 || all params: 6,755,192,832 ||")
    assert count_parameters(model)[0] == 32 * 4 * 2 * 16 * 4096 == 16_777_216
    assert all(p.device.type == "meta" for p in model.parameters())
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 128
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024  # ru_maxrss is KiB on Linux
    assert grown_mib < 200  # 6.7 B parameters would be 25 GiB
