"""One tokenizer interface over the places a Llama-family tokenizer lives.

- `tokenizer.json` (+ `tokenizer_config.json`): the `tokenizers` library, as transformers uses it;
- `vocab.json` + `merges.txt` (Qwen2Tokenizer, GPT2Tokenizer, MindFormers' Qwen2.5 `vocab_file` /
  `merges_file`): rebuilt as the byte-level BPE transformers builds from them;
- `tokenizer.model`: SentencePiece (Meta checkpoints, older Llama-2 directories);
- GGUF metadata (`tokenizer.ggml.*`): rebuilt as a byte-level BPE for the `tokenizers` library.

Chat templates are rendered the way transformers renders them: Jinja in a sandboxed environment
(templates come from downloaded files), with `trim_blocks` / `lstrip_blocks`, `raise_exception`
and a `tojson` filter. `chat_template_kwargs` (e.g. Qwen3's `enable_thinking: false`) are passed to
every rendering, as `apply_chat_template(..., **kwargs)` passes them: set once on the tokenizer, data
preparation, training-time evaluation, predict and chat all render the same prompt.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import signal
import threading
from datetime import datetime
from pathlib import Path

import sentencepiece as spm
from jinja2 import TemplateError
from jinja2.exceptions import SecurityError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from petformers import atomic
from petformers.errors import TokenizerError
from petformers.jsonio import read_json


class Tokenizer:
    def __init__(self, backend, *, kind: str, bos_token: str | None, eos_token: str | None,
                 pad_token: str | None, add_bos: bool, chat_template: str | None,
                 extra_eos_ids: list[int] = (), source: str = ""):
        self.backend = backend  # tokenizers.Tokenizer or sentencepiece.SentencePieceProcessor
        self.kind = kind  # "tokenizers" | "sentencepiece"
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.add_bos = add_bos  # prepend bos when encoding with add_special_tokens=True
        self.chat_template = chat_template
        self.source = source
        self.chat_template_source = f"{source}: chat_template"  # where the template came from, for its errors
        self._extra_eos = [i for i in extra_eos_ids if i is not None]
        self.chat_template_kwargs: dict = {}  # extra template variables, e.g. {"enable_thinking": False}

    # ---- ids -------------------------------------------------------------------------------
    def token_to_id(self, token: str | None) -> int | None:
        if token is None:
            return None
        if self.kind == "sentencepiece":
            i = self.backend.piece_to_id(token)
            return None if i == self.backend.unk_id() and token != self.backend.id_to_piece(i) else i
        return self.backend.token_to_id(token)

    def id_to_token(self, i: int) -> str:
        if self.kind == "sentencepiece":
            return self.backend.id_to_piece(i)
        return self.backend.id_to_token(i)

    @property
    def bos_id(self) -> int | None:
        return self.token_to_id(self.bos_token)

    @property
    def eos_id(self) -> int | None:
        return self.token_to_id(self.eos_token)

    @property
    def pad_id(self) -> int | None:
        pad = self.token_to_id(self.pad_token)
        return pad if pad is not None else self.eos_id

    @property
    def eos_ids(self) -> list[int]:
        """Every id that ends generation: eos, end-of-turn tokens, generation_config's eos list."""
        ids = [self.eos_id, *self._extra_eos]
        return sorted({i for i in ids if i is not None})

    @property
    def vocab_size(self) -> int:
        if self.kind == "sentencepiece":
            return self.backend.get_piece_size()
        return self.backend.get_vocab_size(with_added_tokens=True)

    # ---- text <-> ids ----------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids; special tokens written in `text` (e.g. <|im_start|>) are recognised."""
        if self.kind == "sentencepiece":
            ids = self.backend.encode(text)
        else:
            ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self.kind == "sentencepiece":
            return self.backend.encode(texts)
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        if self.kind == "sentencepiece":
            if skip_special_tokens:
                ids = [i for i in ids if not self.backend.is_control(i)]
            return self.backend.decode(ids)
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    # ---- chat ------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """The conversation rendered as text by the model's own template (as transformers does);
        `kwargs` (and `chat_template_kwargs`) are template variables such as `enable_thinking`."""
        if not self.chat_template:
            raise TokenizerError(f"{self.source}: this tokenizer has no chat template; "
                                 "use --template fastchat/alpaca or a model with a chat template")
        return render_chat_template(self.chat_template, messages, add_generation_prompt,
                                    **(self.chat_template_kwargs | kwargs), source=self.chat_template_source,
                                    bos_token=self.bos_token or "", eos_token=self.eos_token or "")

    def set_chat_template_kwargs(self, **kwargs) -> list[str]:
        """Template variables for every rendering from now on (e.g. enable_thinking=False); returns the
        names the chat template never reads, for the caller to report (they change nothing)."""
        self.chat_template_kwargs.update(kwargs)
        return [k for k in kwargs if k not in (self.chat_template or "")]

    def fingerprint(self) -> str:
        """sha256 of the vocabulary and special tokens: equal for the same tokenizer in any format."""
        h = hashlib.sha256()
        for i in range(self.vocab_size):
            h.update(self.id_to_token(i).encode("utf-8", "surrogatepass") + b"\0")
        h.update(json.dumps([self.bos_token, self.eos_token, self.add_bos]).encode())
        return h.hexdigest()[:16]

    # ---- constructors ----------------------------------------------------------------------
    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        """From a Hugging Face model directory (tokenizer.json or tokenizer.model)."""
        path = Path(path)
        cfg = _read_json(path / "tokenizer_config.json") or {}
        special = _read_json(path / "special_tokens_map.json") or {}
        gen = _read_json(path / "generation_config.json") or {}
        template = cfg.get("chat_template")
        template_source = f"{path / 'tokenizer_config.json'}: chat_template"
        if template is None and (path / "chat_template.jinja").exists():
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")
            template_source = str(path / "chat_template.jinja")
        if isinstance(template, list):  # transformers' named templates: take "default"
            template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])

        def tok(name):
            value = cfg.get(name, special.get(name))
            return value.get("content") if isinstance(value, dict) else value

        extra_eos = gen.get("eos_token_id")
        extra_eos = extra_eos if isinstance(extra_eos, list) else [extra_eos]
        if (path / "tokenizer.json").exists():
            _check_utf8(path / "tokenizer.json")
            try:
                backend = HFTokenizer.from_file(str(path / "tokenizer.json"))
            except Exception as e:
                raise TokenizerError(f"{path / 'tokenizer.json'}: cannot be read ({e})") from None
            add_bos = cfg.get("add_bos_token")
            if add_bos is None:  # ask the post-processor whether it inserts bos
                probe = backend.encode("a", add_special_tokens=True).ids
                bos_id = backend.token_to_id(tok("bos_token")) if tok("bos_token") else None
                add_bos = bool(probe) and bos_id is not None and probe[0] == bos_id
            t = cls(backend, kind="tokenizers", bos_token=tok("bos_token"), eos_token=tok("eos_token"),
                    pad_token=tok("pad_token"), add_bos=bool(add_bos), chat_template=template,
                    extra_eos_ids=extra_eos, source=str(path))
            t.chat_template_source = template_source
            return t
        if (path / "tokenizer.model").exists():
            t = cls.from_sentencepiece(path / "tokenizer.model")
            t.chat_template, t._extra_eos = template, [i for i in extra_eos if i is not None]
            t.chat_template_source = template_source
            return t
        if (path / "vocab.json").exists() and (path / "merges.txt").exists():
            backend = _bpe_from_vocab_merges(path, cfg, [tok(k) for k in _SPECIAL_KEYS])
            eos = tok("eos_token") or ("<|endoftext|>" if _is_qwen2(cfg) else None)
            pad = tok("pad_token") or ("<|endoftext|>" if _is_qwen2(cfg) else None)
            t = cls(backend, kind="tokenizers", bos_token=tok("bos_token"), eos_token=eos, pad_token=pad,
                    add_bos=bool(cfg.get("add_bos_token", False)), chat_template=template,
                    extra_eos_ids=extra_eos, source=str(path))
            t.chat_template_source = template_source
            return t
        raise TokenizerError(f"{path}: no tokenizer.json or tokenizer.model (nor vocab.json + merges.txt) found")

    @classmethod
    def from_sentencepiece(cls, model_file: str | Path) -> "Tokenizer":
        if not Path(model_file).is_file():
            raise TokenizerError(f"{model_file}: no such file (a SentencePiece tokenizer.model is needed)")
        sp = spm.SentencePieceProcessor()
        try:
            sp.load(str(model_file))
        except Exception as e:
            raise TokenizerError(f"{model_file}: not a SentencePiece model ({e})") from None
        piece = lambda i: sp.id_to_piece(i) if i >= 0 else None  # noqa: E731
        return cls(sp, kind="sentencepiece", bos_token=piece(sp.bos_id()), eos_token=piece(sp.eos_id()),
                   pad_token=piece(sp.pad_id()), add_bos=True, chat_template=None, source=str(model_file))

    @classmethod
    def from_gguf_metadata(cls, meta: dict, source: str = "") -> "Tokenizer":
        """Rebuild the tokenizer a GGUF describes: byte-level BPE ('gpt2', Llama 3, SmolLM) or
        SentencePiece BPE ('llama', Llama 2 / Mistral), as transformers rebuilds them."""
        kind = meta.get("tokenizer.ggml.model")
        if kind not in ("gpt2", "llama"):
            raise TokenizerError(f"{source}: GGUF tokenizer model {kind!r} is not supported ('gpt2' byte-level "
                                 "BPE and 'llama' SentencePiece are); pass a Hugging Face tokenizer directory")
        tokens = meta["tokenizer.ggml.tokens"]
        types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        if kind == "gpt2":
            backend = _gguf_byte_level_bpe(meta, source)
        else:
            backend = _gguf_sentencepiece_bpe(meta)
        special = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3]
        user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == 4]
        backend.add_special_tokens(special)
        if user:
            backend.add_tokens(user)

        def name(key):
            i = meta.get(key)
            return tokens[i] if i is not None and 0 <= i < len(tokens) else None

        # llama.cpp adds bos to a SentencePiece vocabulary whose file does not say otherwise.
        add_bos = meta.get("tokenizer.ggml.add_bos_token", kind == "llama")
        t = cls(backend, kind="tokenizers", bos_token=name("tokenizer.ggml.bos_token_id"),
                   eos_token=name("tokenizer.ggml.eos_token_id"),
                   pad_token=name("tokenizer.ggml.padding_token_id"),
                   add_bos=bool(add_bos),
                   chat_template=meta.get("tokenizer.chat_template"),
                   extra_eos_ids=[meta.get("tokenizer.ggml.eot_token_id")], source=source)
        t.chat_template_source = f"{source}: tokenizer.chat_template"
        return t

    def save_pretrained(self, out_dir: str | Path):
        """Write tokenizer.json/tokenizer.model and tokenizer_config.json that transformers loads."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        if self.kind == "sentencepiece":
            atomic.write_bytes(out_dir / "tokenizer.model", self.backend.serialized_model_proto())
            tokenizer_class = "LlamaTokenizer"
        else:
            with atomic.replacing(out_dir / "tokenizer.json") as tmp:
                self.backend.save(str(tmp))
            tokenizer_class = "PreTrainedTokenizerFast"
        cfg = {"tokenizer_class": tokenizer_class, "bos_token": self.bos_token, "eos_token": self.eos_token,
               "pad_token": self.pad_token, "add_bos_token": self.add_bos, "add_eos_token": False,
               "clean_up_tokenization_spaces": False, "model_max_length": 1_000_000}
        if self.chat_template:
            cfg["chat_template"] = self.chat_template
        atomic.write_json(out_dir / "tokenizer_config.json", cfg)


