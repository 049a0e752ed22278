"""GGUF export (`petformers export gguf` / `gguf-lora`), checked by llama.cpp itself and by
transformers' GGUF reader: tiny random models of each family here, the real SmolLM2 in
test_gguf_export_smollm2.py. Quantizers are checked against the gguf package and llama.cpp."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import llamacpp
from conftest import write_tiny_llama
from petformers.checkpoint import gguf_quants, gguf_write
from petformers.checkpoint.load import load_pretrained
from petformers.checkpoint.peft import save_peft_adapter
from petformers.pet import PetConfig, apply_lora, lora_state_dict

needs_llamacpp = pytest.mark.skipif(llamacpp.unavailable_reason() is not None,
                                    reason=str(llamacpp.unavailable_reason()))
MIXED_TEXT = "Hello wörld! 你好，世界。 Emoji 🎉🚀 and عربى text\n  <|im_start|>user\nnew line 12345"
IDS = [5, 17, 301, 42, 9, 77, 130, 2, 64, 18]


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "petformers", *args], capture_output=True, text=True)


def make_adapter(model_dir: Path, out: Path, **pet) -> tuple[Path, torch.Tensor]:
    """A LoRA adapter with non-zero B (random), saved in PEFT format, and the merged model's logits."""
    from petformers.pet import merge_and_unload

    model = load_pretrained(model_dir, with_tokenizer=False)[0]
    config = PetConfig(**({"lora_rank": 4, "lora_alpha": 8, "target_modules": "all-linear"} | pet))
    torch.manual_seed(0)  # LoRA A's init draws from the global generator: the same adapter whatever ran before
    apply_lora(model, config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, t in lora_state_dict(model).items():
            t.add_(torch.randn(t.shape, generator=g) * 0.1)
    save_peft_adapter(model, config, out, str(model_dir))
    with torch.no_grad():
        logits = merge_and_unload(model).eval()(torch.tensor([IDS]))[0]
    return out, logits


# ---- quantizers --------------------------------------------------------------------------------

def _test_matrix(rows=48, cols=512, seed=0) -> np.ndarray:
    x = (np.random.default_rng(seed).standard_normal((rows, cols)) * 0.05).astype(np.float32)
    x[0, :256] = 0  # an all-zero block
    x[1, :16] = 0  # an all-zero sub-block
    x[2, :] = 0.01  # a constant row
    x[3, 7] = 3.0  # an outlier
    return x


@pytest.mark.parametrize("qtype", ["BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_quantizer_equals_gguf_package(qtype):
    import gguf

    x = _test_matrix()
    ours = gguf_quants.quantize(x, qtype)
    theirs = gguf.quants.quantize(x, gguf.GGMLQuantizationType[qtype])
    assert ours.tobytes() == theirs.tobytes()
    assert ours.nbytes == gguf_quants.nbytes(qtype, x.shape)


def _ggml_quantize(x: np.ndarray, qtype: str) -> np.ndarray:
    """llama.cpp's own quantizer (ggml_quantize_chunk, no importance matrix)."""
    import ctypes

    import gguf

    L = llamacpp.lib()
    L.ggml_quantize_chunk.restype = ctypes.c_size_t
    L.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                      ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    t = int(gguf.GGMLQuantizationType[qtype])
    L.ggml_quantize_init(t)
    out = np.zeros(gguf_quants.nbytes(qtype, x.shape), np.uint8)
    x = np.ascontiguousarray(x, np.float32)
    n = L.ggml_quantize_chunk(t, x.ctypes.data, out.ctypes.data, 0, x.shape[0], x.shape[1], None)
    assert n == out.nbytes
    return out


def _k_quant_matrices() -> dict[str, np.ndarray]:
    """Data that has split petformers' K-quants from llama.cpp's before: weight-like normals at several
    scales, heavy tails, exact zeros among normals (sparse), values on a 4-bit grid (a dequantized
    Q4_1 base), and the edge cases (zero block, zero sub-block, constant row, outlier)."""
    rng = np.random.default_rng(1)
    shape = (64, 1024)
    mats = {f"normal {s:g}": rng.standard_normal(shape) * s for s in (1e-4, 0.02, 1.0, 30.0)}
    mats["cauchy"] = rng.standard_cauchy(shape) * 0.01
    mats["sparse"] = rng.standard_normal(shape) * (rng.random(shape) < 0.1)
    mats["grid"] = rng.integers(-8, 8, shape) * 0.01 + 0.003
    mats["edges"] = _test_matrix(rows=64)
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in mats.items()}


@needs_llamacpp
@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_K", "Q6_K"])
def test_k_quants_equal_llamacpp_bit_for_bit(qtype):
    """petformers' numpy K-quantizers write llama.cpp's own bytes (ggml_quantize_chunk, no imatrix)."""
    import gguf

    size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]][1]
    for name, x in _k_quant_matrices().items():
        ours, ref = gguf_quants.quantize(x, qtype), _ggml_quantize(x, qtype)
        differing = int((ours.reshape(-1, size) != ref.reshape(-1, size)).any(axis=1).sum())
        assert differing == 0, f"{name}: {differing} of {ref.size // size} blocks differ"
        assert ours.nbytes == gguf_quants.nbytes(qtype, x.shape)


