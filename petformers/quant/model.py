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
from petformers.quant import blockwise
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
    def from_keys(cls, bits=None, qtype=None, double_quant=None, where: str = "model.model_config.") -> "QuantConfig | None":
        """None when neither bits nor type is set (a float base). `where` prefixes the key names in errors
        ('model.model_config.' for the YAML, '--' for command-line flags)."""
        if bits is None and qtype is None:
            if double_quant is not None and double_quant is not False:
                raise ConfigError(f"{where}double_quantization: needs quantization_bit: 4 (double quantization "
                                  "is of NF4/FP4 block scales)")
            return None
        if bits is not None:
            try:
                bits = int(bits)
            except (TypeError, ValueError):
                bits = -1
            if bits not in (4, 8):
                raise ConfigError(f"{where}quantization_bit: must be 4 or 8, not {bits!r}")
        if qtype is None:
            qtype = "nf4" if bits == 4 else "int8"
        qtype = str(qtype).lower()
        if qtype not in TYPES:
            raise ConfigError(f"{where}quantization_type: must be one of {', '.join(TYPES)}, not {qtype!r}")
        if qtype in ("nf4", "fp4") and bits not in (None, 4):
            raise ConfigError(f"{where}quantization_type: {qtype} is 4-bit; set quantization_bit: 4 (not {bits})")
        if qtype == "int8" and bits not in (None, 8):
            raise ConfigError(f"{where}quantization_type: int8 is 8-bit; set quantization_bit: 8 (not {bits})")
        if qtype in ("nf4", "fp4"):
            bits = 4
        elif qtype == "int8":
            bits = 8
        if double_quant is None:
            double_quant = qtype in ("nf4", "fp4")
        if isinstance(double_quant, str) and double_quant.lower() in ("true", "false"):
            double_quant = double_quant.lower() == "true"
        if not isinstance(double_quant, bool):
            raise ConfigError(f"{where}double_quantization: must be True or False, not {double_quant!r}")
        if double_quant and qtype not in ("nf4", "fp4"):
            raise ConfigError(f"{where}double_quantization: applies to nf4/fp4 only, not {qtype}")
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


def random_quantized_weight(shape: tuple[int, int], config: QuantConfig, generator: torch.Generator,
                            std: float = 0.02, compute_dtype: torch.dtype = torch.float32) -> QuantizedWeight:
    """A weight created directly in quantized form (no float matrix): uniformly random 4-bit codes,
    which for NF4 are samples of a normal distribution (its codes are equal-mass quantiles), with
    block absmax values around those of N(0, std) blocks of 64 (~2.4 std); int8: uniform codes.
    For memory and speed measurements of models too large to create in float (a 7B base here)."""
    out, cols = shape
    n = out * cols
    if config.type in ("nf4", "fp4"):
        packed = torch.randint(0, 256, ((n + 1) // 2,), dtype=torch.uint8, generator=generator)
        blocks = -(-n // blockwise.BLOCK_4BIT)
        absmax = (std * (2.4 + 0.35 * torch.randn(blocks, generator=generator))).clamp_(min=std)
        q = blockwise.Quantized4bit(packed, absmax, (out, cols), config.type)
        if config.double_quant:
            q.absmax_offset = absmax.mean()
            q.absmax, q.absmax_scale = blockwise.quantize_8bit(absmax - q.absmax_offset)
        return FourBitWeight(q, compute_dtype)
    if config.type == "int8":
        q = torch.randint(-127, 128, (out, cols), dtype=torch.int8, generator=generator)
        return Int8Weight(q, torch.full((out,), std * 4.0), compute_dtype)
    raise ValueError(f"{config.type}: random weights are made for nf4, fp4 and int8")


def estimate_quantized_bytes(numel: int, rows: int, config: QuantConfig) -> int:
    """Bytes of one [rows, numel/rows] weight in the configured format (nf4/fp4/int8), as stored above."""
    if config.type in ("nf4", "fp4"):
        blocks = -(-numel // 64)
        scales = blocks + 4 * -(-blocks // 256) + 4 if config.double_quant else 4 * blocks
        return (numel + 1) // 2 + scales
    if config.type == "int8":
        return numel + 4 * rows
    raise ValueError(f"{config.type}: the size comes from the GGUF file")


def base_weight_bytes(model: nn.Module, config: QuantConfig | None, dtype: torch.dtype,
                      gguf_bytes: dict[str, int] | None = None) -> int:
    """Bytes of a model's frozen base (works on the meta device): quantized layers at their quantized
    size (for gguf: the file's own bytes per tensor, `gguf_bytes` by petformers name), the rest in dtype."""
    element = torch.empty((), dtype=dtype).element_size()
    # the linear layers QLoRA quantizes, plain or already wrapped by LoRA (which keeps `weight`)
    targets = {f"{n}.weight" for n, m in model.named_modules()
               if (isinstance(m, nn.Linear) or isinstance(getattr(m, "lora_a", None), nn.Linear))
               and n.split(".")[-1] not in KEEP_FLOAT} if config is not None else set()
    total, seen = 0, set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen or p.requires_grad:
            continue
        seen.add(id(p))
        if name in targets and config.type == "gguf" and gguf_bytes and name in gguf_bytes:
            total += gguf_bytes[name]
        elif name in targets and config.type != "gguf":
            total += estimate_quantized_bytes(p.numel(), p.shape[0], config)
        else:
            total += p.numel() * element
    for m in model.modules():  # layers already quantized (a loaded model)
        if isinstance(m, QuantizedWeight):
            total += m.nbytes()
    return total


KEYS = ("quantization_bit", "quantization_type", "double_quantization")  # model_config's names


def quant_config_of(model_config: dict | None) -> QuantConfig | None:
    """The run's quantization from its YAML model_config (None: a float base)."""
    mc = model_config or {}
    return QuantConfig.from_keys(mc.get("quantization_bit"), mc.get("quantization_type"),
                                 mc.get("double_quantization"), where="model.model_config.")
