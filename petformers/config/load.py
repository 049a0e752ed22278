"""`load_run_config`: a YAML (MindFormers' or native), `key.path=value` overrides and flags -> a checked RunConfig.

Order of precedence, as in MindFormers' run_mindformer.py: the YAML, then the overrides, then the
command-line flags that are not None. Each value is converted to its field's type and checked by
the field's own check (schema.py); an error names the key's path, and its file and line.
"""

from __future__ import annotations

import dataclasses
import math
import textwrap
import typing

import yaml

from petformers.config import mindformers, schema, yamlio
from petformers.config.schema import RunConfig
from petformers.config.yamlio import MISSING, get, set_path
from petformers.errors import ConfigError
from petformers.models.config import LlamaConfig
from petformers.pet.config import PetConfig
from petformers.quant.model import quant_config_of


@dataclasses.dataclass(frozen=True)
class Key:
    """One schema field: its dotted name ("runner.epochs"), type, default and check."""
    name: str
    type: object
    default: object
    check: object
    ignored: str
    does: object  # what petformers behaves as, for an ignored key (schema._ANY: not acted on whatever it is)


def schema_keys() -> list[Key]:
    """Every YAML key of the schema, top-level keys first, then section by section."""
    out = []
    hints = typing.get_type_hints(RunConfig)
    for f in dataclasses.fields(RunConfig):
        if f.metadata.get("section"):
            section = f.default_factory
            sub = typing.get_type_hints(section)
            out += [_key(f"{f.name}.{g.name}", g, sub[g.name]) for g in dataclasses.fields(section)]
        elif "doc" in f.metadata:
            out.append(_key(f.name, f, hints[f.name]))
    return out


def _key(name: str, f: dataclasses.Field, kind) -> Key:
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return Key(name, kind, default, f.metadata.get("check"), f.metadata.get("ignored", ""),
               f.metadata.get("does", schema._ANY))


def load_run_config(path: str | None, overrides: list[str] = (), cli: dict | None = None) -> RunConfig:
    """The YAML at `path` (None: defaults only), then `key.path=value` overrides, then the non-None flags of `cli`."""
    source = str(path) if path else ""
    raw, lines = yamlio.read_yaml(source) if source else ({}, {})
    overrides = list(overrides or ())
    raw = yamlio.apply_overrides(raw, overrides)
    changed = {o.split("=", 1)[0].strip() for o in overrides}
    try:
        changed |= _apply_cli(raw, cli or {})
        cfg = _map(raw)
    except ConfigError as e:
        raise ConfigError(yamlio.locate(str(e), source, lines, changed)) from None
    cfg.source = source
    return cfg


def read_model_section(path: str) -> tuple[LlamaConfig, dict | None]:
    """(the architecture, the pet_config mapping or None) of a MindFormers YAML's model.model_config, for
    commands that need only the model (`petformers convert`)."""
    raw, _ = yamlio.read_yaml(path)
    model_config = get(raw, "model.model_config")
    if not isinstance(model_config, dict):
        raise ConfigError(f"{path}: no model.model_config section (it gives the model's shapes)")
    pet = model_config.get("pet_config")
    return LlamaConfig.from_mindformers({k: v for k, v in model_config.items() if k != "pet_config"}), pet


def field_value(cfg: RunConfig, name: str):
    """The value of the dotted field `name` ("runner.epochs", "seed")."""
    node = cfg
    for part in name.split("."):
        node = getattr(node, part)
    return node


def not_acted_on(cfg: RunConfig) -> dict[str, str]:
    """Keys the source sets that petformers accepts without acting on them -> the reason (schema `ignored`);
    a value that is what petformers does anyway (schema `does`) is not listed."""
    table = mindformers.paths_for(cfg.raw)
    out = {}
    for key in schema_keys():
        if key.ignored:
            where = _chosen_path(cfg.raw, table[key.name])
            if where is not None and field_value(cfg, key.name) != key.does:
                out[where] = key.ignored
    return out


