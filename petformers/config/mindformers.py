"""MindFormers' YAML, mapped onto the schema: where each key lives, and what is accepted but not acted on.

`PATHS` says where each schema field is read from (highest priority first; the first place is where a
flag and the resolved dump write it). A field not listed in `_PLACES` is read from its own name at
the top level (petformers' native form). `IGNORED` lists the keys MindFormers (v1.1-v1.5) writes that
mean nothing on PyTorch, each with the reason; they are named in the run's log, never an error. A key
petformers does not know that looks like a misspelt honoured key is a ConfigError naming its path.
"""

from __future__ import annotations

import dataclasses
import difflib

from petformers.config import schema
from petformers.errors import ConfigError
from petformers.models.config import LlamaConfig
from petformers.quant.model import KEYS as QUANTIZATION_KEYS

CHECKPOINT_MONITOR = "CheckpointMonitor"

# Where a field is read from when not only from its own top-level name. A path is dotted; a number
# indexes a list; "{ckpt}" is the index of the CheckpointMonitor entry in `callbacks`.
_PLACES: dict[str, tuple[str, ...]] = {
    "runner.epochs": ("runner_config.epochs",),
    "tensorboard.tensorboard_dir": ("tensorboard.tensorboard_dir",),
    "tensorboard.tensorboard_queue_size": ("tensorboard.tensorboard_queue_size",),
    "tensorboard.log_loss_scale_to_tensorboard": ("tensorboard.log_loss_scale_to_tensorboard",),
    "tensorboard.log_timers_to_tensorboard": ("tensorboard.log_timers_to_tensorboard",),
    "runner.batch_size": ("runner_config.batch_size", "train_dataset.batch_size"),
    "runner.gradient_accumulation_steps": ("runner_config.gradient_accumulation_steps",),
    "runner.max_steps": ("max_steps", "runner_config.max_steps"),
    "optimizer.type": ("optimizer.type",),
    "optimizer.beta1": ("optimizer.beta1", "optimizer.betas.0"),
    "optimizer.beta2": ("optimizer.beta2", "optimizer.betas.1"),
    "optimizer.eps": ("optimizer.eps",),
    "optimizer.weight_decay": ("optimizer.weight_decay",),
    "optimizer.use_clip_grad": ("runner_wrapper.use_clip_grad",),
    "optimizer.max_grad_norm": ("runner_wrapper.max_grad_norm",),
    "schedule.type": ("lr_schedule.type",),
    "schedule.learning_rate": ("lr_schedule.learning_rate", "optimizer.learning_rate"),
    "schedule.lr_end": ("lr_schedule.lr_end",),
    "schedule.warmup_ratio": ("lr_schedule.warmup_ratio",),
    "schedule.warmup_steps": ("lr_schedule.warmup_steps",),
    "schedule.warmup_lr_init": ("lr_schedule.warmup_lr_init",),
    "schedule.total_steps": ("lr_schedule.total_steps",),
    "data.train_dataset_dir": ("train_dataset_dir", "train_dataset.data_loader.dataset_dir",
                               "train_dataset.data_loader.path"),
    "data.eval_dataset_dir": ("eval_dataset_dir", "eval_dataset.data_loader.dataset_dir",
                              "eval_dataset.data_loader.path"),
    "data.shuffle": ("train_dataset.data_loader.shuffle",),
    "data.drop_remainder": ("train_dataset.drop_remainder",),
    "data.tokenizer": ("tokenizer", "processor.tokenizer.tokenizer_file", "processor.tokenizer.vocab_file"),
    "model.seq_length": ("model.model_config.seq_length",),
    "model.compute_dtype": ("model.model_config.compute_dtype",),
    "model.param_init_type": ("model.model_config.param_init_type",),
    "model.recompute": ("recompute_config.recompute",),
    "model.fused_projections": ("model.model_config.fused_projections",),
    "checkpoint.save_checkpoint_steps": ("save_checkpoint_steps", "callbacks.{ckpt}.save_checkpoint_steps"),
    "checkpoint.keep_checkpoint_max": ("keep_checkpoint_max", "callbacks.{ckpt}.keep_checkpoint_max"),
    "parallel.data_parallel": ("parallel_config.data_parallel",),
    "parallel.parallel_strategy": ("parallel_strategy", "parallel_config.parallel_strategy"),
}
# Fields read by their own rule (config/load.py's _read_model), not from a path.
_BY_RULE = ("model.model_config", "model.pet_config")