@needs_llamacpp
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_legacy_quants_equal_llamacpp_bit_for_bit(qtype):
    """The gguf package's legacy quantizers (which petformers calls) write llama.cpp's bytes too. The one
    difference: a block whose max or min is a zero takes llama.cpp's +0 where the package may keep a
    -0 of the data (same values), so negative zeros are made positive here."""
    import gguf

    size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]][1]
    for name, x in _k_quant_matrices().items():
        x = x + np.float32(0)  # -0.0 + 0.0 == +0.0
        ours, ref = gguf_quants.quantize(x, qtype), _ggml_quantize(x, qtype)
        assert np.array_equal(ours.reshape(-1, size), ref.reshape(-1, size)), name


def test_k_quant_error_ranks_between_legacy_types():
    """Dequantized by the gguf package: Q4_K beats Q4_0 and Q6_K beats Q5_1, as in llama.cpp."""
    import gguf

    x = _test_matrix(rows=64, seed=1)
    x[3, 7] = 0.0

    def rel_rmse(q):
        y = gguf.quants.dequantize(gguf_quants.quantize(x, q), gguf.GGMLQuantizationType[q]).reshape(x.shape)
        return float(np.sqrt(((y - x) ** 2).mean() / (x ** 2).mean()))

    assert rel_rmse("Q4_K") < rel_rmse("Q4_0")
    assert rel_rmse("Q6_K") < rel_rmse("Q5_1")
    assert rel_rmse("Q6_K") < 0.03


def test_q4_k_m_mix_follows_llama_quantize():
    """q4_k (llama-quantize's alias of Q4_K_M): Q6_K for attn_v / ffn_down in the 'more bits' layers
    (first and last eighth, every third between), Q4_K elsewhere (llama-quant.cpp)."""
    m = gguf_quants.OUTTYPES["q4_k"]
    kinds = [gguf_write.choose_type(f"blk.{i}.ffn_down.weight", (256, 512), m, 32, False) for i in range(32)]
    assert kinds[:4] == ["Q6_K"] * 4 and kinds[28:] == ["Q6_K"] * 4
    assert kinds[4:10] == ["Q4_K", "Q4_K", "Q6_K", "Q4_K", "Q4_K", "Q6_K"]
    assert [gguf_write.choose_type(f"blk.{i}.attn_v.weight", (256, 512), m, 32, False) for i in range(32)] == kinds
    for name in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"):
        assert gguf_write.choose_type(f"blk.0.{name}.weight", (256, 512), m, 32, False) == "Q4_K"
    assert gguf_write.choose_type("token_embd.weight", (256, 512), m, 32, False) == "Q4_K"  # untied
    assert gguf_write.choose_type("output.weight", (256, 512), m, 32, True) == "Q6_K"
    assert gguf_write.choose_type("blk.0.attn_norm.weight", (512,), m, 32, False) == "F32"


