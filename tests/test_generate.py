"""Generation against transformers' `generate` and its logits processors, on the tiny random Llama."""

from __future__ import annotations

import pytest
import torch

from petformers.checkpoint.load import load_pretrained
from petformers.generate import (GenerationConfig, StreamPrinter, _apply_repetition_penalty,
                                 _filter_top_k_top_p, generate, next_token)


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()


def random_prompt(length: int, seed: int) -> list[int]:
    return torch.randint(4, 512, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def transformers_generate(reference, prompt, **kwargs) -> list[int]:
    x = torch.tensor([prompt])
    out = reference.generate(x, attention_mask=torch.ones_like(x), **kwargs)[0, len(prompt):].tolist()
    eos = reference.generation_config.eos_token_id
    return out[:out.index(eos)] if eos in out else out


@pytest.mark.parametrize("seed", [0, 1])
def test_greedy_equals_transformers(loaded, reference, seed):
    model, tok = loaded
    prompt = random_prompt(12 + seed, seed)
    ours = generate(model, [prompt], GenerationConfig(max_new_tokens=20), tok.eos_ids, tok.pad_id)[0]
    assert ours == transformers_generate(reference, prompt, max_new_tokens=20, do_sample=False)
    assert len(ours) == 20


def test_batched_left_padding_equals_one_by_one(loaded):
    model, tok = loaded
    prompts = [random_prompt(n, seed) for seed, n in enumerate((5, 17, 9, 1))]
    cfg = GenerationConfig(max_new_tokens=12)
    batched = generate(model, prompts, cfg, tok.eos_ids, tok.pad_id)
    alone = [generate(model, [p], cfg, tok.eos_ids, tok.pad_id)[0] for p in prompts]
    assert batched == alone
    assert all(len(a) == 12 for a in alone)


def test_batched_left_padding_equals_transformers(loaded, reference):
    """transformers' own batched generation with left padding and an attention mask gives the same."""
    model, tok = loaded
    prompts = [random_prompt(n, 10 + n) for n in (6, 14, 3)]
    longest = max(map(len, prompts))
    ids = torch.tensor([[tok.pad_id] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    theirs = reference.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)[:, longest:].tolist()
    ours = generate(model, prompts, GenerationConfig(max_new_tokens=10), tok.eos_ids, tok.pad_id)
    assert ours == [t[:t.index(2)] if 2 in t else t for t in theirs]


def test_stops_on_every_eos_id(loaded):
    model, tok = loaded
    prompt = random_prompt(12, 0)
    free = generate(model, [prompt], GenerationConfig(max_new_tokens=20), [], tok.pad_id)[0]
    stop = free[7]
    cut = generate(model, [prompt], GenerationConfig(max_new_tokens=20), [999, stop], tok.pad_id)[0]
    assert cut == free[:free.index(stop)]
    # In a batch, a finished row stops growing while the others go on.
    both = generate(model, [prompt, random_prompt(8, 3)], GenerationConfig(max_new_tokens=20), [stop], tok.pad_id)
    assert both[0] == cut and len(both[1]) > 0


@pytest.mark.parametrize("settings", [
    dict(temperature=0.7), dict(top_k=20), dict(top_p=0.8),
    dict(temperature=1.3, top_k=50, top_p=0.9, repetition_penalty=1.3),
], ids=["temperature", "top_k", "top_p", "all"])
def test_sampling_equals_transformers_with_the_same_seed(loaded, reference, settings):
    """Same processors in the same order and one multinomial draw per step: the same random stream
    (a Generator seeded as transformers' global RNG) gives the same tokens."""
    model, tok = loaded
    prompt = random_prompt(12, 5)
    cfg = GenerationConfig(max_new_tokens=20, do_sample=True, **settings)
    ours = generate(model, [prompt], cfg, tok.eos_ids, tok.pad_id, generator=torch.Generator().manual_seed(123))[0]
    torch.manual_seed(123)
    theirs = transformers_generate(reference, prompt, max_new_tokens=20, do_sample=True,
                                   top_k=cfg.top_k, top_p=cfg.top_p, temperature=cfg.temperature,
                                   repetition_penalty=cfg.repetition_penalty)
    assert ours == theirs


def test_sampling_is_reproducible_and_top_k_1_is_greedy(loaded):
    model, tok = loaded
    prompts = [random_prompt(9, 7), random_prompt(4, 8)]
    cfg = GenerationConfig(max_new_tokens=16, do_sample=True, temperature=1.5)

    def sample(seed, c=cfg):
        return generate(model, prompts, c, tok.eos_ids, tok.pad_id, generator=torch.Generator().manual_seed(seed))

    assert sample(42) == sample(42)
    assert sample(42) != sample(43)
    greedy = generate(model, prompts, GenerationConfig(max_new_tokens=16), tok.eos_ids, tok.pad_id)
    top1 = GenerationConfig(max_new_tokens=16, do_sample=True, temperature=1.5, top_k=1)
    assert sample(42, top1) == greedy == sample(43, top1)


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_matches_transformers(penalty):
    from transformers import RepetitionPenaltyLogitsProcessor

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g) * 4
    seen = torch.randint(0, 50, (3, 12), generator=g)  # with repeats
    expected = RepetitionPenaltyLogitsProcessor(penalty)(seen, logits.clone())
    assert torch.equal(_apply_repetition_penalty(logits, seen, penalty), expected)


@pytest.mark.parametrize("top_k", [1, 5, 49, 50, 80])
def test_top_k_matches_transformers(top_k):
    from transformers import TopKLogitsWarper

    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(top_k)) * 3
    logits[0, :10] = 1.0  # ties at the k-th value are all kept, as in transformers
    expected = TopKLogitsWarper(top_k)(None, logits.clone())
    assert torch.equal(_filter_top_k_top_p(logits, top_k, 1.0), expected)


