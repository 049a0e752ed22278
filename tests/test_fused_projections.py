"""Fused projections (pet/fused.py) against the separate ones on tiny random models: the same logits, loss
and gradients, the same state dict and adapter, the fallbacks (quantized base, a `.to()`, DoRA), merge and
unmerge, new weights loaded, and a merged export of a fused model read back."""

from __future__ import annotations

import copy

import pytest
import torch

from petformers.checkpoint.hf import save_model_dir
from petformers.checkpoint.load import load_pretrained
from petformers.checkpoint.peft import load_peft_adapter, save_peft_adapter
from petformers.models.config import LlamaConfig
from petformers.models.llama import build_model
from petformers.pet import PetConfig, apply_lora, lora_state_dict, merge_and_unload, merge_lora, unmerge_lora
from petformers.pet.fused import fuse_projections, fused_groups
from petformers.quant.model import QuantConfig, quantize_model

EVERY = ".*wq|.*wk|.*wv|.*wo|.*w1|.*w3"


def tiny(bias=False, quantized=False, targets=EVERY, dora=False, seed=0):
    """2 layers, 4 query heads over 2 key/value heads, LoRA (dropout 0) with a random B, so that every
    projection's update is non-zero and lands in its own slice only."""
    config = LlamaConfig(vocab_size=64, hidden_size=64, num_layers=2, num_heads=4, n_kv_heads=2,
                         intermediate_size=96, qkv_has_bias=bias)
    model = build_model(config, device="cpu", dtype=torch.float32)
    model.init_weights(generator=torch.Generator().manual_seed(seed))
    if bias:  # init_weights zeroes biases: give each projection its own
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.5, generator=g)
    if quantized:
        quantize_model(model, QuantConfig(4, "nf4", True))
    apply_lora(model, PetConfig(lora_rank=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, use_dora=dora))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in lora_state_dict(model).values():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return model.train()


def fused_copy(model, groups: int):
    fused = copy.deepcopy(model)
    fuse_projections(fused)
    assert fused_groups(fused) == groups
    return fused


IDS = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(2))


def step(model):
    """Logits, loss, and the gradients of every trainable parameter and of the input embeddings."""
    model.zero_grad(set_to_none=True)
    model.tok_embeddings.weight.requires_grad_(True)
    logits = model(IDS)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 64), IDS[:, 1:].reshape(-1))
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    model.tok_embeddings.weight.requires_grad_(False)
    return logits.detach(), loss.detach(), grads


def assert_same(a, b, atol=1e-6):
    """Equal up to float32 rounding: one matmul sums in another order than three (atol is relative to the
    largest value of each gradient)."""
    logits_a, loss_a, grads_a = step(a)
    logits_b, loss_b, grads_b = step(b)
    torch.testing.assert_close(logits_a, logits_b, atol=atol, rtol=1e-5)
    torch.testing.assert_close(loss_a, loss_b, atol=atol, rtol=1e-5)
    assert grads_a.keys() == grads_b.keys() and "tok_embeddings.weight" in grads_a
    for name in grads_a:
        scale = max(1.0, grads_a[name].abs().max().item())
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=atol * scale, rtol=1e-5,
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("targets, bias", [
    (EVERY, False),
    (EVERY, True),  # Qwen2's q/k/v bias
    (".*wq|.*wv", False),  # PEFT's default for Llama: wk, w1 and w3 plain slices
    (".*wk|.*w3", True),
    (".*wo|.*w2", False),  # no adapter in either group
])
def test_fused_equals_separate(targets, bias):
    model = tiny(bias=bias, targets=targets)
    fused = fused_copy(model, groups=4)
    assert_same(model, fused)


