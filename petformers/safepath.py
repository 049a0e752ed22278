"""Paths read from a file (an index's shard names, MindRecord shard lists, a checkpoint manifest's
entries) stay inside the directory of that file: a hostile or broken file must not make petformers read
or write elsewhere. Paths the user types (--output_dir, export --output) are the user's own choice,
relative to the working directory, and are not confined."""

from __future__ import annotations

import os
from pathlib import Path

from petformers.errors import PetformersError

NAME_MAX, PATH_MAX = 255, 4096  # Linux limits: a longer name fails at open() with ENAMETOOLONG


def shown(name) -> str:
    """A name from a file as it can appear in a one-line message: itself when short and printable, else
    its repr cut to 80 characters (no newline, NUL or megabyte name reaches the terminal)."""
    return name if isinstance(name, str) and name.isprintable() and len(name) <= 80 else f"{name!r:.80}"


def inside(base: str | Path, name, source: str | Path, key: str,
           error: type[PetformersError] = PetformersError) -> Path:
    """`base / name`, refused (naming `source` and `key`) when `name` is not a plain relative path to a
    file that stays inside `base` after resolving `..` and symlinks (the directory itself, an empty or
    NUL-bearing name, a symlink loop and a name the file system cannot hold are refused too)."""
    shown_name = f"{name!r:.80}"
    if not isinstance(name, str) or not name or "\x00" in name:
        raise error(f"{source}: {key}: expected a file name, got {shown_name}")
    if Path(name).is_absolute():
        raise error(f"{source}: {key}: {shown_name} is an absolute path; only names inside {base} are allowed")
    encoded = name.encode("utf-8", "surrogatepass")
    if len(encoded) > PATH_MAX or any(len(part) > NAME_MAX for part in encoded.split(b"/")):
        raise error(f"{source}: {key}: {shown_name} is longer than a file name can be")
    root = Path(base).resolve()
    try:
        path = (root / name).resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop (RuntimeError before Python 3.13)
        raise error(f"{source}: {key}: {shown_name} cannot be resolved ({e})") from None
    if root not in path.parents:
        what = "is the directory itself, not a file in it" if path == root else f"leaves the directory {base}"
        raise error(f"{source}: {key}: {shown_name} {what}")
    return Path(base) / name