def _schema_keys() -> list[str]:
    out = []
    for f in dataclasses.fields(schema.RunConfig):
        if f.metadata.get("section"):
            out += [f"{f.name}.{g.name}" for g in dataclasses.fields(f.default_factory)]
        elif "doc" in f.metadata:
            out.append(f.name)
    return out


PATHS: dict[str, tuple[str, ...]] = {name: _PLACES.get(name, (name.rsplit(".", 1)[-1],))
                                     for name in _schema_keys() if name not in _BY_RULE}
assert set(_PLACES) <= set(PATHS), sorted(set(_PLACES) - set(PATHS))

# Honoured keys that are not schema fields: read by their own rule in config/load.py.
_EXTRA_HONOURED = (
    "model.model_config.pet_config", "optimizer.betas", "callbacks",
    "parallel_config.model_parallel", "parallel_config.pipeline_stage", "parallel_config.context_parallel",
)
# model_config keys read under another name (Hugging Face's) beside LlamaConfig's fields.
MODEL_ALIASES = {"rope_theta": "float", "num_hidden_layers": "int", "num_attention_heads": "int",
                 "max_position_embedding": "int"}

# ---- accepted and ignored, each with its reason ------------------------------------------------------

_DATASET_PIPELINE = ("input_columns", "output_columns", "column_order", "num_parallel_workers",
                     "python_multiprocessing", "repeat", "numa_enable", "prefetch_size", "dynamic_batch", "divisor",
                     "remainder", "construct_args_key", "eod_reset", "data_loader.type", "data_loader.split",
                     "data_loader.load_func", "data_loader.adaptor_config", "data_loader.mock_config",
                     "data_loader.shard_id", "data_loader.num_shards", "data_loader.column_names",
                     "data_loader.handler")
