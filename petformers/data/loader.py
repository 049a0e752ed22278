"""Open whatever `--train_dataset_dir` points at as rows in the trainer's canonical format.

Accepted: a directory written by `petformers data prepare` (meta.json + .npy), a MindRecord file
(`.mindrecord`, `.mindrecord0`, ...), or a raw Alpaca / conversation / messages / text file, which
is prepared on the fly with the run config's template, seq_length and packing.
Every row is a dict of int arrays of length seq_length: input_ids, targets (shifted, -100 = not
trained), position_ids, segment_ids.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from petformers.data.dataset import check_tokenizer, PreparedDataset
from petformers.data.formats import is_text_file
from petformers.data.mindrecord import MindRecordDataset
from petformers.data.packing import IGNORE_INDEX
from petformers.data.prepare import prepare, prepare_text
from petformers.errors import DataError

_MINDRECORD = re.compile(r"\.mindrecord\d*$")


def dataset_kind(path) -> str:
    """"prepared" (a `petformers data prepare` directory), "mindrecord", or "raw" (needs a tokenizer)."""
    p = Path(path)
    if p.is_dir() and (p / "meta.json").exists():
        return "prepared"
    if _MINDRECORD.search(p.name) or (p.is_dir() and list(p.glob("*.mindrecord*"))):
        return "mindrecord"
    return "raw"


def open_dataset(path: str, tokenizer, seq_length: int, template: str, packing: bool, drop_long: bool = False,
                 run_mode: str = "finetune", pad_id: int = 0, progress: bool = True, shared_prefix: bool = False):
    """`pad_id`: the id a MindRecord's rows are padded with, masked from the loss as MindFormers does
    (train.setup.data_pad_id decides it). Every dataset returned tells its own `pad_id`. `shared_prefix`:
    raw data packed on the fly writes the samples' common prefix once per row (data/packing.py)."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{path}: dataset not found")
    kind = dataset_kind(p)
    if kind == "prepared":
        ds = PreparedDataset(p)
        if tokenizer is not None:
            check_tokenizer(ds.meta, tokenizer, str(p))
        return ds
    if kind == "mindrecord":
        file = p if p.is_file() else sorted(x for x in p.glob("*.mindrecord*") if not x.name.endswith(".db"))[0]
        return MindRecordDataset(str(file), pad_id=pad_id)
    if tokenizer is None:
        raise DataError(f"{path}: a raw dataset needs a tokenizer (the checkpoint has none; set processor.tokenizer)")

    if run_mode == "train" and is_text_file(p):
        ds, _ = prepare_text(str(p), tokenizer, seq_length)
        return ds

    ds, _ = prepare(str(p), tokenizer, seq_length, template=template, packing=packing, drop_long=drop_long,
                    progress=progress, shared_prefix=shared_prefix)
    return ds


def collate(rows: list[dict], pad_id: int, packed: bool, device) -> dict:
    """Stack rows into tensors, trimming columns that are padding in every row (pads sit at the end;
    `pad_id` is the dataset's own, `dataset.pad_id`).

    Unpacked rows need no segment ids: right padding never affects real tokens under causal attention.
    """
    arrays = {k: np.stack([r[k] for r in rows]) for k in ("input_ids", "targets", "position_ids", "segment_ids")}
    real = (arrays["targets"] != IGNORE_INDEX) | (arrays["input_ids"] != pad_id)
    cols = np.nonzero(real.any(axis=0))[0]
    width = int(cols[-1]) + 1 if len(cols) else 1
    batch = {k: torch.from_numpy(np.ascontiguousarray(v[:, :width]).astype(np.int64)).to(device)
             for k, v in arrays.items()}
    if not packed:
        batch["segment_ids"] = None
        batch["position_ids"] = None
    return batch
