"""GGUF export of the real SmolLM2-135M (a Q4_1 GGUF) with a LoRA adapter whose B is non-zero,
loaded back by llama.cpp (the real client) and by transformers' GGUF reader."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import llamacpp
from petformers.checkpoint.gguf_export import export_gguf_lora, export_merged, source_reader, touched_parameters
from petformers.checkpoint.load import load_pretrained
from petformers.checkpoint.peft import merge_adapter, save_peft_adapter
from petformers.pet import PetConfig, apply_lora, merge_and_unload

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(llamacpp.unavailable_reason() is not None, reason=str(llamacpp.unavailable_reason()))]

ROOT = Path(__file__).resolve().parents[1]
MIXED_TEXT = "Hello wörld! 你好，世界。 Emoji 🎉🚀👍🏽 and numbers 1234567 <|im_start|>user\n  tabs\tend"
B_STD = 0.05  # the adapter's B: strong enough to change greedy continuations, not to break the model
PLAIN_PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, a small robot"]


def greedy(model, ids: list[int], n: int) -> list[int]:
    """petformers' merged model, greedy, n new tokens (no early stop: compared token for token)."""
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[-n:]


@pytest.fixture(scope="module")
def smol(smollm2_gguf, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf_smollm2")
    reader = source_reader(smollm2_gguf)
    model, tokenizer = load_pretrained(smollm2_gguf, reader=reader)
    prompt_ids = [tokenizer.encode(p) for p in PLAIN_PROMPTS]
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2+2? Answer briefly."}])
    prompt_ids.append(tokenizer.encode(chat))
    with torch.no_grad():
        base_logits = model(torch.tensor([prompt_ids[0]]))[0].numpy()
    config = PetConfig(lora_rank=8, lora_alpha=16, target_modules=["wq", "wk", "wv", "wo"])  # attention only
    torch.manual_seed(0)  # A's initialisation
    apply_lora(model, config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_b" in name:
                p.copy_(torch.randn(p.shape, generator=g) * B_STD)
    save_peft_adapter(model, config, out / "adapter", str(smollm2_gguf))
    touched = touched_parameters(model)
    model = merge_and_unload(model).eval()
    files = {}
    for outtype in ("f32", "f16", "q8_0", "q4_0", "q4_k", "q4_1"):
        files[outtype] = out / f"smollm2-{outtype}.gguf"
        if outtype == "q8_0":
            tracemalloc.start()  # numpy's allocations while the file is written (the model is torch's)
        files[outtype + "_result"] = export_merged(model, tokenizer, files[outtype], outtype, reader=reader,
                                                   touched=touched, modelfile=outtype == "f32", progress=False)
        if outtype == "q8_0":
            files["q8_0_peak"] = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
    return SimpleNamespace(base=smollm2_gguf, reader=reader, model=model, tokenizer=tokenizer, files=files,
                           adapter=out / "adapter", prompts=prompt_ids, base_logits=base_logits, out=out)


def test_adapter_changes_the_model(smol):
    with torch.no_grad():
        merged = smol.model(torch.tensor([smol.prompts[0]]))[0].numpy()
    assert np.abs(merged - smol.base_logits).max() > 0.5


def test_export_streams_tensor_by_tensor(smol):
    """Writing q8_0 allocates about one tensor at a time, not a second copy of the model: the peak is
    a few times the largest tensor (the 49152 x 576 embeddings), far below the model's float32 size."""
    largest = 49152 * 576 * 4
    model_bytes = sum(p.numel() * 4 for p in smol.model.parameters())
    assert smol.files["q8_0_peak"] < 3 * largest < 0.7 * model_bytes, (smol.files["q8_0_peak"], largest)


def test_f32_in_llamacpp_logits_and_greedy_equal_petformers(smol):
    with llamacpp.Model(smol.files["f32"]) as m:
        for ids in smol.prompts:
            with torch.no_grad():
                ref = smol.model(torch.tensor([ids]))[0].numpy()
            assert np.abs(m.logits(ids) - ref).max() < 1e-3
            assert m.greedy(ids, 8, stop_at_eog=False) == greedy(smol.model, ids, 8)


def test_f32_in_transformers_logits_and_greedy_equal_petformers(smol):
    from transformers import AutoModelForCausalLM

    f = smol.files["f32"]
    hf = AutoModelForCausalLM.from_pretrained(str(f.parent), gguf_file=f.name, dtype=torch.float32).eval()
    for ids in (smol.prompts[0], smol.prompts[-1]):  # a plain and a chat prompt
        with torch.no_grad():
            ref = smol.model(torch.tensor([ids]))[0]
            logits = hf(torch.tensor([ids])).logits[0]
            assert (logits - ref).abs().max() < 1e-3
            out = hf.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids):].tolist()
        want = greedy(smol.model, ids, 8)
        eos = smol.tokenizer.eos_ids
        if any(t in eos for t in want):  # transformers stops after the first end-of-turn token
            want = want[:min(want.index(t) for t in eos if t in want) + 1]
        assert out == want