def resolved_yaml(cfg: RunConfig) -> str:
    """Every setting in effect, in the native form (MindFormers section names); `load_run_config` of it gives
    `cfg` back."""
    tree: dict = {}
    in_model_config = ("model.seq_length", "model.compute_dtype", "model.param_init_type", "model.fused_projections")
    for name, paths in mindformers.PATHS.items():
        if name not in in_model_config:
            set_path(tree, paths[0], field_value(cfg, name))
    defaults = schema.ModelSection()
    model_config = dict(cfg.model.model_config)
    for name in in_model_config:
        leaf = name.rsplit(".", 1)[1]
        if leaf in model_config or getattr(cfg.model, leaf) != getattr(defaults, leaf):
            model_config[leaf] = getattr(cfg.model, leaf)
    if cfg.model.pet_config is not None:
        model_config["pet_config"] = cfg.model.pet_config
    if model_config:
        tree["model"] = {"model_config": model_config}
    head = [f"# petformers resolved config{' of ' + cfg.source if cfg.source else ''}: every setting in effect.",
            "# Run it again with: petformers run --config resolved_config.yaml"]
    if cfg.ignored_keys:
        text = "Ignored (MindSpore/Ascend-only or unknown) keys of the source: " + ", ".join(cfg.ignored_keys)
        head += ["# " + line for line in textwrap.wrap(text, 98, break_on_hyphens=False)]
    body = yaml.safe_dump(tree, sort_keys=False, default_flow_style=False, allow_unicode=True, width=100)
    return "\n".join(head) + "\n" + body


# ---- the tree -> a RunConfig ----------------------------------------------------------------------------


def _is_set(value) -> bool:
    return value is not MISSING and value is not None and value != "" and value != "None"


def _chosen_path(raw: dict, paths: tuple[str, ...]) -> str | None:
    return next((p for p in paths if _is_set(get(raw, p))), None)


def _map(raw: dict) -> RunConfig:
    """The raw tree (overrides and flags applied) -> a checked RunConfig."""
    ignored = mindformers.check_keys(raw)
    table = mindformers.paths_for(raw)
    keys = [k for k in schema_keys() if k.name in table]
    values = {}
    for key in keys:
        where = _chosen_path(raw, table[key.name])
        if where is not None:
            values[key.name] = _coerce(get(raw, where), key.type, where, key.default)
    _check_betas(raw)
    _check_parallel(raw)
    for key in keys:
        value = values.get(key.name, key.default)
        if key.check is not None:
            try:
                value = key.check(value)
            except ValueError as e:
                raise ConfigError(f"{_chosen_path(raw, table[key.name]) or table[key.name][0]}: {e}") from None
        values[key.name] = value
    if values["schedule.warmup_ratio"] is not None:
        values["schedule.warmup_steps"] = None  # MindFormers: warmup_ratio takes precedence over warmup_steps
    model_config, pet_config = _read_model(raw, values)
    sections: dict[str, dict] = {}
    top = {}
    for name, value in values.items():
        if "." in name:
            section, leaf = name.split(".", 1)
            sections.setdefault(section, {})[leaf] = value
        else:
            top[name] = value
    sections["model"] |= {"model_config": model_config, "pet_config": pet_config}
    built = {f.name: f.default_factory(**sections.get(f.name, {}))
             for f in dataclasses.fields(RunConfig) if f.metadata.get("section")}
    return RunConfig(**top, **built, ignored_keys=ignored, raw=raw)


def _read_model(raw: dict, values: dict) -> tuple[dict, dict | None]:
    """model.model_config without pet_config (its known keys typed), and the checked pet_config."""
    model_config = get(raw, "model.model_config")
    if model_config is MISSING or model_config is None:
        return {}, None
    model_config = dict(model_config)
    pet = model_config.pop("pet_config", None)
    if pet is not None:
        PetConfig.from_dict(pet, "model.model_config.pet_config")  # unknown keys and bad values raise here
        pet = dict(pet)
    hints = typing.get_type_hints(LlamaConfig)
    for f in dataclasses.fields(LlamaConfig):
        if f.name in model_config and f.name != "extra":
            _coerce_model_key(model_config, f.name, hints[f.name])
    for alias, kind in mindformers.MODEL_ALIASES.items():
        if alias in model_config:
            _coerce_model_key(model_config, alias, {"int": int, "float": float}[kind])
    for name in ("compute_dtype", "param_init_type", "fused_projections"):
        if name in model_config:
            model_config[name] = values[f"model.{name}"]  # checked and normalised by the schema's check
    quant_config_of(model_config)  # quantization_bit/_type/double_quantization checked together here
    return model_config, pet


