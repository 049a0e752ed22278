"""llama.cpp itself, for tests: its C API (llama.h) through ctypes.

llama.cpp comes prebuilt in the `xllamacpp` wheel from PyPI (pinned in the `dev` extra: its shared
library exports the whole llama.h API). Only the few calls tests need are declared, with the struct
layouts of that pinned version: logits of every position, greedy generation, tokenization, LoRA
adapters. `available()` says whether it can be loaded; tests that need it skip with the reason.
"""

from __future__ import annotations

import ctypes
import os
from functools import lru_cache

import numpy as np

PINNED = "2026.10.11549"  # the xllamacpp release whose llama.h these declarations follow


class _ModelParams(ctypes.Structure):
    # Only ever filled by llama_model_default_params() and passed back unchanged: an opaque buffer
    # larger than the real struct (passed on the stack by value, the callee reads its own size).
    _fields_ = [("_raw", ctypes.c_byte * 1024)]


class _ContextParams(ctypes.Structure):
    # The leading fields of llama_context_params (llama.h of the pinned release), then opaque bytes.
    _fields_ = [("n_ctx", ctypes.c_uint32), ("n_batch", ctypes.c_uint32), ("n_ubatch", ctypes.c_uint32),
                ("n_seq_max", ctypes.c_uint32), ("n_rs_seq", ctypes.c_uint32), ("n_outputs_max", ctypes.c_uint32),
                ("n_outputs_max_per_seq", ctypes.c_uint32), ("n_threads", ctypes.c_int32),
                ("n_threads_batch", ctypes.c_int32), ("ctx_type", ctypes.c_int), ("rope_scaling_type", ctypes.c_int),
                ("pooling_type", ctypes.c_int), ("attention_type", ctypes.c_int), ("flash_attn_type", ctypes.c_int),
                ("rope_freq_base", ctypes.c_float), ("rope_freq_scale", ctypes.c_float),
                ("yarn_ext_factor", ctypes.c_float), ("yarn_attn_factor", ctypes.c_float),
                ("yarn_beta_fast", ctypes.c_float), ("yarn_beta_slow", ctypes.c_float),
                ("yarn_orig_ctx", ctypes.c_uint32), ("defrag_thold", ctypes.c_float),
                ("cb_eval", ctypes.c_void_p), ("cb_eval_user_data", ctypes.c_void_p),
                ("type_k", ctypes.c_int), ("type_v", ctypes.c_int), ("_rest", ctypes.c_byte * 1024)]


class _Batch(ctypes.Structure):
    _fields_ = [("n_tokens", ctypes.c_int32), ("token", ctypes.POINTER(ctypes.c_int32)), ("embd", ctypes.c_void_p),
                ("pos", ctypes.POINTER(ctypes.c_int32)), ("n_seq_id", ctypes.POINTER(ctypes.c_int32)),
                ("seq_id", ctypes.POINTER(ctypes.POINTER(ctypes.c_int32))), ("logits", ctypes.POINTER(ctypes.c_int8))]


_LOG_CB = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
_silence = _LOG_CB(lambda level, text, data: None)


def unavailable_reason() -> str | None:
    try:
        import xllamacpp
    except ImportError as e:  # not installed, or its libgomp.so.1 missing (make llamacpp-runtime)
        return f"llama.cpp cannot be loaded ({e}): pip install 'xllamacpp=={PINNED}' (dev extra), apt-get install libgomp1"
    version = getattr(xllamacpp, "__version__", "?")
    if version != PINNED:
        return f"xllamacpp {version} is installed; these tests declare llama.h of {PINNED}"
    return None


@lru_cache(maxsize=1)
def lib():
    import xllamacpp

    L = ctypes.CDLL(os.path.join(os.path.dirname(xllamacpp.__file__), "xllamacpp.abi3.so"))
    p, c, i32, f = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int32, ctypes.c_float
    sig = {
        "llama_log_set": (None, [_LOG_CB, p]),
        "llama_backend_init": (None, []),
        "llama_model_default_params": (_ModelParams, []),
        "llama_context_default_params": (_ContextParams, []),
        "llama_model_load_from_file": (p, [c, _ModelParams]),
        "llama_model_free": (None, [p]),
        "llama_init_from_model": (p, [p, _ContextParams]),
        "llama_free": (None, [p]),
        "llama_model_get_vocab": (p, [p]),
        "llama_vocab_n_tokens": (i32, [p]),
        "llama_vocab_is_eog": (ctypes.c_bool, [p, i32]),
        "llama_tokenize": (i32, [p, c, i32, ctypes.POINTER(i32), i32, ctypes.c_bool, ctypes.c_bool]),
        "llama_batch_init": (_Batch, [i32, i32, i32]),
        "llama_batch_free": (None, [_Batch]),
        "llama_decode": (i32, [p, _Batch]),
        "llama_get_logits_ith": (ctypes.POINTER(f), [p, i32]),
        "llama_get_memory": (p, [p]),
        "llama_memory_clear": (None, [p, ctypes.c_bool]),
        "llama_model_chat_template": (c, [p, c]),
        "llama_model_meta_val_str": (i32, [p, c, c, ctypes.c_size_t]),
        "llama_model_desc": (i32, [p, c, ctypes.c_size_t]),
        "llama_adapter_lora_init": (p, [p, c]),
        "llama_set_adapters_lora": (i32, [p, ctypes.POINTER(p), ctypes.c_size_t, ctypes.POINTER(f)]),
    }
    for name, (restype, argtypes) in sig.items():
        fn = getattr(L, name)
        fn.restype, fn.argtypes = restype, argtypes
    L.llama_log_set(_silence, None)
    L.llama_backend_init()
    return L


