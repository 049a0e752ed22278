"""Quantized bases (QLoRA): formats against their oracles (the `gguf` package, bitsandbytes, the QLoRA
paper's NF4 definition), the quantized linear layer's gradients, LoRA over it, and loading."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import gguf
from gguf.quants import dequantize as gguf_dequantize, quantize as gguf_quantize

from petformers.pet.lora import LoRALinear
from petformers.quant import blockwise, gguf_blocks, int8
from petformers.quant.linear import QuantLinear, quant_linear
from petformers.quant.model import QuantConfig, quantize_model, quantized_bytes
from petformers.quant.weight import FourBitWeight, GGUFWeight, Int8Weight

try:
    import bitsandbytes.functional as bnb_f
except Exception:  # not installed, or no build for this platform: the paper's definition is the oracle
    bnb_f = None

# Where each block type keeps its float16 fields (byte offsets in a block).
_HALF_FIELDS = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0], "Q2_K": [80, 82],
                "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}


@pytest.mark.parametrize("type_id", sorted(gguf_blocks.BLOCK_TYPES), ids=gguf_blocks.type_name)
def test_gguf_blocks_equal_gguf_package_bit_for_bit(type_id):
    name, block, size = gguf_blocks.BLOCK_TYPES[type_id]
    rows, cols = 8, block * 4
    rng = np.random.default_rng(type_id)
    raw = rng.integers(0, 256, size=(rows, cols // block * size), dtype=np.uint8)  # every bit pattern
    blocks = raw.reshape(-1, size)
    for offset in _HALF_FIELDS[name]:  # finite scales of both signs and several magnitudes
        halves = (rng.standard_normal(len(blocks)) * 10.0 ** rng.integers(-4, 1, len(blocks))).astype(np.float16)
        blocks[:, offset:offset + 2] = halves.view(np.uint8).reshape(-1, 2)
    qtype = gguf.GGMLQuantizationType(type_id)
    ref = gguf_dequantize(raw, qtype).reshape(rows, cols)
    got = gguf_blocks.dequantize(torch.from_numpy(raw.copy()), type_id, (rows, cols))
    assert got.dtype == torch.float32 and np.isfinite(ref).all()
    np.testing.assert_array_equal(got.numpy().view(np.uint32), ref.view(np.uint32))
    if name in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"):  # real quantized data too (the package writes these)
        w = rng.standard_normal((rows, cols)).astype(np.float32)
        q = gguf_quantize(w, qtype)
        ref = gguf_dequantize(q, qtype).reshape(rows, cols)
        got = GGUFWeight(torch.from_numpy(q.copy()), type_id, (rows, cols)).dequantize()
        np.testing.assert_array_equal(got.numpy().view(np.uint32), ref.view(np.uint32))
        bits = {"Q4": 4, "Q5": 5, "Q8": 8}[name[:2]]
        step = np.abs(w).reshape(-1, block).max(1, keepdims=True) * 2 / (2 ** bits - 1)
        assert (np.abs(got.numpy().reshape(-1, block) - w.reshape(-1, block)) <= step * 1.01).all()


def test_nf4_code_book_is_the_papers_definition():
    """QLoRA appendix E: 8 positive quantiles of N(0,1) over [0.5, offset] and 7 negative ones over
    [1 - offset, 0.5], offset = (1 - 1/(2·15) + 1 - 1/(2·16)) / 2, plus 0, normalised to [-1, 1]."""
    offset = 0.5 * ((1 - 1 / 30) + (1 - 1 / 32))
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    values = values / values.abs().max()
    code = blockwise.code_4bit("nf4").double()
    assert code.numel() == 16 and code[7] == 0 and code[0] == -1 and code[15] == 1
    torch.testing.assert_close(code, values, atol=2e-7, rtol=0)
    fp4 = blockwise.code_4bit("fp4")
    expected = torch.tensor([0, 0.0625, 8, 12, 4, 6, 2, 3, 0, -0.0625, -8, -12, -4, -6, -2, -3]) / 12
    assert torch.equal(fp4, expected)  # 1 sign, 2 exponent, 1 mantissa bit, in bit-pattern order


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape", [(96, 256), (33, 65)], ids=["whole-blocks", "partial-block"])
def test_4bit_round_trip_error_bound(quant_type, shape):
    torch.manual_seed(0)
    w = torch.randn(shape) * 0.02
    q = blockwise.quantize_4bit(w, quant_type, double_quant=False)
    assert q.packed.numel() == (w.numel() + 1) // 2 and q.absmax.numel() == -(-w.numel() // 64)
    back = blockwise.dequantize_4bit(q)
    code = blockwise.code_4bit(quant_type).sort().values
    half_gap = ((code[1:] - code[:-1]) / 2).max()
    flat, err = w.reshape(-1), (back - w).reshape(-1).abs()
    for i in range(q.absmax.numel()):  # nearest code: error <= half the widest gap, per block
        blk = slice(i * 64, (i + 1) * 64)
        assert err[blk].max() <= half_gap * flat[blk].abs().max() * (1 + 1e-6)
    # double quantization: the block scales cost ~8 bits per 64 weights and move by < 1% of their range
    dq = blockwise.quantize_4bit(w, quant_type, double_quant=True)
    assert dq.absmax.dtype == torch.uint8
    assert (dq.absmax_float() - q.absmax).abs().max() <= 0.01 * q.absmax.max()


@pytest.mark.skipif(bnb_f is None, reason="bitsandbytes is not installed for this platform")
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_equals_bitsandbytes(quant_type):
    torch.manual_seed(1)
    w = torch.randn(160, 64 * 129) * 0.02  # 20640 blocks: 81 blocks of 256 absmax values, the last partial
    assert torch.equal(blockwise.code_4bit(quant_type), bnb_f.get_4bit_type(quant_type, device="cpu"))
    assert torch.equal(blockwise.dynamic_code_8bit(), bnb_f.create_dynamic_map())
    packed, state = bnb_f.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=False)
    ours = blockwise.quantize_4bit(w, quant_type, double_quant=False)
    assert torch.equal(ours.packed, packed.view(-1)) and torch.equal(ours.absmax, state.absmax)
    assert torch.equal(blockwise.dequantize_4bit(ours), bnb_f.dequantize_4bit(packed, state))

    packed, state = bnb_f.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=True)
    ours = blockwise.quantize_4bit(w, quant_type, double_quant=True)
    assert torch.equal(ours.packed, packed.view(-1))
    assert torch.equal(ours.absmax_offset, state.offset) and torch.equal(ours.absmax_scale, state.state2.absmax)
    # The 8-bit codes of the absmax values: bitsandbytes' CPU kernel (a C binary search) sometimes picks
    # the neighbour of the nearest code; ours is always the nearest (bitsandbytes' torch reference rule).
    scaled = (state.state2.absmax.repeat_interleave(256)[: ours.absmax.numel()])
    target = (blockwise.quantize_4bit(w, quant_type, double_quant=False).absmax - ours.absmax_offset) / scaled
    code = blockwise.dynamic_code_8bit()
    differ = ours.absmax != state.absmax
    assert differ.float().mean() < 0.01
    ours_err = (code[ours.absmax.long()] - target).abs()
    theirs_err = (code[state.absmax.long()] - target).abs()
    assert (ours_err <= theirs_err).all() and (ours_err[differ] < theirs_err[differ]).all()
    # Dequantization of bitsandbytes' own quantized state: equal bit for bit.
    theirs = blockwise.Quantized4bit(packed.view(-1), state.absmax, tuple(w.shape), quant_type, 64,
                                     state.state2.absmax, state.offset)
    assert torch.equal(blockwise.dequantize_4bit(theirs), bnb_f.dequantize_4bit(packed, state))


@pytest.mark.skipif(bnb_f is None, reason="bitsandbytes is not installed for this platform")
@pytest.mark.parametrize("double_quant", [True, False])
def test_fused_dequantization_path_gives_the_same_weight(double_quant):
    """The path CUDA takes (bitsandbytes' kernel over petformers' stored blocks), run here on CPU."""
    torch.manual_seed(8)
    qw = FourBitWeight.quantize(torch.randn(80, 192) * 0.03, "nf4", double_quant)
    assert torch.equal(qw.dequantize_fused(torch.float32), qw.dequantize(torch.float32))


def test_int8_round_trip_and_bitsandbytes():
    torch.manual_seed(2)
    w = torch.randn(48, 80)
    w[3] = 0  # an all-zero row stays zero
    q, absmax = int8.quantize_int8(w)
    back = int8.dequantize_int8(q, absmax)
    assert (back - w).abs().max(dim=1).values.le(absmax / 127 / 2 * (1 + 1e-5) + 1e-12).all()
    assert torch.equal(back[3], torch.zeros(80))
    if bnb_f is not None:
        w[3] = 1.0
        q, absmax = int8.quantize_int8(w)
        bq, bstats, _ = bnb_f.int8_vectorwise_quant(w.clone())
        assert torch.equal(q, bq) and torch.equal(absmax, bstats)
        assert torch.equal(int8.dequantize_int8(q, absmax), bnb_f.int8_vectorwise_dequant(bq, bstats))


def test_dtype_casts_keep_the_quantized_base():
    torch.manual_seed(3)
    qw = FourBitWeight.quantize(torch.randn(64, 128))
    before = qw.dequantize()
    qw.to(torch.bfloat16)
    assert qw.absmax_scale.dtype == torch.float32 and torch.equal(qw.dequantize(torch.float32), before)


# ---- the quantized linear layer --------------------------------------------------------------------

def _weights():
    torch.manual_seed(4)
    w = torch.randn(96, 128) * 0.05
    return [FourBitWeight.quantize(w, "nf4"), FourBitWeight.quantize(w, "fp4", double_quant=False),
            Int8Weight.quantize(w), GGUFWeight(torch.from_numpy(gguf_quantize(w.numpy(), gguf.GGMLQuantizationType.Q4_1)),
                                               gguf_blocks.TYPE_IDS["Q4_1"], (96, 128))]


@pytest.mark.parametrize("qw", _weights(), ids=lambda q: q.format)
def test_quant_linear_grad_equals_float_layer_with_dequantized_weight(qw):
    bias = nn.Parameter(torch.randn(96) * 0.1)
    layer = QuantLinear(qw, bias)
    dense = qw.dequantize(torch.float32)
    x = torch.randn(3, 5, 128, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        y = layer(x)
    y_ref = F.linear(x_ref, dense, bias.detach())
    assert torch.equal(y, y_ref)
    assert max(saved, default=0) < dense.numel()  # no float copy of the weight kept for backward
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-6, atol=1e-7)
    assert bias.grad is None and not any(b.requires_grad for b in qw.buffers())


LORA_VARIANTS = {"plain": {}, "rslora": {"use_rslora": True}, "dora": {"use_dora": True},
                 "dropout": {"dropout": 0.3}, "dora-dropout": {"use_dora": True, "dropout": 0.3}}


@pytest.mark.parametrize("variant", list(LORA_VARIANTS))
def test_lora_over_quantized_base_equals_lora_over_dequantized_float(variant):
    kwargs = LORA_VARIANTS[variant]
    qw = _weights()[0]
    dense = nn.Parameter(qw.dequantize(torch.float32), requires_grad=False)
    q_lora = LoRALinear(qw, None, 8, 16, **kwargs)
    f_lora = LoRALinear(dense, None, 8, 16, **kwargs)
    torch.manual_seed(5)
    q_lora.reset_lora_parameters()
    nn.init.normal_(q_lora.lora_b.weight, std=0.02)  # a trained-looking adapter (B = 0 would hide errors)
    if q_lora.use_dora:
        q_lora.init_magnitude()
    f_lora.load_state_dict(q_lora.state_dict(), strict=False)
    assert set(q_lora.state_dict()) == set(f_lora.state_dict()) - {"weight"}  # the quantized base is not state
    x = torch.randn(4, 7, 128)
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    outs = []
    for layer, xi in zip((q_lora, f_lora), xs):
        torch.manual_seed(6)  # the same dropout mask
        outs.append(layer(xi))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-6, atol=1e-6)
    g = torch.randn_like(outs[0])
    for out in outs:
        out.backward(g)
    torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=1e-5, atol=1e-6)
    f_params = dict(f_lora.named_parameters())
    trained = [(name, p) for name, p in q_lora.named_parameters() if p.requires_grad]
    assert len(trained) == (3 if q_lora.use_dora else 2)
    for name, p in trained:
        torch.testing.assert_close(p.grad, f_params[name].grad, rtol=1e-5, atol=1e-6, msg=name)

    q_lora.eval(), f_lora.eval()
    before = q_lora(x)
    q_lora.merge()
    assert q_lora.merged and not q_lora.is_quantized and q_lora.weight.dtype == torch.float32
    torch.testing.assert_close(q_lora(x), before, rtol=1e-5, atol=1e-5)
    f_lora.merge()
    torch.testing.assert_close(q_lora.weight, f_lora.weight, rtol=0, atol=1e-6)
    q_lora.unmerge()
    assert q_lora.weight is qw and torch.equal(q_lora(x), before)  # the blocks come back untouched


def test_pissa_over_a_quantized_base_is_refused():
    from petformers.errors import AdapterError

    with pytest.raises(AdapterError, match="pissa"):
        LoRALinear(_weights()[0], None, 4, 8).reset_lora_parameters("pissa")


def test_config_keys_are_checked_together():
    from petformers.errors import ConfigError

    assert QuantConfig.from_keys() is None
    assert QuantConfig.from_keys(4) == QuantConfig(4, "nf4", True)
    assert QuantConfig.from_keys(8) == QuantConfig(8, "int8", False)
    assert QuantConfig.from_keys(4, "fp4", False) == QuantConfig(4, "fp4", False)
    assert QuantConfig.from_keys(None, "gguf").type == "gguf"
    for bad, key in (((3, None, None), "quantization_bit"), ((8, "nf4", None), "quantization_type"),
                     ((4, "q4", None), "quantization_type"), ((8, "int8", True), "double_quantization"),
                     ((None, None, True), "double_quantization"), ((4, None, "yes"), "double_quantization")):
        with pytest.raises(ConfigError, match=key):
            QuantConfig.from_keys(*bad)


# ---- loading: quantized layer by layer, or GGUF blocks kept ----------------------------------------

def test_load_quantizes_linear_layers_and_keeps_the_rest_float(tiny_model_dir):
    from petformers.checkpoint.load import load_pretrained
    from petformers.models.llama import Llama

    float_model, _ = load_pretrained(tiny_model_dir, with_tokenizer=False)
    config = QuantConfig.from_keys(4, "nf4", True)
    model, _ = load_pretrained(tiny_model_dir, with_tokenizer=False, quantization=config)
    quantized = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert len(quantized) == 2 * 7 and not isinstance(model.lm_head, QuantLinear)
    assert isinstance(model.lm_head, nn.Linear) and model.tok_embeddings.weight.dtype == torch.float32
    # the same blocks as quantizing the float model in memory, so the same logits, bit for bit
    reference = quantize_model(load_pretrained(tiny_model_dir, with_tokenizer=False)[0], config)
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        logits = model(ids)
        assert torch.equal(logits, reference(ids))
        float_logits = float_model(ids)
    rel = (logits - float_logits).norm() / float_logits.norm()
    assert 0 < rel < 0.2  # NF4 moves the logits, but not far
    linear_params = sum(m.weight.numel() for m in float_model.modules()
                        if isinstance(m, nn.Linear) and m is not float_model.lm_head)
    assert quantized_bytes(model) / linear_params < 0.6  # ~0.5 byte per weight (4 bits + scales)
    assert isinstance(model, Llama) and not any(k.endswith(("packed", "absmax")) for k in model.state_dict())


def test_loading_quantizes_each_weight_on_arrival(tiny_model_dir):
    """Layer by layer: when the loader yields a tensor, no earlier float linear weight is still alive
    (only the one before it, in the consumer's loop variable), so the float model never exists."""
    import gc
    import weakref

    from petformers.checkpoint import hf
    from petformers.checkpoint.materialize import materialize
    from petformers.models.llama import build_model

    refs, most_alive = [], 0

    def tracked():
        nonlocal most_alive
        for name, tensor in hf.iter_tensors(tiny_model_dir):
            gc.collect()
            most_alive = max(most_alive, sum(r() is not None for r in refs))
            if tensor.ndim == 2 and "embed" not in name and "lm_head" not in name and "tok_" not in name:
                refs.append(weakref.ref(tensor))
            yield name, tensor

    model = build_model(hf.read_config(tiny_model_dir), device="meta")
    materialize(model, tracked(), torch.float32, quantization=QuantConfig.from_keys(4))
    assert len(refs) == 14 and most_alive <= 1
    assert len([m for m in model.modules() if isinstance(m, QuantLinear)]) == 14


@pytest.mark.parametrize("qtype", [gguf.GGMLQuantizationType.Q4_1, gguf.GGMLQuantizationType.Q8_0], ids=lambda q: q.name)
def test_gguf_kept_quantized_gives_the_logits_of_the_dequantized_file(tmp_path, tiny_model_dir, tiny_tokenizer_dir, qtype):
    from petformers.checkpoint.load import load_pretrained
    from test_gguf import write_gguf_from_hf  # tests/ is on sys.path under pytest

    path = tmp_path / f"tiny-{qtype.name}.gguf"
    write_gguf_from_hf(path, tiny_model_dir, tiny_tokenizer_dir, qtype=qtype)
    dense, _ = load_pretrained(path, with_tokenizer=False)
    kept, _ = load_pretrained(path, with_tokenizer=False, quantization=QuantConfig.from_keys(None, "gguf"))
    layers = [m for m in kept.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 14 and all(m.weight.format == qtype.name for m in layers)
    ids = torch.randint(0, dense.config.vocab_size, (2, 10))
    with torch.no_grad():
        assert torch.equal(kept(ids), dense(ids))


def test_gguf_type_needs_a_gguf_file(tiny_model_dir):
    from petformers.checkpoint.load import load_pretrained
    from petformers.errors import CheckpointError

    with pytest.raises(CheckpointError, match="quantization_type gguf"):
        load_pretrained(tiny_model_dir, with_tokenizer=False, quantization=QuantConfig.from_keys(None, "gguf"))


@pytest.mark.slow
def test_smollm2_q4_1_kept_quantized_equals_dequantized(smollm2_gguf):
    """The real SmolLM2-135M Q4_1 file: blocks kept vs the file dequantized to float32 at load."""
    from petformers.checkpoint.load import load_pretrained

    ids = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 30]])
    dense, _ = load_pretrained(smollm2_gguf, with_tokenizer=False)
    with torch.no_grad():
        expected = dense(ids)
    del dense
    kept, _ = load_pretrained(smollm2_gguf, with_tokenizer=False, quantization=QuantConfig.from_keys(None, "gguf"))
    assert {m.weight.format for m in kept.modules() if isinstance(m, QuantLinear)} >= {"Q4_1"}
    with torch.no_grad():
        torch.testing.assert_close(kept(ids), expected, rtol=1e-5, atol=1e-5)


