"""The Llama model against transformers' LlamaForCausalLM (the reference), in float32.

Each tiny random Llama is built and saved by transformers; petformers loads the directory and must
give the same logits. Packed rows and the KV cache are checked against plain full-sequence runs.
"""

from __future__ import annotations

import pytest
import torch
from conftest import write_tiny_llama

from petformers.checkpoint.load import load_pretrained
from petformers.models.llama import KVCache

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  # small, so that the 128-token input below crosses the low/medium/high frequency bands
                  "original_max_position_embeddings": 32}
VARIANTS = {
    "gqa-untied": dict(n_kv_heads=2, tie=False),
    "mha-untied": dict(n_kv_heads=4, tie=False),
    "gqa-tied": dict(n_kv_heads=2, tie=True),
    "mqa-tied": dict(n_kv_heads=1, tie=True),
    "llama3-rope": dict(n_kv_heads=2, rope_scaling=LLAMA3_SCALING),
    "linear-rope": dict(n_kv_heads=2, rope_scaling={"rope_type": "linear", "factor": 4.0}),
}


def reference_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def pair(tiny_model_dir):
    """(petformers model, transformers model) for the shared tiny model directory."""
    model, _ = load_pretrained(tiny_model_dir, with_tokenizer=False)
    return model, reference_model(tiny_model_dir)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_equal_transformers(tmp_path, variant):
    path = write_tiny_llama(tmp_path / variant, seed=len(variant), **VARIANTS[variant])
    model, _ = load_pretrained(path, with_tokenizer=False)
    ref = reference_model(path)
    ids = torch.randint(0, 512, (2, 128), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ref(ids).logits
        got = model(ids)
    assert got.dtype == torch.float32
    assert (got - expected).abs().max().item() <= 1e-5
    cfg = model.config
    assert cfg.n_kv_heads == VARIANTS[variant]["n_kv_heads"]
    assert cfg.tie_word_embeddings == VARIANTS[variant].get("tie", False)
    if cfg.tie_word_embeddings:
        assert model.lm_head.weight is model.tok_embeddings.weight
    else:
        assert model.lm_head.weight.data_ptr() != model.tok_embeddings.weight.data_ptr()


def test_parameter_names_are_mindformers(pair):
    model, _ = pair
    names = set(dict(model.named_parameters()))
    for n in ("tok_embeddings.weight", "layers.1.attention.wq.weight", "layers.1.attention.wk.weight",
              "layers.1.attention.wv.weight", "layers.1.attention.wo.weight", "layers.0.feed_forward.w1.weight",
              "layers.0.feed_forward.w2.weight", "layers.0.feed_forward.w3.weight",
              "layers.0.attention_norm.weight", "layers.0.ffn_norm.weight", "norm.weight", "lm_head.weight"):
        assert n in names, n
    assert not any(p.requires_grad for p in model.parameters())  # loaded models are frozen
    assert not model.training


def test_packed_row_equals_separate_samples(pair):
    """Two samples packed in one row (positions restart, segment ids differ) see only themselves."""
    model, _ = pair
    g = torch.Generator().manual_seed(1)
    a, b = torch.randint(0, 512, (1, 23), generator=g), torch.randint(0, 512, (1, 17), generator=g)
    packed = torch.cat([a, b], dim=1)
    positions = torch.cat([torch.arange(23), torch.arange(17)])[None]
    segments = torch.cat([torch.zeros(23, dtype=torch.long), torch.ones(17, dtype=torch.long)])[None]
    with torch.no_grad():
        logits = model(packed, position_ids=positions, segment_ids=segments)
        alone_a, alone_b = model(a), model(b)
    assert (logits[:, :23] - alone_a).abs().max().item() <= 1e-5
    assert (logits[:, 23:] - alone_b).abs().max().item() <= 1e-5
    # Without segment ids the second sample would see the first: the test above is not vacuous.
    with torch.no_grad():
        leaky = model(packed, position_ids=positions)
    assert (leaky[:, 23:] - alone_b).abs().max().item() > 1e-3


def test_packed_batch_with_trailing_padding(pair):
    """A batch of packed rows: row 0 holds two samples, row 1 one sample then padding (its own segment)."""
    model, _ = pair
    g = torch.Generator().manual_seed(2)
    a, b, c = (torch.randint(0, 512, (1, n), generator=g) for n in (10, 14, 19))
    pad = torch.full((1, 5), 3)
    ids = torch.cat([torch.cat([a, b], 1), torch.cat([c, pad], 1)])
    positions = torch.stack([torch.cat([torch.arange(10), torch.arange(14)]),
                             torch.cat([torch.arange(19), torch.arange(5)])])
    segments = torch.tensor([[0] * 10 + [1] * 14, [0] * 19 + [1] * 5])
    with torch.no_grad():
        logits = model(ids, position_ids=positions, segment_ids=segments)
        refs = [model(x) for x in (a, b, c)]
    assert (logits[0, :10] - refs[0][0]).abs().max().item() <= 1e-5
    assert (logits[0, 10:] - refs[1][0]).abs().max().item() <= 1e-5
    assert (logits[1, :19] - refs[2][0]).abs().max().item() <= 1e-5


def test_kv_cache_incremental_equals_full(pair):
    model, ref = pair
    ids = torch.randint(0, 512, (2, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(model.config, batch_size=2, max_len=30, device="cpu", dtype=torch.float32)
        steps = [model(ids[:, :12], cache=cache)]  # prefill
        steps.append(model(ids[:, 12:18], cache=cache))  # a chunk
        for t in range(18, 30):  # then one token at a time
            steps.append(model(ids[:, t:t + 1], cache=cache))
        expected = ref(ids).logits
    incremental = torch.cat(steps, dim=1)
    assert cache.length == 30
    assert (incremental - full).abs().max().item() <= 1e-5
    assert (full - expected).abs().max().item() <= 1e-5


def test_hidden_states_feed_lm_head(pair):
    model, ref = pair
    ids = torch.randint(0, 512, (1, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        hidden = model.hidden_states(ids)
        expected = ref(ids, output_hidden_states=True).hidden_states[-1]
    assert hidden.shape == (1, 9, 64)
    assert (hidden - expected).abs().max().item() <= 1e-5
    assert torch.equal(model.lm_head(hidden), model(ids))
