"""`petformers convert`: MindSpore / MindFormers `.ckpt` <-> Hugging Face model directories and PEFT adapters.

    petformers convert --from mindspore X.ckpt --config YAML --to hf --output_dir OUT
    petformers convert --from hf DIR --to mindspore --output_dir OUT
    petformers convert --from peft ADAPTER_DIR --to mindspore --output_dir OUT
    petformers convert --from peft ADAPTER_DIR --to mindspore --output_dir OUT --merged \
        --load_checkpoint BASE.ckpt --config YAML

The conversions themselves live in petformers/checkpoint/convert.py.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from petformers.checkpoint.convert import hf_to_mindspore, mindspore_to_hf, peft_to_mindspore
from petformers.config.load import read_model_section
from petformers.errors import ConfigError
from petformers.models.config import parse_dtype


def register(subparsers):
    p = subparsers.add_parser(
        "convert", help="convert between MindSpore .ckpt, Hugging Face model directories and PEFT adapters",
        description="Convert a MindFormers Llama checkpoint (.ckpt file, directory or rank_N/ layout) to a Hugging "
                    "Face model directory, a Hugging Face Llama directory to a MindFormers .ckpt, or a PEFT "
                    "adapter to a MindFormers .ckpt (mindpet LoRA tensors, or merged into its base with --merged).")
    p.add_argument("source", help="the input: a .ckpt file / directory (--from mindspore), a Hugging Face "
                                  "model directory (--from hf) or a PEFT adapter directory (--from peft)")
    p.add_argument("--from", dest="src_format", required=True, choices=["mindspore", "hf", "peft"],
                   help="input format")
    p.add_argument("--to", dest="dst_format", required=True, choices=["hf", "mindspore"], help="output format")
    p.add_argument("--config", help="MindFormers YAML whose model.model_config describes the model "
                                    "(required with --from mindspore)")
    p.add_argument("--output_dir", required=True, help="where to write the converted model")
    p.add_argument("--dtype", default=None,
                   help="dtype of the written weights: float32, bfloat16 or float16 (default: as stored)")
    p.add_argument("--tokenizer", default=None,
                   help="with --to hf: a tokenizer (directory or tokenizer.model) to save beside the weights")
    p.add_argument("--merged", action="store_true",
                   help="with --from peft: write the base weights with the adapter merged in, not the adapter alone")
    p.add_argument("--load_checkpoint", "--base", dest="base", default=None,
                   help="with --from peft --merged: the base model (.ckpt with --config, or a Hugging Face "
                        "directory; default: the adapter's base_model_name_or_path)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    dtype = parse_dtype(args.dtype, "--dtype") if args.dtype else None
    pair = (args.src_format, args.dst_format)
    if pair == ("mindspore", "hf"):
        if not args.config:
            raise ConfigError("--config: converting a MindSpore checkpoint needs the MindFormers YAML whose "
                              "model.model_config describes the model")
        config, pet = read_model_section(args.config)
        out = mindspore_to_hf(Path(args.source), config, pet, Path(args.output_dir), dtype, args.tokenizer,
                              config_source=args.config)
    elif pair == ("hf", "mindspore"):
        out = hf_to_mindspore(Path(args.source), Path(args.output_dir), dtype)
    elif pair == ("peft", "mindspore"):
        base_config = read_model_section(args.config)[0] if args.config else None
        out = peft_to_mindspore(Path(args.source), Path(args.output_dir), dtype, args.merged, args.base, base_config)
    else:
        raise ConfigError(f"--from {args.src_format} --to {args.dst_format}: nothing to convert; "
                          "use --from mindspore --to hf, --from hf --to mindspore or --from peft --to mindspore")
    print(out)
    return 0
