"""`petformers predict`: generate answers for one prompt, a file of prompts, or a JSON list (run_mode predict)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from petformers.cli.common import add_generation_args, add_model_args, generation_config, load_model
from petformers.errors import DataError


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


def read_prompts(predict_data: str) -> list[str]:
    path = Path(predict_data)
    if len(predict_data) < 4096 and path.is_file():
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json":
            try:
                prompts = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
            if not isinstance(prompts, list) or not all(isinstance(x, str) for x in prompts):
                raise DataError(f"{path}: expected a JSON list of strings")
            return prompts
        return [line for line in text.splitlines() if line.strip()]
    return [predict_data]


def encode_prompt(tokenizer, prompt: str, chat: bool, system: str | None = None) -> list[int]:
    if chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        return tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    return tokenizer.encode(prompt, add_special_tokens=True)


def run(args):
    import torch

    from petformers.generate import StreamPrinter, generate

    prompts = read_prompts(args.predict_data)
    model, tokenizer = load_model(args)
    cfg = generation_config(args)
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(args.seed)
    encoded = [encode_prompt(tokenizer, p, args.chat, args.system) for p in prompts]
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
    for start in range(0, len(encoded), args.batch_size):
        outs = generate(model, encoded[start:start + args.batch_size], cfg, tokenizer.eos_ids, tokenizer.pad_id,
                        generator)
        for out in outs:
            print(json.dumps({"answer": tokenizer.decode(out)}, ensure_ascii=False))
    return 0
