"""Adapters in Hugging Face PEFT's format: `adapter_config.json` + `adapter_model.safetensors`.

What PEFT writes for a LlamaForCausalLM, and what is read back here:
- tensor keys `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` (lora_B, and
  `...q_proj.lora_magnitude_vector` for DoRA); a modules_to_save copy under the module's own name
  (`base_model.model.lm_head.weight`);
- target_modules / rank_pattern / alpha_pattern / modules_to_save in Hugging Face module names.
petformers writes target_modules as the modules it actually adapted (short names such as "q_proj"
when every layer's is adapted, full names otherwise), so PEFT selects exactly the same layers
whatever regex or petformers names the YAML used.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open

from petformers import atomic
from petformers.checkpoint.hf import save_safetensors_atomic
from petformers.errors import AdapterError
from petformers.jsonio import read_json
from petformers.models import names
from petformers.pet.config import PetConfig
from petformers.pet.inject import adapter_parameters, apply_lora, load_lora_state_dict, lora_state_dict
from petformers.pet.lora import LoRALinear
from petformers.pet.matching import LINEAR_TYPES, pattern_value
from petformers.pet.merge import merge_and_unload
from petformers.pet.module_to_save import ModuleToSave

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_PARAM_TO_PEFT = {"lora_a.weight": "lora_A.weight", "lora_b.weight": "lora_B.weight",
                  "magnitude": "lora_magnitude_vector"}


def peft_key(name: str) -> str:
    """petformers adapter tensor name -> PEFT's saved key."""
    for suffix, peft in _PARAM_TO_PEFT.items():
        if name.endswith("." + suffix):
            return _PREFIX + names.to_hf(name[: -len(suffix) - 1]) + "." + peft
    module_name, _, rest = name.partition(".module.")  # a ModuleToSave copy is saved under the module's name
    return _PREFIX + names.to_hf(f"{module_name}.{rest}")


def name_of_peft_key(key: str) -> str:
    """PEFT's saved key -> petformers name: peft_key's inverse (a modules_to_save copy comes back under its
    module's own name, `lm_head.weight`)."""
    name = key.removeprefix(_PREFIX)
    for suffix, peft in _PARAM_TO_PEFT.items():
        if name.endswith("." + peft):
            return names.from_hf(name[: -len(peft) - 1]) + "." + suffix
    return names.from_hf(name)


def read_adapter_state(adapter_dir) -> dict[str, torch.Tensor]:
    """A PEFT adapter's tensors under petformers names (`layers.0.attention.wq.lora_a.weight`, `lm_head.weight`)."""
    read_adapter_config(Path(adapter_dir))  # a clear error when this is not an adapter directory
    return {name_of_peft_key(key): t for key, t in read_adapter_tensors(Path(adapter_dir)).items()}