def test_q4_k_s_mix_follows_llama_quantize():
    """q4_k_s: Q5_K for attn_v in layers 0-3 and ffn_down in the first eighth, Q4_K elsewhere."""
    s = gguf_quants.OUTTYPES["q4_k_s"]
    v = [gguf_write.choose_type(f"blk.{i}.attn_v.weight", (256, 512), s, 32, False) for i in range(32)]
    down = [gguf_write.choose_type(f"blk.{i}.ffn_down.weight", (256, 512), s, 32, False) for i in range(32)]
    assert v == ["Q5_K"] * 4 + ["Q4_K"] * 28 and down == v
    assert [gguf_write.choose_type(f"blk.{i}.ffn_down.weight", (256, 512), s, 80, False)
            for i in range(80)] == ["Q5_K"] * 10 + ["Q4_K"] * 70
    assert gguf_write.choose_type("blk.9.attn_q.weight", (256, 512), s, 32, False) == "Q4_K"
    assert gguf_write.choose_type("output.weight", (256, 512), s, 32, True) == "Q6_K"
    # 576-wide rows (SmolLM2): Q5_K falls back to Q5_1, as in llama-quantize
    assert gguf_write.choose_type("blk.0.attn_v.weight", (192, 576), s, 30, False) == "Q5_1"


def test_70b_attn_v_gets_q5_k():
    """llama.cpp's 70B rule: attn_v that the mix leaves at Q4_K gets Q5_K (80 layers, GQA llama / qwen2)."""
    from types import SimpleNamespace

    llama70 = SimpleNamespace(num_layers=80, num_heads=64, n_kv_heads=8)
    assert gguf_write.is_70b(llama70, gguf_write.FAMILIES["llama"])
    assert not gguf_write.is_70b(SimpleNamespace(num_layers=80, num_heads=64, n_kv_heads=64),
                                 gguf_write.FAMILIES["llama"])  # llama.cpp's 65B
    assert gguf_write.is_70b(SimpleNamespace(num_layers=80, num_heads=64, n_kv_heads=8), gguf_write.FAMILIES["qwen2"])
    assert not gguf_write.is_70b(SimpleNamespace(num_layers=32, num_heads=32, n_kv_heads=8),
                                 gguf_write.FAMILIES["llama"])
    m, s = gguf_quants.OUTTYPES["q4_k_m"], gguf_quants.OUTTYPES["q4_k_s"]
    assert gguf_write.choose_type("blk.11.attn_v.weight", (1024, 8192), m, 80, False, True) == "Q5_K"
    assert gguf_write.choose_type("blk.12.attn_v.weight", (1024, 8192), m, 80, False, True) == "Q6_K"
    assert gguf_write.choose_type("blk.11.attn_v.weight", (1024, 8192), s, 80, False, True) == "Q5_K"
    assert gguf_write.choose_type("blk.11.attn_q.weight", (8192, 8192), m, 80, False, True) == "Q4_K"
    assert gguf_write.choose_type("blk.11.attn_v.weight", (1024, 8192), m, 80, False, False) == "Q4_K"


@pytest.mark.parametrize("outtype, output_type", [("q4_0", "Q6_K"), ("q4_1", "Q6_K"), ("q5_0", "Q6_K"),
                                                  ("q5_1", "Q6_K"), ("q6_k", "Q6_K"), ("q8_0", "Q8_0"),
                                                  ("f16", "F16"), ("bf16", "BF16"), ("f32", "F32")])
def test_output_matrix_type_by_file_type(outtype, output_type):
    """The output matrix (or tied embeddings): Q6_K for the low-bit files, Q8_0 when its rows do not
    split into the file's blocks or when the file is Q8_0; float files keep their type everywhere."""
    ot = gguf_quants.OUTTYPES[outtype]
    assert gguf_write.choose_type("output.weight", (49152, 512), ot, 30, True) == output_type
    assert gguf_write.choose_type("blk.3.ffn_down.weight", (512, 1536), ot, 30, False) == ot.qtype
    assert gguf_write.choose_type("blk.3.attn_v.weight", (192, 576), ot, 30, False) == \
        ("Q8_0" if ot.qtype == "Q6_K" else ot.qtype)
    if output_type == "Q6_K":  # SmolLM2's tied 576-wide embeddings: Q6_K does not fit, Q8_0 as llama-quantize
        assert gguf_write.choose_type("token_embd.weight", (49152, 576), ot, 30, True) == "Q8_0"


