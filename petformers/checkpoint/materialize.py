"""Fill a model built on the meta device with real tensors, once, in the asked dtype.

Loaders yield (petformers_name, tensor) pairs; each tensor is checked and converted as it arrives
and assigned in place of the meta parameter, so the full model is never held twice. With a
`QuantConfig`, the weight of each linear layer QLoRA quantizes is quantized as it arrives (or, for a
GGUF file, kept in its blocks) and its layer becomes a QuantLinear: the float model never exists, and
the peak while loading is the quantized model plus one float tensor.
"""

from __future__ import annotations

from typing import Iterable

import torch

from petformers.errors import CheckpointError
from petformers.models.llama import Llama
from petformers.quant.linear import QuantLinear
from petformers.quant.model import QuantConfig, quantize_tensor, quantized_targets, replace_module
from petformers.quant.weight import GGUFWeight


def materialize(model: Llama, tensors: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype,
                device="cpu", source: str = "checkpoint", quantization: QuantConfig | None = None) -> Llama:
    expected = dict(model.state_dict(keep_vars=True))
    to_quantize = {f"{n}.weight" for n in quantized_targets(model)} if quantization else set()
    quantized = {}
    tied = model.config.tie_word_embeddings
    if tied:
        expected.pop("lm_head.weight", None)
    loaded: dict[str, torch.Tensor] = {}
    for name, tensor in tensors:
        if tied and name == "lm_head.weight":
            continue
        if name not in expected:
            raise CheckpointError(f"{source}: unexpected tensor {name!r} (not a parameter of this Llama model)")
        want = tuple(expected[name].shape)
        if tuple(tensor.shape) != want:
            raise CheckpointError(f"{source}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                                  f"the model config expects {want}")
        if hasattr(tensor, "type_id"):  # GGUF blocks (gguf_file.Blocks), kept only for quantized layers
            if name not in to_quantize or quantization.type != "gguf":
                tensor = tensor.dequantize()
            else:
                quantized[name] = GGUFWeight(tensor.data.to(device), tensor.type_id, tensor.shape, dtype)
                continue
        if name in to_quantize and quantization.type != "gguf":
            quantized[name] = quantize_tensor(tensor.to(device), quantization, dtype)
            continue
        loaded[name] = tensor.to(device=device, dtype=dtype)
    missing = sorted(set(expected) - set(loaded) - set(quantized))
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CheckpointError(f"{source}: missing tensors {', '.join(missing[:3])}{more}")
    for name, weight in quantized.items():
        module_name = name.removesuffix(".weight")
        replace_module(model, module_name, QuantLinear(weight, model.get_submodule(module_name).bias))
    model.load_state_dict(loaded, strict=False, assign=True)  # completeness checked above
    model.tie_weights()
    return model.requires_grad_(False).eval()
