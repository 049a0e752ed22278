"""Speed must never change results: each optimization petformers uses for `make bench` against its plain form.

- packed rows (block-diagonal attention, per-sample positions) vs one sample per padded row;
- chunked cross-entropy over trained positions vs float32 logits for every position (values and grads);
- a bfloat16 frozen base with float32 adapters vs everything in float32;
- the benchmark compares like with like: the baseline's tokenization (transformers' chat template)
  equals petformers' (same tokens, same trained positions), and the FLOP counts match the model.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from petformers.data.packing import fill_rows, place, shift_targets
from petformers.models.config import LlamaConfig
from petformers.models.llama import build_model
from petformers.pet.config import PetConfig
from petformers.pet.inject import apply_lora
from petformers.data.loader import collate
from petformers.train.loss import chunked_cross_entropy_sum, plain_cross_entropy_sum

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
PAD = 0


def tiny_config(**kw) -> LlamaConfig:
    base = dict(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, n_kv_heads=2, intermediate_size=48,
                rms_norm_eps=1e-5, theta=10000.0, pad_token_id=PAD)
    return LlamaConfig(**(base | kw))


def tiny_lora_model(seed: int = 0, dtype=torch.float32):
    """A tiny random Llama with LoRA on q/k/v/o whose B is non-zero (so the adapter matters), no dropout."""
    torch.manual_seed(seed)
    model = build_model(tiny_config(), device="cpu", dtype=torch.float32)
    model.init_weights(std=0.1, generator=torch.Generator().manual_seed(seed))
    apply_lora(model, PetConfig(lora_rank=4, lora_alpha=8, lora_dropout=0.0, target_modules=".*wq|.*wk|.*wv|.*wo"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_b" in name:
                p.normal_(0, 0.05)
    return model.to(dtype) if dtype == torch.float32 else _cast_base(model, dtype)


def _cast_base(model, dtype):
    """Frozen base in `dtype`, adapters kept float32 (what compute_dtype bfloat16 means)."""
    for name, p in model.named_parameters():
        if not p.requires_grad:
            p.data = p.data.to(dtype)
    return model


def make_rows(samples: list[tuple[list[int], list[int]]], seq_length: int, packing: bool) -> list[dict]:
    """Rows exactly as `petformers data prepare` builds them (packing.py), from (ids, labels) samples."""
    lengths = np.array([len(ids) for ids, _ in samples])
    ids = np.concatenate([np.array(i) for i, _ in samples])
    labels = np.concatenate([np.array(lab) for _, lab in samples])
    row, offset, n_rows = place(lengths, seq_length, packing)
    arrays = {k: np.zeros((n_rows, seq_length), np.int32)
              for k in ("input_ids", "targets", "position_ids", "segment_ids")}
    fill_rows(arrays, ids, shift_targets(labels, lengths), lengths, row, offset, PAD)
    return [{k: v[r] for k, v in arrays.items()} for r in range(n_rows)]


def loss_and_grads(model, rows: list[dict], packed: bool, micro_batch: int):
    """Token-mean loss over all rows (as loop.py normalises it) and the adapters' gradients."""
    model.zero_grad(set_to_none=True)
    batches = [collate(rows[i:i + micro_batch], PAD, packed, "cpu") for i in range(0, len(rows), micro_batch)]
    n_tokens = sum(int((b["targets"] != -100).sum()) for b in batches)
    total = 0.0
    for b in batches:
        hidden = model.hidden_states(b["input_ids"], b["position_ids"], b["segment_ids"])
        loss = chunked_cross_entropy_sum(model.lm_head, hidden, b["targets"], chunk=16)
        (loss / n_tokens).backward()
        total += float(loss.detach())
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return total / n_tokens, grads


def random_samples(n: int, seed: int, vocab: int = 97, max_len: int = 20):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(4, max_len))
        ids = rng.integers(1, vocab, length).tolist()
        prompt = int(rng.integers(1, length - 1))
        out.append((ids, [-100] * prompt + ids[prompt:]))
    return out


# ---- packing --------------------------------------------------------------------------------------

