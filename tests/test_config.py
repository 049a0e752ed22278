"""The run configuration: MindFormers YAMLs load as is, overrides and flags win, mistakes are named."""

from __future__ import annotations

import dataclasses
import re
import textwrap
from pathlib import Path

import pytest

from petformers.errors import ConfigError
from petformers.models.config import LlamaConfig
from petformers.pet.config import PetConfig
from petformers.config.load import load_run_config as load_config
from petformers.config.load import resolved_yaml
from petformers.config.mindformers import PATHS
from petformers.config.schema import DataSection, RunConfig
from petformers.config.yamlio import apply_overrides

ROOT = Path(__file__).resolve().parents[1]
SEED_YAML = ROOT / "configs" / "llama2" / "lora_llama2_7b.yaml"
SMOLLM2_YAML = ROOT / "configs" / "smollm2" / "lora_smollm2_135m.yaml"


def write(tmp_path: Path, text: str, name: str = "c.yaml") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return str(path)


def seed_with(tmp_path: Path, old: str, new: str) -> str:
    """The seed's YAML with one line replaced (the edit must hit)."""
    text = SEED_YAML.read_text(encoding="utf-8")
    assert old in text
    return write(tmp_path, text.replace(old, new, 1))


def line_of(path: str, needle: str) -> int:
    return next(i for i, line in enumerate(Path(path).read_text().splitlines(), 1) if needle in line)


def comparable(cfg: RunConfig) -> dict:
    d = dataclasses.asdict(cfg)
    for k in ("raw", "source", "ignored_keys"):
        d.pop(k)
    return d


# ---- the seed's config --------------------------------------------------------------------------


def test_seed_config_values():
    cfg = load_config(str(SEED_YAML))
    assert (cfg.runner.epochs, cfg.runner.batch_size, cfg.runner.gradient_accumulation_steps) == (2, 2, 1)  # runner_config wins over 4
    assert cfg.parallel.data_parallel == 8 and cfg.parallel.use_parallel is True
    assert cfg.run_mode == "finetune" and cfg.seed == 0 and cfg.output_dir == "./output"
    assert cfg.load_checkpoint == "" and cfg.resume_training is False and cfg.auto_trans_ckpt is False
    assert cfg.optimizer.type == "FP32StateAdamWeightDecay"
    assert (cfg.optimizer.beta1, cfg.optimizer.beta2, cfg.optimizer.eps, cfg.optimizer.weight_decay) == (0.9, 0.999, 1e-8, 0.0)
    assert cfg.schedule.type == "CosineWithWarmUpLR"
    assert cfg.schedule.learning_rate == 1e-5 and cfg.schedule.lr_end == 0.0
    assert cfg.schedule.warmup_ratio == 0.03 and cfg.schedule.warmup_steps is None and cfg.schedule.total_steps == -1
    assert cfg.data.train_dataset_dir == "" and cfg.data.shuffle is True and cfg.data.drop_remainder is True
    assert cfg.eval.do_eval is False and cfg.eval.eval_step_interval == 100
    assert cfg.checkpoint.save_checkpoint_steps == 100 and cfg.checkpoint.keep_checkpoint_max == 5
    assert cfg.model.recompute is False and cfg.optimizer.use_clip_grad is True and cfg.optimizer.max_grad_norm == 1.0
    assert cfg.model.seq_length == 4096 and cfg.model.compute_dtype == "float16" and cfg.model.param_init_type == "float32"
    assert cfg.source == str(SEED_YAML)
    assert cfg.model.pet_config == {"pet_type": "lora", "lora_rank": 16, "lora_alpha": 16, "lora_dropout": 0.05,
                              "target_modules": ".*wq|.*wk|.*wv|.*wo"}
    assert "pet_config" not in cfg.model.model_config


