"""Paths read from a file (an index's shard names, MindRecord shard lists, adapter names) stay inside
the directory of that file: a hostile or broken file must not make petformers read or write elsewhere."""

from __future__ import annotations

from pathlib import Path

from petformers.errors import PetformersError


def inside(base: str | Path, name, source: str | Path, key: str,
           error: type[PetformersError] = PetformersError) -> Path:
    """`base / name`, refused (naming `source` and `key`) when `name` is not a plain relative path that
    stays inside `base` after resolving `..` and symlinks."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise error(f"{source}: {key}: expected a file name, got {name!r}")
    if Path(name).is_absolute():
        raise error(f"{source}: {key}: {name!r} is an absolute path; only names inside {base} are allowed")
    root = Path(base).resolve()
    path = (root / name).resolve()
    if path != root and root not in path.parents:
        raise error(f"{source}: {key}: {name!r} leaves the directory {base}")
    return Path(base) / name
