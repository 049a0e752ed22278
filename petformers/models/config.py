"""The one Llama-family config, and its builders from every format users hold.

Field names are MindFormers' (`num_layers`, `n_kv_heads`, `theta`, `qkv_has_bias`, ...) so that a
MindFormers `model.model_config` section maps one to one; Hugging Face, GGUF and Meta names are
translated here.

A family is this config plus a few switches (MindFormers itself runs Qwen2.5 as a Llama):

| family  | switches                                                                        |
|---------|---------------------------------------------------------------------------------|
| llama   | (Llama 2/3.x; `rope_scaling` llama3/linear; explicit `head_dim`; attention_bias) |
| mistral | `sliding_window`                                                                |
| qwen2   | `qkv_has_bias`, `theta` 1e6, often `tie_word_embeddings`; `sliding_window` rare |
| qwen3   | `qk_norm`, explicit `head_dim`                                                  |

`family` only decides what an export calls the model (`architectures`, `model_type`); the model is
built from the switches alone.
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass, field
from typing import Any

import torch

from petformers.errors import ConfigError

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def parse_dtype(name: str | torch.dtype, key: str = "dtype") -> torch.dtype:
    """'bfloat16' / 'bf16' / torch.bfloat16 -> torch.bfloat16; anything else is a ConfigError."""
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[str(name).lower()]
    except KeyError:
        raise ConfigError(f"{key}: unknown dtype {name!r}; use one of float32, bfloat16, float16") from None


def ffn_hidden_size(hidden_size: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's / MindFormers' SwiGLU width: int(2*4*h/3), times the multiplier, rounded up to multiple_of."""
    width = int(2 * 4 * hidden_size / 3)
    if ffn_dim_multiplier is not None:
        width = int(ffn_dim_multiplier * width)
    return multiple_of * ((width + multiple_of - 1) // multiple_of)


# family (Hugging Face model_type) -> its transformers architecture
FAMILIES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM"}
HF_ARCHITECTURES = {arch: family for family, arch in FAMILIES.items()}
# GGUF general.architecture -> family (llama.cpp writes Mistral and Llama 3 as "llama")
GGUF_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}