class Model:
    """One GGUF loaded by llama.cpp, with one context (optionally with a LoRA adapter applied)."""

    def __init__(self, path, n_ctx: int = 512, lora: str | None = None, lora_scale: float = 1.0):
        L = lib()
        self.model = L.llama_model_load_from_file(str(path).encode(), L.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        params = L.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch = n_ctx, n_ctx, n_ctx
        params.n_threads = params.n_threads_batch = 1
        # float32 KV cache and plain attention: the default f16 cache alone moves logits by ~1e-2.
        params.type_k = params.type_v = 0  # GGML_TYPE_F32
        params.flash_attn_type = 0  # LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.ctx = L.llama_init_from_model(self.model, params)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not create a context for {path}")
        self.vocab = L.llama_model_get_vocab(self.model)
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        self.n_ctx = n_ctx
        self.adapter = None
        if lora is not None:
            self.adapter = L.llama_adapter_lora_init(self.model, str(lora).encode())
            if not self.adapter:
                raise RuntimeError(f"llama.cpp could not load the LoRA adapter {lora}")
            adapters = (ctypes.c_void_p * 1)(self.adapter)
            scales = (ctypes.c_float * 1)(lora_scale)
            if L.llama_set_adapters_lora(self.ctx, adapters, 1, scales) != 0:
                raise RuntimeError(f"llama.cpp could not apply the LoRA adapter {lora}")

    def close(self):
        L = lib()
        if self.ctx:
            L.llama_free(self.ctx)
        if self.model:
            L.llama_model_free(self.model)
        self.ctx = self.model = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- vocabulary ------------------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool = False, parse_special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        buf = (ctypes.c_int32 * (len(data) + 16))()
        n = lib().llama_tokenize(self.vocab, data, len(data), buf, len(buf), add_special, parse_special)
        if n < 0:
            raise RuntimeError(f"llama_tokenize needs {-n} tokens")
        return list(buf[:n])

    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(1 << 16)
        n = lib().llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8") if n >= 0 else None

    def desc(self) -> str:
        """llama.cpp's one-line description: architecture, size class, and its name of the file type."""
        buf = ctypes.create_string_buffer(256)
        lib().llama_model_desc(self.model, buf, len(buf))
        return buf.value.decode("utf-8")

    def chat_template(self) -> str | None:
        t = lib().llama_model_chat_template(self.model, None)
        return t.decode("utf-8") if t else None

    # ---- compute ---------------------------------------------------------------------------
    def logits(self, tokens: list[int]) -> np.ndarray:
        """float32 [len(tokens), n_vocab]: the logits at every position of one fresh sequence."""
        L = lib()
        L.llama_memory_clear(L.llama_get_memory(self.ctx), True)
        return self._decode(tokens, 0, all_logits=True)

    def _decode(self, tokens: list[int], start: int, all_logits: bool) -> np.ndarray:
        L = lib()
        n = len(tokens)
        batch = L.llama_batch_init(n, 0, 1)
        try:
            for i, t in enumerate(tokens):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = t, start + i, 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = 1 if (all_logits or i == n - 1) else 0
            batch.n_tokens = n
            rc = L.llama_decode(self.ctx, batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode failed ({rc})")
            rows = range(n) if all_logits else [n - 1]
            return np.stack([np.ctypeslib.as_array(L.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,)).copy()
                             for i in rows])
        finally:
            L.llama_batch_free(batch)

    def greedy(self, tokens: list[int], max_new_tokens: int, stop_at_eog: bool = True) -> list[int]:
        """Greedy continuation (argmax each step), as petformers' and transformers' greedy decoding."""
        L = lib()
        L.llama_memory_clear(L.llama_get_memory(self.ctx), True)
        out: list[int] = []
        logits = self._decode(tokens, 0, all_logits=False)[-1]
        pos = len(tokens)
        for _ in range(max_new_tokens):
            nxt = int(np.argmax(logits))
            if stop_at_eog and L.llama_vocab_is_eog(self.vocab, nxt):
                break
            out.append(nxt)
            logits = self._decode([nxt], pos, all_logits=False)[-1]
            pos += 1
        return out

    def nll(self, tokens: list[int]) -> tuple[float, int]:
        """Summed negative log-likelihood of tokens[1:] given their prefixes, and how many were scored."""
        logits = self.logits(tokens).astype(np.float64)
        logp = logits - logits.max(axis=1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(axis=1, keepdims=True))
        target = np.array(tokens[1:])
        return float(-logp[np.arange(len(target)), target].sum()), len(target)
