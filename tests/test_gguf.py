"""GGUF files: tiny ones written here with the `gguf` package's GGUFWriter (as llama.cpp's converter
writes them: q/k rows permuted, weights quantized), and the real SmolLM2-135M-Instruct GGUF checked
against transformers loading the same file."""

from __future__ import annotations

import json
from collections.abc import Mapping

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize
from safetensors.numpy import load_file

from petformers.checkpoint.load import load_pretrained
from petformers.errors import CheckpointError
from petformers.generate import GenerationConfig, generate
from petformers.tokenizer import Tokenizer

# llama.cpp's tensor names for the Hugging Face ones (convert_hf_to_gguf.py's mapping, written out).
_LAYER = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.down_proj": "ffn_down",
          "mlp.up_proj": "ffn_up", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
_TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight"}
_PF_LAYER = {"attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv",
             "attn_output": "attention.wo", "ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2",
             "ffn_up": "feed_forward.w3", "attn_norm": "attention_norm", "ffn_norm": "ffn_norm"}
_PF_TOP = {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight",
           "output.weight": "lm_head.weight"}


def gguf_name(hf_name: str) -> str:
    if hf_name in _TOP:
        return _TOP[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    module, param = rest.rsplit(".", 1)
    return f"blk.{layer}.{_LAYER[module]}.{param}"


def petformers_name(gguf_tensor: str) -> str:
    if gguf_tensor in _PF_TOP:
        return _PF_TOP[gguf_tensor]
    _, layer, kind, param = gguf_tensor.split(".")
    return f"layers.{layer}.{_PF_LAYER[kind]}.{param}"


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter: Hugging Face rotate-half q/k rows -> interleaved (Meta) rows."""
    rows, cols = w.shape
    return w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def add_tokenizer(writer: gguf.GGUFWriter, tokenizer_dir, pre: str = "default"):
    """The tiny byte-level BPE tokenizer as GGUF 'gpt2' tokenizer metadata, with the ChatML template."""
    tj = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    cfg = json.loads((tokenizer_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    vocab = dict(tj["model"]["vocab"])
    special = {t["content"]: t["id"] for t in tj["added_tokens"]}
    vocab.update(special)
    tokens = [tok for tok, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([int(gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL) for t in tokens])
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tj["model"]["merges"]])
    writer.add_bos_token_id(vocab[cfg["bos_token"]])
    writer.add_eos_token_id(vocab[cfg["eos_token"]])
    writer.add_pad_token_id(vocab[cfg["pad_token"]])
    writer.add_add_bos_token(False)
    writer.add_chat_template(cfg["chat_template"])


def add_llama_metadata(writer, *, layers, hidden, ffn, heads, kv_heads, vocab, eps=1e-5, theta=10000.0):
    writer.add_context_length(512)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_rope_freq_base(theta)
    writer.add_layer_norm_rms_eps(eps)
    writer.add_vocab_size(vocab)


def write_gguf_from_hf(out_file, hf_dir, tokenizer_dir, qtype=Q.F32, arch="llama") -> dict[str, np.ndarray]:
    """The tiny HF model as a GGUF with every 2-D weight in `qtype` (norms stay F32, as llama.cpp does).
    Returns the original (Hugging Face layout, float32) weight of every GGUF tensor, by GGUF name."""
    cfg = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))
    weights = load_file(str(hf_dir / "model.safetensors"))
    writer = gguf.GGUFWriter(str(out_file), arch)
    add_llama_metadata(writer, layers=cfg["num_hidden_layers"], hidden=cfg["hidden_size"],
                       ffn=cfg["intermediate_size"], heads=cfg["num_attention_heads"],
                       kv_heads=cfg["num_key_value_heads"], vocab=cfg["vocab_size"], eps=cfg["rms_norm_eps"])
    add_tokenizer(writer, tokenizer_dir)
    originals = {}
    for hf_name, w in sorted(weights.items()):
        name = gguf_name(hf_name)
        originals[name] = w.astype(np.float32)
        if ".attn_q." in name:
            w = permute(w, cfg["num_attention_heads"])
        elif ".attn_k." in name:
            w = permute(w, cfg["num_key_value_heads"])
        if w.ndim == 1 or qtype == Q.F32:
            writer.add_tensor(name, w.astype(np.float32))
        else:
            writer.add_tensor(name, quantize(w.astype(np.float32), qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return originals


@pytest.fixture(scope="module")
def f32_gguf(tmp_path_factory, tiny_model_dir, tiny_tokenizer_dir):
    path = tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf"
    originals = write_gguf_from_hf(path, tiny_model_dir, tiny_tokenizer_dir)
    return path, originals


def test_f32_gguf_is_exact_and_matches_transformers(f32_gguf, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    path, originals = f32_gguf
    model, _ = load_pretrained(path)
    state = model.state_dict()
    for name, w in originals.items():  # q/k permutation undone: bit-identical to the HF weights
        assert torch.equal(state[petformers_name(name)], torch.from_numpy(w)), name
    ref = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(ids) - ref(ids).logits).abs().max().item() <= 1e-5
    cfg = model.config
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.n_kv_heads, cfg.vocab_size) == (2, 64, 4, 2, 512)
    assert not cfg.tie_word_embeddings  # output.weight is present


def test_gguf_tokenizer_matches_tokenizer_json(f32_gguf, tiny_model_dir):
    path, _ = f32_gguf
    _, tok = load_pretrained(path, with_tokenizer=True)
    hf_tok = Tokenizer.from_dir(tiny_model_dir)
    assert tok.fingerprint() == hf_tok.fingerprint()
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.eos_ids) == (hf_tok.bos_id, hf_tok.eos_id, hf_tok.pad_id, [2])
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Translate: 你好，世界 🎉"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True)
    assert text == hf_tok.apply_chat_template(messages, add_generation_prompt=True)
    assert tok.encode(text) == hf_tok.encode(text)
    assert tok.decode(tok.encode(text), skip_special_tokens=False) == text


@pytest.mark.parametrize("qtype", [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1], ids=lambda q: q.name)
def test_quantized_gguf_dequantizes_and_unpermutes(tmp_path, tiny_model_dir, tiny_tokenizer_dir, qtype):
    path = tmp_path / f"tiny-{qtype.name}.gguf"
    originals = write_gguf_from_hf(path, tiny_model_dir, tiny_tokenizer_dir, qtype=qtype)
    model, _ = load_pretrained(path, with_tokenizer=False)
    state = model.state_dict()
    for name, w in originals.items():
        got = state[petformers_name(name)]
        if w.ndim == 1:
            assert torch.equal(got, torch.from_numpy(w)), name
            continue
        # Quantization is row-blockwise, so it commutes with the row permutation: the loaded weight
        # must be exactly the dequantized original, in the original (Hugging Face) row order.
        expected = torch.from_numpy(dequantize(quantize(w, qtype), qtype).reshape(w.shape).astype(np.float32))
        assert torch.equal(got, expected), name
        assert (got - torch.from_numpy(w)).abs().max().item() < 0.25 * np.abs(w).max(), name


def test_k_quants_dequantize_and_unpermute(tmp_path, tiny_tokenizer_dir):
    """K-quants (which the gguf package reads but cannot write): random blocks, every tensor another type.
    Bytes are kept below 0x3C so that every float16 scale in them is finite."""
    hidden, heads, kv_heads, ffn, vocab = 256, 4, 2, 256, 512
    qtypes = {"token_embd.weight": Q.Q6_K, "output.weight": Q.Q5_K, "blk.0.attn_q.weight": Q.Q4_K,
              "blk.0.attn_k.weight": Q.Q5_K, "blk.0.attn_v.weight": Q.Q6_K, "blk.0.attn_output.weight": Q.Q3_K,
              "blk.0.ffn_gate.weight": Q.Q2_K, "blk.0.ffn_up.weight": Q.Q4_K, "blk.0.ffn_down.weight": Q.Q8_0}
    shapes = {"token_embd.weight": (vocab, hidden), "output.weight": (vocab, hidden),
              "blk.0.attn_q.weight": (hidden, hidden), "blk.0.attn_k.weight": (hidden // 2, hidden),
              "blk.0.attn_v.weight": (hidden // 2, hidden), "blk.0.attn_output.weight": (hidden, hidden),
              "blk.0.ffn_gate.weight": (ffn, hidden), "blk.0.ffn_up.weight": (ffn, hidden),
              "blk.0.ffn_down.weight": (hidden, ffn)}
    path = tmp_path / "tiny-kquants.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    add_llama_metadata(writer, layers=1, hidden=hidden, ffn=ffn, heads=heads, kv_heads=kv_heads, vocab=vocab)
    add_tokenizer(writer, tiny_tokenizer_dir)
    rng = np.random.default_rng(0)
    stored = {}
    for name, (rows, cols) in shapes.items():
        block, size = gguf.GGML_QUANT_SIZES[qtypes[name]]
        raw = rng.integers(0, 0x3C, size=(rows, cols // block * size), dtype=np.uint8)
        writer.add_tensor(name, raw, raw_dtype=qtypes[name])
        stored[name] = dequantize(raw, qtypes[name]).reshape(rows, cols)
    for name in ("blk.0.attn_norm.weight", "blk.0.ffn_norm.weight", "output_norm.weight"):
        writer.add_tensor(name, np.ones(hidden, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    model, _ = load_pretrained(path, with_tokenizer=False)
    state = model.state_dict()
    for name, on_disk in stored.items():
        got = state[petformers_name(name)].numpy()
        if name == "blk.0.attn_q.weight":
            got = permute(got, heads)
        elif name == "blk.0.attn_k.weight":
            got = permute(got, kv_heads)
        assert np.isfinite(on_disk).all()
        np.testing.assert_array_equal(got, on_disk, err_msg=name)
    assert model.config.head_dim == 64 and model.config.n_kv_heads == 2


# ---- tokenizers rebuilt from GGUF metadata, against transformers' GGUF tokenizer ----------------

TRICKY = ["In 2024, I'LL pay $1,234.56 — won't you?", "  two  spaces\n\nand lines\r\n", "你好，世界！🎉 مرحبا",
          "x=12345678; y = x//3"]


def write_tokenizer_gguf(path, fill) -> str:
    writer = gguf.GGUFWriter(str(path), "llama")
    add_llama_metadata(writer, layers=1, hidden=64, ffn=96, heads=4, kv_heads=2, vocab=512)
    fill(writer)
    writer.add_tensor("output_norm.weight", np.ones(64, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def transformers_gguf_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="module")
def unsplit_tokenizer_dir(tmp_path_factory, tiny_tokenizer_dir, alpaca_demo):
    """A byte-level BPE trained without any pre-tokenizer split, so that its merges cross spaces, digits
    and apostrophes: how a file's text is split before merging then changes its tokens."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    records = json.loads(alpaca_demo.read_text(encoding="utf-8"))
    texts = [r["instruction"] + " " + r["output"] for r in records[:300]] + TRICKY * 20
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1500, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>",
                                  "<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    out = tmp_path_factory.mktemp("unsplit")
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_bytes((tiny_tokenizer_dir / "tokenizer_config.json").read_bytes())
    return out


@pytest.mark.parametrize("pre", ["llama-bpe", "default", "smollm"])
def test_byte_level_pre_tokenizers_match_transformers(tmp_path, unsplit_tokenizer_dir, pre):
    """Llama 3 files ('llama-bpe') split numbers in threes and contractions case-insensitively;
    GPT-2's split ('default') keeps a space with the word or number after it."""
    from petformers.checkpoint.load import load_tokenizer

    path = tmp_path / f"tok-{pre}.gguf"
    write_tokenizer_gguf(path, lambda writer: add_tokenizer(writer, unsplit_tokenizer_dir, pre=pre))
    ours = load_tokenizer(path)
    for text in TRICKY:
        assert ours.decode(ours.encode(text)) == text
    if pre == "smollm":  # SmolLM's tokenizer.json splits digits one by one (transformers' GGUF loader does not)
        pieces = [ours.decode([i]) for i in ours.encode("x=12345678; y = x//3")]
        assert all(sum(c.isdigit() for c in piece) <= 1 for piece in pieces) and "x" in pieces
        return
    theirs = transformers_gguf_tokenizer(path)
    for text in TRICKY:
        assert ours.encode(text) == theirs(text, add_special_tokens=False)["input_ids"], text


def test_sentencepiece_gguf_matches_sentencepiece_and_transformers(tmp_path, alpaca_demo):
    """A 'llama' (SentencePiece) vocabulary, as Llama 2 / Mistral GGUFs carry it: no merges, scores."""
    import sentencepiece as spm
    from test_meta_pth import train_sentencepiece

    from petformers.checkpoint.load import load_tokenizer

    proto = train_sentencepiece(alpaca_demo)
    sp = spm.SentencePieceProcessor(model_proto=proto)

    def token_type(i):
        if sp.is_unknown(i):
            return gguf.TokenType.UNKNOWN
        if sp.is_control(i):
            return gguf.TokenType.CONTROL
        if sp.is_byte(i):
            return gguf.TokenType.BYTE
        return gguf.TokenType.UNUSED if sp.is_unused(i) else gguf.TokenType.NORMAL

    def fill(writer):
        n = sp.get_piece_size()
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list([sp.id_to_piece(i) for i in range(n)])
        writer.add_token_scores([sp.get_score(i) for i in range(n)])
        writer.add_token_types([int(token_type(i)) for i in range(n)])
        writer.add_bos_token_id(sp.bos_id())
        writer.add_eos_token_id(sp.eos_id())
        writer.add_unk_token_id(sp.unk_id())
        writer.add_add_bos_token(True)

    path = tmp_path / "spm.gguf"
    write_tokenizer_gguf(path, fill)
    ours, theirs = load_tokenizer(path), transformers_gguf_tokenizer(path)
    texts = TRICKY + ["Give three tips for staying healthy.", "Hello world", " leading space", "ünïcödé"]
    for text in texts:
        ids = ours.encode(text)
        assert ids == theirs(text, add_special_tokens=False)["input_ids"], text
        assert ours.decode(ids) == theirs.decode(ids), text
        if not text.startswith(" "):
            # SentencePiece itself agrees, except on text that starts with a space: its dummy prefix then
            # makes two, where transformers' Metaspace (prepend_scheme "first") keeps one.
            assert ids == sp.encode(text), text
            assert ours.decode(ids) == sp.decode(ids) == text
        assert ours.encode(text, add_special_tokens=True) == [1, *ids]
    assert ours.fingerprint() == Tokenizer.from_sentencepiece(_write(tmp_path / "tokenizer.model", proto)).fingerprint()
    assert (ours.bos_id, ours.eos_id, ours.eos_ids) == (1, 2, [2])


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


# ---- bad GGUF files --------------------------------------------------------------------------

def test_gguf_of_another_architecture_is_refused(tmp_path, tiny_tokenizer_dir):
    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_block_count(1)
    add_tokenizer(writer, tiny_tokenizer_dir)
    writer.add_tensor("token_embd.weight", np.zeros((512, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError) as err:
        load_pretrained(path)
    assert str(path) in str(err.value) and "gpt2" in str(err.value)


@pytest.mark.parametrize("keep", [0.5, 0.02], ids=["in-tensor-data", "in-metadata"])
def test_truncated_gguf_is_refused(tmp_path, f32_gguf, keep):
    data = f32_gguf[0].read_bytes()
    path = tmp_path / "truncated.gguf"
    path.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(CheckpointError) as err:
        load_pretrained(path)
    assert str(path) in str(err.value)
    assert "\n" not in str(err.value)


def test_gguf_missing_a_tensor_names_it(tmp_path, tiny_model_dir, tiny_tokenizer_dir):
    import shutil

    hf_dir = tmp_path / "hf"
    shutil.copytree(tiny_model_dir, hf_dir)
    from safetensors.numpy import save_file

    weights = load_file(str(hf_dir / "model.safetensors"))
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, str(hf_dir / "model.safetensors"))
    path = tmp_path / "incomplete.gguf"
    write_gguf_from_hf(path, hf_dir, tiny_tokenizer_dir)
    with pytest.raises(CheckpointError) as err:
        load_pretrained(path, with_tokenizer=False)
    assert str(path) in str(err.value) and "layers.1.feed_forward.w3.weight" in str(err.value)


# ---- the real SmolLM2-135M-Instruct GGUF against transformers ---------------------------------

CHAT = [{"role": "user", "content": "Write a short poem about the sea."}]


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    return load_pretrained(smollm2_gguf)


@pytest.fixture(scope="module")
def smollm2_reference(smollm2_gguf):
    """transformers' own GGUF loading (dequantizes with the same gguf package): loaded once, ~35 s."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(smollm2_gguf.parent), smollm2_gguf.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder, gguf_file=name)


def _reference_chat_ids(tokenizer, messages) -> list[int]:
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if isinstance(out, Mapping) else out)


@pytest.mark.slow
def test_smollm2_chat_tokens_equal_transformers(smollm2, smollm2_reference):
    _, tok = smollm2
    _, ref_tok = smollm2_reference
    for messages in (CHAT, [{"role": "system", "content": "You answer in French."},
                            {"role": "user", "content": "Combien font 12 + 30 ? Réponds 🙂"},
                            {"role": "assistant", "content": "42."}, {"role": "user", "content": "Et 7×6 ?"}]):
        text = tok.apply_chat_template(messages, add_generation_prompt=True)
        assert text == ref_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert tok.encode(text) == _reference_chat_ids(ref_tok, messages)
    assert tok.eos_id == ref_tok.eos_token_id and tok.bos_id == ref_tok.bos_token_id


@pytest.mark.slow
def test_smollm2_logits_and_greedy_answer_equal_transformers(smollm2, smollm2_reference):
    model, tok = smollm2
    ref, ref_tok = smollm2_reference
    ids = tok.encode(tok.apply_chat_template(CHAT, add_generation_prompt=True))
    x = torch.tensor([ids])
    with torch.no_grad():
        assert (model(x) - ref(x).logits).abs().max().item() <= 1e-4
    answer = generate(model, [ids], GenerationConfig(max_new_tokens=24), tok.eos_ids, tok.pad_id)[0]
    expected = ref.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=24, do_sample=False)[0, len(ids):]
    expected = expected.tolist()
    if ref_tok.eos_token_id in expected:  # transformers keeps the eos; petformers stops before it
        expected = expected[:expected.index(ref_tok.eos_token_id)]
    assert answer == expected
    assert len(answer) == 24  # a real 24-token answer, not an early stop
    assert tok.decode(answer).strip()


@pytest.mark.parametrize("changes, key", [
    ({"llama.attention.head_count": 0}, "'llama.attention.head_count' is 0"),  # was a ZeroDivisionError
    ({"llama.attention.head_count": 1}, "key 'llama.attention.head_count_kv' 2"),  # named no key
    ({"llama.block_count": "3"}, "'llama.block_count' is '3'"),
    ({"llama.embedding_length": 10}, "'llama.embedding_length' 10 is not divisible"),
])
def test_gguf_shape_keys_are_refused_by_name(changes, key):
    """Found by tests/test_fuzz_readers.py: shape counts from a GGUF header are checked with their key."""
    from petformers.errors import ConfigError
    from petformers.models.config import LlamaConfig

    meta = {"general.architecture": "llama", "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
            "llama.embedding_length": 16, "llama.block_count": 2, "llama.feed_forward_length": 32,
            "tokenizer.ggml.tokens": ["a", "b"]}
    assert LlamaConfig.from_gguf(meta).num_heads == 4
    with pytest.raises(ConfigError, match=key.replace("(", r"\(")) as e:
        LlamaConfig.from_gguf({**meta, **changes})
    assert "\n" not in str(e.value)