def test_fallback_types_for_rows_that_do_not_split_into_blocks():
    assert gguf_quants.usable_type("Q4_K", 576) == "Q5_0"  # SmolLM2's hidden size: as llama-quantize
    assert gguf_quants.usable_type("Q6_K", 576) == "Q8_0"
    assert gguf_quants.usable_type("Q4_K", 1536) == "Q4_K"
    assert gguf_quants.usable_type("Q4_0", 48) == "F16"


def test_permutation_is_the_inverse_of_the_readers():
    from petformers.checkpoint.gguf_file import _unpermute

    w = torch.randn(4 * 16, 8)
    assert not torch.equal(gguf_write.permute_rows(w, 4), w)
    assert torch.equal(_unpermute(gguf_write.permute_rows(w, 4), 4), w)


# ---- tiny models: every outtype, llama.cpp and transformers read them --------------------------

@pytest.fixture(scope="module")
def tiny_export(tiny_model_dir, tmp_path_factory):
    """A tiny Llama + LoRA adapter (non-zero B on every linear layer), exported as f32 by the CLI."""
    out = tmp_path_factory.mktemp("gguf_tiny")
    adapter, merged_logits = make_adapter(tiny_model_dir, out / "adapter")
    gguf_file = out / "tiny-f32.gguf"
    r = cli("export", "gguf", "--load_checkpoint", str(tiny_model_dir), "--adapter", str(adapter),
            "--output", str(gguf_file), "--outtype", "f32")
    assert r.returncode == 0, r.stderr
    assert "llama-cli -m" in r.stdout
    return gguf_file, adapter, merged_logits


@needs_llamacpp
def test_tiny_f32_llamacpp_logits_equal_merged_model(tiny_export):
    gguf_file, _, merged = tiny_export
    with llamacpp.Model(gguf_file) as m:
        logits = m.logits(IDS)
    assert np.abs(logits - merged.numpy()).max() < 1e-4


def test_tiny_f32_transformers_reads_it(tiny_export, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file, _, merged = tiny_export
    model = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name,
                                                 dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([IDS])).logits[0]
    assert (logits - merged).abs().max() < 1e-4
    from tokenizers import Tokenizer

    source = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json")).encode(MIXED_TEXT, add_special_tokens=False).ids
    tok = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    assert tok.encode(MIXED_TEXT, add_special_tokens=False) == source


@needs_llamacpp
def test_tiny_tokenizer_and_template_read_back_by_llamacpp(tiny_export, tiny_model_dir):
    from conftest import CHATML_TEMPLATE
    from tokenizers import Tokenizer

    gguf_file, _, _ = tiny_export
    source = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json")).encode(MIXED_TEXT, add_special_tokens=False).ids
    assert len(source) > 20
    with llamacpp.Model(gguf_file) as m:
        assert m.tokenize(MIXED_TEXT) == source
        assert m.chat_template() == CHATML_TEMPLATE
        assert m.meta("tokenizer.ggml.pre") == "gpt-2"
        assert m.meta("general.file_type") == "0"


# llama.cpp's names of the file types (llama_model_ftype_name)
FILE_TYPE_NAMES = {"f32": "all F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0", "q4_1": "Q4_1",
                   "q5_0": "Q5_0", "q5_1": "Q5_1", "q4_k": "Q4_K - Medium", "q4_k_m": "Q4_K - Medium",
                   "q4_k_s": "Q4_K - Small", "q6_k": "Q6_K"}


@needs_llamacpp
@pytest.mark.parametrize("outtype", ["f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q4_k_s",
                                     "q6_k"])
