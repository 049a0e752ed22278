"""`petformers predict`: generate answers for one prompt, a file of prompts, or a JSON list (run_mode predict)."""

from __future__ import annotations

import json
import sys

import torch

from petformers.cli.common import add_generation_args, add_model_args, generation_config, load_model
from petformers.errors import DataError
from petformers.generate import StreamPrinter, generate
from petformers.inference import RAW, answer, encode_prompt, read_prompts


def register(subparsers):
    p = subparsers.add_parser("predict", help="generate text with a model (and adapter)",
                              description="Generate text. Only the generated text goes to stdout.")
    add_model_args(p)
    p.add_argument("--predict_data", required=True,
                   help="a prompt, or a file with one prompt per line, or a .json file with a list of prompts")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    p.add_argument("--system", default=None, help="system message for --chat")
    p.add_argument("--batch_size", type=int, default=8, help="prompts generated together (left padded)")
    add_generation_args(p)
    p.set_defaults(func=run)


def run(args):
    prompts = read_prompts(args.predict_data)
    model, tokenizer = load_model(args)
    cfg = generation_config(args)
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(args.seed)
    system = [{"role": "system", "content": args.system}] if args.system and args.chat else []
    encoded = [encode_prompt([*system, {"role": "user", "content": p}], "chat" if args.chat else RAW, tokenizer)
               for p in prompts]
    for i, ids in enumerate(encoded):
        if not ids:
            raise DataError(f"--predict_data {args.predict_data[:80]!r}: prompt {i + 1} is empty "
                            "(no tokens to continue from)")
    if len(encoded) == 1:
        def write(text):
            sys.stdout.write(text)
            sys.stdout.flush()
        printer = StreamPrinter(tokenizer, write)
        generate(model, encoded, cfg, tokenizer.eos_ids, tokenizer.pad_id, generator, printer)
        printer.finish()
        sys.stdout.write("\n")
        return 0
    for text in answer(model, tokenizer, encoded, cfg, args.batch_size, generator):
        print(json.dumps({"answer": text}, ensure_ascii=False))
    return 0
