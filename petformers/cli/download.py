"""`petformers download NAME`: fetch a known model into the cache and print its path."""

from __future__ import annotations

from petformers.checkpoint.download import download, KNOWN_MODELS


def register(subparsers):
    p = subparsers.add_parser("download", help="download a known model into the cache",
                              description="Download a known model into $PETFORMERS_HOME (default ~/.cache/petformers).")
    p.add_argument("name", choices=sorted(KNOWN_MODELS), help="model name")
    p.set_defaults(func=run)


def run(args):
    print(download(args.name))
    return 0
