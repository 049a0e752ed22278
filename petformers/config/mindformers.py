"""`RunConfig`: what `petformers run` does, read from a MindFormers YAML as is, or from the simpler native form.

One table, `PATHS`, says where each setting lives in the YAML (highest priority first). The honoured
keys of every section, the misspelling check, the CLI flags and the resolved-config dump all derive
from it, so they cannot disagree. MindSpore/Ascend-only keys are collected in `ignored_keys` for the
caller to log once; a misspelt key that matters is a ConfigError naming its path and line.

Order of precedence, as in MindFormers' run_mindformer.py: the YAML, then `key.path=value` overrides,
then the command-line flags that are not None.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from petformers.errors import ConfigError

RUN_MODES = ("finetune", "train", "eval", "predict")
OPTIMIZERS = ("FP32StateAdamWeightDecay", "AdamWeightDecay", "AdamW")
PARALLEL_STRATEGIES = ("ddp", "fsdp")
CHECKPOINT_MONITOR = "CheckpointMonitor"


@dataclass
class RunConfig:
    # top level (MindFormers names)
    seed: int = 0
    output_dir: str = "./output"
    load_checkpoint: str = ""  # base weights: HF dir / .gguf / Meta dir / MindSpore .ckpt / known name
    adapter: str = ""  # optional PEFT adapter dir to start from (eval/predict/finetune)
    resume_training: bool = False
    auto_trans_ckpt: bool = False
    run_mode: str = "finetune"  # finetune | train | eval | predict
    use_parallel: bool = False
    do_eval: bool = False
    eval_step_interval: int = 100  # MindFormers' name; -1 = only at the end
    # runner_config
    epochs: int = 1
    batch_size: int = 1  # per device micro-batch (runner_config.batch_size; train_dataset.batch_size alias)
    gradient_accumulation_steps: int = 1
    max_steps: int = -1  # petformers extra: stop after N optimizer steps (-1: epochs decide)
    # optimizer
    optimizer_type: str = "FP32StateAdamWeightDecay"  # also AdamW / AdamWeightDecay
    learning_rate: float = 1e-5
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    # lr_schedule
    lr_schedule_type: str = "CosineWithWarmUpLR"  # or LinearWithWarmUpLR | ConstantWarmUpLR (+ cosine/linear/constant)
    lr_end: float = 0.0
    warmup_ratio: float | None = None  # when set, it decides the warmup and warmup_steps is None (MindFormers)
    warmup_steps: int | None = None
    warmup_lr_init: float = 0.0
    total_steps: int = -1  # -1: from the dataset
    # data
    train_dataset_dir: str = ""
    eval_dataset_dir: str = ""
    shuffle: bool = True
    drop_remainder: bool = True
    template: str = "fastchat"  # fastchat | alpaca | chat, for raw files prepared on the fly
    packing: bool = False
    drop_long: bool = False
    tokenizer: str = ""  # tokenizer path when the checkpoint has none (processor.tokenizer.vocab_file / tokenizer_file)
    # model
    model_config: dict = field(default_factory=dict)  # the YAML's model.model_config without pet_config
    pet_config: dict | None = None  # raw pet_config dict (PetConfig.from_dict input) or None
    seq_length: int = 2048
    compute_dtype: str = "float32"  # from model_config.compute_dtype
    param_init_type: str = "float32"
    # recompute / clip
    recompute: bool = False
    use_clip_grad: bool = True
    max_grad_norm: float = 1.0
    # checkpoints (callbacks: CheckpointMonitor)
    save_checkpoint_steps: int = 100
    keep_checkpoint_max: int = 5
    save_merged: bool = False  # write output_dir/merged/ at the end
    # distributed (parallel_config)
    data_parallel: int = 1
    parallel_strategy: str = "ddp"  # ddp | fsdp (petformers extra, under parallel_config or a native key)
    # evaluation with generation (run_mode eval)
    eval_generation: bool = False
    max_new_tokens: int = 128
    # bookkeeping
    ignored_keys: list[str] = field(default_factory=list)  # dotted paths of Ascend/MindSpore-only keys seen
    source: str = ""  # the YAML path
    raw: dict = field(default_factory=dict)  # the YAML as loaded, overrides and flags applied


# Where each RunConfig field is read from, highest priority first. A path is dotted; a number indexes
# a list; "{ckpt}" is the index of the CheckpointMonitor entry in `callbacks`. The first path is where
# a flag or the resolved dump writes the value. Native (petformers) keys sit at the top level.
PATHS: dict[str, tuple[str, ...]] = {
    "seed": ("seed",),
    "run_mode": ("run_mode",),
    "output_dir": ("output_dir",),
    "load_checkpoint": ("load_checkpoint",),
    "adapter": ("adapter",),
    "auto_trans_ckpt": ("auto_trans_ckpt",),
    "resume_training": ("resume_training",),
    "use_parallel": ("use_parallel",),
    "do_eval": ("do_eval",),
    "eval_step_interval": ("eval_step_interval",),
    "train_dataset_dir": ("train_dataset_dir", "train_dataset.data_loader.dataset_dir",
                          "train_dataset.data_loader.path"),
    "eval_dataset_dir": ("eval_dataset_dir", "eval_dataset.data_loader.dataset_dir", "eval_dataset.data_loader.path"),
    "template": ("template",),
    "packing": ("packing",),
    "drop_long": ("drop_long",),
    "tokenizer": ("tokenizer", "processor.tokenizer.tokenizer_file", "processor.tokenizer.vocab_file"),
    "max_steps": ("max_steps", "runner_config.max_steps"),
    "save_merged": ("save_merged",),
    "save_checkpoint_steps": ("save_checkpoint_steps", "callbacks.{ckpt}.save_checkpoint_steps"),
    "keep_checkpoint_max": ("keep_checkpoint_max", "callbacks.{ckpt}.keep_checkpoint_max"),
    "eval_generation": ("eval_generation",),
    "max_new_tokens": ("max_new_tokens",),
    "parallel_strategy": ("parallel_strategy", "parallel_config.parallel_strategy"),
    "epochs": ("runner_config.epochs",),
    "batch_size": ("runner_config.batch_size", "train_dataset.batch_size"),
    "gradient_accumulation_steps": ("runner_config.gradient_accumulation_steps",),
    "optimizer_type": ("optimizer.type",),
    "beta1": ("optimizer.beta1", "optimizer.betas.0"),
    "beta2": ("optimizer.beta2", "optimizer.betas.1"),
    "eps": ("optimizer.eps",),
    "weight_decay": ("optimizer.weight_decay",),
    "lr_schedule_type": ("lr_schedule.type",),
    "learning_rate": ("lr_schedule.learning_rate", "optimizer.learning_rate"),
    "lr_end": ("lr_schedule.lr_end",),
    "warmup_ratio": ("lr_schedule.warmup_ratio",),
    "warmup_steps": ("lr_schedule.warmup_steps",),
    "warmup_lr_init": ("lr_schedule.warmup_lr_init",),
    "total_steps": ("lr_schedule.total_steps",),
    "shuffle": ("train_dataset.data_loader.shuffle",),
    "drop_remainder": ("train_dataset.drop_remainder",),
    "seq_length": ("model.model_config.seq_length",),
    "compute_dtype": ("model.model_config.compute_dtype",),
    "param_init_type": ("model.model_config.param_init_type",),
    "recompute": ("recompute_config.recompute",),
    "use_clip_grad": ("runner_wrapper.use_clip_grad",),
    "max_grad_norm": ("runner_wrapper.max_grad_norm",),
    "data_parallel": ("parallel_config.data_parallel",),
}

# Honoured keys that are not RunConfig fields: read by their own rule in _map.
_EXTRA_HONOURED = (
    "model.model_config.pet_config", "optimizer.betas", "callbacks",
    "parallel_config.model_parallel", "parallel_config.pipeline_stage", "parallel_config.context_parallel",
)

# Keys MindFormers (v1.1-v1.5) writes that mean nothing on PyTorch: reported as ignored, never an error,
# and never mistaken for a misspelling. Whole sections are listed by their name.
_DATASET_IGNORED = ("input_columns", "output_columns", "column_order", "num_parallel_workers",
                    "python_multiprocessing", "repeat", "numa_enable", "prefetch_size", "dynamic_batch", "divisor",
                    "remainder", "pad_token_id", "construct_args_key", "seed", "tokenizer", "eod_reset",
                    "data_loader.type", "data_loader.split", "data_loader.load_func", "data_loader.adaptor_config",
                    "data_loader.mock_config", "data_loader.packing", "data_loader.shard_id",
                    "data_loader.num_shards", "data_loader.column_names", "data_loader.handler")
KNOWN_IGNORED: frozenset[str] = frozenset(
    (
        # top level
        "src_strategy_path_or_dir", "only_save_strategy", "micro_batch_interleave_num", "trainer", "context",
        "parallel", "train_dataset_task", "eval_dataset_task", "metric", "eval_callbacks", "auto_tune",
        "filepath_prefix", "autotune_per_step", "profile", "profile_start_step", "profile_stop_step",
        "init_start_profile", "profile_communication", "profile_memory", "profile_level", "profile_rank_ids",
        "profile_pipeline", "profile_output", "profile_cpu", "profile_with_stack", "layer_scale", "layer_decay",
        "lr_scale", "lr_scale_factor", "remote_save_url", "moe_config", "load_ckpt_format", "remove_redundancy",
        "use_legacy", "pretrained_model_dir", "eval_epoch_interval", "load_ckpt_async", "transform_process_num",
        "ignore_data_skip", "data_skip_steps", "swap_config", "monitor_config", "tensorboard",
        "check_for_nan_in_loss_and_grad", "print_separate_loss", "device_num", "local_rank", "device_id",
        "top_k", "save_file", "predict_batch_size", "adapter_id", "register_path", "auto_trans_ckpt_async",
        "infer_precision_sync", "jit_config", "ascend_config", "mindformers_config", "output_path",
        # runner_config / runner_wrapper
        "runner_config.sink_mode", "runner_config.sink_size", "runner_config.initial_epoch",
        "runner_config.initial_step", "runner_config.stop_step", "runner_config.per_epoch_size",
        "runner_wrapper.type", "runner_wrapper.scale_sense", "runner_wrapper.local_norm",
        "runner_wrapper.calculate_per_token_loss", "runner_wrapper.micro_batch_num",
        "runner_wrapper.use_skip_data_by_global_norm",
        # optimizer / lr_schedule
        "optimizer.amsgrad", "optimizer.maximize", "optimizer.swap",
        "lr_schedule.warmup_epochs", "lr_schedule.num_cycles", "lr_schedule.decay_steps", "lr_schedule.power",
        # recompute_config
        "recompute_config.select_recompute", "recompute_config.select_comm_recompute",
        "recompute_config.parallel_optimizer_comm_recompute", "recompute_config.mp_comm_recompute",
        "recompute_config.recompute_slice_activation", "recompute_config.select_recompute_exclude",
        "recompute_config.select_comm_recompute_exclude",
        # parallel_config
        "parallel_config.use_seq_parallel", "parallel_config.micro_batch_num", "parallel_config.vocab_emb_dp",
        "parallel_config.gradient_aggregation_group", "parallel_config.expert_parallel",
        "parallel_config.optimizer_shard", "parallel_config.seq_split_num", "parallel_config.context_parallel_algo",
        "parallel_config.ulysses_degree_in_cp", "parallel_config.mem_coeff",
        # model
        "model.arch",
        *(f"model.model_config.{k}" for k in (
            "type", "batch_size", "ignore_token_id", "layernorm_compute_type", "softmax_compute_type",
            "rotary_dtype", "use_past", "extend_method", "use_flash_attention", "offset", "checkpoint_name_or_path",
            "repetition_penalty", "max_decode_length", "top_k", "top_p", "do_sample", "scaling_factor",
            "pretrain_seqlen", "compute_in_2d", "use_past_shard", "block_size", "num_blocks", "is_dynamic",
            "qkv_concat", "fine_grain_interleave", "use_rope_slice", "fused_rms_norm", "parallel_decoding_params",
            "embedding_init_type", "residual_dtype", "use_ring_attention", "use_attn_mask_compression",
            "use_eod_attn_mask_compression", "moe_config", "auto_map", "quantization_config")),
        # processor
        "processor.type", "processor.return_tensors", "processor.max_length", "processor.image_processor",
        *(f"processor.tokenizer.{k}" for k in (
            "type", "unk_token", "bos_token", "eos_token", "pad_token", "add_bos_token", "add_eos_token",
            "merges_file", "chat_template", "auto_register", "padding_side", "legacy", "model_max_length",
            "use_fast", "trust_remote_code", "added_tokens_decoder", "errors", "clean_up_tokenization_spaces")),
        # datasets
        *(f"{s}.{k}" for s in ("train_dataset", "eval_dataset") for k in _DATASET_IGNORED),
        "eval_dataset.batch_size", "eval_dataset.drop_remainder", "eval_dataset.data_loader.shuffle",
    )
)
# CheckpointMonitor's keys with no PyTorch meaning (the layout of petformers' checkpoints is its own).
_MONITOR_IGNORED = frozenset((
    "prefix", "directory", "integrated_save", "async_save", "save_network_params", "save_trainable_params",
    "checkpoint_format", "save_checkpoint_seconds", "keep_checkpoint_per_n_minutes", "append_info", "enc_key",
    "enc_mode", "exception_save", "remove_redundancy", "save_optimizer", "embedding_local_norm_threshold",
    "global_batch_size",
))
_CUTOFF = 0.8  # difflib similarity above which an unknown key is taken for a misspelling


# ---- public API -------------------------------------------------------------------------------


def load_config(path: str | None, overrides: list[str] = (), cli: dict | None = None) -> RunConfig:
    """The YAML at `path` (None: defaults only), then `key.path=value` overrides, then the non-None flags of `cli`."""
    source = str(path) if path else ""
    text = _read(source) if source else ""
    raw = _plain(_parse(text, source)) if source else {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys, got {type(raw).__name__}")
    lines = _line_index(text) if source else {}
    overrides = list(overrides or ())
    raw = apply_overrides(raw, overrides)
    changed = {o.split("=", 1)[0].strip() for o in overrides}
    try:
        raw, flags = _apply_cli(raw, cli or {})
        changed |= flags
        cfg = _map(raw)
    except ConfigError as e:
        raise ConfigError(_locate(str(e), source, lines, changed)) from None
    cfg.source = source
    return cfg


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """A copy of `raw` with each "key.path=value" set (value parsed as a YAML scalar; numbers index lists)."""
    out = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key.path=value")
        key, text = (s.strip() for s in item.split("=", 1))
        if not key:
            raise ConfigError(f"override {item!r}: empty key")
        try:
            value = yaml.safe_load(text) if text else None
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: invalid value ({_yaml_problem(e)})") from None
        _set(out, key, value, what=f"override {item!r}")
    return out


def resolved_yaml(cfg: RunConfig) -> str:
    """Every setting in effect, in the native form (MindFormers section names); `load_config` of it gives `cfg` back."""
    tree: dict = {}
    for name, paths in PATHS.items():
        if name in ("seq_length", "compute_dtype", "param_init_type"):
            continue  # written inside model_config below
        _set(tree, paths[0], getattr(cfg, name))
    defaults = RunConfig()
    model_config = dict(cfg.model_config)
    for name in ("seq_length", "compute_dtype", "param_init_type"):
        if name in model_config or getattr(cfg, name) != getattr(defaults, name):
            model_config[name] = getattr(cfg, name)
    if cfg.pet_config is not None:
        model_config["pet_config"] = cfg.pet_config
    if model_config:
        tree["model"] = {"model_config": model_config}
    head = [f"# petformers resolved config{' of ' + cfg.source if cfg.source else ''}: every setting in effect.",
            "# Run it again with: petformers run --config resolved_config.yaml"]
    if cfg.ignored_keys:
        text = "Ignored (MindSpore/Ascend-only or unknown) keys of the source: " + ", ".join(cfg.ignored_keys)
        head += ["# " + line for line in textwrap.wrap(text, 98, break_on_hyphens=False)]
    body = yaml.safe_dump(tree, sort_keys=False, default_flow_style=False, allow_unicode=True, width=100)
    return "\n".join(head) + "\n" + body


# ---- reading the YAML -------------------------------------------------------------------------


def _read(source: str) -> str:
    p = Path(source)
    if not p.is_file():
        raise ConfigError(f"{source}: config file not found")
    try:
        return p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{source}: cannot read the config ({e})") from None


def _parse(text: str, source: str):
    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        raise ConfigError(f"{where}: invalid YAML ({_yaml_problem(e)})") from None


def _yaml_problem(e: yaml.YAMLError) -> str:
    return getattr(e, "problem", None) or str(e).splitlines()[0]


def _plain(node, _stack: tuple = ()):
    """The loaded tree with YAML anchors unshared: setting `train_dataset.x` leaves `train_dataset_task` alone."""
    if isinstance(node, (dict, list)):
        if id(node) in _stack:
            raise ConfigError("the YAML refers to itself through an alias (recursive anchor)")
        _stack = _stack + (id(node),)
        if isinstance(node, dict):
            return {k: _plain(v, _stack) for k, v in node.items()}
        return [_plain(v, _stack) for v in node]
    return node


def _line_index(text: str) -> dict[str, int]:
    """Dotted path -> 1-based line of its key, for error messages."""
    out: dict[str, int] = {}

    def walk(node, prefix: str, depth: int):
        if depth > 32:
            return
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                path = f"{prefix}.{k.value}" if prefix else str(k.value)
                out.setdefault(path, k.start_mark.line + 1)
                walk(v, path, depth + 1)
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                path = f"{prefix}.{i}"
                out.setdefault(path, v.start_mark.line + 1)
                walk(v, path, depth + 1)

    try:
        walk(yaml.compose(text), "", 0)
    except yaml.YAMLError:
        pass
    return out


def _locate(message: str, source: str, lines: dict[str, int], changed: set[str]) -> str:
    """Prefix an error that starts with a dotted path by the file and line it came from."""
    path = message.split(":", 1)[0]
    if path.startswith("--") or path.startswith("override"):
        return message
    if any(path == c or path.startswith(c + ".") for c in changed):
        return f"{message} (value set on the command line)"
    if not source:
        return message
    line = lines.get(path)
    while line is None and "." in path:  # a key that is missing: point at its section
        path = path.rsplit(".", 1)[0]
        line = lines.get(path)
    return f"{source}:{line}: {message}" if line else f"{source}: {message}"


# ---- dotted paths -----------------------------------------------------------------------------

_MISSING = object()


def _get(tree, path: str):
    node = tree
    for part in path.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return _MISSING
    return node


def _set(tree: dict, path: str, value, what: str = ""):
    parts = path.split(".")
    node = tree
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"{what or path}: {'.'.join(parts[:i]) or '(top)'} is a list; "
                                  f"use an index below {len(node)}")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
        else:
            raise ConfigError(f"{what or path}: {'.'.join(parts[:i])} is not a mapping")


def _paths(raw: dict) -> dict[str, tuple[str, ...]]:
    """PATHS with "{ckpt}" made the index of the CheckpointMonitor callback (dropped when there is none)."""
    index = _monitor_index(raw)
    out = {}
    for name, paths in PATHS.items():
        out[name] = tuple(p.format(ckpt=index) for p in paths if "{ckpt}" not in p or index is not None)
    return out


def _monitor_index(raw: dict) -> int | None:
    callbacks = raw.get("callbacks")
    if isinstance(callbacks, list):
        for i, entry in enumerate(callbacks):
            if isinstance(entry, dict) and entry.get("type") == CHECKPOINT_MONITOR:
                return i
    return None


def _is_set(value) -> bool:
    return value is not _MISSING and value is not None and value != "" and value != "None"


def _chosen_path(raw: dict, paths: tuple[str, ...]) -> str | None:
    return next((p for p in paths if _is_set(_get(raw, p))), None)


# ---- flags ------------------------------------------------------------------------------------


def _apply_cli(raw: dict, cli: dict) -> tuple[dict, set[str]]:
    """Write each non-None flag where its field is read from (as run_mindformer.py sets the config)."""
    fields = {f.name: f for f in dataclasses.fields(RunConfig)}
    table = _paths(raw)
    written = set()
    for name, value in cli.items():
        if value is None:
            continue
        if name not in table:
            raise ValueError(f"load_config: {name!r} is not a flag of RunConfig")
        value = _coerce(value, fields[name].type, f"--{name}", fields[name].default)
        path = _chosen_path(raw, table[name]) or _first_writable(raw, table[name])
        _set(raw, path, value)
        written.add(path)
    return raw, written


def _first_writable(raw: dict, paths: tuple[str, ...]) -> str:
    """Where a flag goes when no place holds a value: an existing MindFormers section, else the first place."""
    for p in [p for p in paths if "." in p] + [p for p in paths if "." not in p]:
        parent = p.rsplit(".", 1)[0] if "." in p else ""
        if not parent or isinstance(_get(raw, parent), dict):
            return p
    return paths[0]


# ---- values -----------------------------------------------------------------------------------

_NOUNS = {"int": "an integer", "float": "a number", "bool": "True or False", "str": "a string",
          "dict": "a mapping", "list[str]": "a list of strings"}


def _coerce(value, kind: str, where: str, default):
    """`value` as the field's type ("int", "float | None", ...); null or "None" gives the default."""
    optional = kind.endswith("| None")
    base = kind.split("|")[0].strip()
    if value is None or value == "None":
        return None if optional else default
    wrong = ConfigError(f"{where}: must be {_NOUNS.get(base, base)}, got {value!r}")
    if base == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        raise wrong
    if base == "int":
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
    if base == "float":
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
    if base == "str":
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise wrong
    if base == "dict":
        if isinstance(value, dict):
            return value
        raise wrong
    return value


