"""SwiGLU, RMSNorm and LoRA's dropout-then-A with a hand-written backward that keeps less for it.

Autograd keeps every intermediate an op's derivative formula names. On the bench model (30 layers,
1024-token rows, LoRA with dropout on q/k/v/o) a training row kept ~1.4 GiB, of which: silu(a) beside a
and b in SwiGLU (180 MiB); and for each LoRA layer's `A(dropout(x))`, the dropped-out input (for A's
gradient) *and* torch's CPU dropout noise as a float tensor the size of x (533 MiB together). Here SwiGLU
keeps a and b, and dropout-then-A keeps x (which q, k and v share) and a one-byte mask: the dropped
tensors are recomputed in backward by one elementwise pass each, no matmul is recomputed. RMSNorm keeps
its input and the per-row 1/rms (what autograd keeps when its weight is frozen, but without the
normalised output when the weight trains, as in full fine-tuning).

Values are bitwise the torch-op formulas' (the same dropout masks from the same RNG draws); gradients
equal autograd's up to float rounding (tests/test_lean_ops.py). No library does this on CPU: PyTorch's
ops keep these intermediates, and fused kernels (liger, apex) are CUDA/Triton only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight * x / rms(x) in x's dtype, 1/rms(x) in float32 [..., 1])."""
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (xf * rstd).to(x.dtype), rstd


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        out, rstd = _rms_norm(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        normed = x.float() * rstd
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad * normed.to(x.dtype)).reshape(-1, weight.shape[-1]).sum(0).to(weight.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            g = (grad * weight).float()
            grad_x = (rstd * (g - normed * (g * normed).mean(-1, keepdim=True))).to(x.dtype)
        return grad_x, grad_weight, None


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a, b)
        return F.silu(a) * b

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        a, b = ctx.saved_tensors
        sig = torch.sigmoid(a)
        silu = a * sig
        grad_b = grad * silu if ctx.needs_input_grad[1] else None
        grad_a = None
        if ctx.needs_input_grad[0]:
            grad_a = grad * b * sig * (1 + a * (1 - sig))
        return grad_a, grad_b


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x / rms(x)), the rms in float32 and the result cast back to x's dtype (Meta's order)."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _RMSNorm.apply(x, weight, eps)
    return _rms_norm(x, weight, eps)[0]


def swiglu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """silu(a) * b."""
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
        return _SwiGLU.apply(a, b)
    return F.silu(a) * b


class _DropoutLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, p: float) -> torch.Tensor:
        # torch's own CPU dropout: a float noise tensor drawn by bernoulli_(1 - p), divided by 1 - p
        # (the same RNG draws and the same products as nn.Dropout on CPU), kept here as a bool mask.
        noise = torch.empty_like(x).bernoulli_(1 - p).div_(1 - p)
        ctx.p = p
        ctx.save_for_backward(x, weight, noise != 0)
        return F.linear(x * noise, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, mask = ctx.saved_tensors
        noise = mask.to(x.dtype).div_(1 - ctx.p)
        grad_x = grad_weight = None
        if ctx.needs_input_grad[1]:
            dropped = (x * noise).reshape(-1, x.shape[-1])
            grad_weight = grad.reshape(-1, grad.shape[-1]).t().mm(dropped)
        if ctx.needs_input_grad[0]:
            grad_x = grad.matmul(weight) * noise
        return grad_x, grad_weight, None


def dropout_linear(x: torch.Tensor, weight: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """F.linear(F.dropout(x, p, training), weight), keeping x and a bool mask for backward."""
    if not training or p == 0:
        return F.linear(x, weight)
    if not torch.is_grad_enabled() or not (x.requires_grad or weight.requires_grad):
        return F.linear(F.dropout(x, p, True), weight)
    return _DropoutLinear.apply(x, weight, p)