def _coerce_model_key(model_config: dict, key: str, kind):
    value = model_config[key]
    if value is None or value == "None":
        return
    base = _base(kind)[0]
    if base in (int, float, bool):
        model_config[key] = _coerce(value, base, f"model.model_config.{key}", None)
    elif typing.get_origin(kind) in (typing.Union, _UNION) and list in map(typing.get_origin, typing.get_args(kind)):
        ok = isinstance(value, int) and not isinstance(value, bool) or (
            isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value))
        if not ok:
            raise ConfigError(f"model.model_config.{key}: must be an integer or a list of integers, got {value!r}")


def _check_betas(raw: dict):
    betas = get(raw, "optimizer.betas")
    if betas is MISSING or betas is None:
        return
    if not (isinstance(betas, list) and len(betas) == 2):
        raise ConfigError(f"optimizer.betas: must be a list of two numbers [beta1, beta2], got {betas!r}")


def _check_parallel(raw: dict):
    for key in ("model_parallel", "pipeline_stage", "context_parallel"):
        path = f"parallel_config.{key}"
        value = get(raw, path)
        if not _is_set(value):
            continue
        value = _coerce(value, int, path, 1)
        if value != 1:
            raise ConfigError(
                f"{path}: {value} is not supported; petformers trains with data parallelism only "
                "(parallel_strategy ddp, or fsdp to shard a model too large for one device): "
                f"set {key}: 1 and use data_parallel")


# ---- flags ----------------------------------------------------------------------------------------------


def _apply_cli(raw: dict, cli: dict) -> set[str]:
    """Write each non-None flag where its field is read from (as run_mindformer.py sets the config); the
    paths written."""
    by_flag = {k.name.rsplit(".", 1)[-1]: k for k in schema_keys()}
    table = mindformers.paths_for(raw)
    written = set()
    for flag, value in cli.items():
        if value is None:
            continue
        key = by_flag.get(flag)
        if key is None or key.name not in table:
            raise ValueError(f"load_run_config: {flag!r} is not a flag of RunConfig")
        value = _coerce(value, key.type, f"--{flag}", key.default)
        path = _chosen_path(raw, table[key.name]) or _first_writable(raw, table[key.name])
        set_path(raw, path, value)
        written.add(path)
    return written


def _first_writable(raw: dict, paths: tuple[str, ...]) -> str:
    """Where a flag goes when no place holds a value: an existing MindFormers section, else the first place."""
    for p in [p for p in paths if "." in p] + [p for p in paths if "." not in p]:
        parent = p.rsplit(".", 1)[0] if "." in p else ""
        if not parent or isinstance(get(raw, parent), dict):
            return p
    return paths[0]


# ---- values ---------------------------------------------------------------------------------------------

_UNION = type(int | None)
_NOUNS = {int: "an integer", float: "a number", bool: "True or False", str: "a string", dict: "a mapping"}


def _base(kind) -> tuple[object, bool]:
    """(the type without None, whether None is allowed) of an annotation such as `float | None`."""
    if typing.get_origin(kind) in (typing.Union, _UNION):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        return (args[0] if len(args) == 1 else kind), type(None) in typing.get_args(kind)
    return kind, False


def _coerce(value, kind, where: str, default):
    """`value` as the field's type (int, float | None, ...); null or "None" gives the default."""
    base, optional = _base(kind)
    if value is None or value == "None":
        return None if optional else default
    wrong = ConfigError(f"{where}: must be {_NOUNS.get(base, str(base))}, got {value!r}")
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        raise wrong
    if base is int:
        if isinstance(value, bool):
            raise wrong
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                raise wrong from None
        raise wrong
    if base is float:
        if isinstance(value, bool):
            raise wrong
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # PyYAML reads 1e-5 (no dot) as a string
            try:
                number = float(value.strip())
            except ValueError:
                raise wrong from None
            if math.isfinite(number):
                return number
        raise wrong
    if base is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise wrong
    if base is dict:
        if isinstance(value, dict):
            return value
        raise wrong
    return value