# How byte-level BPE vocabularies split text before merging, by GGUF `tokenizer.ggml.pre` (llama.cpp's
# names). The patterns are those of the models' own tokenizer.json files.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                 r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                 r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen2 / Qwen2.5 / Qwen3: Llama 3's pattern with single digits (\p{N}), after NFC normalisation.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GGUF_SPLITS = {"llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
                "smaug-bpe": _LLAMA3_SPLIT, "tekken": _TEKKEN_SPLIT,
                "qwen2": QWEN2_SPLIT, "deepseek-r1-qwen": QWEN2_SPLIT}
_GGUF_NFC = ("qwen2", "deepseek-r1-qwen")  # pre-tokenizers whose tokenizer.json normalises to NFC first
_GPT2_PRE = (None, "default", "gpt2")


_SPECIAL_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")
_QWEN2_CLASSES = (None, "Qwen2Tokenizer", "Qwen2TokenizerFast")
_GPT2_CLASSES = ("GPT2Tokenizer", "GPT2TokenizerFast")


def _is_qwen2(cfg: dict) -> bool:
    return cfg.get("tokenizer_class") in _QWEN2_CLASSES


def _bpe_from_vocab_merges(path: Path, cfg: dict, specials: list[str | None]):
    """The byte-level BPE transformers builds from vocab.json + merges.txt: Qwen2Tokenizer's (NFC, Qwen's
    split pattern; also when tokenizer_config.json names no class, as MindFormers' Qwen2.5 directories)
    or GPT2Tokenizer's. Added tokens come from tokenizer_config.json's `added_tokens_decoder` at their ids,
    then the special tokens it names (Qwen2Tokenizer adds them when missing)."""
    cls_name = cfg.get("tokenizer_class")
    if cls_name not in _QWEN2_CLASSES + _GPT2_CLASSES:
        raise TokenizerError(f"{path / 'tokenizer_config.json'}: tokenizer_class {cls_name!r} with vocab.json + "
                             "merges.txt is not supported (Qwen2Tokenizer, GPT2Tokenizer); pass a tokenizer.json")
    vocab = read_json(path / "vocab.json", TokenizerError)
    if not isinstance(vocab, dict):
        raise TokenizerError(f"{path / 'vocab.json'}: not a token -> id mapping")
    lines = (path / "merges.txt").read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split(" ", 1)) for line in lines if line and not line.startswith("#version")]
    bad = next((i for i, m in enumerate(merges) if len(m) != 2), None)
    if bad is not None:
        raise TokenizerError(f"{path / 'merges.txt'}: line {bad + 1} is not two tokens separated by a space")
    added = []
    for key, entry in sorted((cfg.get("added_tokens_decoder") or {}).items(), key=lambda kv: int(kv[0])):
        vocab.setdefault(entry["content"], int(key))
        added.append(AddedToken(entry["content"], special=bool(entry.get("special", True)),
                                normalized=bool(entry.get("normalized", False)),
                                lstrip=bool(entry.get("lstrip", False)), rstrip=bool(entry.get("rstrip", False)),
                                single_word=bool(entry.get("single_word", False))))
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    if _is_qwen2(cfg):
        backend.normalizer = normalizers.NFC()
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=bool(cfg.get("add_prefix_space")),
                                                         use_regex=True)
    backend.decoder = decoders.ByteLevel()
    for token in added:  # one by one: the library keeps the flags of each
        (backend.add_special_tokens if token.special else backend.add_tokens)([token])
    names = [t for t in specials if t] + list(cfg.get("additional_special_tokens") or [])
    if _is_qwen2(cfg):
        names.append("<|endoftext|>")  # Qwen2Tokenizer's unk/eos/pad default
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in names
                                if isinstance(t, str) and t not in {a.content for a in added}])
    return backend


