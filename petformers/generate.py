"""Text generation with a KV cache: greedy or sampling, batched prompts with left padding, streaming.

Sampling follows transformers' order so that the same settings mean the same thing:
repetition penalty, then temperature, then top-k, then top-p (nucleus).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from petformers.models.llama import KVCache, Llama


@dataclass
class GenerationConfig:
    max_new_tokens: int = 256
    do_sample: bool = False  # greedy by default (MindFormers' and transformers' default)
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k filtering
    top_p: float = 1.0  # 1.0: no nucleus filtering
    repetition_penalty: float = 1.0  # >1 discourages tokens already in the sequence


def _apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    scores = logits.gather(1, seen)
    scores = torch.where(scores < 0, scores * penalty, scores / penalty)
    return logits.scatter(1, seen, scores)


def _filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        remove_sorted = cumulative <= (1 - top_p)
        remove_sorted[:, -1] = False  # always keep the most likely token
        remove = remove_sorted.scatter(1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def next_token(logits: torch.Tensor, sequences: torch.Tensor, cfg: GenerationConfig,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Choose the next token [B] from last-position logits [B, vocab] (float32)."""
    if cfg.repetition_penalty != 1.0:
        logits = _apply_repetition_penalty(logits, sequences, cfg.repetition_penalty)
    if not cfg.do_sample:
        return logits.argmax(-1)
    logits = logits / max(cfg.temperature, 1e-5)
    logits = _filter_top_k_top_p(logits, cfg.top_k, cfg.top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: Llama, prompts: list[list[int]], cfg: GenerationConfig, eos_ids: list[int], pad_id: int,
             generator: torch.Generator | None = None,
             on_token: Callable[[int, int], None] | None = None) -> list[list[int]]:
    """New tokens for each prompt (without the final eos). `on_token(row, token)` streams them."""
    if not prompts or not all(prompts):
        raise ValueError("generate needs at least one prompt, and every prompt at least one token")
    device = next(model.parameters()).device
    batch, longest = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((batch, longest), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((batch, longest + cfg.max_new_tokens), dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):  # left padding: every prompt ends at the same column
        ids[row, longest - len(prompt):] = torch.tensor(prompt, device=device)
        mask[row, longest - len(prompt):longest] = 1
    positions = (mask[:, :longest].cumsum(-1) - 1).clamp(min=0)
    cache = KVCache(model.config, batch, longest + cfg.max_new_tokens, device, next(model.parameters()).dtype)
    padded = mask[:, :longest].eq(0).any().item()
    logits = model(ids, position_ids=positions, attention_mask=mask[:, :longest] if padded else None, cache=cache)
    eos = torch.tensor(eos_ids or [-1], device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    sequences, out = ids, [[] for _ in range(batch)]
    last_pos = positions[:, -1]
    for step in range(cfg.max_new_tokens):
        token = next_token(logits[:, -1].float(), sequences, cfg, generator)
        token = torch.where(finished, torch.full_like(token, pad_id), token)
        is_eos = torch.isin(token, eos)
        for row in torch.nonzero(~finished & ~is_eos).flatten().tolist():
            out[row].append(int(token[row]))
            if on_token is not None:
                on_token(row, int(token[row]))
        finished |= is_eos
        if finished.all() or step == cfg.max_new_tokens - 1:
            break
        sequences = torch.cat([sequences, token[:, None]], dim=1)
        mask[:, longest + step] = 1
        last_pos = last_pos + 1
        logits = model(token[:, None], position_ids=last_pos[:, None],
                       attention_mask=mask[:, :longest + step + 1] if padded else None, cache=cache)
    return out


class StreamPrinter:
    """Prints decoded text as tokens arrive; decodes the whole answer each time so that multi-byte
    characters split across tokens are printed only once complete."""

    def __init__(self, tokenizer, write: Callable[[str], None]):
        self.tokenizer, self.write = tokenizer, write
        self.tokens: list[int] = []
        self.printed = 0

    def __call__(self, row: int, token: int):
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return
        self.write(text[self.printed:])
        self.printed = len(text)

    def finish(self):
        """Print what is still held back: an answer cut off mid-character ends with U+FFFD, as `decode` gives."""
        text = self.tokenizer.decode(self.tokens)
        if len(text) > self.printed:
            self.write(text[self.printed:])
        self.printed = len(text)