def test_packed_loss_and_grads_equal_unpacked():
    model = tiny_lora_model()
    model.train()
    samples = random_samples(9, seed=1)
    unpacked = make_rows(samples, seq_length=32, packing=False)
    packed = make_rows(samples, seq_length=32, packing=True)
    assert len(packed) < len(unpacked)  # several samples share a row
    loss_u, grads_u = loss_and_grads(model, unpacked, packed=False, micro_batch=4)
    loss_p, grads_p = loss_and_grads(model, packed, packed=True, micro_batch=2)
    assert loss_p == pytest.approx(loss_u, rel=1e-5)
    for name in grads_u:
        torch.testing.assert_close(grads_p[name], grads_u[name], rtol=1e-4, atol=1e-6, msg=name)


def test_sample_by_sample_attention_equals_the_block_diagonal_mask():
    """Packed rows take `segment_attention` (each sample alone, causal, k/v heads shared by SDPA); an
    all-ones attention_mask sends the same rows through one [T, T] block-diagonal mask instead.
    Several rows of different layouts, grouped-query heads: same logits, same gradients."""
    model = tiny_lora_model()
    model.train()
    rows = make_rows(random_samples(11, seed=4), seq_length=40, packing=True)
    b = collate(rows[:3], PAD, True, "cpu")
    assert len({tuple(r["segment_ids"]) for r in rows[:3]}) == 3  # different layouts per row

    def run(attention_mask):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)  # the same dropout masks in both runs
        hidden = model.hidden_states(b["input_ids"], b["position_ids"], b["segment_ids"], attention_mask)
        chunked_cross_entropy_sum(model.lm_head, hidden, b["targets"]).backward()
        return hidden.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    h_segments, g_segments = run(None)
    h_masked, g_masked = run(torch.ones_like(b["input_ids"]))
    torch.testing.assert_close(h_segments, h_masked, rtol=1e-5, atol=1e-5)
    for name in g_masked:
        torch.testing.assert_close(g_segments[name], g_masked[name], rtol=1e-4, atol=1e-6, msg=name)


def test_packed_rows_never_see_another_sample():
    """Changing one sample's tokens changes no other sample's loss in the same packed row."""
    model = tiny_lora_model()
    model.eval()
    samples = random_samples(6, seed=2)
    rows = make_rows(samples, seq_length=64, packing=True)
    changed = copy.deepcopy(samples)
    changed[0] = ([5] * len(changed[0][0]), changed[0][1][:1] + [5] * (len(changed[0][0]) - 1))
    rows_changed = make_rows(changed, seq_length=64, packing=True)

    def per_position(rows):
        b = collate(rows, PAD, True, "cpu")
        with torch.no_grad():
            logits = model(b["input_ids"], b["position_ids"], b["segment_ids"]).float()
        return b, torch.nn.functional.cross_entropy(logits.transpose(1, 2), b["targets"], reduction="none",
                                                    ignore_index=-100)

    b, before = per_position(rows)
    _, after = per_position(rows_changed)
    # Positions of sample 0: same layout in both (same lengths), found by its segment in its row.
    lengths = np.array([len(s[0]) for s in samples])
    row, offset, _ = place(lengths, 64, True)
    own = torch.zeros_like(before, dtype=torch.bool)
    own[int(row[0]), int(offset[0]):int(offset[0]) + int(lengths[0])] = True
    assert not torch.equal(before[own], after[own])
    torch.testing.assert_close(before[~own], after[~own], rtol=0, atol=1e-6)


# ---- chunked cross-entropy ------------------------------------------------------------------------