def test_seed_config_builds_the_7b_model_and_adapter():
    cfg = load_config(str(SEED_YAML))
    model = LlamaConfig.from_mindformers(cfg.model.model_config)
    assert (model.hidden_size, model.num_layers, model.num_heads, model.vocab_size) == (4096, 32, 32, 32000)
    assert model.intermediate_size == 11008 and model.seq_length == 4096
    pet = PetConfig.from_dict(cfg.model.pet_config)
    # BRIEF §1.3: 32 layers x 4 projections x (A [16, 4096] + B [4096, 16])
    trainable = model.num_layers * 4 * pet.lora_rank * (model.hidden_size + model.hidden_size)
    assert trainable == 16_777_216


def test_seed_config_reports_ignored_keys_once():
    cfg = load_config(str(SEED_YAML))
    ignored = cfg.ignored_keys
    assert len(ignored) == len(set(ignored))
    for key in ("context", "parallel", "trainer", "runner_config.sink_mode", "runner_config.sink_size",
                "src_strategy_path_or_dir", "only_save_strategy", "micro_batch_interleave_num",
                "train_dataset.input_columns", "train_dataset.num_parallel_workers", "train_dataset_task",
                "parallel_config.micro_batch_num", "recompute_config.select_recompute",
                "callbacks.MFLossMonitor", "callbacks.CheckpointMonitor.prefix", "model.model_config.use_flash_attention",
                "model.model_config.use_past", "model.arch", "processor.tokenizer.type", "metric",
                "runner_wrapper.scale_sense", "eval_callbacks", "auto_tune", "profile", "layer_decay"):
        assert key in ignored, key
    for honoured in ("runner_config.epochs", "runner_config.batch_size", "optimizer.type", "seed", "callbacks",
                     "model.model_config.pet_config", "parallel_config.data_parallel", "recompute_config.recompute"):
        assert honoured not in ignored


def test_anchors_and_merge_keys(tmp_path):
    path = write(tmp_path, """
        base: &base {epochs: 3, batch_size: 5}
        runner_config:
          <<: *base
          gradient_accumulation_steps: 2
        train_dataset: &train_dataset
          data_loader: {type: MindDataset, dataset_dir: /data/train.mindrecord, shuffle: False}
          batch_size: 5
        train_dataset_task:
          type: CausalLanguageModelDataset
          dataset_config: *train_dataset
        eval_dataset: *train_dataset
    """)
    cfg = load_config(path)
    assert (cfg.runner.epochs, cfg.runner.batch_size, cfg.runner.gradient_accumulation_steps) == (3, 5, 2)
    assert cfg.data.train_dataset_dir == cfg.data.eval_dataset_dir == "/data/train.mindrecord"
    assert cfg.data.shuffle is False
    assert "base" in cfg.ignored_keys  # unknown top-level key, far from any honoured one
    # The alias is unshared: setting the train set leaves the eval set (and the task section) alone.
    cfg = load_config(path, ["train_dataset.data_loader.dataset_dir=/data/other"])
    assert cfg.data.train_dataset_dir == "/data/other" and cfg.data.eval_dataset_dir == "/data/train.mindrecord"
    assert cfg.raw["train_dataset_task"]["dataset_config"]["data_loader"]["dataset_dir"] == "/data/train.mindrecord"


# ---- overrides and flags ------------------------------------------------------------------------


def test_overrides_apply():
    cfg = load_config(str(SEED_YAML), ["runner_config.batch_size=4", "model.model_config.pet_config.lora_rank=8",
                                       "lr_schedule.learning_rate=3e-4", "callbacks.1.save_checkpoint_steps=7",
                                       "recompute_config.recompute=True", "max_steps=20"])
    assert cfg.runner.batch_size == 4 and cfg.model.pet_config["lora_rank"] == 8
    assert cfg.schedule.learning_rate == 3e-4  # "3e-4" is a string to PyYAML; it is still a number here
    assert cfg.checkpoint.save_checkpoint_steps == 7 and cfg.model.recompute is True and cfg.runner.max_steps == 20
    # a native top-level key wins over the CheckpointMonitor entry
    assert load_config(str(SEED_YAML), ["save_checkpoint_steps=9"]).checkpoint.save_checkpoint_steps == 9


