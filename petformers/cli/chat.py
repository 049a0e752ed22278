"""`petformers chat`: an interactive terminal chat with streaming, for trying a fine-tuned model by hand."""

from __future__ import annotations

import sys

import torch

from petformers.cli.common import add_generation_args, add_model_args, generation_config, load_model
from petformers.generate import StreamPrinter, generate
from petformers.inference import encode_prompt

HELP = "Type a message; /reset clears the conversation, /exit (or Ctrl-D) quits."


def register(subparsers):
    p = subparsers.add_parser("chat", help="interactive chat with a model (and adapter)", description=HELP)
    add_model_args(p)
    p.add_argument("--system", default=None, help="system message")
    add_generation_args(p)
    p.set_defaults(func=run)


def run(args):
    model, tokenizer = load_model(args)
    cfg = generation_config(args)
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(args.seed)
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    print(HELP, file=sys.stderr)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            messages = list(system)
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        ids = encode_prompt(messages, "chat", tokenizer)
        sys.stdout.write("assistant> ")

        def write(text):
            sys.stdout.write(text)
            sys.stdout.flush()

        printer = StreamPrinter(tokenizer, write)
        generate(model, [ids], cfg, tokenizer.eos_ids, tokenizer.pad_id, generator, printer)
        printer.finish()
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": tokenizer.decode(printer.tokens)})
