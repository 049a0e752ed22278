"""`LoRALinear`: a frozen linear layer plus a trainable low-rank update, as PEFT and MindFormers define it.

    y = W x + b + s · B A dropout(x)          s = alpha / r   (alpha / sqrt(r) with rsLoRA)

W [out, in] (and b) are the base layer's own parameters, kept under the same names (`...wq.weight`),
so the base state dict is unchanged by injection. A = `lora_a.weight` [r, in], B = `lora_b.weight`
[out, r]. With DoRA a magnitude m [out] rescales each output row of the adapted weight:

    y = m / ||W + s B A||_row · (W + s B A) x + b

where the row norm is computed without gradient (DoRA paper §4.3, as PEFT does).

Adapters are float32 even when W is bf16/fp16: B starts at zero and its updates (lr × grad, ~1e-5
relative) are below bf16's resolution (2^-8), so a bf16 adapter would round most steps away; and
s·BAx is small next to Wx, so it is added in float32 and the sum cast back to W's dtype (PEFT's order).

W may be a `QuantizedWeight` (QLoRA): the base product then goes through `quant_linear` (dequantized on
the fly, recomputed in backward), DoRA's norms and merging use the dequantized W, and merge() replaces W
by the float merged matrix while keeping the quantized one aside, so unmerge() restores it exactly.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from petformers.errors import AdapterError
from petformers.models.lean_ops import dropout_linear
from petformers.quant.linear import quant_linear
from petformers.quant.weight import QuantizedWeight

ADAPTER_DTYPE = torch.float32


def lora_scaling(rank: int, alpha: float, use_rslora: bool = False) -> float:
    """The factor s on B·A·x: alpha / r, or alpha / sqrt(r) with rsLoRA (the one place this rule lives)."""
    return alpha / (math.sqrt(rank) if use_rslora else rank)


class LoRALinear(nn.Module):
    def __init__(self, weight: nn.Parameter | QuantizedWeight, bias: nn.Parameter | None, rank: int, alpha: float, *,
                 dropout: float = 0.0, use_rslora: bool = False, use_dora: bool = False):
        """Takes over `weight` [out, in] and `bias` (frozen, their dtype and device); the adapter is
        created on the same device, in float32, with nn.Linear's default init (see reset_lora_parameters)."""
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.rank, self.alpha = rank, alpha
        self.scaling = lora_scaling(rank, alpha, use_rslora)
        self.use_dora = use_dora
        self.weight = weight if isinstance(weight, QuantizedWeight) else weight.requires_grad_(False)
        self.bias = bias.requires_grad_(False) if bias is not None else None
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device = weight.device
        self.lora_a = nn.Linear(self.in_features, rank, bias=False, device=device, dtype=ADAPTER_DTYPE)
        self.lora_b = nn.Linear(rank, self.out_features, bias=False, device=device, dtype=ADAPTER_DTYPE)
        # DoRA's m, one per output row; set from the base weight by init_magnitude().
        self.magnitude = nn.Parameter(torch.ones(self.out_features, device=device, dtype=ADAPTER_DTYPE)) \
            if use_dora else None
        # Row norms at merge time: DoRA's unmerge cannot recover them from the merged weight.
        self.register_buffer("merge_norm", None, persistent=False)
        self.merged = False  # the update is folded into `weight`; forward is the plain linear layer
        self._quantized_base: QuantizedWeight | None = None  # a quantized W while merged (see merge)
        self.disabled = False  # forward is the base layer only (e.g. to compare with the base model)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, alpha: float, **kwargs) -> "LoRALinear":
        """Wrap an nn.Linear (or a QuantLinear), taking over its weight and bias (no copy)."""
        return cls(linear.weight, linear.bias, rank, alpha, **kwargs)

    # ---- initialisation --------------------------------------------------------------------

    @torch.no_grad()
    def reset_lora_parameters(self, init: bool | str = True):
        """True/"kaiming": A Kaiming-uniform (a=sqrt(5), nn.Linear's default), B zeros: a no-op adapter.
        "gaussian": A ~ N(0, 1/r), B zeros. "pissa": see init_pissa. False: leave nn.Linear's init."""
        if init is False:
            pass
        elif init == "pissa":
            self.init_pissa()
        else:
            if init in (True, "kaiming"):
                nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))
            elif init == "gaussian":
                nn.init.normal_(self.lora_a.weight, std=1 / self.rank)
            else:
                raise AdapterError(f"unknown init_lora_weights {init!r}")
            nn.init.zeros_(self.lora_b.weight)
        if self.use_dora:
            self.init_magnitude()

    @torch.no_grad()
    def init_pissa(self):
        """PiSSA: B A = the top-r singular part of W / s, and W becomes the residual, so the output is unchanged."""
        if self.weight.device.type == "meta":
            return
        if self.is_quantized:
            raise AdapterError("init_lora_weights: pissa rewrites the base weight, which is quantized here; "
                               "use the default init over a quantized base, or pissa over a float one")
        w = self.weight.float()
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        sr = s[: self.rank] / self.scaling
        self.lora_a.weight.copy_(torch.diag(sr.sqrt()) @ vh[: self.rank])
        self.lora_b.weight.copy_(u[:, : self.rank] @ torch.diag(sr.sqrt()))
        self.weight.copy_((w - self.scaling * self.lora_b.weight @ self.lora_a.weight).to(self.weight.dtype))

    @torch.no_grad()
    def init_magnitude(self):
        """DoRA's m starts as the row norms of W + s B A, so the adapted layer starts equal to the base one."""
        self.magnitude.copy_(self._weight_norm(self.dense_weight(ADAPTER_DTYPE), self.delta_weight()))

    # ---- the base ---------------------------------------------------------------------------

    @property
    def is_quantized(self) -> bool:
        return isinstance(self.weight, QuantizedWeight)

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """W as a float matrix in `dtype` (dequantized when the base is quantized)."""
        return self.weight.dequantize(dtype) if self.is_quantized else self.weight.to(dtype)

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_quantized:
            return quant_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)

    # ---- the update ------------------------------------------------------------------------

    def lora_weight(self) -> torch.Tensor:
        """B A [out, in], computed through the modules' forward (not `B.weight @ A.weight`) so that it
        works under FSDP, where the weights are only whole inside a forward call (as PEFT does)."""
        eye = torch.eye(self.in_features, device=self.lora_a.weight.device, dtype=self.lora_a.weight.dtype)
        return self.lora_b(self.lora_a(eye)).T

    def delta_weight(self) -> torch.Tensor:
        """s B A, float32 [out, in]: what merging adds to W (before DoRA's rescaling)."""
        return self.lora_b.weight @ self.lora_a.weight * self.scaling

    def _weight_norm(self, weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return torch.linalg.norm(weight + delta, dim=1).to(weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add_update(x, self.base_forward(x))

    def add_update(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """`result` (this layer's W x + b) plus the adapter's update of x. Apart from forward so that
        pet/fused.py can compute W x + b of several layers in one matmul and hand each its slice."""
        if self.merged:
            if self.disabled:
                raise AdapterError("a merged LoRA layer cannot be disabled; unmerge it first")
            return result
        if self.disabled:
            return result
        dtype = result.dtype
        x = x.to(self.lora_a.weight.dtype)
        if not self.use_dora:
            if isinstance(self.dropout, nn.Dropout) and type(self.lora_a) is nn.Linear:
                # A(dropout(x)) keeping x and a bool mask for backward, not the dropped x and a float
                # noise tensor (models/lean_ops.py): 2 x [tokens, in] floats less per LoRA layer
                h = dropout_linear(x, self.lora_a.weight, self.dropout.p, self.dropout.training)
            else:
                h = self.lora_a(self.dropout(x))
            if dtype == h.dtype and type(self.lora_b) is nn.Linear and self.lora_b.bias is None:
                # result + s·h·Bᵀ as one addmm: no separate scale and add passes over [tokens, out] in
                # forward or backward (~30% of LoRA's own cost on a 192-wide k/v projection on CPU).
                out = torch.addmm(result.reshape(-1, self.out_features), h.reshape(-1, self.rank),
                                  self.lora_b.weight.t(), alpha=self.scaling)
                return out.view(result.shape)
            return (result + self.lora_b(h) * self.scaling).to(dtype)
        return (result + self._dora_extra(x, result)).to(dtype)

    def _dora_extra(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """What DoRA adds to the base output, exactly PEFT's DoraLinearLayer.forward:
        (m/n - 1) · W x + m/n · s · B A x, with n = ||W + s·BA||_row detached from the graph."""
        lora_weight = self.lora_weight().to(x.dtype)
        weight = self.dense_weight(x.dtype)
        weight_norm = self._weight_norm(weight, self.scaling * lora_weight.detach()).detach()
        mag_norm_scale = (self.magnitude / weight_norm).view(1, -1)
        if isinstance(self.dropout, nn.Identity) or not self.training:
            base = result if self.bias is None else result - self.bias
        else:  # the base term must see the same dropped input as the LoRA term
            x = self.dropout(x)
            base = F.linear(x, weight)
        lora = self.lora_b(self.lora_a(x))
        return (mag_norm_scale - 1) * base + mag_norm_scale * lora * self.scaling

    # ---- merge -----------------------------------------------------------------------------

    @torch.no_grad()
    def merge(self):
        """W <- W + s B A (DoRA: m / ||W + s B A|| · (W + s B A)), computed in float32, stored in W's dtype.
        A quantized W is dequantized, merged into a float parameter in its compute dtype, and kept aside."""
        if self.merged:
            return
        w = self.dense_weight(ADAPTER_DTYPE)
        delta = self.delta_weight()
        if self.use_dora:
            self.merge_norm = self._weight_norm(w, delta)
            new = (self.magnitude / self.merge_norm).view(-1, 1) * (w + delta)
        else:
            new = w + delta
        if self.is_quantized:
            self._quantized_base = self.weight
            self.weight = nn.Parameter(new.to(self._quantized_base.compute_dtype), requires_grad=False)
        else:
            self.weight.copy_(new.to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """Undo merge(); W comes back to within float32 rounding (exact up to W's dtype)."""
        if not self.merged:
            return
        if self._quantized_base is not None:  # the quantized blocks were never changed: exact
            quantized, self._quantized_base = self._quantized_base, None
            del self.weight  # the merged float parameter
            self.weight = quantized
            self.merge_norm = None
            self.merged = False
            return
        w = self.weight.to(ADAPTER_DTYPE)
        delta = self.delta_weight()
        if self.use_dora:
            w = w / (self.magnitude / self.merge_norm).view(-1, 1)
            self.merge_norm = None
        self.weight.copy_((w - delta).to(self.weight.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"alpha={self.alpha}, scaling={self.scaling:g}, dora={self.use_dora}, merged={self.merged}")
