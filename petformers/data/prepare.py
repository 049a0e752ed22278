"""Instruction data (or raw text) -> tokenized rows for training, with the prompt masked out.

`prepare` (finetune): read a file (formats.py), render every conversation with a template
(templates.py), tokenize all pieces in batches (`tokenizer.encode_batch`, Rust, parallel), then
truncate or drop long samples, place them in rows (packing.py) and write the rows (dataset.py),
all with vectorised numpy. `prepare_text` (run_mode train): documents joined with eos, cut into
rows of seq_length tokens.

A sample of n tokens fits a row iff n <= seq_length. A longer one is cut to its first seq_length
tokens (counted as truncated), or dropped with `drop_long`; a sample left with no trained target
(its prompt alone fills the row) is dropped. Both are counted, never silent.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import asdict, dataclass, field
from itertools import chain
from pathlib import Path

import numpy as np
from tqdm import tqdm

from petformers import __version__
from petformers.data import dataset as ds
from petformers.data.formats import RecordError, load_samples, load_texts
from petformers.data.packing import IGNORE_INDEX, common_prefix, fill_rows, place, shift_targets, strip_prefix
from petformers.data.templates import Template
from petformers.errors import DataError

BATCH = 2048  # samples per encode_batch call (bounds memory; one progress-bar step)


@dataclass
class Summary:
    """What preparation did; printed by the CLI and stored as meta.json's `counts` / `skipped`."""

    records: int = 0  # records read from the file (good and bad)
    samples: int = 0  # conversations (or text rows) placed in rows
    rows: int = 0
    tokens: int = 0  # real (non-padding) tokens in the rows
    trained_tokens: int = 0  # targets that are not -100
    truncated: int = 0  # samples cut to seq_length
    dropped: int = 0  # samples left out: too long with drop_long, or nothing to train within seq_length
    padding_fraction: float = 0.0  # padding / (rows * seq_length)
    shared_prefix_tokens: int = 0  # tokens every sample starts with, written once per row (packing.py)
    skipped: list[str] = field(default_factory=list)  # "file:line: key: reason" of each bad record

    def counts(self) -> dict:
        d = asdict(self)
        d["skipped"] = len(self.skipped)
        return d

    def format(self, max_skipped: int = 20) -> str:
        lines = [f"records {self.records:,}  samples {self.samples:,}  rows {self.rows:,}",
                 f"tokens {self.tokens:,}  trained tokens {self.trained_tokens:,}  "
                 f"padding {self.padding_fraction:.1%}"
                 + (f"  shared prefix {self.shared_prefix_tokens} tokens per row" if self.shared_prefix_tokens else ""),
                 f"truncated {self.truncated:,}  dropped {self.dropped:,}  skipped {len(self.skipped):,}"]
        lines += [f"  skipped {s}" for s in self.skipped[:max_skipped]]
        if len(self.skipped) > max_skipped:
            lines.append(f"  ... and {len(self.skipped) - max_skipped:,} more (all listed in meta.json)")
        return "\n".join(lines)


def has_dummy_prefix(tokenizer) -> bool:
    """True when the tokenizer writes a space before every text (SentencePiece's dummy prefix, '▁')."""
    ids = tokenizer.encode("a")
    return bool(ids) and tokenizer.id_to_token(ids[0]).startswith("▁")


