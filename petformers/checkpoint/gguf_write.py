"""Write GGUF files that llama.cpp, Ollama and LM Studio load: a merged model, or a LoRA adapter.

Written with the `gguf` package's GGUFWriter in its streaming mode: tensor infos first (names, shapes,
types are known before any data), then one tensor at a time, each merged, permuted and quantized
just before it is written, so an export never holds a second float copy of the model.
The layout follows llama.cpp's own converter (`convert_hf_to_gguf.py` / `convert_lora_to_gguf.py`):
its tensor names, its metadata keys, and its q/k row permutation for rotary-interleaved families.
Families differ only by the data in `FAMILIES`.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from petformers.atomic import replacing
from petformers.checkpoint import gguf_quants
from petformers.errors import CheckpointError, ConfigError
from petformers.pet.lora import LoRALinear
from petformers.pet.module_to_save import ModuleToSave

log = logging.getLogger(__name__)

# petformers module name (inside `layers.N.`) -> llama.cpp tensor name (inside `blk.N.`).
_LAYER_TENSORS = {
    "attention.wq": "attn_q", "attention.wk": "attn_k", "attention.wv": "attn_v", "attention.wo": "attn_output",
    "feed_forward.w1": "ffn_gate", "feed_forward.w2": "ffn_down", "feed_forward.w3": "ffn_up",
    "attention_norm": "attn_norm", "ffn_norm": "ffn_norm",
    "attention.q_norm": "attn_q_norm", "attention.k_norm": "attn_k_norm",
}
_TOP_TENSORS = {"tok_embeddings": "token_embd", "norm": "output_norm", "lm_head": "output"}


@dataclass(frozen=True)
class Family:
    """What differs between architectures in a GGUF file."""
    arch: str  # general.architecture, and the prefix of the hyper-parameter keys
    permute_qk: bool  # llama.cpp applies rope to interleaved pairs: q/k rows are reordered on export
    extra_tensors: tuple[str, ...] = field(default=())  # petformers module names beyond Llama's


FAMILIES = {
    "llama": Family("llama", permute_qk=True),
    "mistral": Family("llama", permute_qk=True),  # llama.cpp runs Mistral as "llama"
    "qwen2": Family("qwen2", permute_qk=False),
    "qwen3": Family("qwen3", permute_qk=False, extra_tensors=("attention.q_norm", "attention.k_norm")),
}


def family_of(config) -> Family:
    """The GGUF layout of a model: its family as exports name it (`LlamaConfig.hf_family`)."""
    try:
        name = config.hf_family
    except ConfigError as e:
        raise CheckpointError(f"GGUF export: {e}") from None
    if name not in FAMILIES:
        raise CheckpointError(f"GGUF export of model family {name!r} is not supported "
                              f"(supported: {', '.join(sorted(FAMILIES))})")
    if getattr(config, "sliding_window", None):
        log.warning("the model attends within a sliding window of %d keys; llama.cpp's %s attends to every "
                    "key, so longer sequences will differ", config.sliding_window, FAMILIES[name].arch)
    return FAMILIES[name]


def gguf_tensor_name(name: str) -> str | None:
    """'layers.3.attention.wq.weight' -> 'blk.3.attn_q.weight'; None for names llama.cpp has no use for."""
    parts = name.split(".")
    if parts[0] == "layers":
        module, suffix = ".".join(parts[2:-1]), parts[-1]
        mapped = _LAYER_TENSORS.get(module)
        return f"blk.{parts[1]}.{mapped}.{suffix}" if mapped else None
    mapped = _TOP_TENSORS.get(parts[0])
    return f"{mapped}.{'.'.join(parts[1:])}" if mapped else None


def permute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Hugging Face rotate-half rows -> llama.cpp's interleaved pairs, per head (llama.cpp's `permute`)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _permute_for(name: str, config, family: Family) -> int | None:
    """The head count to permute `name`'s rows with, or None."""
    if not family.permute_qk:
        return None
    if ".attention.wq." in name:
        return config.num_heads
    if ".attention.wk." in name:
        return config.n_kv_heads
    return None


# ---- tensor types -------------------------------------------------------------------------------

def _use_more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of layers that get more bits in the *_M mixes."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def is_70b(config, family: Family) -> bool:
    """llama.cpp's LLM_TYPE_70B (its K-quant mixes give a 70B's attn_v more bits): 80 layers, with
    grouped-query attention for its llama architecture; any 80-layer qwen2."""
    if config.num_layers != 80:
        return False
    return family.arch == "qwen2" or (family.arch == "llama" and config.n_kv_heads != config.num_heads)


