"""Regional compilation (petformers/models/compile.py, the regional_compile lever of scripts/bench_levers.py)
must not change what training computes: a tiny LoRA model with its decoder blocks compiled gives the eager
model's loss and every LoRA gradient, over packed rows of several samples, for two batches whose samples
and row widths differ (the dynamic shapes), and the second batch reuses the graphs of the first."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from petformers.data.loader import collate
from petformers.data.packing import fill_rows, place, shift_targets
from petformers.models.compile import compile_blocks
from petformers.models.config import LlamaConfig
from petformers.models.llama import build_model
from petformers.pet.config import PetConfig
from petformers.pet.inject import apply_lora
from petformers.train.loss import chunked_cross_entropy_sum

PAD, VOCAB = 0, 61


def tiny_lora_model() -> torch.nn.Module:
    """2 layers, grouped-query heads, LoRA on q/k/v/o with a non-zero B (so the adapters matter), no dropout."""
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=16, num_layers=2, num_heads=2, n_kv_heads=1,
                         intermediate_size=24, rms_norm_eps=1e-5, theta=10000.0, pad_token_id=PAD)
    model = build_model(config, device="cpu", dtype=torch.float32)
    model.init_weights(std=0.2, generator=torch.Generator().manual_seed(0))
    apply_lora(model, PetConfig(lora_rank=2, lora_alpha=4, lora_dropout=0.0, target_modules=".*wq|.*wk|.*wv|.*wo"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_b" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    return model.train()


def packed_batch(lengths: list[int], seq_length: int, seed: int) -> dict:
    """One packed row holding samples of these lengths (prompt half masked), as `petformers data prepare`
    writes it, through the trainer's collate (which trims the row to its last real column)."""
    rng = np.random.default_rng(seed)
    lengths = np.array(lengths)
    ids = rng.integers(1, VOCAB, int(lengths.sum()))
    labels = ids.copy()
    for start, n in zip(np.cumsum(lengths) - lengths, lengths):
        labels[start:start + n // 2] = -100
    row, offset, n_rows = place(lengths, seq_length, packing=True)
    assert n_rows == 1
    arrays = {k: np.zeros((1, seq_length), np.int32) for k in ("input_ids", "targets", "position_ids", "segment_ids")}
    fill_rows(arrays, ids, shift_targets(labels, lengths), lengths, row, offset, PAD)
    return collate([{k: v[0] for k, v in arrays.items()}], PAD, True, "cpu")


def loss_and_grads(model, batch: dict):
    model.zero_grad(set_to_none=True)
    hidden = model.hidden_states(batch["input_ids"], batch["position_ids"], batch["segment_ids"])
    loss = chunked_cross_entropy_sum(model.lm_head, hidden, batch["targets"]) / int((batch["targets"] != -100).sum())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def graphs_compiled() -> int:
    """Frames dynamo has compiled so far in this process (a recompile adds one)."""
    from torch._dynamo.utils import counters

    return counters["frames"]["ok"]


def test_regional_compile_gives_the_eager_loss_and_gradients():
    torch.manual_seed(0)
    eager = tiny_lora_model()
    compiled = compile_blocks(copy.deepcopy(eager))
    # Different segment counts and lengths, and rows of different widths (collate trims the padding).
    batches = [packed_batch([7, 3, 11, 5], seq_length=32, seed=1), packed_batch([9, 4, 6], seq_length=32, seed=2)]
    assert batches[0]["input_ids"].shape[1] != batches[1]["input_ids"].shape[1]
    before = graphs_compiled()
    for i, batch in enumerate(batches):
        if i == 1:
            first = graphs_compiled()
            assert first > before  # the blocks were compiled (not silently run eager)
        loss_e, grads_e = loss_and_grads(eager, batch)
        loss_c, grads_c = loss_and_grads(compiled, batch)
        assert float(loss_c) == pytest.approx(float(loss_e), rel=1e-5)
        assert grads_c.keys() == grads_e.keys() and len(grads_e) == 2 * 2 * 4  # A and B of wq/wk/wv/wo, 2 layers
        for name, g in grads_e.items():
            torch.testing.assert_close(grads_c[name], g, rtol=1e-5, atol=1e-7, msg=name)
    assert graphs_compiled() == first  # the second batch's new lengths reused the first batch's graphs
