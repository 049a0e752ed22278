"""Which modules a `target_modules` pattern selects: PEFT's rule, in one place.

- a string is a regex `re.fullmatch`ed against the full dotted module name;
- a list matches a name exactly or as a `.name` suffix;
- "all-linear" is every linear layer (nn.Linear or QuantLinear) but lm_head (the output layer).
Every module is tried under its petformers name (`layers.0.attention.wq`) and its Hugging Face name
(`model.layers.0.self_attn.q_proj`), so patterns written for either (the seed's '.*wq|.*wk|.*wv|.*wo',
a PEFT user's ["q_proj", "v_proj"]) select the same layers.
"""

from __future__ import annotations

import re

import torch.nn as nn

from petformers.models import names
from petformers.errors import AdapterError, ConfigError
from petformers.quant.linear import QuantLinear

LINEAR_TYPES = (nn.Linear, QuantLinear)  # a linear layer over a float or a quantized base


def matches(pattern: str | list[str], name: str) -> bool:
    """PEFT's target_modules rule for one module name, tried under both naming schemes."""
    candidates = (name, names.to_hf(name))
    if isinstance(pattern, str):
        return any(re.fullmatch(pattern, n) for n in candidates)
    return any(n == p or n.endswith("." + p) for n in candidates for p in pattern)


def pattern_value(patterns: dict, name: str, default):
    """PEFT's rank_pattern / alpha_pattern rule: the first key whose regex matches a dotted suffix of the name."""
    candidates = (name, names.to_hf(name))
    for key, value in patterns.items():
        if any(re.match(rf"(.*\.)?({key})$", n) for n in candidates):
            return value
    return default


def find_targets(model: nn.Module, target_modules, exclude_modules=None, modules_to_save=None) -> list[str]:
    """Names of the nn.Linear modules to adapt, in model order.

    Errors (AdapterError): the pattern selects no linear layer (the message lists the model's linear
    layers), or it selects a module that is not a linear layer.
    """
    if target_modules is None:
        raise ConfigError("pet_config.target_modules: required (e.g. '.*wq|.*wk|.*wv|.*wo' or 'all-linear')")
    if isinstance(target_modules, str) and target_modules != "all-linear":
        try:
            re.compile(target_modules)
        except re.error as e:
            raise ConfigError(f"pet_config.target_modules: invalid regex {target_modules!r}: {e}") from None
    linear = [n for n, m in model.named_modules() if isinstance(m, LINEAR_TYPES)]
    targets = []
    for name, module in model.named_modules():
        if not name:
            continue
        if target_modules == "all-linear":
            selected = isinstance(module, LINEAR_TYPES) and name.split(".")[-1] != "lm_head"
        else:
            selected = matches(target_modules, name)
        if not selected or (exclude_modules and matches(exclude_modules, name)):
            continue
        if modules_to_save and _inside(modules_to_save, name):
            continue  # trained in full instead (PEFT never adapts a module it saves, nor one inside it)
        if not isinstance(module, LINEAR_TYPES):
            raise AdapterError(f"target_modules {target_modules!r} matches {name!r}, a {type(module).__name__}; "
                               "LoRA applies to linear layers only: "
                               f"{shorten(linear)}")
        targets.append(name)
    if not targets:
        raise AdapterError(f"target_modules {target_modules!r} matches no linear layer of this model; "
                           f"its linear layers are: {shorten(linear)}")
    return targets


def _inside(pattern: list[str], name: str) -> bool:
    """Whether the module or one of its parents matches `pattern` (list rule)."""
    parts = name.split(".")
    return any(matches(pattern, ".".join(parts[:i])) for i in range(1, len(parts) + 1))


def shorten(module_names: list[str]) -> str:
    """'layers.0.attention.wq', 'layers.1.attention.wq' -> 'layers.{0..1}.attention.wq', in first-seen order."""
    groups: dict[str, list[int]] = {}
    for name in module_names:
        m = re.match(r"^(.*?layers\.)(\d+)(\..*)$", name)
        key = f"{m.group(1)}{{}}{m.group(3)}" if m else name
        groups.setdefault(key, []).append(int(m.group(2)) if m else -1)
    out = []
    for key, idx in groups.items():
        if idx == [-1]:
            out.append(key)
        elif len(idx) == 1:
            out.append(key.format(idx[0]))
        elif idx == list(range(idx[0], idx[-1] + 1)):
            out.append(key.replace("{}", f"{{{idx[0]}..{idx[-1]}}}"))
        else:
            out.append(key.replace("{}", "{" + ",".join(map(str, idx)) + "}"))
    return ", ".join(out)