def test_apply_overrides_is_a_copy_and_checks_its_input():
    raw = {"runner_config": {"epochs": 1}, "callbacks": [{"type": "CheckpointMonitor"}]}
    out = apply_overrides(raw, ["runner_config.epochs=3", "optimizer.betas=[0.9, 0.95]", "x.y.z=null",
                                "callbacks.0.keep_checkpoint_max=2"])
    assert raw == {"runner_config": {"epochs": 1}, "callbacks": [{"type": "CheckpointMonitor"}]}
    assert out["runner_config"]["epochs"] == 3 and out["optimizer"]["betas"] == [0.9, 0.95]
    assert out["x"] == {"y": {"z": None}} and out["callbacks"][0]["keep_checkpoint_max"] == 2
    with pytest.raises(ConfigError, match="expected key.path=value"):
        apply_overrides(raw, ["runner_config.epochs"])
    with pytest.raises(ConfigError, match="runner_config.epochs is not a mapping"):
        apply_overrides(raw, ["runner_config.epochs.x=1"])
    with pytest.raises(ConfigError, match="is a list"):
        apply_overrides(raw, ["callbacks.5.x=1"])


def test_cli_flags_override_yaml_and_overrides():
    cli = {"train_dataset_dir": "/data/alpaca-fastchat4096.mindrecord", "load_checkpoint": "/ckpt/llama2_7b.ckpt",
           "auto_trans_ckpt": "False", "use_parallel": "True", "run_mode": "finetune", "resume_training": "True",
           "seed": "7", "output_dir": "/out", "eval_dataset_dir": None, "do_eval": None}
    cfg = load_config(str(SEED_YAML), ["seed=3", "run_mode=eval"], cli)
    assert cfg.data.train_dataset_dir == "/data/alpaca-fastchat4096.mindrecord"
    assert cfg.load_checkpoint == "/ckpt/llama2_7b.ckpt" and cfg.output_dir == "/out"
    assert cfg.auto_trans_ckpt is False and cfg.parallel.use_parallel is True and cfg.resume_training is True
    assert cfg.seed == 7 and cfg.run_mode == "finetune"
    assert cfg.eval.do_eval is False and cfg.data.eval_dataset_dir == ""  # None flags leave the YAML alone
    # written where MindFormers' run_mindformer.py writes it
    assert cfg.raw["train_dataset"]["data_loader"]["dataset_dir"] == "/data/alpaca-fastchat4096.mindrecord"
    with pytest.raises(ConfigError, match="--seed: must be an integer"):
        load_config(str(SEED_YAML), cli={"seed": "seven"})
    with pytest.raises(ConfigError, match="--use_parallel: must be True or False"):
        load_config(str(SEED_YAML), cli={"use_parallel": "maybe"})
    with pytest.raises(ValueError):
        load_config(str(SEED_YAML), cli={"dry_run": True})


def test_defaults_without_a_file():
    cfg = load_config(None, cli={"load_checkpoint": "smollm2-135m-instruct", "train_dataset_dir": "t.json"})
    assert comparable(cfg) == comparable(RunConfig(
        load_checkpoint="smollm2-135m-instruct", data=DataSection(train_dataset_dir="t.json")))


# ---- mistakes -----------------------------------------------------------------------------------


def test_misspelt_runner_key_is_named_with_file_line_and_nearest_name(tmp_path):
    path = seed_with(tmp_path, "  epochs: 2", "  epoch: 2")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == f"{path}:{line_of(path, 'epoch: 2')}: runner_config.epoch: unknown key; did you mean 'epochs'?"


def test_misspelt_pet_config_key(tmp_path):
    path = seed_with(tmp_path, "lora_rank: 16", "lora_rnak: 16")
    with pytest.raises(ConfigError, match=r"model\.model_config\.pet_config\.lora_rnak: unknown key; "
                                          r"did you mean 'lora_rank'\?") as e:
        load_config(path)
    assert f":{line_of(path, 'lora_rnak')}:" in str(e.value)