def test_tiny_every_outtype_loads_and_stays_close(tiny_export, tiny_model_dir, tmp_path, outtype):
    """Each outtype loads in llama.cpp; its logits stay near f32's, by a bound per bit width."""
    import gguf

    gguf_file, adapter, merged = tiny_export
    out = tmp_path / f"tiny-{outtype}.gguf"
    from petformers.checkpoint.gguf_export import export_gguf

    result = export_gguf(tiny_model_dir, adapter, out, outtype, modelfile=False, progress=False)
    reader = gguf.GGUFReader(str(out))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_norm.weight"] == "F32"
    want = gguf_quants.usable_type(gguf_quants.OUTTYPES[outtype].qtype, 64)
    assert types["blk.0.attn_q.weight"] == want, (types, result)
    with llamacpp.Model(out) as m:
        logits = m.logits(IDS)
        # general.file_type is llama-quantize's for this mix, as llama.cpp names it
        assert m.desc().endswith(" " + FILE_TYPE_NAMES[outtype]), m.desc()
    err = np.abs(logits - merged.numpy()).max() / np.abs(merged.numpy()).max()
    # Measured (seeded adapter): f16 7e-4, bf16 6e-3, q8_0 0.019, 5-bit 0.10-0.12, 4-bit 0.19-0.21 (the
    # K types fall back on these 64-wide rows: q4_k/q4_k_s -> Q5_0, q6_k -> Q8_0).
    bits = {"f16": 16, "bf16": 16, "q8_0": 8, "q6_k": 8, "q5_0": 5, "q5_1": 5, "q4_k": 5, "q4_k_s": 5}.get(outtype, 4)
    bound = {"f16": 2e-3, "bf16": 2e-2}.get(outtype) or {8: 5e-2, 5: 0.2, 4: 0.35}[bits]
    assert err < bound, err


@needs_llamacpp
def test_tiny_gguf_lora_in_llamacpp_equals_merged(tiny_model_dir, tmp_path):
    """gguf-lora over a base GGUF computes what the merged model computes, with per-module ranks and
    alphas (folded into B) and rsLoRA scaling."""
    adapter, merged = make_adapter(tiny_model_dir, tmp_path / "adapter", lora_rank=4, lora_alpha=8,
                                   rank_pattern={"wv": 2}, alpha_pattern={"wo": 3.0}, use_rslora=True)
    from petformers.checkpoint.gguf_export import export_gguf

    base = tmp_path / "base.gguf"  # in process: tiny_export runs `export gguf` through the CLI already
    export_gguf(tiny_model_dir, None, base, "f32", modelfile=False, progress=False)
    lora = tmp_path / "lora.gguf"
    r = cli("export", "gguf-lora", "--load_checkpoint", str(tiny_model_dir), "--adapter", str(adapter),
            "--output", str(lora))
    assert r.returncode == 0, r.stderr
    import gguf

    reader = gguf.GGUFReader(str(lora))
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.type"].contents() == "lora"
    assert reader.fields["adapter.lora.alpha"].contents() == 8.0
    shapes = {t.name: tuple(int(d) for d in t.shape) for t in reader.tensors}  # GGUF order: ne[0] first
    assert shapes["blk.0.attn_q.weight.lora_a"] == (64, 4) and shapes["blk.0.attn_q.weight.lora_b"] == (4, 64)
    assert shapes["blk.1.attn_v.weight.lora_a"] == (64, 2)
    with llamacpp.Model(base) as m:
        plain = m.logits(IDS)
    with llamacpp.Model(base, lora=lora) as m:
        adapted = m.logits(IDS)
    assert np.abs(plain - merged.numpy()).max() > 1e-2  # the adapter matters
    assert np.abs(adapted - merged.numpy()).max() < 1e-4