def _gguf_byte_level_bpe(meta: dict, source: str):
    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    backend = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                     fuse_unk=False, byte_fallback=False))
    pre = meta.get("tokenizer.ggml.pre")
    if pre in _GGUF_NFC:
        backend.normalizer = normalizers.NFC()
    if pre in _GGUF_SPLITS:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_GGUF_SPLITS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif pre == "smollm":  # SmolLM splits digits one by one, then GPT-2's pattern
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    else:
        if pre not in _GPT2_PRE:
            logging.getLogger("petformers").warning(
                "%s: GGUF pre-tokenizer %r is unknown to petformers; splitting text as GPT-2 does, which may "
                "tokenize differently from the model's own tokenizer", source, pre)
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    return backend


def _gguf_sentencepiece_bpe(meta: dict):
    """A SentencePiece BPE vocabulary (Llama 2, Mistral) as a `tokenizers` BPE with byte fallback.
    Files without merges get them from the token scores: a piece made of two pieces is their merge,
    ranked by its score (what transformers does for these files)."""
    tokens = meta["tokenizer.ggml.tokens"]
    vocab = {t: i for i, t in enumerate(tokens)}
    if meta.get("tokenizer.ggml.merges"):
        merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    else:
        scores = meta.get("tokenizer.ggml.scores") or [-float(i) for i in range(len(tokens))]
        merges = _merges_from_scores(vocab, dict(zip(tokens, scores)))
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True))
    prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", split=False,
                                                     prepend_scheme="first" if prefix else "never")
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(content=" ", left=1))
    backend.decoder = decoders.Sequence(steps)
    return backend