@pytest.mark.parametrize("old, new, message", [
    ("  learning_rate: 1.e-5\n\n# lr", "  learning_rat: 1.e-5\n\n# lr", r"optimizer\.learning_rat: .*'learning_rate'"),
    ("  warmup_ratio: 0.03", "  warmup_ration: 0.03", r"lr_schedule\.warmup_ration: .*'warmup_ratio'"),
    ("runner_config:", "runner_confg:", r"runner_confg: .*'runner_config'"),
    ("    num_layers: 32", "    num_layer: 32", r"model\.model_config\.num_layer: .*'num_layers'"),
    ("    save_checkpoint_steps: 100", "    save_checkpoint_step: 100",
     r"callbacks\.1\.save_checkpoint_step: .*'save_checkpoint_steps'"),
    ("  - type: CheckpointMonitor", "  - type: CheckpointMointor", r"callbacks\.1\.type: .*'CheckpointMonitor'"),
    ("  use_clip_grad: True", "  use_clip_grads: True", r"runner_wrapper\.use_clip_grads: .*'use_clip_grad'"),
])
def test_misspellings_that_matter_are_errors(tmp_path, old, new, message):
    with pytest.raises(ConfigError, match=message):
        load_config(seed_with(tmp_path, old, new))


def test_model_parallel_and_pipeline_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"parallel_config\.model_parallel: 2 is not supported; "
                                          r"petformers trains with data parallelism only"):
        load_config(seed_with(tmp_path, "  model_parallel: 1", "  model_parallel: 2"))
    with pytest.raises(ConfigError, match=r"parallel_config\.pipeline_stage: 2"):
        load_config(str(SEED_YAML), ["parallel_config.pipeline_stage=2"])


@pytest.mark.parametrize("old, new, message", [
    ("  batch_size: 2", '  batch_size: "two"', r"runner_config\.batch_size: must be an integer, got 'two'"),
    ("  epochs: 2", "  epochs: 0", r"runner_config\.epochs: must be at least 1"),
    ("  use_clip_grad: True", "  use_clip_grad: maybe", r"runner_wrapper\.use_clip_grad: must be True or False"),
    ("  warmup_ratio: 0.03", "  warmup_ratio: fast", r"lr_schedule\.warmup_ratio: must be a number"),
    ("  type: FP32StateAdamWeightDecay", "  type: Came", r"optimizer\.type: 'Came' is not supported"),
    ("  type: CosineWithWarmUpLR", "  type: StepLR", r"lr_schedule\.type: unknown schedule 'StepLR'"),
    ("run_mode: 'finetune'", "run_mode: 'tune'", r"run_mode: must be one of finetune, train, eval, predict"),
    ('compute_dtype: "float16"', 'compute_dtype: "float8"', r"model\.model_config\.compute_dtype: unknown dtype"),
    ("    hidden_size: 4096", "    hidden_size: big", r"model\.model_config\.hidden_size: must be an integer"),
    ("      lora_dropout: 0.05", "      lora_dropout: 2", r"model\.model_config\.pet_config\.lora_dropout: must be in"),
    ("runner_config:\n", "runner_config: 5\nx:\n", r"runner_config: must be a mapping"),
])
def test_wrong_values_name_their_path(tmp_path, old, new, message):
    path = seed_with(tmp_path, old, new)
    with pytest.raises(ConfigError, match=message) as e:
        load_config(path)
    assert str(e.value).startswith(path + ":")


def test_an_override_error_says_it_came_from_the_command_line():
    with pytest.raises(ConfigError, match=r"^runner_config\.batch_size: must be an integer, got 'two' "
                                          r"\(value set on the command line\)$"):
        load_config(str(SEED_YAML), ["runner_config.batch_size=two"])


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "missing.yaml"))
    bad = write(tmp_path, "runner_config:\n  epochs: [1\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(bad)}:\d+: invalid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n", "list.yaml"))


# ---- other MindFormers spellings and the native form ----------------------------------------------