def encode_samples(pieces: list[list], tokenizer, progress: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rendered samples -> (ids, labels, lengths): tokens of all samples end to end, int32.

    Each text piece is tokenized on its own. With a dummy-prefix tokenizer (SentencePiece), a
    piece that continues text and starts with a space drops that space: the prefix stands for it,
    so ` Making` after `ASSISTANT:` is `▁Making`, as in the whole round tokenized at once. (A
    piece that continues text without a space, as the alpaca template's answer after
    `### Response:`, still gets the prefix: one '▁' more than the whole text would have.)
    """
    dummy = has_dummy_prefix(tokenizer)
    ids_parts, label_parts, lengths = [], [], []
    bar = _progress(len(pieces), progress, "tokenize")
    for b in range(0, len(pieces), BATCH):
        batch = pieces[b:b + BATCH]
        texts = []
        for sample in batch:
            after_text = False
            for value, _ in sample:
                if isinstance(value, str):
                    texts.append(value[1:] if dummy and after_text and value.startswith(" ") else value)
                after_text = isinstance(value, str)
        encoded = iter(tokenizer.encode_batch(texts) if texts else [])
        piece_ids, piece_trained = [], []
        for sample in batch:
            n = 0
            for value, trained in sample:
                t = next(encoded) if isinstance(value, str) else value
                piece_ids.append(t)
                piece_trained.append(trained)
                n += len(t)
            lengths.append(n)
        piece_len = np.fromiter((len(t) for t in piece_ids), np.int64, len(piece_ids))
        ids = np.fromiter(chain.from_iterable(piece_ids), np.int32, int(piece_len.sum()))
        trained = np.repeat(np.array(piece_trained, bool), piece_len)
        ids_parts.append(ids)
        label_parts.append(np.where(trained, ids, IGNORE_INDEX).astype(np.int32))
        bar.update(len(batch))
    bar.close()
    return (np.concatenate(ids_parts) if ids_parts else np.zeros(0, np.int32),
            np.concatenate(label_parts) if label_parts else np.zeros(0, np.int32),
            np.array(lengths, np.int64))


def _progress(total: int, enabled: bool, desc: str):
    return tqdm(total=total, desc=desc, unit=" samples", file=sys.stderr, disable=not enabled,
                dynamic_ncols=True, leave=False)


def truncate(ids, labels, lengths, seq_length: int, drop_long: bool):
    """Cut (or drop) samples longer than seq_length, then drop samples with no target left.

    Returns (ids, targets, lengths, truncated, dropped); targets are shifted (packing.shift_targets).
    """
    n = len(lengths)
    too_long = lengths > seq_length
    new_len = np.minimum(lengths, seq_length)
    if too_long.any():
        if drop_long:
            new_len[too_long] = 0
        starts = np.cumsum(lengths) - lengths
        pos = np.arange(len(ids), dtype=np.int64) - np.repeat(starts, lengths)
        token_keep = pos < np.repeat(new_len, lengths)
        ids, labels = ids[token_keep], labels[token_keep]
    alive = new_len > 0
    kept = new_len[alive]
    targets = shift_targets(labels, kept)
    # A sample whose targets are all -100 teaches nothing: drop it too.
    has_target = np.logical_or.reduceat(targets != IGNORE_INDEX, np.cumsum(kept) - kept) if len(kept) else \
        np.zeros(0, bool)
    if not has_target.all():
        token_keep = np.repeat(has_target, kept)
        ids, targets, kept = ids[token_keep], targets[token_keep], kept[has_target]
    final = alive.copy()
    final[alive] = has_target
    truncated = int((too_long & final).sum())
    dropped = n - int(final.sum())
    return ids, targets, kept, truncated, dropped


def build(ids, targets, lengths, seq_length: int, packing: bool, pad_id: int, meta: dict, summary: Summary,
          output_dir=None, shared_prefix: bool = False):
    """Place the samples in rows, fill the four arrays, and return the dataset (written if output_dir).
    `shared_prefix` (with packing): the tokens all samples start with are written once per row."""
    prefix = None
    p = common_prefix(ids, targets, lengths) if packing and shared_prefix else 0
    if p:
        prefix = ids[:p].copy()
        ids, targets, lengths = strip_prefix(ids, targets, lengths, p)
    row, offset, n_rows = place(lengths, seq_length - p, packing)
    if n_rows == 0:
        raise DataError(f"{meta['source_file']}: nothing left to train on ({summary.dropped} samples dropped: "
                        f"each is longer than seq_length {seq_length} or has no answer within it)")
    summary.samples, summary.rows, summary.tokens = len(lengths), n_rows, int(lengths.sum()) + p * n_rows
    summary.shared_prefix_tokens = p
    meta["shared_prefix_tokens"] = p
    summary.trained_tokens = int((targets != IGNORE_INDEX).sum())
    summary.padding_fraction = 1.0 - summary.tokens / (n_rows * seq_length)
    meta["counts"] = summary.counts()
    meta["skipped"] = summary.skipped
    if output_dir is None:
        arrays = ds.allocate(n_rows, seq_length)
        fill_rows(arrays, ids, targets, lengths, row, offset, pad_id, prefix=prefix)
        return ds.InMemoryDataset(arrays, meta)
    output_dir = Path(output_dir)
    tmp = ds.temp_dir_for(output_dir)
    try:
        arrays = ds.allocate(n_rows, seq_length, tmp)
        fill_rows(arrays, ids, targets, lengths, row, offset, pad_id, prefix=prefix)
        ds.commit(tmp, arrays, meta, output_dir)
        del arrays
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ds.PreparedDataset(output_dir)


def base_meta(kind: str, tokenizer, seq_length: int, packing: bool, template: str | None, input_path,
              source_format: str, sha: str) -> dict:
    return {
        "format": ds.FORMAT, "format_version": ds.FORMAT_VERSION, "created_by": f"petformers {__version__}",
        "kind": kind, "template": template, "seq_length": seq_length, "packing": packing,
        "pad_id": _pad_id(tokenizer), "ignore_index": IGNORE_INDEX,
        "tokenizer_fingerprint": tokenizer.fingerprint(), "tokenizer_source": str(tokenizer.source),
        "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id,
        # template variables the rows were rendered with (e.g. Qwen3's enable_thinking), when any
        **({"chat_template_kwargs": dict(tokenizer.chat_template_kwargs)}
           if template == "chat" and getattr(tokenizer, "chat_template_kwargs", None) else {}),
        "source_file": str(input_path), "source_format": source_format, "source_sha256": sha,
        "columns": {c: "int32" for c in ds.COLUMNS},
        "layout": "targets[i] is the label of the token after input_ids[i] (-100: not trained); "
                  "position_ids restart at 0 and segment_ids count up per sample; padding is one more segment; "
                  "with a shared prefix of P tokens (shared_prefix_tokens), every row starts with it and each "
                  "sample's positions continue at P: a segment whose first position is p > 0 also attends to "
                  "the row's first p columns",
    }


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_id
    if pad is None:
        raise DataError(f"{tokenizer.source}: the tokenizer has neither a pad nor an eos token to pad rows with")
    return int(pad)


def _check_seq_length(seq_length) -> int:
    if not isinstance(seq_length, int) or seq_length < 2:
        raise DataError(f"seq_length must be an integer >= 2, got {seq_length!r}")
    return seq_length


def prepare(input_path, tokenizer, seq_length: int, template: str = "fastchat", packing: bool = False,
            drop_long: bool = False, skip_invalid: bool = False, output_dir=None, progress: bool = True,
            shared_prefix: bool = False):
    """Instruction data -> (dataset, Summary). Writes `output_dir` if given, else keeps rows in memory.

    Accepts Alpaca JSON/JSONL, ShareGPT / MindFormers conversations and OpenAI messages (told
    apart per file). Bad records raise DataError naming file, line and key, or with
    `skip_invalid` are skipped and listed in the summary.
    """
    seq_length = _check_seq_length(seq_length)
    tpl = Template(template, tokenizer)
    pad_id = _pad_id(tokenizer)
    samples, skipped, n_records, fmt, sha = load_samples(input_path, skip_invalid)
    pieces = []
    for s in samples:
        try:
            pieces.append(tpl.pieces(s.messages))
        except RecordError as e:
            if not skip_invalid:
                raise DataError(f"{s.where}: {e} (--skip_invalid skips bad records)") from None
            skipped.append(f"{s.where}: {e}")
    if not pieces:
        raise DataError(f"{input_path}: no valid record ({len(skipped)} skipped; the first: {skipped[0]})")
    ids, labels, lengths = encode_samples(pieces, tokenizer, progress)
    ids, targets, lengths, truncated, dropped = truncate(ids, labels, lengths, seq_length, drop_long)
    summary = Summary(records=n_records, truncated=truncated, dropped=dropped, skipped=skipped)
    meta = base_meta("sft", tokenizer, seq_length, packing, template, input_path, fmt, sha)
    meta["drop_long"] = drop_long
    dataset = build(ids, targets, lengths, seq_length, packing, pad_id, meta, summary, output_dir, shared_prefix)
    return dataset, summary


def prepare_text(input_path, tokenizer, seq_length: int, output_dir=None, skip_invalid: bool = False,
                 progress: bool = True):
    """Raw text (run_mode train) -> (dataset, Summary): documents joined, cut into rows.

    Each document (a paragraph of a .txt file, or a record's `text`) is bos (when the tokenizer
    adds one) + its tokens + eos; all are laid end to end and cut every seq_length tokens. Every
    token is trained; targets are shifted inside each row (its last target is -100); the last
    row is padded.
    """
    seq_length = _check_seq_length(seq_length)
    pad_id = _pad_id(tokenizer)
    if tokenizer.eos_id is None:
        raise DataError(f"{tokenizer.source}: the tokenizer has no eos token to end documents with")
    docs, skipped, sha = load_texts(input_path, skip_invalid)
    bos = [tokenizer.bos_id] if tokenizer.add_bos and tokenizer.bos_id is not None else []
    ids, _, _ = encode_samples([[(bos, True), (d, True), ([tokenizer.eos_id], True)] for d in docs],
                               tokenizer, progress)
    n_rows = -(-len(ids) // seq_length)
    lengths = np.full(n_rows, seq_length, np.int64)
    lengths[-1] = len(ids) - seq_length * (n_rows - 1)
    targets = shift_targets(ids, lengths)
    summary = Summary(records=len(docs) + len(skipped), skipped=skipped)
    meta = base_meta("text", tokenizer, seq_length, False, None, input_path, "text", sha)
    dataset = build(ids, targets, lengths, seq_length, False, pad_id, meta, summary, output_dir)
    return dataset, summary
