"""Qwen's tokenizer and chat templates against transformers.

A byte-level BPE is trained here with Qwen2's pre-tokenizer (NFC, then its split pattern: single
digits, case-insensitive contractions) and ChatML specials, and saved in the three forms models ship:
tokenizer.json, vocab.json + merges.txt (Qwen2Tokenizer, MindFormers' Qwen2.5 `vocab_file` /
`merges_file`), and GGUF metadata with `tokenizer.ggml.pre: qwen2`. Each must encode and decode a
few hundred mixed strings exactly as transformers does. Chat templates in Qwen2.5's and Qwen3's style
render exactly as `apply_chat_template`, with and without `enable_thinking`.
"""

from __future__ import annotations

import json
import random

import pytest

from petformers.checkpoint.load import load_tokenizer
from petformers.tokenizer import QWEN2_SPLIT, Tokenizer

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
ADDED = ["<think>", "</think>"]  # Qwen3: added tokens that are not special (kept by skip_special_tokens)

ENGLISH = ["The quick brown fox jumps over the lazy dog.", "I'll say it's DON'T and WE'RE, they'd've.",
           "Fine-tuning LoRA adapters: rank 16, alpha 32.", "Hello,world!How are you?", "e.g. U.S.A. vs. UK"]
CHINESE = ["把这句话翻译成英文。", "你好，世界！", "通义千问是阿里云研发的大语言模型。", "数字１２３和123混合"]
OTHER = ["日本語のテキストです。", "한국어 문장입니다.", "مرحبا بالعالم", "Ünïcödé naïve café — ½ ∑ 𝔘",
         "cafe\u0301 and e\u0301te\u0301 (NFD, NFC-normalised)", "Ａｂｃ full-width"]
EMOJI = ["🎉🚀", "👨‍👩‍👧‍👦 family", "👍🏽 skin tone", "🇨🇳🇺🇸 flags", "❤️‍🔥", "a😀b"]
CODE = ["def f(x):\n    return x ** 2\n", "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}",
        "if __name__ == '__main__':\n    main()", "x=[1,2,3];y={'k':\"v\"}", "SELECT * FROM t WHERE id=42;",
        "<div class=\"x\">&nbsp;</div>"]
SPACE = ["  two spaces", "trailing   ", "\n\n\nthree newlines", "tab\tsep\t\tdouble", "crlf\r\nline",
         " \n \n", "     ", "\u3000ideographic space", "nbsp\u00a0here"]
NUMBERS = ["3.14159", "1234567890", "2026-12-02 01:23:45", "-42e10", "v1.2.3"]
CHATML = ["<|im_start|>user\nHi<|im_end|>\n", "<|endoftext|>", "text<|im_end|>more", "<think>\nhmm\n</think>\n\n"]
POOLS = [ENGLISH, CHINESE, OTHER, EMOJI, CODE, SPACE, NUMBERS, CHATML]


def mixed_strings(n: int, seed: int) -> list[str]:
    """Every pool's strings, then `n` random joins of 1-4 pieces from random pools."""
    rng = random.Random(seed)
    out = [s for pool in POOLS for s in pool]
    while len(out) < n:
        pieces = [rng.choice(rng.choice(POOLS)) for _ in range(rng.randint(1, 4))]
        out.append(rng.choice(["", " ", "\n", "\t"]).join(pieces))
    return out


STRINGS = mixed_strings(320, seed=0)


