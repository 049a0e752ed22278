"""Cross-entropy over the trained positions only, in chunks, never materialising float32 logits
for the whole batch: hidden states [B, T, H] -> the N positions whose target is not -100 -> lm_head
and log-softmax on `chunk` rows at a time, each chunk recomputed in backward (activation
checkpointing), so peak memory holds one chunk's logits instead of B*T*vocab floats.

When lm_head is frozen (LoRA: the usual case) the chunks go through `_FrozenHeadCrossEntropy`
instead, which computes the gradient for the hidden states in the forward pass, while the chunk's
logits are at hand: lm_head runs twice per chunk instead of three times (no recomputation) and
nothing of the logits survives the chunk (docs/benchmarks.md has the measured effect).

Returns the **sum** of token losses; the caller divides by the number of trained tokens of the whole
optimizer step (across micro-batches and ranks), so accumulation equals one big batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from petformers.data.packing import IGNORE_INDEX


def _chunk_loss_sum(lm_head, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = lm_head(hidden).float()
    return F.cross_entropy(logits, targets, reduction="sum")


# Rows per chunk of the frozen-head path: one chunk's float32 logits stay under 32 MiB whatever the
# vocabulary (170 rows for SmolLM2's 49,152 tokens), small enough to stay out of the peak.
FROZEN_HEAD_CHUNK_ELEMENTS = 1 << 23


class _FrozenHeadCrossEntropy(torch.autograd.Function):
    """Sum of token losses of hidden [N, H] through a frozen, bias-free weight [V, H].

    d(loss)/d(hidden) = (softmax(logits) - onehot(target)) @ weight is computed chunk by chunk in
    forward and saved ([N, H], like hidden itself); backward only scales it. The weight gets no
    gradient, so this is exact only for a frozen head: the caller checks.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden)
        for start in range(0, targets.numel(), chunk):
            h, t = hidden[start:start + chunk], targets[start:start + chunk]
            logits = F.linear(h, weight).float()
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
            probs[torch.arange(t.numel(), device=t.device), t] -= 1.0
            grad[start:start + chunk] = probs.to(weight.dtype) @ weight
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad,) = ctx.saved_tensors
        return grad * grad_total.to(grad.dtype), None, None, None


def _frozen_linear_weight(lm_head) -> torch.Tensor | None:
    """lm_head's weight when lm_head is a plain frozen nn.Linear without bias, else None."""
    if type(lm_head) is not torch.nn.Linear or lm_head.bias is not None or lm_head.weight.requires_grad:
        return None
    return lm_head.weight


def chunked_cross_entropy_sum(lm_head, hidden: torch.Tensor, targets: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Sum of token losses for positions with target != -100. hidden [B, T, H], targets [B, T] (int64)."""
    keep = targets.reshape(-1) != IGNORE_INDEX
    h = hidden.reshape(-1, hidden.shape[-1])[keep]
    t = targets.reshape(-1)[keep]
    total = hidden.new_zeros((), dtype=torch.float32)
    if t.numel() == 0:
        return total + 0.0 * hidden.sum()  # keeps the graph connected for DDP
    weight = _frozen_linear_weight(lm_head)
    if weight is not None and torch.is_grad_enabled() and h.requires_grad:
        rows = max(1, min(chunk, FROZEN_HEAD_CHUNK_ELEMENTS // weight.shape[0]))
        return _FrozenHeadCrossEntropy.apply(h, weight, t, rows)
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