def test_newer_mindformers_yaml_still_loads(tmp_path):
    """Keys of later MindFormers versions (and ones nobody knows yet) are ignored, not errors."""
    path = write(tmp_path, """
        seed: 42
        output_dir: './output'
        load_checkpoint: '/models/Qwen2.5-7B'
        load_ckpt_format: 'safetensors'
        use_legacy: False
        remove_redundancy: True
        some_future_option: 3
        run_mode: 'finetune'
        trainer: {type: CausalLanguageModelingTrainer, model_name: 'qwen2_5_7b'}
        runner_config: {epochs: 1, batch_size: 1, sink_mode: True, sink_size: 1, gradient_accumulation_steps: 8}
        optimizer: {type: AdamW, betas: [0.9, 0.95], eps: 1.e-8, weight_decay: 0.01}
        lr_schedule: {type: ConstantWarmUpLR, learning_rate: 1e-6, warmup_steps: 10, total_steps: -1}
        train_dataset:
          data_loader: {type: CommonDataLoader, path: '/data/packed', shuffle: True, load_func: 'load_from_disk'}
          input_columns: ["input_ids", "labels", "loss_mask", "position_ids"]
          dynamic_batch: True
          divisor: 32
          remainder: 1
        processor:
          tokenizer: {type: Qwen2Tokenizer, vocab_file: '/models/vocab.json', merges_file: '/models/merges.txt'}
        parallel_config: {data_parallel: 2, model_parallel: 1, pipeline_stage: 1, context_parallel: 1}
        callbacks:
          - {type: MFLossMonitor}
          - {type: CheckpointMonitor, prefix: qwen, save_checkpoint_steps: 500, keep_checkpoint_max: 3,
             checkpoint_format: safetensors, save_optimizer: True}
        context: {mode: 0, device_target: Ascend, jit_config: {jit_level: O1}}
        model:
          model_config:
            type: LlamaConfig
            seq_length: 8192
            compute_dtype: bf16
            param_init_type: float32
            qkv_concat: False
            block_size: 16
            num_blocks: 1024
            is_dynamic: True
            scaling_factor: 1.0
            rope_theta: 1000000.0
        runner_wrapper:
          type: MFTrainOneStepCell
          scale_sense: {type: DynamicLossScaleUpdateCell, loss_scale_value: 65536}
          use_clip_grad: True
          max_grad_norm: 0.5
    """)
    cfg = load_config(path)
    assert cfg.optimizer.type == "AdamW" and (cfg.optimizer.beta1, cfg.optimizer.beta2, cfg.optimizer.weight_decay) == (0.9, 0.95, 0.01)
    assert cfg.schedule.type == "ConstantWarmUpLR" and cfg.schedule.learning_rate == 1e-6 and cfg.schedule.warmup_steps == 10
    assert cfg.schedule.warmup_ratio is None and cfg.runner.gradient_accumulation_steps == 8
    assert cfg.data.train_dataset_dir == "/data/packed" and cfg.data.tokenizer == "/models/vocab.json"
    assert cfg.checkpoint.save_checkpoint_steps == 500 and cfg.checkpoint.keep_checkpoint_max == 3 and cfg.optimizer.max_grad_norm == 0.5
    assert cfg.model.compute_dtype == "bfloat16" and cfg.model.model_config["compute_dtype"] == "bfloat16"
    assert cfg.model.seq_length == 8192 and cfg.model.pet_config is None and cfg.parallel.data_parallel == 2
    for key in ("load_ckpt_format", "use_legacy", "remove_redundancy", "some_future_option",
                "train_dataset.dynamic_batch", "train_dataset.data_loader.load_func", "processor.tokenizer.merges_file",
                "callbacks.CheckpointMonitor.checkpoint_format", "model.model_config.qkv_concat"):
        assert key in cfg.ignored_keys, key


def test_warmup_ratio_wins_over_warmup_steps_as_in_mindformers():
    cfg = load_config(str(SEED_YAML), ["lr_schedule.warmup_steps=10"])
    assert cfg.schedule.warmup_ratio == 0.03 and cfg.schedule.warmup_steps is None
    cfg = load_config(str(SEED_YAML), ["lr_schedule.warmup_steps=10", "lr_schedule.warmup_ratio=null"])
    assert cfg.schedule.warmup_ratio is None and cfg.schedule.warmup_steps == 10