def test_gguf_lora_refuses_dora_in_one_line(tiny_model_dir, tmp_path):
    adapter, _ = make_adapter(tiny_model_dir, tmp_path / "dora", use_dora=True)
    r = cli("export", "gguf-lora", "--load_checkpoint", str(tiny_model_dir), "--adapter", str(adapter),
            "--output", str(tmp_path / "x.gguf"))
    assert r.returncode == 2
    errors = [line for line in r.stderr.splitlines() if line.startswith("petformers: error:")]
    assert len(errors) == 1 and "DoRA" in errors[0] and "Traceback" not in r.stderr
    assert not (tmp_path / "x.gguf").exists()


def test_bad_outtype_and_missing_adapter_are_one_line(tiny_model_dir, tmp_path):
    r = cli("export", "gguf", "--load_checkpoint", str(tiny_model_dir), "--output", str(tmp_path / "x.gguf"),
            "--outtype", "q3_k")
    assert r.returncode == 2 and "q3_k" in r.stderr and "Traceback" not in r.stderr
    r = cli("export", "gguf", "--load_checkpoint", str(tiny_model_dir), "--adapter", str(tmp_path / "nope"),
            "--output", str(tmp_path / "x.gguf"))
    assert r.returncode == 2 and "nope" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "x.gguf.tmp").exists()
    (tmp_path / "d").mkdir()
    r = cli("export", "gguf", "--load_checkpoint", str(tiny_model_dir), "--output", str(tmp_path / "d"))
    assert r.returncode == 2 and "is a directory" in r.stderr and "Traceback" not in r.stderr


def test_disk_full_while_writing_is_one_line_and_leaves_nothing(tiny_model_dir, tmp_path):
    """A write past RLIMIT_FSIZE (SIGXFSZ ignored) fails with EFBIG as a full disk fails with ENOSPC."""
    import resource
    import signal

    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))  # the f32 file is ~550 KB

    out = tmp_path / "full.gguf"
    r = subprocess.run([sys.executable, "-m", "petformers", "export", "gguf", "--load_checkpoint", str(tiny_model_dir),
                        "--output", str(out), "--outtype", "f32", "--no_modelfile"],
                       capture_output=True, text=True, preexec_fn=limited)
    assert r.returncode == 2, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("petformers: error:")]
    assert len(errors) == 1 and "full.gguf" in errors[0] and "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []


@needs_llamacpp
def test_llama3_rope_scaling_written_as_rope_freqs(tiny_tokenizer_dir, tmp_path):
    """Llama 3.1 rope scaling becomes llama.cpp's rope_freqs tensor: logits match beyond the
    original context only if the factors are right."""
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
    model_dir = write_tiny_llama(tmp_path / "m", rope_scaling=scaling, tokenizer_dir=tiny_tokenizer_dir)
    out = tmp_path / "r.gguf"
    assert cli("export", "gguf", "--load_checkpoint", str(model_dir), "--output", str(out),
               "--outtype", "f32").returncode == 0
    model = load_pretrained(model_dir, with_tokenizer=False)[0]
    ids = list(range(5, 69))  # 64 positions, 4x the original context
    with torch.no_grad():
        ref = model(torch.tensor([ids]))[0].numpy()
    with llamacpp.Model(out) as m:
        assert np.abs(m.logits(ids) - ref).max() < 1e-4


