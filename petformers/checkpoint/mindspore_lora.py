"""mindpet LoRA in MindFormers checkpoints: reading the adapter tensors, and folding them into the base.

mindpet stores `<module>.mindpet_delta_lora_a` [r, in] and `.mindpet_delta_lora_b` [out, r]; merged, a
weight becomes W + scaling·B@A with scaling = alpha / r (pet.lora.lora_scaling), as MindFormers'
transform_ckpt_lora computes it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from petformers.checkpoint.mindspore_load import config_hint, expected_shapes, lora_expected, read_model_tensors
from petformers.checkpoint.mindspore_names import PF_LORA, is_lora, to_mindformers
from petformers.errors import AdapterError, CheckpointError
from petformers.models.config import LlamaConfig
from petformers.pet.lora import lora_scaling


def mindpet_lora_tensors(path, config: LlamaConfig | None = None) -> dict[str, torch.Tensor]:
    """mindpet LoRA tensors as petformers names (`layers.N.attention.wq.lora_a.weight` [r, in], `.lora_b` [out, r]).

    Empty when the checkpoint holds no LoRA. With `config`, each pair is checked against the base
    layer's shape and model-parallel slices of a rank_N layout are concatenated.
    """
    path = Path(path)
    expected = expected_shapes(config) if config is not None else None
    lora = {n: t for n, t in read_model_tensors(path, expected).items() if is_lora(n)}
    for name, tensor in lora.items():
        module, ab = PF_LORA.match(name).groups()
        other = lora.get(f"{module}.lora_{'b' if ab == 'a' else 'a'}.weight")
        if other is None:
            raise CheckpointError(f"{path}: {to_mindformers(name)!r} has no matching lora_{'b' if ab == 'a' else 'a'}")
        if tensor.dim() != 2:
            raise CheckpointError(f"{path}: {to_mindformers(name)!r} has shape {list(tensor.shape)}, expected 2-D")
        if expected is not None:
            want = lora_expected(name, tensor, expected)
            if want is None:
                raise CheckpointError(f"{path}: {to_mindformers(name)!r} adapts {module!r}, which is not a "
                                      f"layer of a model with model_config {config_hint(config)}")
            if tuple(tensor.shape) != want:
                raise CheckpointError(f"{path}: {to_mindformers(name)!r} has shape {list(tensor.shape)}, "
                                      f"expected {list(want)} for {module!r} with model_config "
                                      f"{config_hint(config)}")
    return lora


def _pet_value(pet_config, key: str, default=None):
    if pet_config is None:
        return default
    if isinstance(pet_config, dict):
        return pet_config.get(key, default)
    return getattr(pet_config, key, default)


def _scaling(module: str, rank: int, pet_config, model) -> float:
    if model is not None:
        try:
            value = getattr(model.get_submodule(module), "scaling", None)
        except AttributeError:
            value = None
        if isinstance(value, (int, float)):
            return float(value)
    alpha = _pet_value(pet_config, "lora_alpha")
    if alpha is None:
        raise AdapterError(f"merging {module!r} needs lora_alpha: pass pet_config (the YAML's model_config.pet_config)")
    return lora_scaling(rank, float(alpha), bool(_pet_value(pet_config, "use_rslora", False)))


def merge_lora_tensors(base: dict, lora: dict, pet_config=None, model=None) -> dict[str, torch.Tensor]:
    """`base` with every adapted weight replaced by W + scaling·B@A (computed in float32, cast back to W's dtype).

    scaling is the LoRA module's own `scaling` when `model` has one, else alpha/r (alpha/√r with
    use_rslora) from `pet_config` (a PetConfig or the YAML's pet_config mapping).
    """
    out = dict(base)
    for name in lora:
        module, ab = PF_LORA.match(name).groups()
        if ab == "b":
            continue
        a, b = lora[name], lora.get(f"{module}.lora_b.weight")
        weight = out.get(f"{module}.weight")
        if b is None or weight is None:
            raise AdapterError(f"cannot merge {module!r}: its lora_b or base weight is missing")
        if a.shape[0] != b.shape[1] or (b.shape[0], a.shape[1]) != tuple(weight.shape):
            raise AdapterError(f"cannot merge {module!r}: lora_a {list(a.shape)} and lora_b {list(b.shape)} do not "
                               f"fit its weight {list(weight.shape)}")
        delta = _scaling(module, a.shape[0], pet_config, model) * (b.detach().float() @ a.detach().float())
        out[f"{module}.weight"] = (weight.detach().float() + delta).to(weight.dtype)
    return out