@pytest.mark.parametrize("frozen_head", [True, False], ids=["frozen_head", "trained_head"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [1, 7, 64, 4096])
def test_chunked_cross_entropy_equals_plain(dtype, chunk, frozen_head):
    """Both paths: a frozen lm_head (LoRA; gradient computed in forward) and a trained one (recomputed)."""
    torch.manual_seed(0)
    hidden_size, vocab = 24, 131
    head = torch.nn.Linear(hidden_size, vocab, bias=False).to(dtype).requires_grad_(not frozen_head)
    hidden = torch.randn(3, 17, hidden_size, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, vocab, (3, 17))
    targets[0, :9] = -100  # a masked prompt
    targets[2] = -100  # a row with nothing to train (padding)
    wrt = (hidden,) if frozen_head else (hidden, head.weight)

    chunked = chunked_cross_entropy_sum(head, hidden, targets, chunk=chunk)
    grads_chunked = torch.autograd.grad(2.5 * chunked, wrt)  # a non-unit upstream gradient
    plain = plain_cross_entropy_sum(head(hidden), targets)
    grads_plain = torch.autograd.grad(2.5 * plain, wrt)

    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(chunked, plain, **tol)
    for a, b in zip(grads_chunked, grads_plain):
        if dtype == torch.float32:
            torch.testing.assert_close(a, b, **tol)
        else:  # bf16 sums of many terms round differently chunk by chunk: compare as vectors
            assert float((a.float() - b.float()).norm() / b.float().norm()) < 2e-2
    assert chunked.dtype == torch.float32
    with torch.no_grad():  # evaluation: no gradient work at all, same value
        torch.testing.assert_close(chunked_cross_entropy_sum(head, hidden, targets, chunk=chunk), plain, **tol)


def test_frozen_head_path_keeps_no_logits_for_backward():
    """The LoRA case saves only an [N, hidden] gradient for backward, never [N, vocab] logits."""
    head = torch.nn.Linear(16, 5000, bias=False).requires_grad_(False)
    hidden = torch.randn(2, 40, 16, requires_grad=True)
    targets = torch.randint(0, 5000, (2, 40))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        chunked_cross_entropy_sum(head, hidden, targets)
    assert saved and all(5000 not in shape for shape in saved), saved


def test_chunked_cross_entropy_with_nothing_trained_is_zero_with_a_graph():
    head = torch.nn.Linear(8, 11, bias=False)
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    loss = chunked_cross_entropy_sum(head, hidden, torch.full((2, 5), -100))
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.count_nonzero(hidden.grad) == 0


# ---- bf16 base, fp32 adapters ---------------------------------------------------------------------

def test_bf16_base_with_fp32_adapters_is_close_to_fp32():
    fp32 = tiny_lora_model()
    bf16 = _cast_base(copy.deepcopy(fp32), torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in bf16.parameters() if p.requires_grad)
    assert bf16.layers[0].attention.wq.weight.dtype == torch.bfloat16
    rows = make_rows(random_samples(6, seed=3), seq_length=48, packing=True)
    loss32, grads32 = loss_and_grads(fp32, rows, packed=True, micro_batch=2)
    loss16, grads16 = loss_and_grads(bf16, rows, packed=True, micro_batch=2)
    assert loss16 == pytest.approx(loss32, rel=1e-2)
    for name, g in grads32.items():
        cos = torch.nn.functional.cosine_similarity(grads16[name].flatten(), g.flatten(), dim=0)
        assert cos > 0.99, (name, float(cos))


# ---- the bench compares the same workload ---------------------------------------------------------

def _import_script(name: str):
    sys.path.insert(0, str(SCRIPTS))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(SCRIPTS))


def test_baseline_tokenization_equals_petformers(tmp_path, tiny_tokenizer_dir):
    """bench_hf.encode (transformers' chat template) and petformers' `chat` template give the same
    input tokens and the same trained targets, so both tools train on exactly the same tokens."""
    from transformers import AutoTokenizer

    from petformers.data.prepare import prepare
    from petformers.tokenizer import Tokenizer

    bench, bench_hf = _import_script("bench"), _import_script("bench_hf")
    records = [{"instruction": "Name a colour.", "input": "", "output": "Blue."},
               {"instruction": "Translate.", "input": "Bonjour le monde", "output": "Hello world, again!"}]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(bench.alpaca_conversation(r)) + "\n" for r in records))

    hf_tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    ours, _ = prepare(str(path), Tokenizer.from_dir(tiny_tokenizer_dir), 64, template="chat", packing=False,
                      progress=False)
    for i, messages in enumerate(bench_hf.read_conversations(path)):
        ids, labels = bench_hf.encode(hf_tok, messages, 64)
        row = ours[i]
        n = int((row["segment_ids"] == 0).sum())
        assert row["input_ids"][:n].tolist() == ids
        # petformers stores shifted targets; transformers shifts labels inside the model.
        assert row["targets"][:n - 1].tolist() == labels[1:]


