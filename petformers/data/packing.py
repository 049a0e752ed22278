"""Where samples go in rows of `seq_length` tokens, and the row arrays themselves.

Without packing each sample has its own row, right-padded (MindFormers' layout). With packing,
samples share rows by **best-fit decreasing**: longest sample first, each into the row whose free
space fits it most tightly, else a new row. It packs as tightly as first-fit decreasing (both use
at most 11/9 of the optimal number of rows, plus one) and runs in O(n log n) with a sorted list of
free spaces. It reorders samples; the trainer shuffles rows anyway. Sequential packing (keep the
file order, start a new row when the next sample does not fit) would waste more padding.

Row layout (all int32, shape [rows, seq_length]):
- `input_ids`: the samples one after another from column 0, then `pad_id`;
- `targets`: next-token labels, already shifted: for a sample at columns o..o+n-1,
  `targets[o+j] = label[j+1]` and `targets[o+n-1] = -100`, so no token predicts across a sample
  boundary; padding is -100;
- `position_ids`: 0..n-1 for each sample;
- `segment_ids`: 0, 1, 2, ... one per sample in the row.
Padding is one more segment: the next segment id, positions restarting at 0. It never shares a
segment with a real token, so block-diagonal attention keeps it out of every sample.

**Shared prefix** (`shared_prefix`, with packing): chat and instruction templates start every sample
with the same tokens (system prompt, template header: 24 of ~200 tokens in the bench's Alpaca chat
samples). Those P tokens are written once, at columns 0..P-1 of every row (segment 0, positions 0..P-1,
not trained); each sample follows without them, its positions continuing at P. The model reads the
rule from the positions alone: a segment whose first position is p > 0 also attends to the row's
first p columns (models/llama.py). Every sample sees the same keys and positions as it would with
the prefix repeated, so loss and gradients are those of plain packing (the prefix's gradient sums over
the samples that read it), for fewer tokens through every layer. A prefix is shared only where none of
its targets is trained, the token after it included (its target would differ per sample).
"""

from __future__ import annotations

from bisect import bisect_left, insort

import numpy as np

IGNORE_INDEX = -100  # a target that is not trained (PyTorch's cross_entropy default); the one definition


