"""`petformers` command: one subcommand per module in this package, each with `register(subparsers)`.

Every user mistake (a `PetformersError`) ends as one line on stderr and exit code 2; logs go to
stderr so that stdout carries only results (generated text, JSON).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from petformers.errors import PetformersError

# Subcommand modules, in the order `--help` lists them.
SUBCOMMANDS = ["download", "predict", "chat", "run", "data", "export", "convert", "ckpt", "report"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="petformers",
        description="Parameter-efficient fine-tuning (LoRA) of Llama-family models on PyTorch, "
                    "MindFormers-compatible.")
    from petformers import __version__
    parser.add_argument("--version", action="version", version=f"petformers {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"petformers.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"petformers.cli.{name}":
                continue  # subcommand not built yet
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        return int(args.func(args) or 0)
    except PetformersError as e:
        print(f"petformers: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("petformers: interrupted", file=sys.stderr)
        return 130