def test_memory_script_runs_lora_steps_over_a_base_created_quantized():
    """scripts/qlora_memory.py (the 7B measurement of docs/benchmarks.md) on a small shape: the same path."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "qlora_memory.py"
    spec = importlib.util.spec_from_file_location("qlora_memory", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    args = script.parse_args(["--layers", "2", "--hidden", "128", "--ffn", "344", "--heads", "4", "--vocab", "256",
                              "--seq-length", "64", "--steps", "2"])
    model, config = script.build_quantized_model(args, QuantConfig.from_keys(4))
    assert not any(p.device.type == "meta" for p in model.parameters())
    assert len([m for m in model.modules() if isinstance(m, QuantLinear)]) == 14
    result = script.run(args)
    assert result["adapter_changed"] and all(np.isfinite(result["losses"]))
    assert result["trainable"] == 2 * 16 * (4 * 128 + 128 + 128 + 128 + 128)  # r16 on wq, wk, wv, wo
    # 7 linear layers of 2 layers at ~0.53 byte per weight (NF4 + double-quantized scales)
    n = 2 * (4 * 128 * 128 + 3 * 128 * 344)
    assert n * 0.5 < result["quantized_bytes"] < n * 0.54
    assert 0 < result["dequant_share"] < 1 and result["peak_rss_bytes"] > 0
    assert "peak RSS over 2 LoRA steps of 64 tokens" in script.markdown(result)


# ---- adapters over a quantized base: PEFT format, export merge, predict/chat -----------------------

def test_adapter_over_quantized_base_exports_merged_and_loads_in_peft(tmp_path, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from petformers.checkpoint.load import load_pretrained
    from petformers.cli.common import load_model
    from petformers.cli.main import main
    from petformers.checkpoint.peft import save_peft_adapter
    from petformers.pet import PetConfig, apply_lora
    from petformers.pet.lora import LoRALinear

    quant = QuantConfig.from_keys(4)
    model, _ = load_pretrained(tiny_model_dir, with_tokenizer=False, quantization=quant)
    pet = PetConfig.from_dict({"pet_type": "lora", "lora_rank": 4, "lora_alpha": 8,
                               "target_modules": ["q_proj", "v_proj", "down_proj"]})
    apply_lora(model, pet)
    torch.manual_seed(7)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_b.weight.normal_(0, 0.05)  # a trained adapter, not B = 0
    adapter = tmp_path / "adapter"
    save_peft_adapter(model, pet, adapter, str(tiny_model_dir))
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        expected = model.eval()(ids)

    # export merge: dequantize -> merge -> save; transformers reads the merged directory
    merged = tmp_path / "merged"
    assert main(["export", "merge", "--load_checkpoint", str(tiny_model_dir), "--adapter", str(adapter),
                 "--output_dir", str(merged), "--quantization_bit", "4"]) == 0
    hf = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, expected, rtol=1e-4, atol=1e-4)

    # PEFT loads the same adapter over the float base (its own LoRA weights are ours)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), str(adapter))
    theirs = peft_model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight
    assert torch.equal(theirs, model.layers[0].attention.wq.lora_b.weight)

    # predict/chat: the adapter stays a LoRA layer over the quantized blocks, same logits
    args = type("Args", (), {"load_checkpoint": str(tiny_model_dir), "adapter": str(adapter), "device": "cpu",
                             "dtype": None, "quantization_bit": 4, "quantization_type": None,
                             "double_quantization": None})()
    served, _ = load_model(args)
    assert isinstance(served.layers[0].attention.wq, LoRALinear) and served.layers[0].attention.wq.is_quantized
    with torch.no_grad():
        assert torch.equal(served(ids), expected)


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_families_with_biases_and_qk_norms_load_quantized(tmp_path, family):
    """Qwen2's q/k/v biases and Qwen3's q/k RMSNorms stay float beside the quantized weights."""
    from family_models import write_family

    from petformers.checkpoint.load import load_pretrained

    model_dir = write_family(tmp_path / family, family)
    config = QuantConfig.from_keys(4)
    model, _ = load_pretrained(model_dir, with_tokenizer=False, quantization=config)
    reference = quantize_model(load_pretrained(model_dir, with_tokenizer=False)[0], config)
    wq = model.layers[0].attention.wq
    assert isinstance(wq, QuantLinear) and (wq.bias is not None) == (family == "qwen2")
    ids = torch.randint(0, model.config.vocab_size, (2, 11))
    with torch.no_grad():
        assert torch.equal(model(ids), reference(ids))
