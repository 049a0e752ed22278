"""A prepared dataset: four int32 `.npy` arrays [rows, seq_length] and `meta.json`, in one directory.

Plain numpy files, memory-mapped when read, so any tool reads them without petformers:
`np.load("input_ids.npy", mmap_mode="r")`. The row layout is described in `packing.py`;
`meta.json` records how the rows were made (tokenizer fingerprint, template, seq_length, packing,
pad id, counts, the source file and its sha256).

A directory is written next to its final place and renamed into it, so a reader never sees a
half-written dataset.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from petformers.atomic import synced
from petformers.errors import DataError

COLUMNS = ("input_ids", "targets", "position_ids", "segment_ids")
FORMAT = "petformers-dataset"
FORMAT_VERSION = 1


class InMemoryDataset(Dataset):
    """Rows held as numpy arrays; `ds[i]` is a dict of the four int32 arrays of row i."""

    def __init__(self, arrays: dict, meta: dict):
        missing = [c for c in COLUMNS if c not in arrays]
        if missing:
            raise DataError(f"dataset: missing column(s) {', '.join(missing)}")
        shapes = {c: tuple(arrays[c].shape) for c in COLUMNS}
        if len(set(shapes.values())) != 1 or len(shapes["input_ids"]) != 2:
            raise DataError(f"dataset: the columns' shapes differ or are not [rows, seq_length]: {shapes}")
        self.arrays = {c: arrays[c] for c in COLUMNS}
        self.meta = meta

    def __len__(self) -> int:
        return self.arrays["input_ids"].shape[0]

    def __getitem__(self, i: int) -> dict:
        return {c: np.array(self.arrays[c][i]) for c in COLUMNS}  # a copy: mmaps are read-only

    @property
    def packing(self) -> bool:
        return bool(self.meta.get("packing", False))

    @property
    def pad_id(self) -> int:
        """The id the rows are padded with (the tokenizer's, recorded in meta.json)."""
        return int(self.meta.get("pad_id") or 0)

    @property
    def seq_length(self) -> int:
        return self.arrays["input_ids"].shape[1]


class PreparedDataset(InMemoryDataset):
    """A prepared dataset directory, memory-mapped (nothing is read until a row is asked for)."""

    def __init__(self, path):
        self.path = Path(path)
        meta = read_meta(self.path)
        arrays = {}
        for c in COLUMNS:
            file = self.path / f"{c}.npy"
            try:
                arrays[c] = np.load(file, mmap_mode="r", allow_pickle=False)
            except FileNotFoundError:
                raise DataError(f"{file}: missing; prepare the dataset again") from None
            except ValueError as e:
                raise DataError(f"{file}: not a readable .npy array ({e})") from None
        super().__init__(arrays, meta)
        expected = (meta.get("counts", {}).get("rows"), meta.get("seq_length"))
        if self.arrays["input_ids"].shape != expected:
            raise DataError(f"{self.path}: arrays are {self.arrays['input_ids'].shape} but meta.json says "
                            f"[rows, seq_length] = {list(expected)}; prepare the dataset again")

    def __reduce__(self):
        # DataLoader workers started by spawn get the path and map the files again, not a copy of them.
        return (PreparedDataset, (self.path,))


def is_prepared(path) -> bool:
    return (Path(path) / "meta.json").is_file() and (Path(path) / "input_ids.npy").is_file()


def read_meta(path: Path) -> dict:
    file = Path(path) / "meta.json"
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: not a prepared dataset (no meta.json); run `petformers data prepare`") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{file}:{e.lineno}: invalid JSON ({e.msg})") from None
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{file}: format {meta.get('format')!r} version {meta.get('format_version')!r} is not "
                        f"{FORMAT!r} version {FORMAT_VERSION}; prepare the dataset again")
    return meta


def check_tokenizer(meta: dict, tokenizer, source) -> None:
    """DataError unless the dataset was tokenized by this tokenizer (same vocabulary and specials)."""
    expected, actual = meta.get("tokenizer_fingerprint"), tokenizer.fingerprint()
    if expected != actual:
        raise DataError(f"{source}: prepared with another tokenizer (fingerprint {expected}, from "
                        f"{meta.get('tokenizer_source') or '?'}) than the model's ({actual}, from "
                        f"{tokenizer.source or '?'}); prepare it again with the model's tokenizer")


def allocate(n_rows: int, seq_length: int, directory: Path | None = None) -> dict:
    """Four int32 [n_rows, seq_length] arrays: in memory, or as .npy files in `directory`."""
    if directory is None:
        return {c: np.empty((n_rows, seq_length), np.int32) for c in COLUMNS}
    return {c: np.lib.format.open_memmap(directory / f"{c}.npy", mode="w+", dtype=np.int32,
                                         shape=(n_rows, seq_length)) for c in COLUMNS}


def temp_dir_for(out_dir: Path) -> Path:
    """An empty directory beside `out_dir` (same filesystem, so the final rename is atomic)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not is_prepared(out_dir) and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise DataError(f"{out_dir}: exists and is not a prepared dataset; refusing to overwrite it "
                        "(choose another --output_dir)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def commit(tmp: Path, arrays: dict, meta: dict, out_dir: Path) -> None:
    """Flush the arrays, write meta.json, and move `tmp` to `out_dir` (replacing an older dataset)."""
    for a in arrays.values():
        if isinstance(a, np.memmap):
            a.flush()
    with synced(tmp / "meta.json") as fh:
        fh.write(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    out_dir = Path(out_dir)
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