_IGNORED_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("MindSpore runtime or graph setting with no PyTorch meaning", (
        "context", "parallel", "jit_config", "ascend_config", "infer_precision_sync", "micro_batch_interleave_num",
        "auto_tune", "autotune_per_step", "filepath_prefix", "swap_config", "mindformers_config", "register_path",
        "use_legacy", "transform_process_num", "auto_trans_ckpt_async", "load_ckpt_async",
        "src_strategy_path_or_dir", "only_save_strategy", "device_num", "local_rank", "device_id",
        "monitor_config", "moe_config")),
    ("MindSpore profiler option (use the PyTorch profiler)", (
        "profile", "profile_start_step", "profile_stop_step", "init_start_profile", "profile_communication",
        "profile_memory", "profile_level", "profile_rank_ids", "profile_pipeline", "profile_output", "profile_cpu",
        "profile_with_stack")),
    ("MindFormers' class registry: run_mode and the sections decide what runs", (
        "trainer", "train_dataset_task", "eval_dataset_task", "metric", "eval_callbacks", "model.arch",
        "model.model_config.type", "processor.type", "processor.tokenizer.type", "runner_wrapper.type")),
    ("layer-wise learning-rate scaling is not implemented; every adapter gets the schedule's rate", (
        "layer_scale", "layer_decay", "lr_scale", "lr_scale_factor")),
    ("the checkpoint's format is read from the file itself", (
        "load_ckpt_format", "remove_redundancy", "pretrained_model_dir", "remote_save_url")),
    ("MindFormers' inference and logging switches; petformers' run_mode predict and metrics.jsonl replace them", (
        "top_k", "save_file", "predict_batch_size", "adapter_id", "output_path", "print_separate_loss",
        "eval_epoch_interval", "check_for_nan_in_loss_and_grad")),
    ("data position is restored exactly on resume; nothing is skipped", ("ignore_data_skip", "data_skip_steps")),
    ("MindSpore data-sink and step bookkeeping; petformers counts optimizer steps itself", (
        "runner_config.sink_mode", "runner_config.sink_size", "runner_config.initial_epoch",
        "runner_config.initial_step", "runner_config.stop_step", "runner_config.per_epoch_size",
        "runner_wrapper.micro_batch_num")),
    ("no loss scaling is needed with float32 master weights and bf16 / fp32 compute", (
        "runner_wrapper.scale_sense",)),
    ("the loss is always the token mean over the whole optimizer step", ("runner_wrapper.calculate_per_token_loss",)),
    ("gradient clipping uses the global norm; per-device norms and data skipping are MindSpore's", (
        "runner_wrapper.local_norm", "runner_wrapper.use_skip_data_by_global_norm")),
    ("AdamW options petformers does not offer (plain AdamW with float32 states)", (
        "optimizer.amsgrad", "optimizer.maximize", "optimizer.swap")),
    ("schedule options of schedules petformers does not offer", (
        "lr_schedule.warmup_epochs", "lr_schedule.num_cycles", "lr_schedule.decay_steps", "lr_schedule.power")),
    ("recompute is all-or-nothing per decoder layer (recompute_config.recompute)", (
        "recompute_config.select_recompute", "recompute_config.select_comm_recompute",
        "recompute_config.parallel_optimizer_comm_recompute", "recompute_config.mp_comm_recompute",
        "recompute_config.recompute_slice_activation", "recompute_config.select_recompute_exclude",
        "recompute_config.select_comm_recompute_exclude")),
    ("Ascend parallel layout; petformers does data parallelism (DDP or FSDP) only", (
        "parallel_config.use_seq_parallel", "parallel_config.micro_batch_num", "parallel_config.vocab_emb_dp",
        "parallel_config.gradient_aggregation_group", "parallel_config.expert_parallel",
        "parallel_config.optimizer_shard", "parallel_config.seq_split_num", "parallel_config.context_parallel_algo",
        "parallel_config.ulysses_degree_in_cp", "parallel_config.mem_coeff")),
    ("Ascend kernel, graph or inference option of the model; the PyTorch model decides these itself", tuple(
        f"model.model_config.{k}" for k in (
            "batch_size", "ignore_token_id", "layernorm_compute_type", "softmax_compute_type", "rotary_dtype",
            "use_past", "extend_method", "use_flash_attention", "offset", "checkpoint_name_or_path",
            "repetition_penalty", "max_decode_length", "top_k", "top_p", "do_sample", "scaling_factor",
            "pretrain_seqlen", "compute_in_2d", "use_past_shard", "block_size", "num_blocks", "is_dynamic",
            "qkv_concat", "fine_grain_interleave", "use_rope_slice", "fused_rms_norm", "parallel_decoding_params",
            "embedding_init_type", "residual_dtype", "use_ring_attention", "use_attn_mask_compression",
            "use_eod_attn_mask_compression", "moe_config", "auto_map", "quantization_config"))),
    ("carried over from Qwen's own config into MindFormers' Qwen2.5 YAMLs; MindFormers' LlamaConfig does not read "
     "them either (theta is the rope base, the whole head is roped, no embedding dropout, weights come from the "
     "checkpoint)", tuple(f"model.model_config.{k}" for k in (
        "rotary_emb_base", "rotary_pct", "emb_dropout_prob", "initializer_range"))),
    ("the tokenizer file decides its special tokens and options", (
        "processor.return_tensors", "processor.max_length", "processor.image_processor", *(
            f"processor.tokenizer.{k}" for k in (
                "unk_token", "bos_token", "eos_token", "pad_token", "add_bos_token", "add_eos_token", "merges_file",
                "chat_template", "auto_register", "padding_side", "legacy", "model_max_length", "use_fast",
                "trust_remote_code", "added_tokens_decoder", "errors", "clean_up_tokenization_spaces")))),
    ("MindSpore dataset-pipeline option; petformers' data loader decides these itself", tuple(
        f"{s}.{k}" for s in ("train_dataset", "eval_dataset") for k in _DATASET_PIPELINE + ("seed", "tokenizer"))
        + ("train_dataset.data_loader.packing", "eval_dataset.data_loader.packing")),
    ("the model's pad id masks MindRecord padding (model.model_config.pad_token_id)", (
        "train_dataset.pad_token_id", "eval_dataset.pad_token_id")),
    ("evaluation uses runner_config.batch_size (at least 8) and the whole eval set in order", (
        "eval_dataset.batch_size", "eval_dataset.drop_remainder", "eval_dataset.data_loader.shuffle")),
)
IGNORED: dict[str, str] = {k: reason for reason, keys in _IGNORED_GROUPS for k in keys}
assert len(IGNORED) == sum(len(keys) for _, keys in _IGNORED_GROUPS), "a key is listed twice"
KNOWN_IGNORED = frozenset(IGNORED)
# CheckpointMonitor's keys with no PyTorch meaning (the layout of petformers' checkpoints is its own).
MONITOR_IGNORED = frozenset((
    "prefix", "directory", "integrated_save", "async_save", "save_network_params", "save_trainable_params",
    "checkpoint_format", "save_checkpoint_seconds", "keep_checkpoint_per_n_minutes", "append_info", "enc_key",
    "enc_mode", "exception_save", "remove_redundancy", "save_optimizer", "embedding_local_norm_threshold",
    "global_batch_size",
))
_MONITOR_REASON = "petformers' checkpoints have their own layout (docs/config.md)"
_CALLBACK_REASON = "MindSpore callback; petformers logs, checkpoints and evaluates by its own keys"
_UNKNOWN_REASON = "not a key petformers knows (a newer MindFormers option?)"
_CUTOFF = 0.8  # difflib similarity above which an unknown key is taken for a misspelling