def supported_architectures() -> str:
    return ", ".join(f"{arch} ({family})" for family, arch in FAMILIES.items())


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    num_layers: int = 32
    num_heads: int = 32
    n_kv_heads: int | None = None  # None: no grouped-query attention (= num_heads)
    head_dim: int | None = None  # None: hidden_size // num_heads
    intermediate_size: int | None = None  # None: computed from multiple_of / ffn_dim_multiplier
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    rms_norm_eps: float = 1e-5
    theta: float = 10000.0  # rope base
    rope_scaling: dict | None = None  # {"rope_type": "llama3", "factor", "low_freq_factor", ...} or linear
    seq_length: int = 4096  # max positions the model was trained for
    tie_word_embeddings: bool = False
    qkv_has_bias: bool = False  # wq/wk/wv have a bias (Qwen2)
    attn_proj_has_bias: bool = False  # wo has a bias too (Llama's and Qwen3's attention_bias)
    qk_norm: bool = False  # RMSNorm over each head of q and k before rope (Qwen3)
    sliding_window: int | None = None  # a query sees only its last `sliding_window` keys (Mistral)
    max_window_layers: int = 0  # layers below this index attend in full despite sliding_window (Qwen2's rule)
    family: str | None = None  # llama, mistral, qwen2 or qwen3: the architecture exports write; None: from the switches
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = 0
    compute_dtype: str = "float32"  # dtype of the frozen base weights and activations
    param_init_type: str = "float32"  # dtype of trainable (adapter) parameters
    extra: dict = field(default_factory=dict, repr=False)  # unrecognised source keys, kept for export

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.num_heads
        for name in ("hidden_size", "num_layers", "num_heads", "n_kv_heads"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name}: must be at least 1, got {getattr(self, name)!r}")
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ConfigError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
            self.head_dim = self.hidden_size // self.num_heads
        if self.intermediate_size is None:
            self.intermediate_size = ffn_hidden_size(self.hidden_size, self.multiple_of, self.ffn_dim_multiplier)
        if self.num_heads % self.n_kv_heads:
            raise ConfigError(f"num_heads {self.num_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.family is not None and self.family not in FAMILIES:
            raise ConfigError(f"family: unknown {self.family!r}; supported: {', '.join(FAMILIES)}")
        if self.sliding_window is not None and int(self.sliding_window) < 1:
            raise ConfigError(f"sliding_window: must be a positive number of keys, got {self.sliding_window!r}")

    @property
    def hf_family(self) -> str:
        """The family an export writes: the source's own when its config can say what the switches do,
        else the one whose config can (a MindFormers Llama with qkv_has_bias is a Qwen2)."""
        wanted = self.family or "llama"
        if wanted in self._families_that_fit():
            return wanted
        fitting = self._families_that_fit()
        if not fitting:
            raise ConfigError("this model (" + self._switches() + ") is none of " + ", ".join(FAMILIES) +
                              ": no transformers architecture holds it")
        return fitting[0]

    def describe(self) -> str:
        """'qwen2 (q/k/v bias, tied embeddings, theta 1e+06)': the family and its switches, for logs."""
        try:
            family = self.hf_family
        except ConfigError:
            family = "no transformers family"
        on = [name for name, flag in (("q/k/v bias", self.qkv_has_bias), ("o bias", self.attn_proj_has_bias),
                                      ("q/k norm", self.qk_norm), ("tied embeddings", self.tie_word_embeddings))
              if flag]
        if self.head_dim != self.hidden_size // self.num_heads:
            on.append(f"head_dim {self.head_dim}")
        if self.sliding_window is not None:
            on.append(f"sliding window {self.sliding_window}"
                      + (f" from layer {self.max_window_layers}" if self.max_window_layers else ""))
        if self.rope_scaling:
            on.append(f"rope scaling {self.rope_scaling.get('rope_type')}")
        on.append(f"theta {self.theta:g}")
        return f"{family} ({', '.join(on)})"

    def _families_that_fit(self) -> list[str]:
        """Families whose transformers config expresses every switch, most specific first."""
        same_bias = self.qkv_has_bias == self.attn_proj_has_bias
        window_everywhere = self.sliding_window is None or self.max_window_layers == 0
        fits = {
            "qwen3": self.qk_norm and same_bias,
            "qwen2": not self.qk_norm and self.qkv_has_bias and not self.attn_proj_has_bias,
            "mistral": not self.qk_norm and not self.qkv_has_bias and not self.attn_proj_has_bias
            and window_everywhere and not self.rope_scaling,
            "llama": not self.qk_norm and same_bias and self.sliding_window is None,
        }
        return [f for f in ("qwen3", "qwen2", "llama", "mistral") if fits[f]]

    def _switches(self) -> str:
        return (f"qkv_has_bias {self.qkv_has_bias}, attn_proj_has_bias {self.attn_proj_has_bias}, "
                f"qk_norm {self.qk_norm}, sliding_window {self.sliding_window}")

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.eos_token_id
        if eos is None:
            return []
        return list(eos) if isinstance(eos, (list, tuple)) else [int(eos)]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # ---- builders ---------------------------------------------------------------------------

    @classmethod
    def from_hf(cls, cfg: dict) -> "LlamaConfig":
        """From a Hugging Face config.json: Llama (2, 3.x), Mistral, Qwen2 / Qwen2.5, Qwen3."""
        arch = (cfg.get("architectures") or [cfg.get("model_type", "?")])[0]
        family = HF_ARCHITECTURES.get(arch) or (cfg.get("model_type") if cfg.get("model_type") in FAMILIES else None)
        if family is None:
            raise ConfigError(f"config.json: unsupported architecture {arch!r} (model_type {cfg.get('model_type')!r}); "
                              f"petformers supports {supported_architectures()}")
        if cfg.get("mlp_bias"):
            raise ConfigError("config.json: mlp_bias true is not supported (the feed-forward layers have no bias)")
        if cfg.get("hidden_act", "silu") not in ("silu", "swish"):
            raise ConfigError(f"config.json: hidden_act {cfg.get('hidden_act')!r} is not supported (silu)")
        bias = bool(cfg.get("attention_bias", False))
        window, window_layers = _hf_sliding_window(cfg, family)
        try:
            return cls(
                vocab_size=cfg["vocab_size"],
                hidden_size=cfg["hidden_size"],
                num_layers=cfg["num_hidden_layers"],
                num_heads=cfg["num_attention_heads"],
                n_kv_heads=cfg.get("num_key_value_heads"),
                # transformers' Qwen3Config defaults head_dim to 128 (not hidden / heads)
                head_dim=cfg.get("head_dim", 128 if family == "qwen3" else None),
                intermediate_size=cfg["intermediate_size"],
                rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
                theta=cfg.get("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
                rope_scaling=_hf_rope_scaling(cfg),
                seq_length=cfg.get("max_position_embeddings", 2048),
                tie_word_embeddings=cfg.get("tie_word_embeddings", False),
                qkv_has_bias=True if family == "qwen2" else bias and family != "mistral",
                attn_proj_has_bias=bias and family in ("llama", "qwen3"),
                qk_norm=family == "qwen3",
                sliding_window=window,
                max_window_layers=window_layers,
                family=family,
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_id=cfg.get("eos_token_id"),
                pad_token_id=cfg.get("pad_token_id"),
            )
        except KeyError as e:
            raise ConfigError(f"config.json: missing key {e.args[0]!r}") from None

    def to_hf(self) -> dict:
        """The config.json of an exported model, in its family's own terms (`Qwen2ForCausalLM`, ...)."""
        family = self.hf_family
        cfg = {
            "architectures": [FAMILIES[family]],
            "model_type": family,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.seq_length,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.theta,
            "rope_scaling": self.rope_scaling,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_dropout": 0.0,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": self.compute_dtype,
        }
        if family in ("llama", "qwen3"):
            cfg["attention_bias"] = self.qkv_has_bias
        if family == "llama":
            cfg["mlp_bias"] = False
        if family == "mistral":
            cfg["sliding_window"] = self.sliding_window
        if family in ("qwen2", "qwen3"):
            cfg["use_sliding_window"] = self.sliding_window is not None
            cfg["sliding_window"] = self.sliding_window
            cfg["max_window_layers"] = self.max_window_layers if self.sliding_window is not None else self.num_layers
        if family == "qwen2" and self.head_dim == self.hidden_size // self.num_heads:
            del cfg["head_dim"]  # Qwen2Config has no head_dim key; it is hidden / heads there
        return cfg

    @classmethod
    def from_gguf(cls, meta: dict[str, Any], tensor_names: set[str] = frozenset()) -> "LlamaConfig":
        """From GGUF key/value metadata (already decoded to Python values). The switches llama.cpp
        does not write as metadata (biases, q/k norms) are read from which tensors the file has."""
        arch = meta.get("general.architecture")
        if arch not in GGUF_ARCHITECTURES:
            raise ConfigError(f"GGUF key 'general.architecture' {arch!r} is not supported; petformers supports "
                              f"{', '.join(GGUF_ARCHITECTURES)}")
        p = f"{arch}."

        def count(key: str, default: int | None = None) -> int:
            """A count the model's shape divides by, refused by its GGUF key unless a whole number >= 1."""
            value = meta[p + key] if default is None else meta.get(p + key, default)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ConfigError(f"GGUF key '{p + key}' is {value!r}; expected a whole number of at least 1")
            return int(value)

        try:
            heads = count("attention.head_count")
            hidden = count("embedding_length")
            kv = count("attention.head_count_kv", heads)
            if heads % kv:
                raise ConfigError(f"GGUF key '{p}attention.head_count' {heads} is not a multiple of key "
                                  f"'{p}attention.head_count_kv' {kv}")
            rope_dim = meta.get(p + "attention.key_length") or meta.get(p + "rope.dimension_count")
            if not rope_dim and hidden % heads:
                raise ConfigError(f"GGUF key '{p}embedding_length' {hidden} is not divisible by key "
                                  f"'{p}attention.head_count' {heads}")
            window = meta.get(p + "attention.sliding_window")
            return cls(
                vocab_size=int(meta.get(p + "vocab_size") or len(meta["tokenizer.ggml.tokens"])),
                hidden_size=hidden,
                num_layers=count("block_count"),
                num_heads=heads,
                n_kv_heads=kv,
                head_dim=int(rope_dim) if rope_dim else None,
                intermediate_size=count("feed_forward_length"),
                rms_norm_eps=float(meta.get(p + "attention.layer_norm_rms_epsilon", 1e-5)),
                theta=float(meta.get(p + "rope.freq_base", 10000.0)),
                seq_length=int(meta.get(p + "context_length", 2048)),
                qkv_has_bias="blk.0.attn_q.bias" in tensor_names,
                attn_proj_has_bias="blk.0.attn_output.bias" in tensor_names,
                qk_norm="blk.0.attn_q_norm.weight" in tensor_names,
                sliding_window=int(window) if window else None,
                family=GGUF_ARCHITECTURES[arch],
                bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
                eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
                pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
            )
        except KeyError as e:
            raise ConfigError(f"GGUF metadata: missing key {e.args[0]!r}") from None

    @classmethod
    def from_meta(cls, params: dict) -> "LlamaConfig":
        """From Meta's params.json (dim, n_layers, n_heads, n_kv_heads, multiple_of, ...)."""
        try:
            scaling = None
            if params.get("use_scaled_rope"):
                scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
            return cls(
                vocab_size=params.get("vocab_size", -1),
                hidden_size=params["dim"],
                num_layers=params["n_layers"],
                num_heads=params["n_heads"],
                n_kv_heads=params.get("n_kv_heads"),
                multiple_of=params.get("multiple_of", 256),
                ffn_dim_multiplier=params.get("ffn_dim_multiplier"),
                rms_norm_eps=params.get("norm_eps", 1e-5),
                theta=params.get("rope_theta", 10000.0),
                rope_scaling=scaling,
                seq_length=params.get("max_seq_len", 4096),
            )
        except KeyError as e:
            raise ConfigError(f"params.json: missing key {e.args[0]!r}") from None

    @classmethod
    def from_mindformers(cls, mc: dict) -> "LlamaConfig":
        """From a MindFormers YAML `model.model_config` section."""
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        aliases = {"rope_theta": "theta", "num_hidden_layers": "num_layers",
                   "num_attention_heads": "num_heads", "max_position_embedding": None}
        kwargs, extra = {}, {}
        for key, value in mc.items():
            key = aliases.get(key, key) if key in aliases else key
            if key is None:
                continue
            (kwargs if key in known else extra)[key] = value
        if "seq_length" not in kwargs and "max_position_embedding" in mc:
            kwargs["seq_length"] = mc["max_position_embedding"]
        if kwargs.get("ffn_dim_multiplier") is not None:
            kwargs["ffn_dim_multiplier"] = float(kwargs["ffn_dim_multiplier"])
        if "theta" in kwargs:
            kwargs["theta"] = float(kwargs["theta"])
        if "rms_norm_eps" in kwargs:
            kwargs["rms_norm_eps"] = float(kwargs["rms_norm_eps"])
        return cls(**kwargs, extra=extra)


def _hf_sliding_window(cfg: dict, family: str) -> tuple[int | None, int]:
    """(sliding_window, max_window_layers) as transformers applies them: Mistral on every layer when set;
    Qwen2/Qwen3 only with use_sliding_window, on the layers from max_window_layers on (or layer_types)."""
    window = cfg.get("sliding_window")
    if family == "mistral":
        return (int(window) if window else None), 0
    if family not in ("qwen2", "qwen3") or not window:
        return None, 0
    kinds = cfg.get("layer_types")
    if kinds:
        sliding = [i for i, kind in enumerate(kinds) if kind == "sliding_attention"]
        if not sliding:
            return None, 0
        if sliding != list(range(sliding[0], len(kinds))):
            raise ConfigError("config.json: layer_types mixes sliding and full attention in an order petformers "
                              "does not support (sliding layers must be the last ones)")
        return int(window), sliding[0]
    if not cfg.get("use_sliding_window"):
        return None, 0
    layers = cfg.get("max_window_layers", 28)
    if layers >= cfg.get("num_hidden_layers", 0):
        return None, 0
    return int(window), int(layers)


def _hf_rope_scaling(cfg: dict) -> dict | None:
    scaling = cfg.get("rope_scaling") or cfg.get("rope_parameters")
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind in (None, "default"):
        return None
    if kind not in ("llama3", "linear"):
        raise ConfigError(f"config.json: rope_scaling type {kind!r} is not supported (llama3, linear)")
    return {k: v for k, v in scaling.items() if k != "rope_theta"} | {"rope_type": kind}