def choose_type(gguf_name: str, shape: tuple[int, ...], outtype: gguf_quants.OutType, n_layers: int,
                is_output: bool, model_70b: bool = False) -> str:
    """The GGML type of one tensor as llama-quantize picks it for the file type (llama-quant.cpp,
    llama_tensor_get_type, without an importance matrix), for the types petformers writes:
    - 1-D tensors (norms, biases) stay F32; float outtypes keep their type for every matrix;
    - the output matrix (the token embeddings when tied to it) gets Q6_K unless the file is Q8_0,
      and Q8_0 when its rows do not split into blocks of the file's type;
    - q4_k_m (= q4_k): Q6_K for attn_v and ffn_down in the layers of `_use_more_bits`;
      q4_k_s: Q5_K for attn_v in layers 0-3 and ffn_down in the first eighth; a 70B's other attn_v Q5_K;
    - rows that do not split into blocks fall back: Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, then F16
      (llama.cpp refuses a legacy type whose 32-blocks do not fit; petformers writes F16 there)."""
    if len(shape) == 1:
        return "F32"
    qtype = outtype.qtype
    if qtype in ("F32", "F16", "BF16"):
        return qtype
    parts = gguf_name.split(".")
    layer = int(parts[1]) if parts[0] == "blk" else -1
    kind = parts[2] if parts[0] == "blk" else parts[0]
    mix = outtype.file_type
    if is_output:
        if not gguf_quants.fits(qtype, shape[-1]):
            qtype = "Q8_0"
        elif qtype != "Q8_0":
            qtype = "Q6_K"
    elif kind == "attn_v":
        if mix == "MOSTLY_Q4_K_M" and _use_more_bits(layer, n_layers):
            qtype = "Q6_K"
        elif mix == "MOSTLY_Q4_K_S" and layer < 4:
            qtype = "Q5_K"
        if model_70b and qtype == "Q4_K":
            qtype = "Q5_K"
    elif kind == "ffn_down":
        if mix == "MOSTLY_Q4_K_M" and _use_more_bits(layer, n_layers):
            qtype = "Q6_K"
        elif mix == "MOSTLY_Q4_K_S" and layer < n_layers // 8:
            qtype = "Q5_K"
    return gguf_quants.usable_type(qtype, shape[-1])


# ---- metadata -----------------------------------------------------------------------------------

def add_model_metadata(writer, config, family: Family, tokenizer_kv: Callable, name: str, file_type: int,
                       quantized: bool, general: dict | None = None):
    import gguf  # heavy (its writer and quant tables): only GGUF exports pay for it

    writer.add_type(gguf.GGUFType.MODEL)
    for key, value in (general or {}).items():  # general.* strings carried over from a GGUF base
        writer.add_string(key, value)
    if not (general or {}).get("general.name"):
        writer.add_name(name)
    writer.add_file_type(file_type)
    if quantized:
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.seq_length)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_layers)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.n_kv_heads)
    writer.add_rope_freq_base(float(config.theta))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_dimension_count(config.head_dim)
    if config.head_dim * config.num_heads != config.hidden_size or family.arch != "llama":
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    if getattr(config, "sliding_window", None):  # written as llama.cpp's converter does (its llama ignores it)
        writer.add_sliding_window(int(config.sliding_window))
    scaling = config.rope_scaling or {}
    if scaling.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    tokenizer_kv(writer)


