"""The run configuration's schema: one dataclass per section, every key documented where it is declared.

A field is declared with `key(default, doc, check)`: `doc` is its line in docs/config.md (generated from
here by `python -m petformers.config.docs`), `check` validates and normalises its value. A check
belongs to the module that owns the choice (the schedule names to train/schedule.py, the optimizers
to train/optimizer.py, ...) and returns the value to keep or raises ValueError with the rule broken.

Where a key is written in the YAML: by default its name at the top level (the native form); the
MindFormers places (sections, aliases) are listed in config/mindformers.py's PATHS. A component
receives its section (`cfg.optimizer`, `cfg.data`, ...), never the raw YAML.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from petformers.checkpoint.gguf_quants import check_outtype
from petformers.data.templates import TEMPLATES
from petformers.distributed.parallel import check_strategy
from petformers.hardware import auto_compute_dtype
from petformers.models.config import parse_dtype
from petformers.train.optimizer import check_optimizer
from petformers.train.run import check_run_mode
from petformers.train.schedule import check_schedule


_ANY = object()


def key(default, doc: str, check=None, *, ignored: str = "", does=_ANY, factory=None):
    """A YAML key: its default, its one-line doc, an optional check, and (`ignored`) why petformers
    accepts it without acting on it; `does`: the value petformers behaves as anyway (a config that sets
    that value is not told it is ignored)."""
    meta = {"doc": doc, "check": check, "ignored": ignored, "does": does}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def section(cls, doc: str):
    return field(default_factory=cls, metadata={"doc": doc, "section": True})


# ---- the rules of plain numbers (the config's own) ----------------------------------------------------


def at_least_1(v):
    if v < 1:
        raise ValueError(f"must be at least 1, got {v!r}")
    return v


def minus_1_or_at_least_1(v):
    if not (v == -1 or v >= 1):
        raise ValueError(f"must be -1 or at least 1, got {v!r}")
    return v


def non_negative(v):
    if v is not None and v < 0:
        raise ValueError(f"must be 0 or more, got {v!r}")
    return v


def positive(v):
    if not v > 0:
        raise ValueError(f"must be above 0, got {v!r}")
    return v


def beta(v):
    if not 0 <= v < 1:
        raise ValueError(f"must be in [0, 1), got {v!r}")
    return v


def fraction(v):
    if v is not None and not 0 <= v <= 1:
        raise ValueError(f"must be in [0, 1], got {v!r}")
    return v


def template(v):
    if v not in TEMPLATES:
        raise ValueError(f"must be one of {', '.join(TEMPLATES)}, got {v!r}")
    return v


def dtype_name(v):
    """'bf16' -> 'bfloat16'; 'auto' -> bfloat16 where this machine multiplies bf16 fast, else float32."""
    if str(v).lower() == "auto":
        return auto_compute_dtype()
    try:
        return str(parse_dtype(v)).removeprefix("torch.")
    except Exception:
        raise ValueError(f"unknown dtype {v!r}; use one of float32, bfloat16, float16") from None


# ---- sections ---------------------------------------------------------------------------------------


@dataclass
class RunnerSection:
    """How long to train, in how large steps (MindFormers' runner_config)."""
    epochs: int = key(1, "passes over the training data", at_least_1)
    batch_size: int = key(1, "micro-batch per device (also read from `train_dataset.batch_size`, which it "
                             "overrides). Global batch = `batch_size` × `data_parallel` × "
                             "`gradient_accumulation_steps`", at_least_1)
    gradient_accumulation_steps: int = key(1, "micro-batches per optimizer step; the loss is normalised by the "
                                              "trained tokens of the whole step, so accumulation equals one big "
                                              "batch", at_least_1)
    max_steps: int = key(-1, "stop after this many optimizer steps; `-1`: `epochs` decide", minus_1_or_at_least_1)


@dataclass
class OptimizerSection:
    """The optimizer and gradient clipping (MindFormers' optimizer and runner_wrapper)."""
    type: str = key("FP32StateAdamWeightDecay", "AdamW with float32 states (MindFormers' "
                    "FP32StateAdamWeightDecay). `AdamWeightDecay` and `AdamW` are the same optimizer here",
                    check_optimizer)
    beta1: float = key(0.9, "first-moment decay (also read from `betas[0]`, MindFormers' AdamW spelling)", beta)
    beta2: float = key(0.999, "second-moment decay (also `betas[1]`)", beta)
    eps: float = key(1e-8, "denominator epsilon", positive)
    weight_decay: float = key(0.0, "decoupled weight decay on the trained parameters", non_negative)
    use_clip_grad: bool = key(True, "clip the global gradient norm")
    max_grad_norm: float = key(1.0, "the clipping norm", positive)


@dataclass
class ScheduleSection:
    """The learning-rate schedule (MindFormers' lr_schedule)."""
    type: str = key("CosineWithWarmUpLR", "`CosineWithWarmUpLR`, `LinearWithWarmUpLR` or `ConstantWarmUpLR` "
                    "(also `cosine`, `linear`, `constant`)", check_schedule)
    learning_rate: float = key(1e-5, "peak learning rate (`lr_schedule.learning_rate` wins over "
                                     "`optimizer.learning_rate`)", non_negative)
    lr_end: float = key(0.0, "learning rate at the last step (cosine, linear)", non_negative)
    warmup_ratio: float | None = key(None, "warmup as a fraction of `total_steps`; when set it takes precedence "
                                           "over `warmup_steps` (MindFormers' rule)", fraction)
    warmup_steps: int | None = key(None, "warmup in optimizer steps (0 when neither is set)", non_negative)
    warmup_lr_init: float = key(0.0, "learning rate at step 0 of the warmup", non_negative)
    total_steps: int = key(-1, "length of the schedule; `-1`: epochs × optimizer steps per epoch (capped by "
                               "`max_steps`)", minus_1_or_at_least_1)


@dataclass
class DataSection:
    """What is trained on and how raw records become token rows (train_dataset, eval_dataset, processor)."""
    train_dataset_dir: str = key("", "training data: a prepared dataset dir, a MindRecord file, or a raw Alpaca "
                                     "/ ShareGPT / messages JSON or JSONL file")
    eval_dataset_dir: str = key("", "evaluation data, same formats")
    shuffle: bool = key(True, "shuffle the training samples each epoch (seeded)")
    drop_remainder: bool = key(True, "the last incomplete global batch of an epoch is dropped",
                               ignored="the trainer always drops it: every optimizer step sees a full global "
                                       "batch, so False is not acted on", does=True)
    template: str = key("fastchat", "how raw conversations become tokens: `fastchat` (Vicuna v1.1, MindFormers' "
                                    "choice), `alpaca` (Stanford Alpaca prompt), `chat` (the model's own chat "
                                    "template)", template)
    packing: bool = key(False, "pack several samples per row (attention stays within each sample) instead of "
                               "padding each to `seq_length`")
    shared_prefix: bool = key(True, "with `packing`: the tokens every sample starts with (system prompt, template header) "
                                    "are written once per row and each sample attends to them, positions "
                                    "continuing after them: the same loss and gradients as plain packing, fewer "
                                    "tokens through the model (data/packing.py)")
    drop_long: bool = key(False, "drop samples longer than `seq_length` instead of truncating them")
    tokenizer: str = key("", "tokenizer to use when the checkpoint carries none: a tokenizer directory "
                             "(`tokenizer.json` / `tokenizer_config.json`), a SentencePiece `tokenizer.model`, or a "
                             "`.gguf` file")
    enable_thinking: bool | None = key(None, "for chat templates with a thinking switch (Qwen3): `false` renders every "
                                             "prompt of the run (data prepared on the fly, evaluation, run_mode "
                                             "predict) as `apply_chat_template(enable_thinking=False)` does; unset: "
                                             "the template's own default")


@dataclass
class ModelSection:
    """The model and its adapter (MindFormers' model.model_config and recompute_config)."""
    seq_length: int = key(2048, "tokens per training row (samples are truncated, padded or packed to it)",
                          at_least_1)
    compute_dtype: str = key("float32", "dtype of the frozen base weights and the activations: `float32`, "
                                        "`bfloat16`, `float16` (`bf16`, `fp16` accepted), or `auto`: `bfloat16` "
                                        "where the hardware multiplies bf16 fast (CUDA with bf16, CPUs with "
                                        "AVX512-BF16 or AMX), else `float32` (petformers/hardware.py)", dtype_name)
    param_init_type: str = key("float32", "dtype MindFormers gives trained parameters", dtype_name,
                               ignored="adapters are always float32 (small updates would vanish in 16 bits)",
                               does="float32")
    recompute: bool = key(False, "activation checkpointing of every decoder layer (LoRA gradients still flow)")
    fused_projections: bool = key(False, "fine-tuning computes each layer's q/k/v projections, and w1/w3, as one "
                                         "matmul over their frozen weights, stacked once into one storage (the "
                                         "weights become views of it: no copy); LoRA stays per projection, and "
                                         "parameter names, the state dict, `target_modules`, the adapter and "
                                         "exports are unchanged. Layers that cannot be fused (a quantized base, "
                                         "DoRA, FSDP) run each projection on its own (petformers/pet/fused.py). "
                                         "Off by default: no faster on the bench's CPU (SmolLM2-135M shapes, "
                                         "bf16 and fp32)")
    model_config: dict = key(None, "the architecture in MindFormers' `LlamaConfig` names, without `pet_config` "
                                   "(see below)", factory=dict)
    pet_config: dict | None = key(None, "the adapter (`PetConfig.from_dict` input); without it `run_mode "
                                        "finetune` is refused")


@dataclass
class CheckpointSection:
    """What is saved, how often (MindFormers' CheckpointMonitor callback, plus petformers' outputs)."""
    save_checkpoint_steps: int = key(100, "save a checkpoint every this many optimizer steps", at_least_1)
    keep_checkpoint_max: int = key(5, "keep only the newest this many checkpoints", at_least_1)
    save_merged: bool = key(False, "at the end, also write `output_dir/merged/`: the base model with the adapter "
                                   "folded in")
    save_gguf: str | None = key(None, "at the end, also write the merged model as one GGUF for llama.cpp / Ollama, "
                                      "`output_dir/gguf/<run>-<type>.gguf` with a `Modelfile`, in this type: `f32`, "
                                      "`f16`, `bf16`, `q8_0`, `q4_0`, `q4_1`, `q5_0`, `q5_1`, `q4_k` (= `q4_k_m`), "
                                      "`q4_k_s` or `q6_k` (as `petformers export gguf --outtype`)", check_outtype)


@dataclass
class ParallelSection:
    """Data parallelism across torchrun's processes (MindFormers' use_parallel and parallel_config)."""
    use_parallel: bool = key(False, "data parallel across the processes started by `torchrun`; a run without "
                                    "`torchrun` (no `WORLD_SIZE` in the environment) is refused with one line, never "
                                    "trained silently on one process")
    data_parallel: int = key(1, "number of data-parallel processes; with `use_parallel` it must equal the "
                                "`torchrun` world size", at_least_1)
    parallel_strategy: str = key("ddp", "`ddp` (every device holds the whole model) or `fsdp` (the model is "
                                        "sharded across devices, for models too large for one)", check_strategy)


@dataclass
class EvalSection:
    """Evaluation during training, run_mode eval and run_mode predict."""
    do_eval: bool = key(False, "evaluate on the eval dataset during training")
    eval_step_interval: int = key(100, "evaluate every this many optimizer steps (and at the end); `-1`: only at "
                                       "the end", minus_1_or_at_least_1)
    eval_generation: bool = key(False, "`run_mode eval`: also generate answers and score them (exact match, "
                                       "ROUGE-L, BLEU-4)")
    max_new_tokens: int = key(128, "`run_mode eval` with generation, `run_mode predict`: answer length limit",
                              at_least_1)


@dataclass
class TensorboardSection:
    """TensorBoard event files (MindFormers' `tensorboard:` section); written by rank 0 only."""
    tensorboard_dir: str = key("", "directory for TensorBoard event files (train/eval scalars, the resolved config "
                                   "as text); empty: none. Needs `pip install 'petformers[tensorboard]'`")
    tensorboard_queue_size: int = key(10, "events held before they are written to the file", at_least_1)
    log_loss_scale_to_tensorboard: bool = key(False, "MindFormers' loss-scale scalar",
                                              ignored="no loss scaling with float32 master weights")
    log_timers_to_tensorboard: bool = key(False, "MindFormers' step-time scalars",
                                          ignored="throughput is always written (train/tokens_per_s)")


@dataclass
class RunConfig:
    """Everything `petformers run` does. Top-level keys first, then one section per concern."""
    seed: int = key(0, "seed of every random generator (weights init, LoRA init, dropout, shuffling); a run is "
                       "deterministic for a given seed")
    run_mode: str = key("finetune", "`finetune` (LoRA on a pretrained model), `train` (from scratch or continued "
                                    "pre-training), `eval` (perplexity; with `eval_generation`, EM / ROUGE-L / "
                                    "BLEU-4), `predict` (generation)", check_run_mode)
    output_dir: str = key("./output", "where checkpoints, the adapter, logs, metrics and the resolved config go")
    load_checkpoint: str = key("", "base weights: a Hugging Face model dir, a `.gguf` file, a Meta (params.json) "
                                   "dir, a MindSpore `.ckpt`, or a known name such as `smollm2-135m-instruct`. "
                                   "Empty: the model is built from `model.model_config` (random weights; "
                                   "`run_mode train` or `--dry_run`)")
    adapter: str = key("", "a PEFT adapter directory to start from (finetune) or to evaluate / predict with")
    resume_training: bool = key(False, "continue from the newest complete checkpoint in `output_dir/checkpoint/` "
                                       "(optimizer, schedule, RNG and data position included)")
    auto_trans_ckpt: bool = key(False, "MindFormers' switch to reshard checkpoints between world sizes",
                                ignored="petformers always reshards checkpoints between world sizes", does=True)
    predict_data: str = key("", "`run_mode predict`: a prompt, a file with one prompt per line, or a `.json` list of prompts; "
                                "also `--predict_data`")
    runner: RunnerSection = section(RunnerSection, "runner")
    optimizer: OptimizerSection = section(OptimizerSection, "optimizer")
    schedule: ScheduleSection = section(ScheduleSection, "schedule")
    data: DataSection = section(DataSection, "data")
    model: ModelSection = section(ModelSection, "model")
    checkpoint: CheckpointSection = section(CheckpointSection, "checkpoint")
    parallel: ParallelSection = section(ParallelSection, "parallel")
    eval: EvalSection = section(EvalSection, "eval")
    tensorboard: TensorboardSection = section(TensorboardSection, "tensorboard")
    # bookkeeping (not YAML keys)
    ignored_keys: list[str] = field(default_factory=list)  # dotted paths of the source's keys not acted on
    source: str = ""  # the YAML path
    raw: dict = field(default_factory=dict)  # the YAML as loaded, overrides and flags applied