def test_flop_counts_match_smollm2_shapes():
    bench = _import_script("bench")
    config = tiny_config(vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9, n_kv_heads=3,
                         intermediate_size=1536, tie_word_embeddings=True)
    model = build_model(config, device="meta")
    body = sum(m.weight.numel() for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and name.startswith("layers."))
    assert bench.N_BODY == body
    assert bench.N_HEAD == model.lm_head.weight.numel()
    apply_lora(model, PetConfig(lora_rank=16, lora_alpha=16, target_modules=".*wq|.*wk|.*wv|.*wo"))
    assert bench.N_LORA == sum(p.numel() for p in model.parameters() if p.requires_grad) == 1_843_200


@pytest.mark.parametrize("shape", [(5, 24), (2, 7, 24)])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fused_lora_update_equals_the_unfused_formula(shape, dropout):
    """LoRALinear adds s·B·A·dropout(x) to W·x in one addmm (fp32 base): same outputs, same gradients for x,
    A and B as the separate scale-and-add, and the same dropout mask for the same seed."""
    from petformers.pet.lora import LoRALinear

    torch.manual_seed(0)
    layer = LoRALinear.from_linear(torch.nn.Linear(24, 10, bias=True), rank=4, alpha=12, dropout=dropout)
    torch.nn.init.normal_(layer.lora_b.weight)
    layer.train()
    x = torch.randn(*shape, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    torch.manual_seed(1)
    y = layer(x)
    torch.manual_seed(1)
    a, b = layer.lora_a.weight.detach().clone().requires_grad_(True), layer.lora_b.weight.detach().clone()
    b.requires_grad_(True)
    dropped = torch.nn.functional.dropout(x_ref, dropout, training=True)
    y_ref = torch.nn.functional.linear(x_ref, layer.weight, layer.bias) + (dropped @ a.T @ b.T) * layer.scaling
    assert y.shape == y_ref.shape
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.lora_a.weight.grad, a.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.lora_b.weight.grad, b.grad, atol=1e-5, rtol=1e-5)


def test_baseline_micro_batches_equal_one_batch_and_group_by_length_is_transformers_order():
    """The transformers + peft peer as a skilled user runs it: 2 micro-batches of 4, each padded to its own
    longest sample, with the summed token loss divided by the step's trained tokens, give the same loss
    and gradients as the 8 samples in one padded batch (Trainer's num_items_in_batch rule); the
    group_by_length order is transformers' own LengthGroupedSampler over the 8 samples of a step."""
    import random

    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.trainer_pt_utils import LengthGroupedSampler

    bench_hf = _import_script("bench_hf")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).float()
    rng = random.Random(0)
    samples = []
    for _ in range(8):
        n = rng.randint(3, 20)
        ids = [rng.randrange(1, 64) for _ in range(n)]
        cut = rng.randint(1, n - 1)
        samples.append((ids, [bench_hf.IGNORE] * cut + ids[cut:]))

    def grads(batches):
        model.zero_grad()
        trained = sum(int((b["labels"][:, 1:] != bench_hf.IGNORE).sum()) for b in batches)
        total = 0.0
        for b in batches:
            loss = bench_hf.summed_loss(model, b, autocast=False) / trained
            loss.backward()
            total += loss.item()
        return total, [p.grad.clone() for p in model.parameters()]

    whole, g_whole = grads([bench_hf.pad_batch(samples, 0)])
    split, g_split = grads([bench_hf.pad_batch(samples[:4], 0), bench_hf.pad_batch(samples[4:], 0)])
    assert abs(whole - split) < 1e-5
    for a, b in zip(g_whole, g_split):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # the mean over 2 separately averaged micro-batches (the rule this replaces) is not the same loss
    halves = [bench_hf.summed_loss(model, bench_hf.pad_batch(s, 0), False).item()
              / sum(int(t != bench_hf.IGNORE) for _, lab in s for t in lab[1:]) for s in (samples[:4], samples[4:])]
    assert abs(sum(halves) / 2 - whole) > 1e-4

    lengths = [len(ids) for ids, _ in samples] * 4
    ours = bench_hf.sample_order(lengths, 8, True, random.Random(1), torch.Generator().manual_seed(3))
    theirs = list(LengthGroupedSampler(8, lengths=lengths, generator=torch.Generator().manual_seed(3)))
    assert [next(ours) for _ in range(len(lengths))] == theirs