def test_modelfile_templates_by_family():
    from types import SimpleNamespace

    from petformers.checkpoint.ollama import modelfile_text

    llama3 = ("{{ bos_token }}{% if messages[0]['role'] != 'system' %}<|start_header_id|>system<|end_header_id|>"
              "\n\nCutting Knowledge Date: December 2023<|eot_id|>{% endif %}{% for m in messages %}"
              "<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>{% endfor %}"
              "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
    ids = {"<|eot_id|>": 9, "<|end_of_text|>": 8, "</s>": 2}
    tok = SimpleNamespace(chat_template=llama3, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
                          eos_ids=[8, 9], id_to_token={v: k for k, v in ids.items()}.get)
    text = modelfile_text("m.gguf", tok)
    assert "<|start_header_id|>{{ .Role }}<|end_header_id|>" in text
    assert 'SYSTEM """Cutting Knowledge Date: December 2023"""' in text
    assert 'PARAMETER stop "<|eot_id|>"' in text and 'PARAMETER stop "<|end_of_text|>"' in text
    inst = "{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]{% else %}" \
           "{{ m['content'] }}</s>{% endif %}{% endfor %}"
    tok = SimpleNamespace(chat_template=inst, bos_token="<s>", eos_token="</s>", eos_ids=[2],
                          id_to_token={2: "</s>"}.get)
    text = modelfile_text("m.gguf", tok)
    assert "[INST] " in text and "SYSTEM" not in text and 'PARAMETER stop "</s>"' in text
    tok = SimpleNamespace(chat_template="{{ messages }}", bos_token="<s>", eos_token="</s>", eos_ids=[2],
                          id_to_token={2: "</s>"}.get)
    assert "TEMPLATE" not in modelfile_text("m.gguf", tok)  # unknown format: Ollama uses the GGUF's own


def test_modelfile_for_chatml(tiny_export):
    gguf_file, _, _ = tiny_export
    text = (gguf_file.parent / "Modelfile").read_text()
    assert text.startswith(f"FROM ./{gguf_file.name}\n")
    assert "TEMPLATE \"\"\"{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>" in text
    assert "<|im_start|>assistant\n\"\"\"" in text
    assert 'PARAMETER stop "<|im_end|>"' in text
    assert "SYSTEM" not in text  # the tiny ChatML template has no default system prompt


# ---- every family: llama.cpp, petformers' GGUF reader and gguf-lora agree with the merged model ----

@needs_llamacpp
@pytest.mark.parametrize("family", ["llama3", "mistral", "qwen2", "qwen3"])
def test_family_round_trip(family, tiny_tokenizer_dir, tmp_path):
    """Tiny random models of each family (biases, q/k norms, explicit head_dim, rope scaling, tied
    embeddings; see family_models.py) with a LoRA adapter on every linear layer."""
    import gguf
    from family_models import GGUF_ARCH, write_family

    from petformers.checkpoint.gguf_export import export_gguf, export_gguf_lora

    model_dir = write_family(tmp_path / family, family, tokenizer_dir=tiny_tokenizer_dir)
    adapter, merged = make_adapter(model_dir, tmp_path / "adapter")
    ids = IDS[:8]  # Mistral's window is 8 keys: llama.cpp has no sliding window, equal up to 8 tokens
    merged = merged[:8]
    out = tmp_path / f"{family}.gguf"
    export_gguf(model_dir, adapter, out, "f32", modelfile=False, progress=False)
    reader = gguf.GGUFReader(str(out))
    assert reader.fields["general.architecture"].contents() == GGUF_ARCH[family]
    names = {t.name for t in reader.tensors}
    assert ("blk.0.attn_q.bias" in names) == (family == "qwen2")
    assert ("blk.0.attn_q_norm.weight" in names) == (family == "qwen3")
    assert ("output.weight" in names) == (family != "qwen2")  # qwen2 here ties its embeddings
    assert ("rope_freqs.weight" in names) == (family == "llama3")
    with llamacpp.Model(out) as m:
        assert np.abs(m.logits(ids) - merged.numpy()).max() < 1e-4
        assert m.tokenize(MIXED_TEXT) == source_tokens(model_dir)
    petformers_model = load_pretrained(out, with_tokenizer=False)[0]  # petformers' own GGUF reader
    with torch.no_grad():
        assert (petformers_model(torch.tensor([ids]))[0] - merged).abs().max() < 1e-4
    base, lora = tmp_path / "base.gguf", tmp_path / "lora.gguf"
    export_gguf(model_dir, None, base, "f32", modelfile=False, progress=False)
    export_gguf_lora(model_dir, adapter, lora, progress=False)
    with llamacpp.Model(base, lora=lora) as m:
        assert np.abs(m.logits(ids) - merged.numpy()).max() < 1e-4
    # From the GGUF base (q/k rows un-permuted on reading only where llama.cpp permuted them), the
    # same adapter gives the same merged file, tensor for tensor.
    again = tmp_path / "again.gguf"
    export_gguf(base, adapter, again, "f32", modelfile=False, progress=False)
    first = {t.name: np.asarray(t.data) for t in reader.tensors}
    for t in gguf.GGUFReader(str(again)).tensors:
        assert np.array_equal(np.asarray(t.data), first[t.name]), t.name
    # The base's tensors are those of the converter-faithful reference writer of family_models.py.
    from family_models import write_gguf

    ref = gguf.GGUFReader(str(write_gguf(tmp_path / "ref.gguf", model_dir, GGUF_ARCH[family])))
    ours = {t.name: t for t in gguf.GGUFReader(str(base)).tensors}
    assert sorted(ours) == sorted(t.name for t in ref.tensors)
    for t in ref.tensors:
        assert ours[t.name].tensor_type == t.tensor_type and np.array_equal(np.asarray(ours[t.name].data),
                                                                            np.asarray(t.data)), t.name


def source_tokens(model_dir: Path) -> list[int]:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(MIXED_TEXT, add_special_tokens=False).ids


# ---- run's save_gguf --------------------------------------------------------------------------------

def _tiny_run_config(tmp_path: Path, model_dir: Path, alpaca_demo: Path, **top) -> Path:
    import json

    import yaml

    records = [r for r in json.loads(alpaca_demo.read_text(encoding="utf-8"))
               if len(r["instruction"]) + len(r["input"]) + len(r["output"]) < 200][:8]
    data = tmp_path / "train.json"
    data.write_text(json.dumps(records))
    cfg = {"seed": 1, "load_checkpoint": str(model_dir), "run_mode": "finetune", "max_steps": 2,
           "runner_config": {"epochs": 1, "batch_size": 2, "gradient_accumulation_steps": 1},
           "optimizer": {"type": "AdamW", "learning_rate": 5e-2},
           "lr_schedule": {"type": "ConstantWarmUpLR", "learning_rate": 5e-2, "warmup_steps": 0},
           "train_dataset": {"data_loader": {"dataset_dir": str(data), "shuffle": False}},
           "model": {"model_config": {"seq_length": 128, "compute_dtype": "float32", "pet_config": {
               "pet_type": "lora", "lora_rank": 4, "lora_alpha": 8, "target_modules": "all-linear"}}},
           "template": "chat"} | top
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@needs_llamacpp
def test_run_save_gguf_writes_the_trained_model(tiny_model_dir, alpaca_demo, tmp_path):
    """`save_gguf: f32` in the YAML: the run ends with a GGUF (and Modelfile) that llama.cpp computes
    exactly as the trained adapter merged into the base computes."""
    import json

    from petformers.checkpoint.peft import merge_adapter

    config = _tiny_run_config(tmp_path, tiny_model_dir, alpaca_demo, save_gguf="f32")
    out = tmp_path / "out"
    r = cli("run", "--config", str(config), "--output_dir", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    gguf_file = out / "gguf" / "out-f32.gguf"
    assert json.loads((out / "run_summary.json").read_text())["artefacts"]["gguf"] == str(gguf_file)
    assert (out / "gguf" / "Modelfile").read_text().startswith("FROM ./out-f32.gguf\n")
    model = load_pretrained(tiny_model_dir, with_tokenizer=False)[0]
    with torch.no_grad():
        base = model(torch.tensor([IDS]))[0]
    merged, _ = merge_adapter(model, out / "adapter")
    with torch.no_grad():
        want = merged(torch.tensor([IDS]))[0]
    assert (want - base).abs().max() > 1e-2  # two steps at lr 5e-2 moved the model
    with llamacpp.Model(gguf_file) as m:
        assert np.abs(m.logits(IDS) - want.numpy()).max() < 1e-4


def test_run_save_gguf_bad_type_is_one_line(tiny_model_dir, alpaca_demo, tmp_path):
    config = _tiny_run_config(tmp_path, tiny_model_dir, alpaca_demo, save_gguf="q3_k")
    r = cli("run", "--config", str(config), "--output_dir", str(tmp_path / "out"))
    assert r.returncode == 2 and "save_gguf" in r.stderr and "q3_k" in r.stderr and "Traceback" not in r.stderr
