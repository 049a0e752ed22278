"""Which layers of a model hold a quantized base, and putting them there.

QLoRA's rule (Dettmers et al. 2023; bitsandbytes/transformers' default `llm_int8_skip_modules`):
every linear layer of the decoder (attention q/k/v/o, MLP gate/up/down) is quantized; the token
embeddings, the RMSNorm weights, biases and the output layer `lm_head` stay in float. The embeddings
and norms are not matmuls and are small; lm_head is kept float because its errors go straight into the
logits (and, tied, it is the embedding matrix). With `quantization_type: gguf` the linear layers keep
the block format of the file (a tensor stored as F16/F32 in the file stays float), and the embeddings
are dequantized to float.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from petformers.errors import ConfigError
from petformers.quant.linear import QuantLinear
from petformers.quant.weight import FourBitWeight, Int8Weight, QuantizedWeight

KEEP_FLOAT = ("lm_head",)  # linear layers that stay float (besides non-linear modules)
TYPES = ("nf4", "fp4", "int8", "gguf")


@dataclass
class QuantConfig:
    """model_config's `quantization_bit`, `quantization_type`, `double_quantization` (LLaMA-Factory's and
    bitsandbytes' names), checked together."""
    bits: int | None = 4
    type: str = "nf4"
    double_quant: bool = True

    @classmethod
    def from_keys(cls, bits=None, qtype=None, double_quant=None, where: str = "model_config") -> "QuantConfig | None":
        """None when neither bits nor type is set (a float base)."""
        if bits is None and qtype is None:
            if double_quant is not None and double_quant is not False:
                raise ConfigError(f"{where}.double_quantization: needs quantization_bit: 4 (double quantization "
                                  "is of NF4/FP4 block scales)")
            return None
        if bits is not None:
            try:
                bits = int(bits)
            except (TypeError, ValueError):
                bits = -1
            if bits not in (4, 8):
                raise ConfigError(f"{where}.quantization_bit: must be 4 or 8, not {bits!r}")
        if qtype is None:
            qtype = "nf4" if bits == 4 else "int8"
        qtype = str(qtype).lower()
        if qtype not in TYPES:
            raise ConfigError(f"{where}.quantization_type: must be one of {', '.join(TYPES)}, not {qtype!r}")
        if qtype in ("nf4", "fp4") and bits not in (None, 4):
            raise ConfigError(f"{where}.quantization_type: {qtype} is 4-bit; set quantization_bit: 4 (not {bits})")
        if qtype == "int8" and bits not in (None, 8):
            raise ConfigError(f"{where}.quantization_type: int8 is 8-bit; set quantization_bit: 8 (not {bits})")
        if qtype in ("nf4", "fp4"):
            bits = 4
        elif qtype == "int8":
            bits = 8
        if double_quant is None:
            double_quant = qtype in ("nf4", "fp4")
        if not isinstance(double_quant, bool):
            raise ConfigError(f"{where}.double_quantization: must be True or False, not {double_quant!r}")
        if double_quant and qtype not in ("nf4", "fp4"):
            raise ConfigError(f"{where}.double_quantization: applies to nf4/fp4 only, not {qtype}")
        return cls(bits, qtype, double_quant)

    def describe(self) -> str:
        if self.type == "gguf":
            return "GGUF blocks kept as stored"
        return f"{self.type} {self.bits}-bit" + (", double quantization" if self.double_quant else "")


def quantize_tensor(w: torch.Tensor, config: QuantConfig, compute_dtype: torch.dtype) -> QuantizedWeight:
    """A float [out, in] weight in the configured format (not for gguf, whose blocks come from the file)."""
    if config.type in ("nf4", "fp4"):
        return FourBitWeight.quantize(w, config.type, config.double_quant, compute_dtype)
    if config.type == "int8":
        return Int8Weight.quantize(w, compute_dtype)
    raise ValueError(f"{config.type}: blocks come from a GGUF file, not from a float tensor")


def is_quantized_target(name: str, module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and name.split(".")[-1] not in KEEP_FLOAT


def quantized_targets(model: nn.Module) -> list[str]:
    """Names of the linear layers QLoRA's rule quantizes, in model order."""
    return [n for n, m in model.named_modules() if is_quantized_target(n, m)]


def replace_module(model: nn.Module, name: str, module: nn.Module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


@torch.no_grad()
def quantize_model(model: nn.Module, config: QuantConfig, compute_dtype: torch.dtype | None = None) -> nn.Module:
    """Replace each target nn.Linear of an in-memory model by a QuantLinear, one at a time (each float
    weight is freed as soon as its layer is quantized, unless something else holds it)."""
    for name in quantized_targets(model):
        linear = model.get_submodule(name)
        dtype = compute_dtype or linear.weight.dtype
        replace_module(model, name, QuantLinear(quantize_tensor(linear.weight, config, dtype), linear.bias)
                       .train(linear.training))
    return model


def quantized_bytes(model: nn.Module) -> int:
    return sum(m.nbytes() for m in model.modules() if isinstance(m, QuantizedWeight))


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Every QuantLinear back to a plain nn.Linear holding its dequantized weight (to export)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantLinear):
            replace_module(model, name, module.to_linear(dtype))
    return model
