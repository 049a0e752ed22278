"""`petformers run --config X.yaml ...`: MindFormers' run_mindformer.py, on PyTorch.

Flags override the YAML as in run_mindformer.py; trailing `key.path=value` pairs override any key.
Also runs as `python -m petformers run` and `torchrun -m petformers run` (with --use_parallel True).
"""

from __future__ import annotations

import argparse

from petformers.config.load import load_run_config, not_acted_on, resolved_yaml
from petformers.config.mindformers import ignored_reason
from petformers.train.run import run as run_job


def _bool(value: str) -> bool:
    low = str(value).strip().lower()
    if low in ("true", "1", "yes", "y"):
        return True
    if low in ("false", "0", "no", "n", ""):
        return False

    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


def register(subparsers):
    p = subparsers.add_parser("run", help="fine-tune / train / evaluate / predict from a (MindFormers) YAML config",
                              description="Run a job from a YAML config (MindFormers' own configs load as is).")
    p.add_argument("--config", required=False, help="YAML config (MindFormers or native)")
    p.add_argument("--run_mode", choices=["finetune", "train", "eval", "predict"])
    p.add_argument("--train_dataset_dir", help="prepared dataset dir, MindRecord, or raw Alpaca/conversation file")
    p.add_argument("--eval_dataset_dir", help="evaluation dataset (same formats)")
    p.add_argument("--load_checkpoint", help="base weights: HF dir, .gguf, Meta dir, MindSpore .ckpt, or a known name")
    p.add_argument("--adapter", help="PEFT adapter dir to start from / evaluate")
    p.add_argument("--output_dir")
    p.add_argument("--resume_training", type=_bool, nargs="?", const=True, default=None,
                   help="continue from the newest complete checkpoint in output_dir/checkpoint")
    p.add_argument("--auto_trans_ckpt", type=_bool, nargs="?", const=True, default=None,
                   help="accepted for MindFormers users: checkpoints reshard between world sizes automatically")
    p.add_argument("--use_parallel", type=_bool, nargs="?", const=True, default=None,
                   help="data parallel under torchrun")
    p.add_argument("--do_eval", type=_bool, nargs="?", const=True, default=None)
    p.add_argument("--seed", type=int)
    p.add_argument("--tensorboard_dir", help="write TensorBoard event files here (tensorboard.tensorboard_dir)")
    p.add_argument("--predict_data", help="run_mode predict: a prompt or a file of prompts")
    p.add_argument("--enable_thinking", type=_bool, default=None, metavar="{true,false}",
                   help="chat templates with a thinking switch (Qwen3): false renders every prompt of the run as "
                        "apply_chat_template(enable_thinking=False) does")
    p.add_argument("--dry_run", action="store_true",
                   help="resolve the config, build the model on the meta device and print sizes; loads no weights")
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="override any YAML key")
    p.set_defaults(func=run)


def run(args):
    cli = {k: getattr(args, k) for k in ("run_mode", "train_dataset_dir", "eval_dataset_dir", "load_checkpoint",
                                         "output_dir", "resume_training", "auto_trans_ckpt", "use_parallel",
                                         "do_eval", "seed", "adapter", "predict_data", "tensorboard_dir",
                                         "enable_thinking")}
    cfg = load_run_config(args.config, args.overrides, cli)
    ignored = {key: ignored_reason(key) for key in cfg.ignored_keys} | not_acted_on(cfg)
    summary = run_job(cfg, dry=args.dry_run, resolved=resolved_yaml(cfg), ignored=ignored)
    return 0 if summary is not None else 1