def _merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    ranked = []
    for piece, score in scores.items():
        pairs = [(piece[:i], piece[i:]) for i in range(1, len(piece)) if piece[:i] in vocab and piece[i:] in vocab]
        pairs.sort(key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
        ranked.extend((score, left, right) for left, right in pairs)
    ranked.sort(key=lambda r: (r[0], len(r[1]), len(r[2])), reverse=True)  # stable: ties keep their order
    return [(left, right) for _, left, right in ranked]


TEMPLATE_SECONDS = 5.0  # a chat template that renders longer than this is stopped (PETFORMERS_TEMPLATE_TIMEOUT)


def render_chat_template(template: str, messages: list[dict], add_generation_prompt: bool,
                         source: str = "chat template", **tokens) -> str:
    """The template rendered in jinja2's immutable sandbox (no access to Python internals, no mutation
    of the messages), stopped with one line when it runs longer than PETFORMERS_TEMPLATE_TIMEOUT
    seconds (a template from a downloaded tokenizer may loop for ever: sandboxed `range` is capped at
    100,000, but nested loops are not). Errors name `source` (the file and key it came from) and the
    template line."""
    try:
        with _time_limit():
            return _compile_chat_template(template).render(messages=messages,
                                                           add_generation_prompt=add_generation_prompt, **tokens)
    except _TemplateTimeout:
        raise TokenizerError(f"{source}: chat template stopped: still rendering after {_template_seconds():g} s "
                             "(PETFORMERS_TEMPLATE_TIMEOUT); does it loop?") from None
    except SecurityError as e:
        raise TokenizerError(f"{source}, {_template_line(e)}: chat template refused: it reaches outside the "
                             f"sandbox ({e})") from None
    except TemplateError as e:
        raise TokenizerError(f"{source}, {_template_line(e)}: chat template failed: {e}") from None
    except RecursionError:
        raise TokenizerError(f"{source}: chat template failed: recursion too deep") from None
    except (TypeError, ValueError, ArithmeticError, LookupError, AttributeError) as e:
        raise TokenizerError(f"{source}, {_template_line(e)}: chat template failed: {type(e).__name__}: {e}") from None


def _template_line(error: BaseException) -> str:
    """'line N' of the template where `error` arose: a syntax error carries it, a rendering error has it in
    the traceback frame jinja2 maps back to the template source."""
    line = getattr(error, "lineno", None)
    tb = error.__traceback__
    while line is None and tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return f"line {line}" if line else "line ?"


def _check_utf8(file: Path):
    """A tokenizer file that is not UTF-8 named with its line and byte (the tokenizers library only says
    'stream did not contain valid UTF-8')."""
    raw = file.read_bytes()
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise TokenizerError(f"{file}:{line}: not UTF-8 text (byte {e.start})") from None


class _TemplateTimeout(Exception):
    pass


def _template_seconds() -> float:
    try:
        return float(os.environ.get("PETFORMERS_TEMPLATE_TIMEOUT", TEMPLATE_SECONDS))
    except ValueError:
        return TEMPLATE_SECONDS


@contextlib.contextmanager
def _time_limit():
    """SIGALRM after the limit, in the main thread (elsewhere signals cannot interrupt; no limit there)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def stop(signum, frame):
        raise _TemplateTimeout()

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, _template_seconds())
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


MAX_TEMPLATE_VALUE = 1 << 20  # longest string / list a template may build with `*`, biggest `**` result (bits)


def _bounded_sandbox():
    class BoundedSandbox(ImmutableSandboxedEnvironment):
        """The immutable sandbox, plus a bound on `*` and `**`: one expression must not allocate
        gigabytes (`'x' * 10**10`) before the time limit can stop it."""
        intercepted_binops = frozenset(["*", "**"])

        def call_binop(self, context, operator, left, right):
            if operator == "*":
                for seq, times in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(times, int) and \
                            len(seq) * times > MAX_TEMPLATE_VALUE:
                        raise SecurityError(f"a repeated sequence of {len(seq)} x {times} items is too long")
            if operator == "**" and isinstance(left, int) and isinstance(right, int) and \
                    abs(left) > 1 and right * max(abs(left), 2).bit_length() > MAX_TEMPLATE_VALUE:
                raise SecurityError("the power is too large")
            return super().call_binop(context, operator, left, right)

    return BoundedSandbox


@functools.lru_cache(maxsize=8)
def _compile_chat_template(template: str):
    """Compiled once per template: compiling takes milliseconds, rendering microseconds (data prep renders 100k+)."""
    _BoundedSandbox = _bounded_sandbox()

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = _BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)  # a syntax error is a TemplateError, named with its line by the caller


def _read_json(path: Path) -> dict | None:
    if not path.exists():
        return None

    return read_json(path, TokenizerError)
