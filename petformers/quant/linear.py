"""`QuantLinear`: a frozen linear layer over a quantized weight, dequantized on the fly.

Forward dequantizes the blocks to the compute dtype (the input's, or autocast's), multiplies, and drops
the float copy. Backward dequantizes again for the input gradient (grad_x = grad_y · W) instead of
keeping the float copy from forward: activation memory does not grow by a float copy of each weight,
at the price of a second dequantization (QLoRA's trade, as bitsandbytes' MatMul4Bit makes it). The base
gets no gradient; a bias, if any, stays float and frozen.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from petformers.quant.weight import QuantizedWeight


class _DequantLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None, dtype: torch.dtype):
        ctx.weight, ctx.x_dtype = weight, x.dtype  # the module, not its float copy
        return F.linear(x.to(dtype), weight.dequantize(dtype), None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        w = ctx.weight.dequantize(grad_out.dtype)
        return (grad_out @ w).to(ctx.x_dtype), None, None, None


def compute_dtype_for(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on x runs in: autocast's where it is on, else x's own."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def quant_linear(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x · Wᵀ + b with W dequantized on the fly (and again in backward, never saved)."""
    dtype = compute_dtype_for(x)
    with torch.autocast(x.device.type, enabled=False):
        if torch.is_grad_enabled() and x.requires_grad:
            return _DequantLinear.apply(x, weight, bias, dtype)
        return F.linear(x.to(dtype), weight.dequantize(dtype), None if bias is None else bias.to(dtype))


class QuantLinear(nn.Module):
    def __init__(self, weight: QuantizedWeight, bias: nn.Parameter | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = weight
        self.bias = bias.requires_grad_(False) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quant_linear(x, self.weight, self.bias)

    @torch.no_grad()
    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A plain frozen nn.Linear with the dequantized weight (e.g. to export a merged model)."""
        w = self.weight.dequantize(dtype)
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = nn.Parameter(w, requires_grad=False)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach().to(w.dtype), requires_grad=False)
        return linear.train(self.training)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