# Chat templates in the shape Qwen's models ship them (written here, not copied).
QWEN25_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) or message.role == 'assistant' %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
QWEN3_TEMPLATE = """{%- if messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(last_query=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- if message.role == 'user' and ns.last_query == messages|length - 1 %}
        {%- set ns.last_query = (messages|length - 1) - loop.index0 %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
    {%- elif message.role == 'assistant' %}
        {%- set content = message.content %}
        {%- set reasoning = '' %}
        {%- if '</think>' in content %}
            {%- set reasoning = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query and (loop.last or reasoning) %}
            {{- '<|im_start|>assistant\\n<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
        {%- else %}
            {{- '<|im_start|>assistant\\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""


def train_qwen_style(out_dir, template=QWEN25_TEMPLATE, vocab_size=1200):
    """tokenizer.json (trained on other mixed strings) + tokenizer_config.json as Qwen2.5 ships them."""
    from tokenizers import (AddedToken, Regex, Tokenizer as HFTokenizer, decoders, models, normalizers,
                            pre_tokenizers, trainers)

    def split(pattern):
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])

    tok = HFTokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    # Trained with digits in runs of up to 3 (Llama 3's rule), so merges of digits exist: only a tokenizer
    # that splits single digits, as Qwen's does, leaves "123" as three tokens.
    tok.pre_tokenizer = split(QWEN2_SPLIT.replace(r"\p{N}|", r"\p{N}{1,3}|"))
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(mixed_strings(600, seed=1) * 3, trainer=trainer)
    tok.pre_tokenizer = split(QWEN2_SPLIT)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ADDED])
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    decoder = {str(tok.token_to_id(t)): {"content": t, "special": t in SPECIALS, "normalized": False,
                                         "lstrip": False, "rstrip": False, "single_word": False}
               for t in SPECIALS + ADDED}
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "unk_token": None, "added_tokens_decoder": decoder,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"], "chat_template": template,
        "clean_up_tokenization_spaces": False, "errors": "replace", "model_max_length": 32768,
        "split_special_tokens": False}), encoding="utf-8")
    (out_dir / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")]}), encoding="utf-8")
    return out_dir


def as_vocab_merges(src, out_dir):
    """The same tokenizer as vocab.json + merges.txt (+ tokenizer_config.json), without tokenizer.json."""
    tj = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps(tj["model"]["vocab"], ensure_ascii=False), encoding="utf-8")
    merges = [" ".join(m) if isinstance(m, list) else m for m in tj["model"]["merges"]]
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    for f in ("tokenizer_config.json", "generation_config.json"):
        (out_dir / f).write_bytes((src / f).read_bytes())
    return out_dir


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return train_qwen_style(tmp_path_factory.mktemp("qwen_tok"))


@pytest.fixture(scope="module")
def hf_tok(qwen_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(qwen_dir))


def assert_same_as_transformers(tok: Tokenizer, hf_tok):
    mismatched = []
    for text in STRINGS:
        want = hf_tok(text, add_special_tokens=False)["input_ids"]
        got = tok.encode(text)
        if got != want or tok.decode(got, skip_special_tokens=False) != hf_tok.decode(want, skip_special_tokens=False) \
                or tok.decode(got) != hf_tok.decode(want, skip_special_tokens=True):
            mismatched.append(text)
    assert not mismatched, f"{len(mismatched)} of {len(STRINGS)} strings differ, e.g. {mismatched[:3]!r}"


def test_strings_cover_what_they_claim():
    assert len(STRINGS) >= 300 and len(set(STRINGS)) > 250
    assert any("\r\n" in s for s in STRINGS) and any("\u0301" in s for s in STRINGS)


def test_tokenizer_json_equals_transformers(qwen_dir, hf_tok):
    assert type(hf_tok).__name__.startswith("Qwen2Tokenizer")
    tok = Tokenizer.from_dir(qwen_dir)
    assert_same_as_transformers(tok, hf_tok)
    for special in SPECIALS:  # never split
        assert tok.encode(f"a{special}b")[1] == tok.token_to_id(special) == hf_tok.convert_tokens_to_ids(special)
    assert tok.encode("12345") == hf_tok("12345", add_special_tokens=False)["input_ids"] and len(tok.encode("12345")) == 5
    assert tok.eos_ids == sorted([tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")])


def test_vocab_json_and_merges_txt_equal_transformers(qwen_dir, hf_tok, tmp_path):
    from transformers import AutoTokenizer

    path = as_vocab_merges(qwen_dir, tmp_path / "slow")
    theirs = AutoTokenizer.from_pretrained(str(path))
    assert_same_as_transformers(load_tokenizer(path / "vocab.json"), theirs)  # MindFormers' vocab_file
    assert_same_as_transformers(Tokenizer.from_dir(path), hf_tok)  # and the same ids as tokenizer.json
    assert Tokenizer.from_dir(path).fingerprint() == Tokenizer.from_dir(qwen_dir).fingerprint()


def test_gguf_qwen2_pre_tokenizer_equals_transformers(qwen_dir, hf_tok, tmp_path):
    """The tokenizer as llama.cpp's converter writes it for Qwen (gpt2 model, pre 'qwen2')."""
    from family_models import write_family, write_gguf

    tj = json.loads((qwen_dir / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = dict(tj["model"]["vocab"]) | {t["content"]: t["id"] for t in tj["added_tokens"]}
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]

    def add_tokenizer(writer):
        import gguf

        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("qwen2")
        writer.add_token_list(tokens)
        writer.add_token_types([int(gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.USER_DEFINED
                                    if t in ADDED else gguf.TokenType.NORMAL) for t in tokens])
        writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tj["model"]["merges"]])
        writer.add_eos_token_id(vocab["<|im_end|>"])
        writer.add_pad_token_id(vocab["<|endoftext|>"])
        writer.add_add_bos_token(False)
        writer.add_chat_template(QWEN25_TEMPLATE)

    model_dir = write_family(tmp_path / "model", "qwen2", tokenizer_dir=qwen_dir)
    path = write_gguf(tmp_path / "qwen2.gguf", model_dir, "qwen2", tokenizer=add_tokenizer)
    tok = load_tokenizer(path)
    assert_same_as_transformers(tok, hf_tok)
    assert tok.chat_template == QWEN25_TEMPLATE and tok.eos_token == "<|im_end|>"