def save_peft_adapter(model: nn.Module, pet_config: PetConfig, out_dir, base_model_name_or_path: str | None):
    """Write the adapter of `model` as a PEFT adapter directory (each file written atomically)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, t in lora_state_dict(model).items():
        if t.device.type == "meta":
            raise AdapterError(f"cannot save adapter tensor {name!r}: it is on the meta device (never materialized)")
        tensors[peft_key(name)] = t.to(torch.float32).cpu().contiguous()
    if not tensors:
        raise AdapterError("the model has no LoRA layers to save")
    config = pet_config.to_peft_config_dict(base_model_name_or_path)
    config.update(_resolved_modules(model, pet_config))
    save_safetensors_atomic(tensors, out_dir / WEIGHTS_FILE, {"format": "pt"})
    atomic.write_json(out_dir / CONFIG_FILE, config)


def _resolved_modules(model: nn.Module, c: PetConfig) -> dict:
    """target_modules, rank/alpha patterns and modules_to_save, in Hugging Face names, from what was adapted."""
    adapted = {names.to_hf(n): m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    linear = list(adapted) + [names.to_hf(n) for n, m in model.named_modules()
                              if isinstance(m, LINEAR_TYPES) and not _inside_adapter(model, n)]

    def compact(chosen: dict[str, object], universe: list[str]) -> dict[str, object]:
        # A short name stands for every module of `universe` with that name when they share one value.
        out = {}
        for short in dict.fromkeys(n.rsplit(".", 1)[-1] for n in chosen):
            group = [n for n in universe if n.rsplit(".", 1)[-1] == short]
            values = {chosen.get(n, None) for n in group}
            if len(values) == 1 and None not in values:
                out[short] = values.pop()
            else:
                out.update({n: chosen[n] for n in group if n in chosen})
        return out

    ranks = {n: m.rank for n, m in adapted.items() if m.rank != c.lora_rank}
    alphas = {n: m.alpha for n, m in adapted.items() if m.alpha != c.lora_alpha}
    return {
        "target_modules": sorted(compact({n: True for n in adapted}, linear)),
        "exclude_modules": None,  # already applied: target_modules lists what was adapted
        "rank_pattern": compact(ranks, list(adapted)),
        "alpha_pattern": compact(alphas, list(adapted)),
        "modules_to_save": [names.to_hf(n) for n, m in model.named_modules() if isinstance(m, ModuleToSave)] or None,
    }


def _inside_adapter(model: nn.Module, name: str) -> bool:
    parent = name.rpartition(".")[0]
    while parent:
        if isinstance(model.get_submodule(parent), (LoRALinear, ModuleToSave)):
            return True
        parent = parent.rpartition(".")[0]
    return False


def read_adapter_config(adapter_dir) -> PetConfig:
    """The PetConfig of a PEFT adapter directory (AdapterError if missing or malformed)."""
    adapter_dir = Path(adapter_dir)
    cfg_file = adapter_dir / CONFIG_FILE
    if not adapter_dir.is_dir():
        raise AdapterError(f"{adapter_dir}: not a directory (expected a PEFT adapter directory)")
    if not cfg_file.exists():
        raise AdapterError(f"{adapter_dir}: no {CONFIG_FILE} (not a PEFT adapter directory)")
    d = read_json(cfg_file, AdapterError)
    if not isinstance(d, dict):
        raise AdapterError(f"{cfg_file}: expected a JSON object at the top level, got {type(d).__name__}")
    return PetConfig.from_peft_config_dict(d, source=str(cfg_file))


def read_adapter_tensors(adapter_dir) -> dict[str, torch.Tensor]:
    """PEFT-keyed tensors of adapter_model.safetensors (never a pickle)."""
    adapter_dir = Path(adapter_dir)
    file = adapter_dir / WEIGHTS_FILE
    if not file.exists():
        if (adapter_dir / "adapter_model.bin").exists():
            raise AdapterError(f"{adapter_dir}: only adapter_model.bin (pickle) found; petformers reads "
                               "safetensors only (never unpickles downloaded files): re-save with safe_serialization")
        raise AdapterError(f"{adapter_dir}: no {WEIGHTS_FILE}")

    try:
        with safe_open(str(file), framework="pt") as st:
            return {key: st.get_tensor(key) for key in st.keys()}
    except Exception as e:  # safetensors raises its own types for truncated or corrupt files
        raise AdapterError(f"{file}: not a readable safetensors file ({e}); is it truncated?") from None


def load_peft_adapter(model: nn.Module, adapter_dir) -> PetConfig:
    """Inject LoRA into `model` as the adapter's config says, load its tensors; returns that config.

    A model that already has LoRA layers (apply_lora from the YAML, to continue training an adapter)
    is not injected again: the adapter must then have the same layers, ranks and scalings.

    Errors (AdapterError, one line): no adapter_config.json, unreadable safetensors, a tensor
    missing or extra, a shape that does not fit (another rank, or an adapter of another base model).
    """
    adapter_dir = Path(adapter_dir)
    pet_config = read_adapter_config(adapter_dir)
    tensors = read_adapter_tensors(adapter_dir)
    file = adapter_dir / WEIGHTS_FILE
    if adapter_parameters(model):  # LoRA already injected (e.g. from the YAML): the adapter must fit it
        _check_same_scaling(model, pet_config, adapter_dir / CONFIG_FILE)
    else:
        apply_lora(model, pet_config)
    expected = adapter_parameters(model)
    by_key = {peft_key(name): name for name in expected}
    unexpected = sorted(set(tensors) - set(by_key))
    if unexpected:
        raise AdapterError(f"{file}: tensor {unexpected[0]!r} matches no adapted module of this model "
                           f"(adapter_config.json target_modules {pet_config.target_modules!r}); "
                           "is the adapter for another base model?")
    state = {}
    for key, name in by_key.items():
        if key not in tensors:
            raise AdapterError(f"{file}: missing tensor {key!r}; is the adapter for another base model?")
        found, want = tuple(tensors[key].shape), tuple(expected[name].shape)
        if found != want:
            raise AdapterError(f"{file}: tensor {key!r} has shape {found}, the model expects {want} "
                               f"({_shape_hint(name, found, want, pet_config)})")
        state[name] = tensors[key]
    load_lora_state_dict(model, state, source=str(file))
    return pet_config


def merge_adapter(model: nn.Module, adapter_dir) -> tuple[nn.Module, PetConfig]:
    """`model` with the adapter at `adapter_dir` folded into its weights (W + scaling·B@A), and the
    adapter's config: the one way predict, chat, eval, export and consolidate apply an adapter."""
    pet_config = load_peft_adapter(model, adapter_dir)
    return merge_and_unload(model), pet_config


def _check_same_scaling(model: nn.Module, c: PetConfig, source: Path):
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            alpha = pattern_value(c.alpha_pattern, name, c.lora_alpha)
            rank = pattern_value(c.rank_pattern, name, c.lora_rank)
            if (m.use_dora, round(m.scaling, 6)) != (c.use_dora, round(c.scaling(rank, alpha), 6)):
                raise AdapterError(f"{source}: the adapter's {name} (scaling {c.scaling(rank, alpha):g}, "
                                   f"use_dora {c.use_dora}) differs from the model's LoRA layer "
                                   f"(scaling {m.scaling:g}, use_dora {m.use_dora}); make pet_config match the adapter")


def _shape_hint(name: str, found: tuple, want: tuple, c: PetConfig) -> str:
    rank_dim = 0 if name.endswith("lora_a.weight") else 1 if name.endswith("lora_b.weight") else None
    if rank_dim is not None and len(found) == 2 and found[1 - rank_dim] == want[1 - rank_dim]:
        return f"rank {found[rank_dim]} in the file, but adapter_config.json gives this module rank {want[rank_dim]}"
    return "an adapter trained for another base model, with other layer sizes?"