def ignored_reason(path: str) -> str:
    """Why the key at dotted `path` (as listed in RunConfig.ignored_keys) is not acted on."""
    if path.startswith("callbacks."):
        return _MONITOR_REASON if path.startswith(f"callbacks.{CHECKPOINT_MONITOR}.") else _CALLBACK_REASON
    return IGNORED.get(path, _UNKNOWN_REASON)


def paths_for(raw: dict) -> dict[str, tuple[str, ...]]:
    """PATHS with "{ckpt}" made the index of the CheckpointMonitor callback (dropped when there is none)."""
    index = _monitor_index(raw)
    return {name: tuple(p.format(ckpt=index) for p in paths if "{ckpt}" not in p or index is not None)
            for name, paths in PATHS.items()}


def _monitor_index(raw: dict) -> int | None:
    callbacks = raw.get("callbacks")
    if isinstance(callbacks, list):
        for i, entry in enumerate(callbacks):
            if isinstance(entry, dict) and entry.get("type") == CHECKPOINT_MONITOR:
                return i
    return None


# ---- keys: honoured, ignored, misspelt ---------------------------------------------------------------


def _honoured() -> dict[str, set[str]]:
    """Section path ("" for the top level) -> the keys petformers reads there."""
    out: dict[str, set[str]] = {}
    for path in [p for paths in PATHS.values() for p in paths if "{ckpt}" not in p] + list(_EXTRA_HONOURED):
        parts = path.split(".")
        for i, part in enumerate(parts):
            if part.isdigit():
                break  # a list element (optimizer.betas.0): the list is a value, not a section
            out.setdefault(".".join(parts[:i]), set()).add(part)
    out["model.model_config"] |= {f.name for f in dataclasses.fields(LlamaConfig) if f.name != "extra"}
    out["model.model_config"] |= set(MODEL_ALIASES)
    out["model.model_config"] |= set(QUANTIZATION_KEYS)  # read by petformers.quant.model.quant_config_of
    return out


def check_keys(raw: dict) -> list[str]:
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
            elif path in IGNORED:
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
            if key not in MONITOR_IGNORED:
                _misspelt(f"callbacks.{i}.{key}", str(key), valid)
            ignored.append(f"callbacks.{kind}.{key}")
