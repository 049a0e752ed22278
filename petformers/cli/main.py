"""`petformers` command: one subcommand per module in this package, each with `register(subparsers)`.

Every user mistake (a `PetformersError`) ends as one line on stderr and exit code 2; logs go to
stderr so that stdout carries only results (generated text, JSON).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from petformers import __version__
from petformers.allocator import reexec_under_jemalloc
from petformers.distributed.leave import exit_process
from petformers.errors import PetformersError

# Subcommand modules, in the order `--help` lists them.
SUBCOMMANDS = ["download", "predict", "chat", "run", "data", "export", "convert", "ckpt", "report", "board"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="petformers",
        description="Parameter-efficient fine-tuning (LoRA) of Llama-family models on PyTorch, "
                    "MindFormers-compatible.")
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


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is now (tests and tqdm replace it), not the one seen at set-up."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


def setup_logging():
    logger = logging.getLogger("petformers")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def entry() -> int:
    """The `petformers` console script: main() in a process running on jemalloc where it is installed
    (petformers/allocator.py). main() itself never replaces the process it is called in."""
    reexec_under_jemalloc(sys.argv[1:])
    return exit_process(main())


def main(argv: list[str] | None = None) -> int:
    setup_logging()
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