@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
def test_f16_q8_0_same_greedy_tokens(smol, outtype):
    with llamacpp.Model(smol.files[outtype]) as m:
        for ids in smol.prompts:
            assert m.greedy(ids, 4, stop_at_eog=False) == greedy(smol.model, ids, 4)


def _held_out_notes() -> list[str]:
    spec = importlib.util.spec_from_file_location("make_data", ROOT / "demo" / "make_data.py")
    make_data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_data)
    _, held_out = make_data.make_splits(128, 40)
    return [r["input"] for r in held_out]


def _perplexity(path: Path, texts: list[list[int]]) -> float:
    total, count = 0.0, 0
    with llamacpp.Model(path) as m:
        for ids in texts:
            nll, n = m.nll(ids)
            total, count = total + nll, count + n
    return float(np.exp(total / count))


@pytest.fixture(scope="module")
def demo_tuned(smollm2_gguf, tmp_path_factory):
    """The fine-tune `make demo` makes (its config and data, LoRA on every projection, one epoch: 43
    steps, ~2.5 min here), exported as f16, q4_0 and q4_k: the issue's "the fine-tune as GGUF"."""
    out = tmp_path_factory.mktemp("gguf_demo_tuned")
    subprocess.run([sys.executable, str(ROOT / "demo" / "make_data.py"), "--out_dir", str(out / "data")],
                   check=True, capture_output=True)
    run = subprocess.run([sys.executable, "-m", "petformers", "run", "--config",
                          str(ROOT / "configs" / "smollm2" / "lora_smollm2_135m.yaml"),
                          "--train_dataset_dir", str(out / "data" / "train.json"), "--output_dir", str(out / "run"),
                          "--load_checkpoint", str(smollm2_gguf), "--do_eval", "False",
                          "save_merged=False", "save_gguf=none"],
                         cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, TQDM_DISABLE="1"))
    assert run.returncode == 0, run.stderr[-2000:]
    reader = source_reader(smollm2_gguf)
    model, tokenizer = load_pretrained(smollm2_gguf, reader=reader)
    model, _ = merge_adapter(model, out / "run" / "adapter")
    files = {}
    for outtype in ("f16", "q4_0", "q4_k"):
        files[outtype] = out / f"tuned-{outtype}.gguf"
        files[outtype + "_result"] = export_merged(model.eval(), tokenizer, files[outtype], outtype, reader=reader,
                                                   modelfile=False, progress=False)
    return SimpleNamespace(files=files, tokenizer=tokenizer, summary=json.loads((out / "run" / "run_summary.json")
                                                                                .read_text()))


def test_q4_0_and_q4_k_perplexity_against_f16(demo_tuned):
    """The issue's bound, 10% of f16's perplexity on the 40 held-out demo notes, for the demo's fine-tune.
    Measured: f16 114.9, q4_0 113.9 (0.991x), q4_k 121.5 (1.057x)."""
    assert demo_tuned.summary["steps"] == 43 and demo_tuned.summary["final_loss"] < 0.5, demo_tuned.summary
    notes = _held_out_notes()
    assert len(notes) == 40
    texts = [demo_tuned.tokenizer.encode(n) for n in notes]
    ppl = {t: _perplexity(demo_tuned.files[t], texts) for t in ("f16", "q4_0", "q4_k")}
    assert 1.0 < ppl["f16"] < 200, ppl
    assert ppl["q4_0"] <= 1.10 * ppl["f16"], ppl
    assert ppl["q4_k"] <= 1.10 * ppl["f16"], ppl
    types = demo_tuned.files["q4_0_result"]["types"]
    # llama-quantize's types: every matrix Q4_0 but the tied embeddings (Q6_K, 576-wide rows: Q8_0)
    assert types == {"Q4_0": 210, "Q8_0": 1, "F32": 61}, types
    # q4_k is llama-quantize's Q4_K_M: Q4_K for the 1536-wide ffn_down rows, Q6_K where the mix gives
    # more bits; 576-wide rows fall back to Q5_0 / Q8_0 as in llama-quantize.
    types = demo_tuned.files["q4_k_result"]["types"]
    assert types.get("Q4_K", 0) == 16 and types.get("Q6_K", 0) == 14, types


