"""`petformers download NAME`: fetch a known model into the cache and print its path."""

from __future__ import annotations


def register(subparsers):
    from petformers.checkpoint.download import KNOWN_MODELS

    p = subparsers.add_parser("download", help="download a known model into the cache",
                              description="Download a known model into $PETFORMERS_HOME (default ~/.cache/petformers).")
    p.add_argument("name", choices=sorted(KNOWN_MODELS), help="model name")
    p.set_defaults(func=run)


def run(args):
    from petformers.checkpoint.download import download

    print(download(args.name))
    return 0