def _map(raw: dict) -> RunConfig:
    """The raw tree (overrides and flags applied) -> a checked RunConfig."""
    ignored = _check_keys(raw)
    table = _paths(raw)
    fields = {f.name: f for f in dataclasses.fields(RunConfig)}
    values = {}
    for name, paths in table.items():
        where = _chosen_path(raw, paths)
        if where is not None:
            values[name] = _coerce(_get(raw, where), fields[name].type, where, fields[name].default)
    cfg = RunConfig(**values, ignored_keys=ignored, raw=raw)
    _check_betas(raw)
    _check_parallel(raw)
    _check_values(cfg, table, raw)
    _read_model(cfg, raw)
    if cfg.warmup_ratio is not None:
        cfg.warmup_steps = None  # MindFormers: warmup_ratio takes precedence over warmup_steps
    return cfg


def _read_model(cfg: RunConfig, raw: dict):
    model_config = _get(raw, "model.model_config")
    if model_config is _MISSING or model_config is None:
        return
    model_config = dict(model_config)
    pet = model_config.pop("pet_config", None)
    if pet is not None:
        from petformers.pet.config import PetConfig

        PetConfig.from_dict(pet, "model.model_config.pet_config")  # unknown keys and bad values raise here
        cfg.pet_config = dict(pet)
    from petformers.models.config import LlamaConfig

    for f in dataclasses.fields(LlamaConfig):
        if f.name in model_config and f.name != "extra":
            _coerce_model_key(model_config, f.name, f.type)
    for alias, kind in (("rope_theta", "float"), ("num_hidden_layers", "int"), ("num_attention_heads", "int"),
                        ("max_position_embedding", "int")):
        if alias in model_config:
            _coerce_model_key(model_config, alias, kind)
    for name in ("compute_dtype", "param_init_type"):
        if name in model_config:
            model_config[name] = getattr(cfg, name)  # checked and normalised by _check_values
    cfg.model_config = model_config


