"""Shared-prefix packing (data/packing.py, models/llama.py): the samples' common prefix written once per
row, each sample attending to it with positions continuing after it. It must change no number: the same
tokens and trained targets, and the same loss and gradients as plain packing (dropout 0)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from petformers.checkpoint.load import load_pretrained, load_tokenizer
from petformers.cli.main import main
from petformers.data.dataset import PreparedDataset
from petformers.data.packing import IGNORE_INDEX, common_prefix
from petformers.data.prepare import prepare
from petformers.models.llama import segment_layout
from petformers.pet import PetConfig, apply_lora
from petformers.train.loss import chunked_cross_entropy_sum


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def alpaca_file(tmp_path_factory, alpaca_demo):
    """40 short real Alpaca records (short so the tiny model's test stays fast)."""
    records = json.loads(alpaca_demo.read_text(encoding="utf-8"))
    records = sorted(records, key=lambda r: len(r["instruction"]) + len(r["input"]) + len(r["output"]))[:40]
    return write_jsonl(tmp_path_factory.mktemp("sp") / "a.jsonl", records)


def samples_of(ds) -> list[tuple[tuple, tuple]]:
    """Every sample of a packed dataset as (its tokens with the prefix in front, their targets), sorted."""
    out = []
    for i in range(len(ds)):
        row = ds[i]
        layout = segment_layout(torch.from_numpy(row["segment_ids"][None].astype(np.int64)),
                                torch.from_numpy(row["position_ids"][None].astype(np.int64)))[0]
        start = 0
        for n, prefix in layout:
            ids, tg = row["input_ids"][start:start + n], row["targets"][start:start + n]
            start += n
            if (tg == IGNORE_INDEX).all():
                continue  # the padding, or the shared prefix itself: every sample has a trained target
            if prefix:
                ids = np.concatenate([row["input_ids"][:prefix], ids])
                tg = np.concatenate([row["targets"][:prefix], tg])
            out.append((tuple(ids.tolist()), tuple(tg.tolist())))
    return sorted(out)


def test_common_prefix_stops_at_a_difference_and_at_a_trained_target():
    ids = np.array([5, 6, 7, 8, 9, 5, 6, 7, 1, 2, 3, 5, 6, 7, 8], np.int32)
    lengths = np.array([5, 6, 4])
    targets = np.full_like(ids, IGNORE_INDEX)
    assert common_prefix(ids, targets, lengths) == 3  # 5 6 7, then 8 / 1 / 8 differ
    targets[1] = 42  # the first sample trains its second token's target: no longer shared
    assert common_prefix(ids, targets, lengths) == 1
    assert common_prefix(ids, np.full_like(ids, IGNORE_INDEX), np.array([15])) == 0  # one sample: nothing to share
    same = np.array([5, 6, 7, 5, 6, 7], np.int32)
    assert common_prefix(same, np.full_like(same, IGNORE_INDEX), np.array([3, 3])) == 2  # each keeps one token


def test_rows_hold_the_same_samples_with_the_prefix_once(tmp_path, smollm2_gguf, alpaca_file):
    tok = load_tokenizer(smollm2_gguf)
    plain, s1 = prepare(alpaca_file, tok, 256, template="chat", packing=True, progress=False)
    shared, s2 = prepare(alpaca_file, tok, 256, template="chat", packing=True, progress=False, shared_prefix=True)
    # SmolLM2's chat template: its default system prompt, the user header and the Alpaca prompt's first sentence
    assert s2.shared_prefix_tokens == shared.meta["shared_prefix_tokens"] == 32
    assert s1.shared_prefix_tokens == 0 and s1.samples == s2.samples == 40
    assert s2.trained_tokens == s1.trained_tokens
    assert s2.rows < s1.rows and s2.tokens == s1.tokens - 32 * s2.samples + 32 * s2.rows
    assert samples_of(shared) == samples_of(plain)  # every sample, its tokens and targets, exactly
    row = shared[0]
    assert (row["position_ids"][:32] == np.arange(32)).all() and (row["segment_ids"][:32] == 0).all()
    assert (row["targets"][:32] == IGNORE_INDEX).all() and row["position_ids"][32] == 32
    # written and read back through the CLI (the default packs with the shared prefix)
    out = tmp_path / "rows"
    assert main(["data", "prepare", "--input", str(alpaca_file), "--tokenizer", str(smollm2_gguf), "--seq_length",
                 "256", "--template", "chat", "--packing", "--output_dir", str(out), "--no_progress"]) == 0
    back = PreparedDataset(out)
    assert back.meta["shared_prefix_tokens"] == 32 and samples_of(back) == samples_of(plain)
    assert main(["data", "prepare", "--input", str(alpaca_file), "--tokenizer", str(smollm2_gguf), "--seq_length",
                 "256", "--template", "chat", "--packing", "--no_shared_prefix", "--output_dir", str(out),
                 "--no_progress"]) == 0
    assert PreparedDataset(out).meta["shared_prefix_tokens"] == 0


def _loss_and_grads(model, ds, batch_rows: int = 4):
    """Summed token loss over the whole dataset / trained tokens, and the gradient of every trainable tensor."""
    model.zero_grad(set_to_none=True)
    total, n = 0.0, 0
    for r0 in range(0, len(ds), batch_rows):
        rows = [ds[i] for i in range(r0, min(r0 + batch_rows, len(ds)))]
        b = {k: torch.from_numpy(np.stack([r[k] for r in rows]).astype(np.int64)) for k in rows[0]}
        hidden = model.hidden_states(b["input_ids"], b["position_ids"], b["segment_ids"])
        loss = chunked_cross_entropy_sum(model.lm_head, hidden, b["targets"])
        loss.backward()
        total += loss.item()
        n += int((b["targets"] != IGNORE_INDEX).sum())
    grads = {k: p.grad.clone() / n for k, p in model.named_parameters() if p.requires_grad}
    return total / n, grads


@pytest.mark.parametrize("path", ["segments", "recompute", "mask"])
def test_same_loss_and_gradients_as_plain_packing(tiny_model_dir, alpaca_file, path):
    """Per sample attention (the default), recompute, and the [T, T] mask path (a sliding window longer than
    every sample, so only the mask differs): all equal plain packing's loss and LoRA gradients."""
    model, tok = load_pretrained(tiny_model_dir)
    model.float()
    apply_lora(model, PetConfig(target_modules=".*wq|.*wk|.*wv|.*wo|.*w1|.*w2|.*w3", lora_dropout=0.0))
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_b" in name:  # B starts at zero; random B makes every adapter's gradient depend on the rest
            p.data.normal_(0, 0.02)
    if path == "recompute":
        model.gradient_checkpointing = True
    if path == "mask":
        model.config.sliding_window, model.config.max_window_layers = 300, 1
    model.train()
    plain, _ = prepare(alpaca_file, tok, 320, template="fastchat", packing=True, progress=False)
    shared, summary = prepare(alpaca_file, tok, 320, template="fastchat", packing=True, progress=False,
                              shared_prefix=True)
    assert summary.shared_prefix_tokens >= 20 and len(shared) < len(plain)  # the Vicuna system prompt
    loss_a, grads_a = _loss_and_grads(model, plain)
    loss_b, grads_b = _loss_and_grads(model, shared)
    assert loss_b == pytest.approx(loss_a, rel=1e-5)
    assert len(grads_a) == 2 * 7 * 2
    for k in grads_a:
        scale = grads_a[k].abs().max().item()
        assert scale > 0, k
        torch.testing.assert_close(grads_b[k], grads_a[k], rtol=0, atol=2e-5 * scale, msg=k)


def test_a_sample_without_its_prefix_is_refused():
    """Positions that start past 0 in a row that does not begin with that many prefix tokens: one clear error."""
    seg = torch.tensor([[0, 0, 1, 1, 1, 2]])
    pos = torch.tensor([[0, 1, 3, 4, 5, 0]])  # the sample claims a 3-token prefix; the row's first run has 2
    with pytest.raises(ValueError, match="shared prefix of 3 tokens"):
        segment_layout(seg, pos)
    assert segment_layout(seg, torch.tensor([[0, 1, 2, 3, 4, 0]])) == [[(2, 0), (3, 2), (1, 0)]]
