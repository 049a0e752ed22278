"""LoRALinear against PEFT's lora.Linear on the same weights; merge / unmerge; fp32 adapters on a bf16 base."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from petformers.errors import AdapterError
from petformers.models.config import LlamaConfig
from petformers.models.llama import build_model
from petformers.pet import (LoRALinear, PetConfig, apply_lora, load_lora_state_dict, lora_state_dict,
                            merge_and_unload, merge_lora, unmerge_lora)
from petformers.pet.module_to_save import ModuleToSave


def make_pair(*, use_dora=False, use_rslora=False, dropout=0.0, bias=False, rank=4, alpha=8):
    """A PEFT lora.Linear and a petformers LoRALinear over the same base layer, with the same random
    (non-zero) A, B and DoRA magnitude."""
    from peft import LoraConfig
    from peft.tuners.lora import Linear as PeftLinear

    torch.manual_seed(0)
    base = nn.Linear(24, 20, bias=bias)
    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, use_dora=use_dora, use_rslora=use_rslora)
    peft = PeftLinear(copy.deepcopy(base), "default", config=cfg, r=rank, lora_alpha=alpha)
    ours = LoRALinear.from_linear(copy.deepcopy(base), rank, alpha, dropout=dropout,
                                  use_rslora=use_rslora, use_dora=use_dora)
    ours.reset_lora_parameters(True)
    with torch.no_grad():
        peft.lora_B["default"].weight.normal_(0, 0.3)
        ours.lora_a.weight.copy_(peft.lora_A["default"].weight)
        ours.lora_b.weight.copy_(peft.lora_B["default"].weight)
        if use_dora:
            assert torch.allclose(ours.magnitude, peft.lora_magnitude_vector["default"].weight)  # same init rule
            peft.lora_magnitude_vector["default"].weight.mul_(torch.rand(20) + 0.5)
            ours.magnitude.copy_(peft.lora_magnitude_vector["default"].weight)
    return peft, ours


def adapter_grads(module) -> list[torch.Tensor]:
    if isinstance(module, LoRALinear):
        params = [module.lora_a.weight, module.lora_b.weight, module.magnitude]
    else:
        params = [module.lora_A["default"].weight, module.lora_B["default"].weight,
                  module.lora_magnitude_vector["default"].weight if module.lora_magnitude_vector else None]
    return [p.grad for p in params if p is not None]


@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_forward_and_gradients_match_peft(use_dora, use_rslora, bias):
    peft, ours = make_pair(use_dora=use_dora, use_rslora=use_rslora, bias=bias)
    x = torch.randn(3, 5, 24)
    y_peft, y_ours = peft(x), ours(x)
    assert torch.allclose(y_peft, y_ours, atol=1e-6)
    # The gradients also check that DoRA's weight norm is detached exactly where PEFT detaches it.
    (y_peft ** 2).sum().backward()
    (y_ours ** 2).sum().backward()
    for g_peft, g_ours in zip(adapter_grads(peft), adapter_grads(ours), strict=True):
        assert torch.allclose(g_peft, g_ours, atol=1e-5)


@pytest.mark.parametrize("use_dora", [False, True])
def test_dropout_applies_to_the_lora_branch_as_in_peft(use_dora):
    peft, ours = make_pair(use_dora=use_dora, dropout=0.5, bias=True)
    peft.train(), ours.train()
    x = torch.randn(4, 24)
    torch.manual_seed(7)
    y_peft = peft(x)
    torch.manual_seed(7)
    y_ours = ours(x)
    assert torch.allclose(y_peft, y_ours, atol=1e-6)
    ours.eval()
    assert not torch.allclose(y_ours, ours(x))  # dropout was active in training only


def test_lora_formula_and_disabled_flag():
    _, ours = make_pair(rank=4, alpha=8)
    x = torch.randn(2, 24)
    expected = F.linear(x, ours.weight) + (8 / 4) * x @ ours.lora_a.weight.T @ ours.lora_b.weight.T
    assert torch.allclose(ours(x), expected, atol=1e-6)
    ours.disabled = True
    assert torch.equal(ours(x), F.linear(x, ours.weight))


@pytest.mark.parametrize("use_dora", [False, True])
def test_merge_unmerge_round_trip(use_dora):
    _, ours = make_pair(use_dora=use_dora, bias=True)
    x = torch.randn(6, 24)
    w0, y0 = ours.weight.detach().clone(), ours(x).detach()
    ours.merge()
    assert ours.merged and torch.allclose(ours(x), y0, atol=1e-5)
    assert torch.allclose(F.linear(x, ours.weight, ours.bias), y0, atol=1e-5)  # the merged layer is plain
    with pytest.raises(AdapterError, match="unmerge it first"):
        ours.disabled = True
        ours(x)
    ours.disabled = False
    ours.unmerge()
    assert not ours.merged
    assert torch.allclose(ours.weight, w0, atol=1e-6, rtol=0)  # float32 rounding
    assert torch.allclose(ours(x), y0, atol=1e-6)


def tiny_model(dtype=torch.float32, tie=False):
    config = LlamaConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, n_kv_heads=2,
                         intermediate_size=48, tie_word_embeddings=tie)
    model = build_model(config, device="cpu", dtype=dtype)
    model.init_weights(generator=torch.Generator().manual_seed(0))
    return model.eval()  # no dropout: outputs are deterministic


def randomize_adapter(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_state_dict(model).values():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def test_merge_and_unload_gives_a_plain_model_with_the_same_logits():
    model = tiny_model()
    apply_lora(model, PetConfig(target_modules="all-linear", use_dora=True, modules_to_save=["lm_head"]))
    randomize_adapter(model)
    model.eval()
    ids = torch.randint(0, 64, (2, 9))
    y = model(ids)
    merge_lora(model)
    assert torch.allclose(model(ids), y, atol=1e-5)
    unmerge_lora(model)
    assert torch.allclose(model(ids), y, atol=1e-5)
    plain = merge_and_unload(model)
    assert not any(isinstance(m, (LoRALinear, ModuleToSave)) for m in plain.modules())
    assert set(plain.state_dict()) == set(tiny_model().state_dict())
    assert torch.allclose(plain(ids), y, atol=1e-5)


def test_bf16_base_keeps_float32_adapters():
    model = tiny_model(torch.bfloat16)
    apply_lora(model, PetConfig(target_modules=".*wq|.*wv", modules_to_save=["lm_head"]))
    assert model.layers[0].attention.wq.weight.dtype == torch.bfloat16
    assert all(t.dtype == torch.float32 for t in lora_state_dict(model).values())
    randomize_adapter(model)
    ids = torch.randint(0, 64, (2, 9))
    logits = model(ids)
    assert logits.dtype == torch.bfloat16
    F.cross_entropy(logits.float().flatten(0, 1), ids.flatten()).backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None and p.grad.dtype == torch.float32 for p in trainable)
    # The LoRA branch is computed in float32, added to the base output in float32, rounded once.
    layer = model.layers[0].attention.wq.eval()
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        expected = (F.linear(x, layer.weight).float()
                    + layer.scaling * x.float() @ layer.lora_a.weight.T @ layer.lora_b.weight.T).bfloat16()
        assert torch.equal(layer(x), expected)


def test_init_options():
    def layer(init, **kw):
        torch.manual_seed(0)
        lora = LoRALinear.from_linear(nn.Linear(64, 48), 8, 16, **kw)
        lora.reset_lora_parameters(init)
        return lora

    x = torch.randn(5, 64)
    base = F.linear(x, layer(True).weight, layer(True).bias)
    for init in (True, "kaiming", "gaussian"):
        lora = layer(init)
        assert torch.all(lora.lora_b.weight == 0) and torch.equal(lora(x), base)  # a no-op adapter
    assert abs(layer("gaussian").lora_a.weight.std().item() - 1 / 8) < 0.02
    pissa = layer("pissa")
    assert pissa.lora_b.weight.abs().sum() > 0 and not torch.equal(pissa.weight, layer(True).weight)
    assert torch.allclose(pissa(x), base, atol=1e-5)  # W_res + s·BA = W
    dora = layer(True, use_dora=True)
    assert torch.allclose(dora.magnitude, dora.weight.norm(dim=1)) and torch.allclose(dora(x), base, atol=1e-6)


def test_adapter_state_dict_round_trip_and_shape_errors():
    config = PetConfig(target_modules=["wq", "wk"], modules_to_save=["lm_head"], use_dora=True)
    a, b = tiny_model(), tiny_model()
    apply_lora(a, config)
    apply_lora(b, config)
    randomize_adapter(a)
    sd = lora_state_dict(a)
    assert "lm_head.module.weight" in sd and "layers.1.attention.wk.magnitude" in sd
    assert not any(n.endswith("wq.weight") for n in sd)  # the frozen base is not part of the adapter
    load_lora_state_dict(b, sd)
    ids = torch.randint(0, 64, (1, 7))
    assert torch.equal(a(ids), b(ids))
    bad = dict(sd) | {"layers.0.attention.wq.lora_a.weight": torch.zeros(4, 32)}
    with pytest.raises(AdapterError, match=r"tensor 'layers\.0\.attention\.wq\.lora_a\.weight' has shape "
                                           r"\(4, 32\), the model expects \(8, 32\)"):
        load_lora_state_dict(b, bad)
    with pytest.raises(AdapterError, match=r"missing tensor 'layers\.0\.attention\.wk\.lora_a\.weight'"):
        load_lora_state_dict(b, {k: v for k, v in sd.items() if k != "layers.0.attention.wk.lora_a.weight"})


def test_meta_model_adapter_is_assigned_on_load():
    meta = build_model(tiny_model().config, device="meta")
    apply_lora(meta, PetConfig(target_modules=["wq"]))
    real = tiny_model()
    apply_lora(real, PetConfig(target_modules=["wq"]))
    randomize_adapter(real)
    load_lora_state_dict(meta, lora_state_dict(real))
    wq = meta.layers[0].attention.wq
    assert wq.lora_b.weight.device.type == "cpu" and wq.lora_b.weight.requires_grad
    assert torch.equal(wq.lora_b.weight, real.layers[0].attention.wq.lora_b.weight)


def test_modules_to_save_unties_a_tied_lm_head():
    model = tiny_model(tie=True)
    apply_lora(model, PetConfig(target_modules=["wq"], modules_to_save=["lm_head"]))
    assert model.lm_head.module.weight is not model.tok_embeddings.weight
    assert model.lm_head.module.weight.requires_grad and not model.tok_embeddings.weight.requires_grad
    with torch.no_grad():
        model.lm_head.module.weight.add_(1.0)
    plain = merge_and_unload(model)
    assert plain.config.tie_word_embeddings is False
    assert not torch.equal(plain.lm_head.weight, plain.tok_embeddings.weight)