def test_q4_0_perplexity_with_a_random_attention_adapter(smol):
    """A regression guard, not the issue's bound: this base is already 4-bit (Q4_1), and requantizing it
    onto Q4_0's symmetric grid costs ~18% perplexity with no adapter at all (measured 1.179x) and 1.17-1.21x
    with attention-only adapters (this seeded one: 1.2045x; one trained on the demo data: 1.171x), while
    the file holds llama.cpp's types and llama.cpp's bytes (llama-quantize --allow-requantize gives the
    same). The README says so."""
    texts = [smol.tokenizer.encode(n) for n in _held_out_notes()]
    ppl = {t: _perplexity(smol.files[t], texts) for t in ("f16", "q4_0", "q4_k")}
    assert ppl["q4_k"] <= 1.10 * ppl["f16"], ppl  # measured 1.028
    assert ppl["q4_0"] <= 1.22 * ppl["f16"], ppl


def test_tokenizer_and_chat_template_read_back(smol):
    from transformers import AutoTokenizer

    source = smol.tokenizer.encode(MIXED_TEXT)
    assert len(source) > 20
    with llamacpp.Model(smol.files["f32"]) as m:
        assert m.tokenize(MIXED_TEXT) == source
        assert m.chat_template() == smol.tokenizer.chat_template
        assert m.meta("tokenizer.ggml.pre") == "smollm"
    with llamacpp.Model(smol.base) as m:  # the source file itself, as llama.cpp reads it
        assert m.tokenize(MIXED_TEXT) == source
    f = smol.files["f32"]
    tok = AutoTokenizer.from_pretrained(str(f.parent), gguf_file=f.name)
    assert tok.encode(MIXED_TEXT, add_special_tokens=False) == source
    assert tok.chat_template == smol.tokenizer.chat_template


def test_gguf_lora_over_original_q4_1_generates_what_merged_f32_generates(smol):
    lora = smol.out / "adapter.gguf"
    result = export_gguf_lora(smol.base, smol.adapter, lora, progress=False)
    assert result["tensors"] == 30 * 4 * 2
    with llamacpp.Model(smol.files["f32"]) as merged:
        want = [merged.greedy(ids, 8, stop_at_eog=False) for ids in smol.prompts]
    with llamacpp.Model(smol.base) as plain:
        without = [plain.greedy(ids, 8, stop_at_eog=False) for ids in smol.prompts]
    with llamacpp.Model(smol.base, lora=lora) as adapted:
        got = [adapted.greedy(ids, 8, stop_at_eog=False) for ids in smol.prompts]
    assert want != without  # the adapter changes what is generated
    assert got == want


def test_q4_1_keeps_untouched_tensors_block_for_block(smol):
    """The base is Q4_1: tensors the attention-only adapter did not touch (embeddings, norms, the MLP)
    are the base's bytes; the attention matrices are requantized from the merged weights."""
    import gguf

    out = gguf.GGUFReader(str(smol.files["q4_1"]))
    base = {t.name: t for t in smol.reader.tensors}
    same, changed = [], []
    for t in out.tensors:
        src = base[t.name]
        assert t.tensor_type == src.tensor_type, t.name
        (same if np.array_equal(np.asarray(t.data), np.asarray(src.data)) else changed).append(t.name)
    assert all(".attn_" in n and n.endswith(("q.weight", "k.weight", "v.weight", "output.weight")) for n in changed)
    assert len(changed) == 120
    assert "token_embd.weight" in same and "blk.7.ffn_down.weight" in same and len(same) == 152
    assert smol.files["q4_1_result"]["copied"] == 152
    with llamacpp.Model(smol.files["q4_1"]) as m:
        assert len(m.greedy(smol.prompts[0], 4, stop_at_eog=False)) == 4


def test_modelfile_beside_the_f32_export(smol):
    text = (smol.files["f32"].parent / "Modelfile").read_text()
    assert text.startswith("FROM ./smollm2-f32.gguf\n")
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in text
    assert 'PARAMETER stop "<|im_end|>"' in text