def _coerce_model_key(model_config: dict, key: str, kind: str):
    value = model_config[key]
    if value is None or value == "None":
        return
    kind = kind.replace(" | None", "")
    if kind in ("int", "float", "bool"):
        model_config[key] = _coerce(value, kind, f"model.model_config.{key}", None)
    elif kind == "int | list[int]":
        ok = isinstance(value, int) and not isinstance(value, bool) or (
            isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value))
        if not ok:
            raise ConfigError(f"model.model_config.{key}: must be an integer or a list of integers, got {value!r}")


def _check_betas(raw: dict):
    betas = _get(raw, "optimizer.betas")
    if betas is _MISSING or betas is None:
        return
    if not (isinstance(betas, list) and len(betas) == 2):
        raise ConfigError(f"optimizer.betas: must be a list of two numbers [beta1, beta2], got {betas!r}")


def _check_parallel(raw: dict):
    for key in ("model_parallel", "pipeline_stage", "context_parallel"):
        path = f"parallel_config.{key}"
        value = _get(raw, path)
        if not _is_set(value):
            continue
        value = _coerce(value, "int", path, 1)
        if value != 1:
            raise ConfigError(
                f"{path}: {value} is not supported; petformers trains with data parallelism only "
                "(parallel_strategy ddp, or fsdp to shard a model too large for one device): "
                f"set {key}: 1 and use data_parallel")


