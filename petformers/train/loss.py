"""Cross-entropy over the trained positions only, in chunks, never materialising float32 logits
for the whole batch: hidden states [B, T, H] -> the N positions whose target is not -100 -> lm_head
and log-softmax on `chunk` rows at a time, each chunk recomputed in backward (activation
checkpointing), so peak memory holds one chunk's logits instead of B*T*vocab floats.

Returns the **sum** of token losses; the caller divides by the number of trained tokens of the whole
optimizer step (across micro-batches and ranks), so accumulation equals one big batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def _chunk_loss_sum(lm_head, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = lm_head(hidden).float()
    return F.cross_entropy(logits, targets, reduction="sum")


def chunked_cross_entropy_sum(lm_head, hidden: torch.Tensor, targets: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Sum of token losses for positions with target != -100. hidden [B, T, H], targets [B, T] (int64)."""
    keep = targets.reshape(-1) != IGNORE_INDEX
    h = hidden.reshape(-1, hidden.shape[-1])[keep]
    t = targets.reshape(-1)[keep]
    total = hidden.new_zeros((), dtype=torch.float32)
    if t.numel() == 0:
        return total + 0.0 * hidden.sum()  # keeps the graph connected for DDP
    for start in range(0, t.numel(), chunk):
        hs, ts = h[start:start + chunk], t[start:start + chunk]
        if torch.is_grad_enabled() and hs.requires_grad:
            total = total + checkpoint(_chunk_loss_sum, lm_head, hs, ts, use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(lm_head, hs, ts)
    return total


def plain_cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Reference: float32 logits for every position, as a plain training loop computes them."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")