def test_fusing_keeps_the_parameters_their_values_and_the_memory():
    model = tiny(bias=True)
    before = {n: p for n, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fuse_projections(model)
    assert fused_groups(model) == 4
    assert dict(model.named_parameters()) == before  # the same Parameter objects under the same names
    after = model.state_dict()
    assert list(after) == list(state) and all(torch.equal(after[k], state[k]) for k in state)
    attention = model.layers[0].attention
    qkv = [attention.wq.weight, attention.wk.weight, attention.wv.weight]
    # views of one block holding exactly the three weights: no copy kept beside them
    assert {w.untyped_storage().data_ptr() for w in qkv} == {qkv[0].data_ptr()}
    assert qkv[0].untyped_storage().nbytes() == sum(w.numel() * w.element_size() for w in qkv)


def saved_bytes(model) -> int:
    """Bytes of the storages autograd keeps for backward in a training forward, parameters' not counted."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(IDS).sum()
    return sum(kept.values())


@pytest.mark.parametrize("targets", [EVERY, ".*wq|.*wk|.*w1", ".*wo|.*w2"])
def test_backward_keeps_no_more(targets):
    """A slice no adapter replaced (here v, kept by attention; w3 beside a LoRA w1) must not keep the whole
    fused output alive."""
    model = tiny(targets=targets)
    assert saved_bytes(fused_copy(model, groups=4)) <= saved_bytes(model)


def test_adapter_files_are_the_same(tmp_path):
    model = tiny()
    fused = fused_copy(model, groups=4)
    pet = PetConfig(lora_rank=4, lora_alpha=8, target_modules=EVERY)
    save_peft_adapter(model, pet, tmp_path / "separate", "tiny")
    save_peft_adapter(fused, pet, tmp_path / "fused", "tiny")
    assert (tmp_path / "separate" / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "fused" / "adapter_model.safetensors").read_bytes()
    # loaded into a fused model, an adapter lands in its own projection
    other = fused_copy(tiny(targets=EVERY), groups=4)
    with torch.no_grad():
        for p in lora_state_dict(other).values():
            p.zero_()
    load_peft_adapter(other, tmp_path / "separate")
    assert_same(model, other)


def test_a_quantized_base_runs_separately_and_the_same():
    model = tiny(quantized=True)
    fused = fused_copy(model, groups=0)
    assert_same(model, fused)


def test_dora_runs_separately_and_the_same():
    model = tiny(dora=True)
    fused = fused_copy(model, groups=0)
    assert_same(model, fused, atol=1e-5)


def test_merge_and_unmerge_stay_exact():
    model = tiny(bias=True)
    fused = fused_copy(model, groups=4)
    with torch.no_grad():
        expected = model(IDS)
        merge_lora(fused)  # written into the block in place: still one matmul, the update now in W
        assert fused_groups(fused) == 4
        assert torch.allclose(fused(IDS), expected, atol=1e-5, rtol=0)
        unmerge_lora(fused)
        assert fused_groups(fused) == 4
    assert_same(model, fused, atol=1e-5)


def test_merge_over_a_quantized_base_falls_back():
    model = tiny(quantized=True)
    fused = copy.deepcopy(model)
    fuse_projections(fused)
    with torch.no_grad():
        expected = model(IDS)
        merge_lora(fused)
        assert fused_groups(fused) == 0
        assert torch.allclose(fused(IDS), expected, atol=1e-5, rtol=0)


def test_new_weights_loaded_or_moved_are_seen():
    model = tiny(bias=True)
    fused = fused_copy(model, groups=4)
    state = tiny(bias=True, seed=5).state_dict()
    model.load_state_dict(state)
    fused.load_state_dict(state)  # copied into the views: still fused, with the new values
    assert fused_groups(fused) == 4
    assert_same(model, fused)
    fused.to(torch.float64)  # every weight gets storage of its own: the stale block is not used
    model.to(torch.float64)
    assert fused_groups(fused) == 0
    assert_same(model, fused)


def test_merged_export_of_a_fused_model_reads_back(tmp_path):
    """In place, as `petformers export merge` and merge_adapter merge (write_outputs merges a deepcopy, whose
    parameters are clones: tests/test_train.py runs that)."""
    fused = fused_copy(tiny(bias=True), groups=4)
    with torch.no_grad():
        expected = fused(IDS)
    merged = merge_and_unload(fused)
    for layer in merged.layers:
        weights = [layer.attention.wq.weight, layer.attention.wk.weight, layer.attention.wv.weight,
                   layer.attention.wq.bias, layer.feed_forward.w1.weight, layer.feed_forward.w3.weight]
        assert all(w.untyped_storage().nbytes() == w.numel() * w.element_size() for w in weights)
    save_model_dir(merged.state_dict(), merged.config, tmp_path / "merged")
    loaded, _ = load_pretrained(tmp_path / "merged", with_tokenizer=False)
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS), expected, atol=1e-5, rtol=1e-5)