def _check_values(cfg: RunConfig, table: dict, raw: dict):
    def where(name):
        return _chosen_path(raw, table[name]) or table[name][0]

    def need(ok: bool, name: str, rule: str):
        if not ok:
            raise ConfigError(f"{where(name)}: {rule}, got {getattr(cfg, name)!r}")

    for name in ("epochs", "batch_size", "gradient_accumulation_steps", "save_checkpoint_steps",
                 "keep_checkpoint_max", "data_parallel", "max_new_tokens", "seq_length"):
        need(getattr(cfg, name) >= 1, name, "must be at least 1")
    for name in ("max_steps", "total_steps", "eval_step_interval"):
        need(getattr(cfg, name) == -1 or getattr(cfg, name) >= 1, name, "must be -1 or at least 1")
    for name in ("learning_rate", "lr_end", "warmup_lr_init", "weight_decay"):
        need(getattr(cfg, name) >= 0, name, "must be 0 or more")
    need(cfg.eps > 0, "eps", "must be above 0")
    need(cfg.max_grad_norm > 0, "max_grad_norm", "must be above 0")
    for name in ("beta1", "beta2"):
        need(0 <= getattr(cfg, name) < 1, name, "must be in [0, 1)")
    need(cfg.warmup_ratio is None or 0 <= cfg.warmup_ratio <= 1, "warmup_ratio", "must be in [0, 1]")
    need(cfg.warmup_steps is None or cfg.warmup_steps >= 0, "warmup_steps", "must be 0 or more")

    cfg.run_mode = cfg.run_mode.lower()
    need(cfg.run_mode in RUN_MODES, "run_mode", f"must be one of {', '.join(RUN_MODES)}")
    cfg.parallel_strategy = cfg.parallel_strategy.lower()
    need(cfg.parallel_strategy in PARALLEL_STRATEGIES, "parallel_strategy",
         f"must be one of {', '.join(PARALLEL_STRATEGIES)}")
    _check_choice(cfg, "optimizer_type", OPTIMIZERS, where("optimizer_type"),
                  "petformers trains with AdamW and float32 states")
    from petformers.data.templates import TEMPLATES

    need(cfg.template in TEMPLATES, "template", f"must be one of {', '.join(TEMPLATES)}")
    from petformers.train.schedule import ALIASES

    if str(cfg.lr_schedule_type).lower().replace("_", "") not in ALIASES:
        raise ConfigError(f"{where('lr_schedule_type')}: unknown schedule {cfg.lr_schedule_type!r}; use "
                          "CosineWithWarmUpLR, LinearWithWarmUpLR or ConstantWarmUpLR (or cosine, linear, constant)")
    from petformers.models.config import parse_dtype

    if str(cfg.compute_dtype).lower() == "auto":
        from petformers.hardware import auto_compute_dtype

        cfg.compute_dtype = auto_compute_dtype()  # bf16 only where this machine multiplies bf16 fast
    for name in ("compute_dtype", "param_init_type"):
        setattr(cfg, name, str(parse_dtype(getattr(cfg, name), where(name))).removeprefix("torch."))