def test_native_form(tmp_path):
    path = write(tmp_path, """
        run_mode: train
        load_checkpoint: ''
        train_dataset_dir: data/train.jsonl
        eval_dataset_dir: data/eval.jsonl
        tokenizer: tok/
        template: alpaca
        packing: True
        drop_long: True
        max_steps: 30
        save_merged: True
        save_checkpoint_steps: 10
        keep_checkpoint_max: 1
        eval_generation: True
        max_new_tokens: 64
        parallel_strategy: FSDP
        adapter: out/adapter
        runner_config: {batch_size: 8}
        lr_schedule: {type: linear, learning_rate: "5e-4", warmup_steps: 3}
        model:
          model_config: {hidden_size: 64, num_layers: 2, num_heads: 4, vocab_size: 512, seq_length: 128}
    """)
    cfg = load_config(path)
    assert cfg.ignored_keys == []
    assert (cfg.run_mode, cfg.data.train_dataset_dir, cfg.data.eval_dataset_dir, cfg.data.tokenizer, cfg.adapter) == \
        ("train", "data/train.jsonl", "data/eval.jsonl", "tok/", "out/adapter")
    assert (cfg.data.template, cfg.data.packing, cfg.data.drop_long, cfg.runner.max_steps, cfg.checkpoint.save_merged) == ("alpaca", True, True, 30, True)
    assert (cfg.checkpoint.save_checkpoint_steps, cfg.checkpoint.keep_checkpoint_max) == (10, 1)
    assert (cfg.eval.eval_generation, cfg.eval.max_new_tokens, cfg.parallel.parallel_strategy) == (True, 64, "fsdp")
    assert (cfg.schedule.type, cfg.schedule.learning_rate, cfg.schedule.warmup_steps) == ("linear", 5e-4, 3)
    assert cfg.model.seq_length == 128 and LlamaConfig.from_mindformers(cfg.model.model_config).num_layers == 2
    with pytest.raises(ConfigError, match="parallel_strategy: must be one of ddp, fsdp"):
        load_config(path, ["parallel_strategy=zero3"])
    with pytest.raises(ConfigError, match="template: must be one of"):
        load_config(path, ["template=vicuna"])


# ---- shipped configs, resolved dump, docs ---------------------------------------------------------


def test_smollm2_config():
    """The demo config loads with nothing ignored, and each value lands in its RunConfig field."""
    import yaml

    raw = yaml.safe_load(SMOLLM2_YAML.read_text())
    cfg = load_config(str(SMOLLM2_YAML))
    assert cfg.ignored_keys == []
    assert cfg.load_checkpoint == "smollm2-135m-instruct" and cfg.data.template == "chat" and cfg.data.packing is True
    runner, mc = raw["runner_config"], raw["model"]["model_config"]
    assert (cfg.model.seq_length, cfg.runner.batch_size, cfg.runner.gradient_accumulation_steps, cfg.runner.epochs) == (
        mc["seq_length"], runner["batch_size"], runner["gradient_accumulation_steps"], runner["epochs"])
    sched = raw["lr_schedule"]
    assert (cfg.schedule.learning_rate, cfg.schedule.type, cfg.schedule.warmup_ratio) == (
        float(sched["learning_rate"]), sched["type"], sched["warmup_ratio"])
    assert (cfg.model.compute_dtype, cfg.model.param_init_type) == (mc["compute_dtype"], mc["param_init_type"])
    monitor = next(c for c in raw["callbacks"] if c["type"] == "CheckpointMonitor")
    assert (cfg.checkpoint.save_checkpoint_steps, cfg.checkpoint.keep_checkpoint_max) == (
        monitor["save_checkpoint_steps"], monitor["keep_checkpoint_max"])
    assert (cfg.eval.do_eval, cfg.eval.eval_step_interval, cfg.checkpoint.save_merged) == (True, raw["eval_step_interval"], True)
    assert cfg.output_dir == "./output/smollm2_lora"
    assert (cfg.data.train_dataset_dir, cfg.data.eval_dataset_dir) == ("demo/data/train.json", "demo/data/eval.json")
    pet = PetConfig.from_dict(cfg.model.pet_config)
    assert (pet.lora_rank, pet.lora_alpha, pet.lora_dropout) == (
        mc["pet_config"]["lora_rank"], mc["pet_config"]["lora_alpha"], mc["pet_config"]["lora_dropout"])
    assert pet.target_modules == mc["pet_config"]["target_modules"]