def best_fit_decreasing(lengths: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(row, column offset) of each sample and the number of rows. Every length must be <= capacity."""
    n = len(lengths)
    row, offset = np.empty(n, np.int64), np.empty(n, np.int64)
    free: list[tuple[int, int]] = []  # (free space, row), sorted
    used: list[int] = []
    for i in np.argsort(-lengths, kind="stable").tolist():
        length = int(lengths[i])
        k = bisect_left(free, (length, -1))
        if k < len(free):
            space, r = free.pop(k)
        else:
            space, r = capacity, len(used)
            used.append(0)
        row[i], offset[i] = r, used[r]
        used[r] += length
        if space - length > 0:
            insort(free, (space - length, r))
    return row, offset, len(used)


def place(lengths: np.ndarray, seq_length: int, packing: bool) -> tuple[np.ndarray, np.ndarray, int]:
    """(row, offset, n_rows): one sample per row, or best-fit-decreasing packing."""
    if packing:
        return best_fit_decreasing(lengths, seq_length)
    n = len(lengths)
    return np.arange(n, dtype=np.int64), np.zeros(n, np.int64), n


def common_prefix(ids: np.ndarray, targets: np.ndarray, lengths: np.ndarray, chunk: int = 64) -> int:
    """The number P of leading tokens every sample shares with none of their targets trained (the
    target at P-1, which predicts the sample's own next token, included), leaving each sample at least
    one token of its own. Compared `chunk` columns at a time over all samples (vectorised)."""
    if len(lengths) < 2:
        return 0
    starts = np.cumsum(lengths) - lengths
    limit = int(lengths.min()) - 1
    p = 0
    while p < limit:
        cols = np.arange(p, min(p + chunk, limit))
        at = starts[:, None] + cols[None, :]
        ok = (ids[at] == ids[starts[0] + cols][None, :]).all(axis=0) & (targets[at] == IGNORE_INDEX).all(axis=0)
        if not ok.all():
            return p + int(np.argmin(ok))
        p += len(cols)
    return p


def strip_prefix(ids: np.ndarray, targets: np.ndarray, lengths: np.ndarray, p: int):
    """The samples without their first `p` tokens: (ids, targets, lengths)."""
    starts = np.cumsum(lengths) - lengths
    keep = np.ones(len(ids), bool)
    keep[(starts[:, None] + np.arange(p)[None, :]).reshape(-1)] = False
    return ids[keep], targets[keep], lengths - p


def shift_targets(labels: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Per-token labels of samples laid end to end -> next-token targets (-100 at each sample's end)."""
    targets = np.full_like(labels, IGNORE_INDEX)
    targets[:-1] = labels[1:]
    targets[np.cumsum(lengths) - 1] = IGNORE_INDEX
    return targets


def fill_rows(arrays: dict, ids: np.ndarray, targets: np.ndarray, lengths: np.ndarray, row: np.ndarray,
              offset: np.ndarray, pad_id: int, block_rows: int = 4096, prefix: np.ndarray | None = None) -> None:
    """Write samples (tokens laid end to end, `lengths` each) into `arrays` at (row, offset).

    `arrays` holds the four [rows, seq_length] int32 arrays (in memory or memory-mapped .npy);
    they are written a block of rows at a time so that temporaries stay small. With a shared
    `prefix` (token ids), every row starts with it and the samples' offsets and positions are
    counted after it (see the module docstring).
    """
    n_rows, seq = arrays["input_ids"].shape
    p = 0 if prefix is None else len(prefix)
    offset = offset + p
    starts = np.cumsum(lengths) - lengths
    order = np.lexsort((offset, row))  # samples by row, then by position in the row
    row_sorted = row[order]
    first_of_row = np.searchsorted(row_sorted, row_sorted, side="left")
    segment = np.empty(len(lengths), np.int64)
    segment[order] = np.arange(len(order)) - first_of_row
    segment += 1 if p else 0
    used = np.bincount(row, weights=lengths, minlength=n_rows).astype(np.int64) + p
    count = np.bincount(row, minlength=n_rows).astype(np.int64) + (1 if p else 0)
    columns = np.arange(seq, dtype=np.int32)[None, :]
    used32, count32 = used.astype(np.int32), count.astype(np.int32)
    for r0 in range(0, n_rows, block_rows):
        r1 = min(r0 + block_rows, n_rows)
        lo, hi = np.searchsorted(row_sorted, [r0, r1])
        sel = order[lo:hi]
        # Padding first (positions restart at the row's used length), then the samples over it.
        block = {
            "input_ids": np.full((r1 - r0, seq), pad_id, np.int32),
            "targets": np.full((r1 - r0, seq), IGNORE_INDEX, np.int32),
            "position_ids": np.maximum(columns - used32[r0:r1, None], 0),
            "segment_ids": np.repeat(count32[r0:r1, None], seq, axis=1),
        }
        n_sel = lengths[sel]
        total = int(n_sel.sum())
        if total:
            local_start = np.cumsum(n_sel) - n_sel
            pos = np.arange(total, dtype=np.int64) - np.repeat(local_start, n_sel)
            src = np.repeat(starts[sel], n_sel) + pos
            dest = np.repeat((row[sel] - r0) * seq + offset[sel], n_sel) + pos
            block["input_ids"].reshape(-1)[dest] = ids[src]
            block["targets"].reshape(-1)[dest] = targets[src]
            block["position_ids"].reshape(-1)[dest] = pos + p
            block["segment_ids"].reshape(-1)[dest] = np.repeat(segment[sel], n_sel)
        if p:
            block["input_ids"][:, :p] = prefix
            block["position_ids"][:, :p] = np.arange(p, dtype=np.int32)
            block["segment_ids"][:, :p] = 0
        for name, values in block.items():
            arrays[name][r0:r1] = values