def _check_choice(cfg: RunConfig, name: str, choices: tuple[str, ...], where: str, why: str):
    value = getattr(cfg, name)
    match = next((c for c in choices if c.lower() == str(value).lower()), None)
    if match is None:
        raise ConfigError(f"{where}: {value!r} is not supported ({why}); use one of {', '.join(choices)}")
    setattr(cfg, name, match)


# ---- keys: honoured, ignored, misspelt --------------------------------------------------------


def _honoured() -> dict[str, set[str]]:
    """Section path ("" for the top level) -> the keys petformers reads there."""
    out: dict[str, set[str]] = {}
    for path in [p for paths in PATHS.values() for p in paths if "{ckpt}" not in p] + list(_EXTRA_HONOURED):
        parts = path.split(".")
        for i, part in enumerate(parts):
            if part.isdigit():
                break  # a list element (optimizer.betas.0): the list is a value, not a section
            out.setdefault(".".join(parts[:i]), set()).add(part)
    from petformers.models.config import LlamaConfig

    out["model.model_config"] |= {f.name for f in dataclasses.fields(LlamaConfig) if f.name != "extra"}
    out["model.model_config"] |= {"rope_theta", "num_hidden_layers", "num_attention_heads", "max_position_embedding"}
    return out


def _check_keys(raw: dict) -> list[str]:
    """The dotted paths of ignored keys; a ConfigError for a key that looks like a misspelt honoured one."""
    honoured = _honoured()
    ignored: list[str] = []

    def walk(node: dict, section: str):
        keys = honoured[section]
        for key, value in node.items():
            path = f"{section}.{key}" if section else str(key)
            if key in keys:
                if path == "callbacks":
                    _check_callbacks(value, ignored)
                elif path in honoured and path != "model.model_config.pet_config":
                    if value is None:
                        continue
                    if not isinstance(value, dict):
                        raise ConfigError(f"{path}: must be a mapping of keys, got {value!r}")
                    walk(value, path)
            elif path in KNOWN_IGNORED:
                ignored.append(path)
            else:
                _misspelt(path, str(key), keys)
                ignored.append(path)

    walk(raw, "")
    return ignored