@pytest.mark.parametrize("source", [SEED_YAML, SMOLLM2_YAML])
def test_resolved_yaml_reloads_to_the_same_config(tmp_path, source):
    cfg = load_config(str(source), ["runner_config.batch_size=3"], {"seed": 5, "train_dataset_dir": "/d"})
    text = resolved_yaml(cfg)
    assert text.startswith("# petformers resolved config")
    again = load_config(write(tmp_path, text, "resolved_config.yaml"))
    assert comparable(again) == comparable(cfg)
    assert again.ignored_keys == [k for k in cfg.ignored_keys if k.startswith("model.model_config.")]


def test_docs_cover_every_key():
    docs = (ROOT / "docs" / "config.md").read_text(encoding="utf-8")
    for name, paths in PATHS.items():
        leaf = paths[0].rsplit(".", 1)[-1]
        assert f"`{paths[0]}`" in docs or f"| `{leaf}` |" in docs, name


def test_docs_key_tables_are_the_schemas():
    """docs/config.md's key tables are generated from the schema: a key added, renamed or re-documented in
    petformers/config/ without `python -m petformers.config.docs` fails here."""
    from petformers.config import docs

    text = (ROOT / "docs" / "config.md").read_text(encoding="utf-8")
    assert docs.current(text), "docs/config.md lost its generated-keys markers"
    assert docs.current(text) == docs.render()
    for name in PATHS:  # every key has its own line, with a meaning
        assert re.search(rf"^\| `{re.escape(PATHS[name][0])}` \| [^|]+ \|[^|]*\| \S", text, re.M), name


def test_every_ignored_key_has_a_reason_and_no_honoured_key_is_ignored():
    from petformers.config.mindformers import IGNORED, ignored_reason

    honoured = {p for paths in PATHS.values() for p in paths}
    assert not honoured & set(IGNORED)
    cfg = load_config(str(SEED_YAML))
    for key in cfg.ignored_keys:
        assert ignored_reason(key), key
    assert "MindSpore" in ignored_reason("context") and "profiler" in ignored_reason("profile")
    assert "newer MindFormers" in ignored_reason("some_future_option")


def test_the_run_log_names_each_ignored_key_with_its_reason(capsys):
    from petformers.cli.main import main

    assert main(["run", "--config", str(SEED_YAML), "--dry_run", "context.device_id=3", "some_future_option=1",
                 "model.model_config.param_init_type=float16"]) == 0
    err = capsys.readouterr().err
    runtime = next(line for line in err.splitlines() if "with no PyTorch meaning" in line)
    assert re.search(r"\bcontext\b", runtime) and "parallel" in runtime
    assert re.search(r"\bsome_future_option: not a key petformers knows", err)
    # keys petformers accepts but does not act on are named too, with why
    assert re.search(r"model\.model_config\.param_init_type.*: adapters are always float32", err)
    assert re.search(r"auto_trans_ckpt.*: petformers always reshards", err)  # the seed sets it False
    # a value that is what petformers does anyway is not reported as ignored
    assert main(["run", "--config", str(SEED_YAML), "--dry_run", "auto_trans_ckpt=True"]) == 0
    err = capsys.readouterr().err
    for key in ("model.model_config.param_init_type", "auto_trans_ckpt", "train_dataset.drop_remainder"):
        assert key not in err, key
    assert re.search(r"\bcontext\b", err)
