"""`petformers data convert|prepare`: instruction data -> conversations -> tokenized training rows.

convert: Alpaca JSON/JSONL (or ShareGPT / OpenAI messages) -> conversation JSONL, with Stanford
Alpaca's prompt wording as MindFormers' alpaca_converter writes it.
prepare: a conversation (or Alpaca, messages) file -> a directory of .npy rows + meta.json; raw
text (a .txt file, or records with a `text` field) is joined and cut into rows for run_mode train.
The summary goes to stderr; stdout carries only the path written.
"""

from __future__ import annotations

import sys
import time

from petformers.checkpoint.load import load_tokenizer
from petformers.data.formats import convert, is_text_file
from petformers.data.prepare import prepare, prepare_text
from petformers.data.templates import TEMPLATES

from petformers.cli.common import add_chat_template_args, apply_chat_template_args


def register(subparsers):
    p = subparsers.add_parser("data", help="convert and tokenize datasets",
                              description="Convert instruction data to conversations and tokenize it for training.")
    sub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    c = sub.add_parser("convert", help="Alpaca / ShareGPT / messages -> conversation JSONL",
                       description="Write conversation JSONL ({id, conversations: [{from, value}]}); Alpaca "
                                   "records get Stanford Alpaca's prompt, as MindFormers' alpaca_converter.")
    c.add_argument("--input", required=True, help="Alpaca JSON/JSONL, ShareGPT JSONL or OpenAI messages JSONL")
    c.add_argument("--output", required=True, help="conversation JSONL to write")
    c.add_argument("--skip_invalid", action="store_true", help="skip (and list) bad records instead of stopping")
    c.set_defaults(func=run_convert)

    r = sub.add_parser("prepare", help="tokenize a dataset into training rows",
                       description="Tokenize with the prompt masked out of the loss, pad or pack rows of "
                                   "seq_length tokens, and write them as .npy arrays with meta.json.")
    r.add_argument("--input", required=True, help="conversation/Alpaca/messages file, or raw text (.txt or "
                                                  "JSONL with a 'text' field) for run_mode train")
    r.add_argument("--tokenizer", required=True,
                   help="HF model/tokenizer dir, .gguf file, tokenizer.model, or a known name (smollm2-135m-instruct)")
    r.add_argument("--seq_length", type=int, required=True, help="tokens per row")
    r.add_argument("--template", choices=TEMPLATES, default="fastchat",
                   help="fastchat: Vicuna v1.1 (MindFormers' default); alpaca: plain Alpaca prompt; "
                        "chat: the tokenizer's own chat template (instruct models)")
    add_chat_template_args(r)
    r.add_argument("--packing", action="store_true", help="put several samples in a row (attention never "
                                                           "crosses samples)")
    r.add_argument("--no_shared_prefix", dest="shared_prefix", action="store_false",
                   help="with --packing: repeat the samples' common prefix in every sample instead of writing it "
                        "once per row")
    r.add_argument("--drop_long", action="store_true", help="drop samples longer than seq_length instead of "
                                                             "truncating them")
    r.add_argument("--skip_invalid", action="store_true", help="skip (and list) bad records instead of stopping")
    r.add_argument("--output_dir", required=True, help="directory to write (replaced if it holds a prepared dataset)")
    r.add_argument("--no_progress", action="store_true", help="no progress bar")
    r.set_defaults(func=run_prepare)


def run_convert(args):
    written, skipped, fmt = convert(args.input, args.output, args.skip_invalid)
    print(f"petformers: {written:,} {fmt} records -> {args.output}; skipped {len(skipped):,}", file=sys.stderr)
    for line in skipped[:20]:
        print(f"  skipped {line}", file=sys.stderr)
    if len(skipped) > 20:
        print(f"  ... and {len(skipped) - 20:,} more", file=sys.stderr)
    print(args.output)
    return 0


def run_prepare(args):
    start = time.perf_counter()
    tokenizer = load_tokenizer(args.tokenizer)
    apply_chat_template_args(tokenizer, args)
    progress = not args.no_progress
    if is_text_file(args.input):
        print(f"petformers: {args.input} is raw text: joining documents with eos into rows (run_mode train)",
              file=sys.stderr)
        _, summary = prepare_text(args.input, tokenizer, args.seq_length, output_dir=args.output_dir,
                                  skip_invalid=args.skip_invalid, progress=progress)
    else:
        _, summary = prepare(args.input, tokenizer, args.seq_length, template=args.template, packing=args.packing,
                             drop_long=args.drop_long, skip_invalid=args.skip_invalid, shared_prefix=args.shared_prefix,
                             output_dir=args.output_dir, progress=progress)
    print(summary.format(), file=sys.stderr)
    print(f"petformers: wrote {args.output_dir} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    print(args.output_dir)
    return 0