def _misspelt(path: str, key: str, valid):
    near = difflib.get_close_matches(key, sorted(valid), n=1, cutoff=_CUTOFF)
    if near:
        raise ConfigError(f"{path}: unknown key; did you mean {near[0]!r}?")


def _check_callbacks(callbacks, ignored: list[str]):
    if callbacks is None:
        return
    if not isinstance(callbacks, list):
        raise ConfigError(f"callbacks: must be a list of {{type: ...}} entries, got {callbacks!r}")
    valid = {"type", "save_checkpoint_steps", "keep_checkpoint_max"}
    for i, entry in enumerate(callbacks):
        if not isinstance(entry, dict) or "type" not in entry:
            raise ConfigError(f"callbacks.{i}: must be a mapping with a 'type', got {entry!r}")
        kind = str(entry["type"])
        if kind != CHECKPOINT_MONITOR:
            if difflib.get_close_matches(kind, [CHECKPOINT_MONITOR], n=1, cutoff=0.85):
                raise ConfigError(f"callbacks.{i}.type: unknown callback {kind!r}; "
                                  f"did you mean {CHECKPOINT_MONITOR!r}?")
            ignored.append(f"callbacks.{kind}")
            continue
        for key in entry:
            if key in valid:
                continue
            if key not in _MONITOR_IGNORED:
                _misspelt(f"callbacks.{i}.{key}", str(key), valid)
            ignored.append(f"callbacks.{kind}.{key}")
