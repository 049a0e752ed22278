"""Atomic writes: a file appears whole or not at all, so a kill at any moment leaves the last good one.

The one helper every petformers writer uses: write to `NAME.tmp` beside the target, flush, fsync, then
rename over it (a rename within a directory is atomic on POSIX). Temp files keep the `.tmp` suffix that
directory listings (the report, the board) skip. Writers of several files (a training checkpoint, a
prepared dataset) write them into a temp directory with `synced` and rename the directory.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator


def temp_path(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


@contextmanager
def replacing(path) -> Iterator[Path]:
    """A temp path to write `path`'s new content to (for libraries that write by path, like safetensors);
    on success it is fsynced and renamed over `path`, on an error removed."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def synced(path, mode: str = "w") -> Iterator[IO]:
    """`open(path, mode)` whose content is flushed and fsynced before it is closed (no rename: for files
    inside a temp directory that is renamed as a whole)."""
    kwargs = {} if "b" in mode else {"encoding": "utf-8", "newline": "\n"}
    with open(path, mode, **kwargs) as fh:
        yield fh
        fh.flush()
        os.fsync(fh.fileno())


@contextmanager
def atomic_open(path, mode: str = "w") -> Iterator[IO]:
    """A file handle whose content replaces `path` atomically when the block ends without an error."""
    with replacing(path) as tmp, synced(tmp, mode) as fh:
        yield fh


def write_bytes(path, data: bytes):
    with atomic_open(path, "wb") as fh:
        fh.write(data)


def write_text(path, text: str):
    with atomic_open(path) as fh:
        fh.write(text)


def write_json(path, obj, indent: int | None = 2):
    """`obj` as UTF-8 JSON (non-ASCII kept as is)."""
    write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False))


def fsync_file(path):
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def fsync_dir(path):
    """Make a directory's entries (renames, new files) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