CONVERSATIONS = [
    [{"role": "user", "content": "你好 🎉"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}],
    [{"role": "user", "content": "Think first."},
     {"role": "assistant", "content": "<think>\nIt is easy.\n</think>\n\nDone."}],
    [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "<think>r1</think>a1"},
     {"role": "user", "content": "q2"}, {"role": "assistant", "content": "<think>\nr2\n</think>\n\na2"}],
]


@pytest.mark.parametrize("convo", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_qwen25_template_equals_transformers(qwen_dir, hf_tok, convo, add_generation_prompt):
    messages = CONVERSATIONS[convo]
    want = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert Tokenizer.from_dir(qwen_dir).apply_chat_template(messages, add_generation_prompt) == want


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    return train_qwen_style(tmp_path_factory.mktemp("qwen3_tok"), template=QWEN3_TEMPLATE, vocab_size=600)


@pytest.mark.parametrize("thinking", [None, True, False], ids=["unset", "thinking", "no-thinking"])
@pytest.mark.parametrize("convo", range(len(CONVERSATIONS)))
def test_qwen3_template_enable_thinking_equals_transformers(qwen3_dir, convo, thinking):
    from transformers import AutoTokenizer

    messages = CONVERSATIONS[convo]
    hf = AutoTokenizer.from_pretrained(str(qwen3_dir))
    kwargs = {} if thinking is None else {"enable_thinking": thinking}
    tok = Tokenizer.from_dir(qwen3_dir)
    for add in (True, False):
        want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add, **kwargs)
        assert tok.apply_chat_template(messages, add, **kwargs) == want
        tok.chat_template_kwargs = kwargs  # set once, as --enable_thinking does: the same text
        assert tok.apply_chat_template(messages, add) == want
        tok.chat_template_kwargs = {}
    if messages[-1]["role"] == "user":
        prompt = tok.apply_chat_template(messages, True, **kwargs)
        assert prompt.endswith("<think>\n\n</think>\n\n") == (thinking is False)
