"""The hand-written backward of RMSNorm and SwiGLU (models/lean_ops.py): the same values and gradients as
the torch-op formulas, and less kept for backward (what they exist for)."""

import pytest
import torch
import torch.nn.functional as F

from petformers.models.config import LlamaConfig
from petformers.models.lean_ops import rms_norm, swiglu
from petformers.models.llama import build_model


def reference_rms_norm(x, weight, eps):
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def saved_bytes(fn, *inputs) -> int:
    """Bytes of the distinct non-input tensors autograd keeps for backward while fn runs."""
    kept = {}
    inputs_ptr = {t.untyped_storage().data_ptr() for t in inputs}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in inputs_ptr:
            kept[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*inputs)
    return sum(kept.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weight_grad", [False, True])
def test_rms_norm_matches_autograd(dtype, weight_grad):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 7, 48, generator=g) * 3).to(dtype).requires_grad_()
    w = (torch.rand(48, generator=g) + 0.5).to(dtype).requires_grad_(weight_grad)
    grad = torch.randn(2, 7, 48, generator=g).to(dtype)
    x_ref, w_ref = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_(weight_grad)

    out = rms_norm(x, w, 1e-5)
    ref = reference_rms_norm(x_ref, w_ref, 1e-5)
    assert torch.equal(out, ref)
    out.backward(grad)
    ref.backward(grad)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(x.grad, x_ref.grad, **tol)
    if weight_grad:
        torch.testing.assert_close(w.grad, w_ref.grad, **tol)
    else:
        assert w.grad is None


def test_swiglu_matches_autograd():
    g = torch.Generator().manual_seed(1)
    a = (torch.randn(3, 5, 64, generator=g) * 4).requires_grad_()
    b = torch.randn(3, 5, 64, generator=g).requires_grad_()
    grad = torch.randn(3, 5, 64, generator=g)
    a_ref, b_ref = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    out, ref = swiglu(a, b), F.silu(a_ref) * b_ref
    assert torch.equal(out, ref)
    out.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(a.grad, a_ref.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(b.grad, b_ref.grad, atol=1e-6, rtol=1e-5)


def test_they_keep_less_for_backward():
    x = torch.randn(1, 256, 64, requires_grad=True)
    w = torch.ones(64, requires_grad=True)  # a trained norm (full fine-tuning)
    one = 256 * 64 * 4
    # the torch-op RMSNorm keeps its normalised output beside x; the lean one keeps x (an input) and 1/rms
    assert saved_bytes(lambda x, w: reference_rms_norm(x, w, 1e-5), x, w) >= one
    assert saved_bytes(lambda x, w: rms_norm(x, w, 1e-5), x, w) <= 256 * 4
    a, b = torch.randn(256, 64, requires_grad=True), torch.randn(256, 64, requires_grad=True)
    assert saved_bytes(lambda a, b: F.silu(a) * b, a, b) >= one  # silu(a)
    assert saved_bytes(swiglu, a, b) == 0


def test_no_grad_path_is_the_same_function():
    x, w = torch.randn(4, 32), torch.rand(32)
    with torch.no_grad():
        assert torch.equal(rms_norm(x, w, 1e-6), reference_rms_norm(x, w, 1e-6))
        assert torch.equal(swiglu(x, w.expand(4, 32)), F.silu(x) * w)


def test_model_gradients_unchanged():
    """A 2-layer model's input and weight gradients equal those through the torch-op formulas."""
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                         n_kv_heads=2, seq_length=32)
    model = build_model(config, device="cpu")
    model.init_weights(generator=torch.Generator().manual_seed(0))
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))

    def grads():
        model.zero_grad(set_to_none=True)
        model(ids).float().pow(2).mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    lean = grads()
    import petformers.models.llama as llama
    original = llama.rms_norm, llama.swiglu
    try:
        llama.rms_norm, llama.swiglu = reference_rms_norm, lambda a, b: F.silu(a) * b
        plain = grads()
    finally:
        llama.rms_norm, llama.swiglu = original
    for name in plain:
        torch.testing.assert_close(lean[name], plain[name], atol=1e-6, rtol=1e-4, msg=name)


def test_dropout_linear_is_dropout_then_linear():
    """The same RNG draws as nn.Dropout on CPU: bitwise the same output, the same gradients."""
    from petformers.models.lean_ops import dropout_linear

    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 9, 40, generator=g).requires_grad_()
    w = torch.randn(8, 40, generator=g).requires_grad_()
    grad = torch.randn(2, 9, 8, generator=g)
    x_ref, w_ref = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    torch.manual_seed(7)
    out = dropout_linear(x, w, 0.3, training=True)
    torch.manual_seed(7)
    ref = F.linear(torch.nn.Dropout(0.3)(x_ref), w_ref)
    assert torch.equal(out, ref)
    assert (out == F.linear(x, w)).all().item() is False  # dropout did drop something
    out.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(w.grad, w_ref.grad, atol=1e-6, rtol=1e-5)
    # kept for backward: x (an input) and a one-byte mask, not the dropped x and a float noise tensor
    kept = saved_bytes(lambda x, w: dropout_linear(x, w, 0.3, True), x, w)
    assert kept == x.numel()
    assert saved_bytes(lambda x, w: F.linear(torch.nn.Dropout(0.3)(x), w), x, w) >= 2 * 4 * x.numel()
    with torch.no_grad():
        assert torch.equal(dropout_linear(x, w, 0.3, training=False), F.linear(x, w))


def test_lora_layer_with_dropout_unchanged():
    """LoRALinear with dropout trains as nn.Dropout + lora_a would: same output and adapter gradients."""
    from petformers.pet.lora import LoRALinear

    base = torch.nn.Linear(32, 24)
    layer = LoRALinear.from_linear(base, rank=4, alpha=8, dropout=0.2)
    layer.reset_lora_parameters()
    torch.nn.init.normal_(layer.lora_b.weight)
    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(3), requires_grad=True)

    def run(lean: bool):
        layer.zero_grad(set_to_none=True)
        x.grad = None
        torch.manual_seed(11)
        if lean:
            out = layer(x)
        else:
            out = F.linear(x, layer.weight, layer.bias) + layer.lora_b(layer.lora_a(layer.dropout(x))) * layer.scaling
        out.pow(2).sum().backward()
        return out.detach(), x.grad.clone(), layer.lora_a.weight.grad.clone(), layer.lora_b.weight.grad.clone()

    lean, plain = run(True), run(False)
    for a, b in zip(lean, plain):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