@pytest.mark.parametrize("top_p", [0.01, 0.3, 0.9, 0.999])
def test_top_p_matches_transformers(top_p):
    from transformers import TopPLogitsWarper

    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(int(top_p * 1000))) * 3
    expected = TopPLogitsWarper(top_p)(None, logits.clone())
    got = _filter_top_k_top_p(logits, 0, top_p)
    assert torch.equal(got, expected)
    assert torch.isfinite(got).sum(-1).min() >= 1  # the most likely token always survives


def test_top_k_then_top_p_matches_transformers_chain():
    from transformers import LogitsProcessorList, TopKLogitsWarper, TopPLogitsWarper

    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(9)) * 2
    expected = LogitsProcessorList([TopKLogitsWarper(10), TopPLogitsWarper(0.7)])(None, logits.clone())
    assert torch.equal(_filter_top_k_top_p(logits, 10, 0.7), expected)


def test_next_token_greedy_ignores_sampling_settings():
    logits = torch.tensor([[0.1, 3.0, 0.2], [2.0, 0.0, 1.0]])
    seen = torch.tensor([[1], [2]])
    assert next_token(logits, seen, GenerationConfig()).tolist() == [1, 0]
    # a strong repetition penalty moves greedy off the repeated token
    assert next_token(logits, seen, GenerationConfig(repetition_penalty=100.0)).tolist() == [2, 0]


def test_stream_printer_waits_for_whole_characters(loaded):
    _, tok = loaded
    text = "ok 你好🎉!"
    pieces = []
    printer = StreamPrinter(tok, pieces.append)
    for token in tok.encode(text):
        printer(0, token)
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    printer.finish()
    assert "".join(pieces) == text  # nothing held back, nothing printed twice
    # An answer cut off inside a character: held back while streaming, printed as decode gives at the end.
    ids = tok.encode("🎉🎉")
    cut = next(n for n in range(1, len(ids)) if tok.decode(ids[:n]).endswith("\ufffd"))
    pieces.clear()
    printer = StreamPrinter(tok, pieces.append)
    for token in ids[:cut]:
        printer(0, token)
    assert "\ufffd" not in "".join(pieces)
    printer.finish()
    assert "".join(pieces) == tok.decode(ids[:cut])


def test_streaming_callback_sees_every_token(loaded):
    model, tok = loaded
    prompts = [random_prompt(6, 1), random_prompt(10, 2)]
    seen = {0: [], 1: []}
    out = generate(model, prompts, GenerationConfig(max_new_tokens=8), tok.eos_ids, tok.pad_id,
                   on_token=lambda row, t: seen[row].append(t))
    assert [seen[0], seen[1]] == out


def test_cuda_generation_matches_cpu(loaded, tiny_model_dir):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    model, tok = loaded
    gpu, _ = load_pretrained(tiny_model_dir, device="cuda", with_tokenizer=False)
    prompts = [random_prompt(7, 1), random_prompt(3, 2)]
    cfg = GenerationConfig(max_new_tokens=10)
    on_gpu = generate(gpu, prompts, cfg, tok.eos_ids, tok.pad_id)
    assert on_gpu == generate(model, prompts, cfg, tok.eos_ids, tok.pad_id)