def llama3_rope_factors(config) -> np.ndarray:
    """Per-frequency divisors of Llama 3.1's rope scaling: llama.cpp reads them from `rope_freqs.weight`."""
    s = config.rope_scaling
    base, dim = float(config.theta), config.head_dim
    factor, low, high = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old_len = float(s["original_max_position_embeddings"])
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old_len / high:
            out.append(1.0)
        elif wavelen > old_len / low:
            out.append(factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def gguf_source_kv(reader, prefix: str) -> Callable:
    """Copy every `prefix*` key of a source GGUF with its exact value types (tokenizer.*: no re-encoding)."""
    import gguf  # heavy (its writer and quant tables): only GGUF exports pay for it

    fields = [f for key, f in reader.fields.items() if key.startswith(prefix)]

    def add(writer):
        for f in fields:
            vtype = f.types[0]
            if vtype == gguf.GGUFValueType.ARRAY:
                writer.add_key_value(f.name, f.contents(), vtype, sub_type=f.types[-1])
            else:
                writer.add_key_value(f.name, f.contents(), vtype)
    return add


def tokenizer_kv_from_tokenizer(tokenizer, vocab_size: int) -> Callable:
    """tokenizer.ggml.* for a Hugging Face tokenizer: byte-level BPE (tokenizer.json) or SentencePiece."""
    if tokenizer is None:
        raise CheckpointError("the base model has no tokenizer; a GGUF needs one (pass a model directory "
                              "with tokenizer.json or tokenizer.model)")
    if tokenizer.kind == "sentencepiece":
        return _sentencepiece_kv(tokenizer, vocab_size)
    return _bpe_kv(tokenizer, vocab_size)


def _special_ids_kv(writer, tokenizer, unk_id):
    if tokenizer.bos_id is not None:
        writer.add_bos_token_id(tokenizer.bos_id)
    if tokenizer.eos_id is not None:
        writer.add_eos_token_id(tokenizer.eos_id)
    if unk_id is not None:
        writer.add_unk_token_id(unk_id)
    pad = tokenizer.token_to_id(tokenizer.pad_token)
    if pad is not None:
        writer.add_pad_token_id(pad)
    writer.add_add_bos_token(bool(tokenizer.add_bos))
    writer.add_add_eos_token(False)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


# tokenizer.json pre-tokenizer regexes -> llama.cpp's `tokenizer.ggml.pre` names.
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_BY_REGEX = {_LLAMA3_REGEX: "llama-bpe", _QWEN2_REGEX: "qwen2"}


def bpe_pre_type(pre_tokenizer: dict | None, source: str) -> str:
    """llama.cpp's name for how a byte-level BPE tokenizer splits text before merging."""
    steps = (pre_tokenizer or {}).get("pretokenizers") if (pre_tokenizer or {}).get("type") == "Sequence" \
        else [pre_tokenizer] if pre_tokenizer else []
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds and kinds[0] == "Split":
        regex = (steps[0].get("pattern") or {}).get("Regex")
        if regex in _PRE_BY_REGEX:
            return _PRE_BY_REGEX[regex]
    raise CheckpointError(f"{source}: the tokenizer's pre-tokenizer ({kinds}) is not one llama.cpp knows "
                          "by name (gpt-2, smollm, llama-bpe, qwen2); the GGUF would tokenize differently")


def _bpe_kv(tokenizer, vocab_size: int) -> Callable:
    import gguf  # heavy (its writer and quant tables): only GGUF exports pay for it

    spec = json.loads(tokenizer.backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise CheckpointError(f"{tokenizer.source}: tokenizer model {model.get('type')!r} "
                              f"(byte_fallback={model.get('byte_fallback')}) cannot be written to GGUF by "
                              "petformers; byte-level BPE tokenizer.json and SentencePiece tokenizer.model can")
    pre = bpe_pre_type(spec.get("pre_tokenizer"), tokenizer.source)
    vocab = dict(model["vocab"])
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    for i, t in added.items():
        vocab[t["content"]] = i
    n = max(vocab_size, max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [int(gguf.TokenType.UNUSED)] * n
    for tok, i in vocab.items():
        tokens[i] = tok
        types[i] = int(gguf.TokenType.NORMAL)
    for i, t in added.items():
        types[i] = int(gguf.TokenType.CONTROL if t.get("special") else gguf.TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    unk = vocab.get(model.get("unk_token")) if model.get("unk_token") else None

    def add(writer):
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        _special_ids_kv(writer, tokenizer, unk)
    return add


def _sentencepiece_kv(tokenizer, vocab_size: int) -> Callable:
    import gguf  # heavy (its writer and quant tables): only GGUF exports pay for it

    sp = tokenizer.backend
    n = sp.get_piece_size()
    tokens, scores, types = [], [], []
    for i in range(n):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        kind = gguf.TokenType.NORMAL
        if sp.is_unknown(i):
            kind = gguf.TokenType.UNKNOWN
        elif sp.is_control(i):
            kind = gguf.TokenType.CONTROL
        elif sp.is_unused(i):
            kind = gguf.TokenType.UNUSED
        elif sp.is_byte(i):
            kind = gguf.TokenType.BYTE
        types.append(int(kind))
    for i in range(n, vocab_size):  # a model vocabulary padded beyond the tokenizer's
        tokens.append(f"[PAD{i}]")
        scores.append(-1000.0)
        types.append(int(gguf.TokenType.UNUSED))

    def add(writer):
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_add_space_prefix(True)
        _special_ids_kv(writer, tokenizer, sp.unk_id() if sp.unk_id() >= 0 else None)
    return add


# ---- the writer ---------------------------------------------------------------------------------

@dataclass
class PlannedTensor:
    name: str  # GGUF name
    shape: tuple[int, ...]  # numpy order (rows first)
    qtype: str
    produce: Callable[[], np.ndarray]  # the bytes (or float array) to write, computed when written


def write_gguf(path: Path, arch: str, add_metadata: Callable, tensors: list[PlannedTensor],
               progress: bool = True) -> Path:
    """Stream `tensors` into a GGUF at `path`, atomically (temp file, fsync, rename)."""
    import gguf  # heavy (its writer and quant tables): only GGUF exports pay for it

    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory; --output names the .gguf file to write")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be written ({e.strerror or e})") from None
    try:
        with replacing(path) as tmp:  # fsynced and renamed into place once whole; removed on any error
            try:
                writer = gguf.GGUFWriter(str(tmp), arch)
            except OSError as e:
                raise CheckpointError(f"{path}: cannot be written ({e.strerror or e})") from None
            try:
                add_metadata(writer)
                for t in tensors:
                    writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), gguf_quants.nbytes(t.qtype, t.shape),
                                           raw_dtype=gguf_quants.ggml_type(t.qtype))
                writer.write_header_to_file()
                writer.write_kv_data_to_file()
                writer.write_ti_data_to_file()
                for t in tqdm(tensors, desc=f"writing {path.name}", unit="tensor", disable=not progress,
                              mininterval=1.0):
                    data = np.ascontiguousarray(t.produce())
                    writer.write_tensor_data(data)
            finally:
                writer.close()
    except OSError as e:  # disk full, permissions: one line, nothing partial left behind
        raise CheckpointError(f"{path}: writing failed ({e.strerror or e}); nothing was written") from None
    return path


@dataclass
class MergedSource:
    """What a merged export reads: the model (adapter already merged), and the base GGUF if it was one."""
    model: torch.nn.Module
    tokenizer: object
    touched: set[str]  # petformers parameter names the adapter changed
    reader: object = None  # gguf.GGUFReader of a GGUF base
    name: str = "petformers export"


def plan_merged(src: MergedSource, outtype: gguf_quants.OutType) -> tuple[list[PlannedTensor], dict]:
    """The tensors of a merged GGUF, in llama.cpp's order, and what was copied block for block."""
    import gguf  # heavy (its writer and quant tables): only GGUF exports pay for it

    config = src.model.config
    family = family_of(config)
    source_tensors = {t.name: t for t in src.reader.tensors} if src.reader is not None else {}
    source_file_type = _field(src.reader, "general.file_type") if src.reader is not None else None
    keep_types = source_file_type is not None and \
        int(source_file_type) == int(gguf.LlamaFileType[outtype.file_type])
    state = src.model.state_dict()
    planned, stats = [], {"copied": 0, "quantized": 0}
    if (config.rope_scaling or {}).get("rope_type") == "llama3":
        factors = llama3_rope_factors(config)
        planned.append(PlannedTensor("rope_freqs.weight", factors.shape, "F32", lambda f=factors: f))
    tied = bool(getattr(config, "tie_word_embeddings", False))
    model_70b = is_70b(config, family)
    for name, tensor in state.items():
        if tied and name == "lm_head.weight":
            continue
        gname = gguf_tensor_name(name)
        if gname is None:
            continue
        shape = tuple(tensor.shape)
        is_output = name == "lm_head.weight" or (tied and name == "tok_embeddings.weight")
        src_t = source_tensors.get(gname)
        if keep_types and src_t is not None:
            qtype = src_t.tensor_type.name
        else:
            qtype = choose_type(gname, shape, outtype, config.num_layers, is_output, model_70b)
        if src_t is not None and name not in src.touched and src_t.tensor_type.name == qtype:
            stats["copied"] += 1
            planned.append(PlannedTensor(gname, shape, qtype, lambda t=src_t: np.asarray(t.data)))
            continue
        stats["quantized"] += 1
        heads = _permute_for(name, config, family)
        planned.append(PlannedTensor(gname, shape, qtype,
                                     lambda n=name, h=heads, q=qtype: _convert(state[n], h, q)))
    return planned, stats


def _convert(tensor: torch.Tensor, permute_heads: int | None, qtype: str) -> np.ndarray:
    t = tensor.detach().to(torch.float32)
    if permute_heads:
        t = permute_rows(t, permute_heads)
    return gguf_quants.quantize(t.numpy(), qtype)


def _field(reader, key: str):
    f = reader.fields.get(key)
    return f.contents() if f is not None else None


def write_merged_gguf(src: MergedSource, path: Path, outtype: str, tokenizer_kv: Callable,
                      general: dict | None = None, progress: bool = True) -> dict:
    """The merged model as one GGUF; returns what was done (tensors copied/quantized, types, bytes)."""
    import gguf  # heavy (its writer and quant tables): only GGUF exports pay for it

    if outtype not in gguf_quants.OUTTYPES:
        raise CheckpointError(f"--outtype {outtype!r} is not supported; use one of "
                              f"{', '.join(gguf_quants.OUTTYPES)}")
    ot = gguf_quants.OUTTYPES[outtype]
    config = src.model.config
    family = family_of(config)
    planned, stats = plan_merged(src, ot)
    file_type = int(gguf.LlamaFileType[ot.file_type])

    def metadata(writer):
        add_model_metadata(writer, config, family, tokenizer_kv, src.name, file_type,
                           quantized=ot.name not in ("f32", "f16", "bf16"), general=general)

    write_gguf(path, family.arch, metadata, planned, progress=progress)
    types: dict[str, int] = {}
    for t in planned:
        types[t.qtype] = types.get(t.qtype, 0) + 1
    return stats | {"types": types, "bytes": Path(path).stat().st_size}


def general_from_gguf(reader) -> dict:
    """general.* strings of a GGUF base worth keeping (name, license, ...), not its type or file type."""
    import gguf  # heavy (its writer and quant tables): only GGUF exports pay for it

    skip = {"general.architecture", "general.type", "general.file_type", "general.quantization_version",
            "general.alignment"}
    out = {}
    for key, f in reader.fields.items():
        if key.startswith("general.") and key not in skip and f.types == [gguf.GGUFValueType.STRING]:
            out[key] = f.contents()
    return out


# ---- LoRA adapter --------------------------------------------------------------------------------

def plan_lora(model: torch.nn.Module, alpha: float, dtype: str = "F32") -> list[PlannedTensor]:
    """llama.cpp's LoRA tensors: `<weight>.lora_a` [r, in] and `.lora_b` [out, r] (numpy order), B's
    rows permuted like the weight's. llama.cpp scales by alpha / r with one alpha per file: a module
    whose scaling differs (rank_pattern, alpha_pattern, rsLoRA) has it folded into B."""
    config = model.config
    family = family_of(config)
    planned = []
    for module_name, module in model.named_modules():
        if isinstance(module, ModuleToSave):
            raise CheckpointError(f"the adapter trains {module_name} in full (modules_to_save): llama.cpp's "
                                  "LoRA format cannot hold it; export a merged GGUF instead")
        if not isinstance(module, LoRALinear):
            continue
        if module.use_dora:
            raise CheckpointError("DoRA adapters cannot be written in llama.cpp's LoRA format; export a "
                                  "merged GGUF (petformers export gguf) instead")
        weight_name = module_name + ".weight"
        gname = gguf_tensor_name(weight_name)
        if gname is None:
            raise CheckpointError(f"LoRA on {module_name}: llama.cpp has no tensor for it")
        a = module.lora_a.weight.detach().float()
        b = module.lora_b.weight.detach().float() * (module.scaling * module.rank / alpha)
        heads = _permute_for(weight_name, config, family)
        if heads:
            b = permute_rows(b, heads)
        for suffix, t in ((".lora_a", a), (".lora_b", b)):
            planned.append(PlannedTensor(gname + suffix, tuple(t.shape), dtype,
                                         lambda t=t: gguf_quants.quantize(t.numpy(), dtype)))
    if not planned:
        raise CheckpointError("the adapter has no LoRA layers to export")
    return planned


def write_lora_gguf(model: torch.nn.Module, path: Path, alpha: float, name: str, dtype: str = "F32",
                    progress: bool = True) -> dict:
    import gguf  # heavy (its writer and quant tables): only GGUF exports pay for it

    family = family_of(model.config)
    planned = plan_lora(model, alpha, dtype)

    def metadata(writer):
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
        writer.add_name(name)

    write_gguf(path, family.arch, metadata, planned, progress=progress)
    return {"tensors": len(planned), "bytes": Path(path).stat().st_size}

