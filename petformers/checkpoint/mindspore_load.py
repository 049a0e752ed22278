"""MindFormers Llama checkpoints (`.ckpt`) to and from petformers' names, base weights and mindpet LoRA.

MindFormers (mindformers/models/llama) names a Llama's parameters
`model.tok_embeddings.embedding_weight`, `model.layers.N.attention.{wq,wk,wv,wo}.weight`,
`model.layers.N.feed_forward.{w1,w2,w3}.weight`, `model.layers.N.{attention_norm,ffn_norm}.weight`,
`model.norm_out.weight` and `lm_head.weight`; Linear weights are [out, in] and q/k rows use the
Hugging Face "rotate half" layout, as petformers does, so only the names change. mindpet's LoRA
adds `<module>.mindpet_delta_lora_a` [r, in] and `<module>.mindpet_delta_lora_b` [out, r], which are
petformers' `<module>.lora_a.weight` / `<module>.lora_b.weight`.

`--load_checkpoint` may be
- one `.ckpt` file;
- a directory of `.ckpt` files, all read and combined into one model (e.g. a base model file and
  a LoRA file); a model tensor present in two files is an error, since which one wins is unclear;
- a directory of `rank_N/` subdirectories (per-rank checkpoints of a parallel run; the newest
  `.ckpt` of each, as MindFormers picks). Under data parallelism every rank holds a full copy and
  rank_0's is used. A tensor whose rank_0 shape is a fraction of the configured shape along one
  axis is a model-parallel slice: the slices of ranks 0..k-1 holding it are concatenated along
  that axis, which assumes MindSpore's default device order (model_parallel varies fastest). Other
  layouts need MindFormers' strategy-based `transform_checkpoints` first.
Optimizer states (`adam_m.*`, `adam_v.*`, `accu_grads.*`) and step counters are skipped.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

import torch

from petformers.checkpoint.mindspore_ckpt import read_ckpt, write_ckpt
from petformers.errors import AdapterError, CheckpointError
from petformers.models.config import LlamaConfig
from petformers.models.llama import build_model
from petformers.pet.lora import lora_scaling

_TOP = {
    "model.tok_embeddings.embedding_weight": "tok_embeddings.weight",
    "model.norm_out.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
}
_TOP_BACK = {v: k for k, v in _TOP.items()}
# attention.q_norm / k_norm: Qwen3's per-head norms, under the names petformers writes them (so that a
# Qwen3 round-trips through a .ckpt; MindFormers' own Qwen3 is a different, mcore-style model).
_LAYER = re.compile(r"^model\.(layers\.\d+\.(?:attention\.w[qkvo]\.(?:weight|bias)|feed_forward\.w[123]\.weight"
                    r"|attention_norm\.weight|ffn_norm\.weight|attention\.[qk]_norm\.weight))$")
_MINDPET = re.compile(r"^(.+)\.mindpet_delta_lora_([ab])$")
_PF_LORA = re.compile(r"^(.+)\.lora_([ab])\.weight$")
# Order of a decoder layer's parameters in MindFormers checkpoints (as in the MindSpore-written
# fixtures), so that files written here match MindSpore's byte for byte.
_LAYER_ORDER = ["ffn_norm", "attention_norm", "attention.wq", "attention.wk", "attention.wv", "attention.wo",
                "attention.q_norm", "attention.k_norm",
                "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"]
_SUFFIX_ORDER = ["weight", "bias", "lora_a.weight", "lora_b.weight"]


# ---- names ------------------------------------------------------------------------------------

def from_mindformers(name: str) -> str | None:
    """MindFormers name -> petformers name; None for what is not a model weight (optimizer states, counters)."""
    if name in _TOP:
        return _TOP[name]
    m = _LAYER.match(name)
    if m:
        return m.group(1)
    m = _MINDPET.match(name)
    if m:
        module, ab = m.groups()
        return f"{module.removeprefix('model.')}.lora_{ab}.weight"
    if name.startswith("model.") or name.startswith("lm_head."):
        return ""  # a model tensor petformers does not know: the caller reports it
    return None


def to_mindformers(name: str) -> str:
    """petformers name (base or LoRA) -> MindFormers / mindpet name."""
    name = name.replace(".base_layer.", ".")
    m = _PF_LORA.match(name)
    if m:
        module, ab = m.groups()
        module = module if module.startswith("lm_head") else f"model.{module}"
        return f"{module}.mindpet_delta_lora_{ab}"
    if name in _TOP_BACK:
        return _TOP_BACK[name]
    if name.startswith("layers."):
        return f"model.{name}"
    raise CheckpointError(f"{name!r} has no MindFormers Llama name")


def _is_lora(name: str) -> bool:
    return _PF_LORA.match(name) is not None


def _order_key(pf_name: str):
    """Sort key giving MindFormers' parameter order (so written files match MindSpore's own)."""
    name = pf_name.replace(".base_layer.", ".")
    if name.startswith("tok_embeddings"):
        return (0, 0, 0, 0)
    m = re.match(r"^layers\.(\d+)\.(.+)$", name)
    if m:
        layer, rest = int(m.group(1)), m.group(2)
        for i, module in enumerate(_LAYER_ORDER):
            if rest.startswith(module + "."):
                suffix = rest[len(module) + 1:]
                return (1, layer, i, _SUFFIX_ORDER.index(suffix) if suffix in _SUFFIX_ORDER else 9)
        return (1, layer, 99, 0)
    if name.startswith("norm."):
        return (2, 0, 0, 0)
    return (3, 0, 0, _SUFFIX_ORDER.index(name[len("lm_head."):]) if name.startswith("lm_head.") else 9)


# ---- reading ----------------------------------------------------------------------------------

def _model_tensors(entries: dict, source: Path) -> dict[str, torch.Tensor]:
    out = {}
    for name, value in entries.items():
        if isinstance(value, str):
            continue
        pf = from_mindformers(name)
        if pf is None:
            continue
        if pf == "":
            raise CheckpointError(f"{source}: {name!r} is not a MindFormers Llama parameter petformers knows "
                                  "(qkv_concat / w_gate_hidden checkpoints are not supported: save with "
                                  "qkv_concat: False)")
        out[pf] = value
    return out


def _rank_dirs(path: Path) -> list[Path]:
    dirs = [d for d in path.iterdir() if d.is_dir() and re.fullmatch(r"rank_\d+", d.name)]
    return sorted(dirs, key=lambda d: int(d.name[5:]))


def _newest_ckpt(folder: Path) -> Path:
    files = list(folder.glob("*.ckpt"))
    if not files:
        raise CheckpointError(f"{folder}: no .ckpt file in this rank directory")
    return max(files, key=lambda f: (f.stat().st_mtime, f.name))


def _fits(tensors: dict, expected: dict) -> bool:
    return all(n in tensors and tuple(tensors[n].shape) == s for n, s in expected.items()
               if not _is_lora(n))


def _lora_expected(name: str, tensor: torch.Tensor, expected: dict) -> tuple | None:
    module, ab = _PF_LORA.match(name).groups()
    base = expected.get(f"{module}.weight")
    if base is None:
        return None
    return (tensor.shape[0], base[1]) if ab == "a" else (base[0], tensor.shape[1])


def _merge_ranks(per_rank: list[dict], expected: dict) -> dict[str, torch.Tensor]:
    names = list(dict.fromkeys(n for tensors in per_rank for n in tensors))
    out = {}
    for name in names:
        pieces = [tensors[name] for tensors in per_rank if name in tensors]
        first = pieces[0]
        want = _lora_expected(name, first, expected) if _is_lora(name) else expected.get(name)
        out[name] = first
        if want is None or tuple(first.shape) == tuple(want) or first.dim() != len(want):
            continue
        axes = [a for a in range(first.dim()) if first.shape[a] != want[a]]
        if len(axes) == 1 and first.shape[axes[0]] and want[axes[0]] % first.shape[axes[0]] == 0:
            k = want[axes[0]] // first.shape[axes[0]]
            if len(pieces) >= k:
                out[name] = torch.cat(pieces[:k], dim=axes[0])
    return out


def read_model_tensors(path, expected: dict | None = None) -> dict[str, torch.Tensor]:
    """Every model tensor (base and LoRA) under petformers names, from a file, a directory or rank_N/.

    `expected` (petformers name -> shape, from the config) lets model-parallel slices of a rank_N
    layout be recognised and concatenated.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_file():
        return _model_tensors(read_ckpt(path), path)
    direct = sorted(path.glob("*.ckpt"))
    if direct:
        out, origin = {}, {}
        for f in direct:
            for name, tensor in _model_tensors(read_ckpt(f), f).items():
                if name in out:
                    raise CheckpointError(f"{path}: {to_mindformers(name)!r} is in both {origin[name].name} and "
                                          f"{f.name}; keep one file per tensor in a --load_checkpoint directory")
                out[name], origin[name] = tensor, f
        return out
    ranks = _rank_dirs(path)
    if not ranks:
        raise CheckpointError(f"{path}: no .ckpt file and no rank_N/ directory: not a MindSpore checkpoint")
    def rank_tensors(rank_dir: Path) -> dict[str, torch.Tensor]:
        file = _newest_ckpt(rank_dir)
        return _model_tensors(read_ckpt(file), file)

    first = rank_tensors(ranks[0])
    if expected is None or len(ranks) == 1 or _fits(first, expected):
        return first  # data parallel: rank_0 holds a full copy
    return _merge_ranks([first] + [rank_tensors(r) for r in ranks[1:]], expected)


def expected_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """petformers parameter name -> shape for `config`, without allocating any weight."""
    return {n: tuple(t.shape) for n, t in build_model(config, device="meta").state_dict().items()}


def _config_hint(config: LlamaConfig) -> str:
    return (f"vocab_size {config.vocab_size}, hidden_size {config.hidden_size}, num_layers {config.num_layers}, "
            f"num_heads {config.num_heads}, n_kv_heads {config.n_kv_heads}, ffn width {config.intermediate_size}")


def iter_base_tensors(path, config: LlamaConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """(petformers name, tensor) for every base weight of a MindFormers Llama checkpoint.

    Tensors keep the file's dtype and view its memory map. Everything is checked against `config`
    before the first tensor is yielded: a name or shape that does not fit, or a missing tensor,
    is one CheckpointError naming the MindFormers parameter and the model_config.
    """
    path = Path(path)
    expected = expected_shapes(config)
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    tensors = read_model_tensors(path, expected)
    base = {n: t for n, t in tensors.items() if not _is_lora(n)}
    if config.tie_word_embeddings:
        base.pop("lm_head.weight", None)
    for name, tensor in base.items():
        if name not in expected:
            raise CheckpointError(f"{path}: {to_mindformers(name)!r} does not exist in a model with "
                                  f"model_config {_config_hint(config)}")
        if tuple(tensor.shape) != expected[name]:
            raise CheckpointError(f"{path}: {to_mindformers(name)!r} has shape {list(tensor.shape)} but "
                                  f"model_config ({_config_hint(config)}) gives {list(expected[name])}")
    missing = [to_mindformers(n) for n in expected if n not in base]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CheckpointError(f"{path}: missing {', '.join(missing[:3])}{more} (is this a LoRA-only checkpoint? "
                              "pass the base model too, e.g. a directory holding both .ckpt files)")
    yield from base.items()


def mindpet_lora_tensors(path, config: LlamaConfig | None = None) -> dict[str, torch.Tensor]:
    """mindpet LoRA tensors as petformers names (`layers.N.attention.wq.lora_a.weight` [r, in], `.lora_b` [out, r]).

    Empty when the checkpoint holds no LoRA. With `config`, each pair is checked against the base
    layer's shape and model-parallel slices of a rank_N layout are concatenated.
    """
    path = Path(path)
    expected = expected_shapes(config) if config is not None else None
    lora = {n: t for n, t in read_model_tensors(path, expected).items() if _is_lora(n)}
    for name, tensor in lora.items():
        module, ab = _PF_LORA.match(name).groups()
        other = lora.get(f"{module}.lora_{'b' if ab == 'a' else 'a'}.weight")
        if other is None:
            raise CheckpointError(f"{path}: {to_mindformers(name)!r} has no matching lora_{'b' if ab == 'a' else 'a'}")
        if tensor.dim() != 2:
            raise CheckpointError(f"{path}: {to_mindformers(name)!r} has shape {list(tensor.shape)}, expected 2-D")
        if expected is not None:
            want = _lora_expected(name, tensor, expected)
            if want is None:
                raise CheckpointError(f"{path}: {to_mindformers(name)!r} adapts {module!r}, which is not a "
                                      f"layer of a model with model_config {_config_hint(config)}")
            if tuple(tensor.shape) != want:
                raise CheckpointError(f"{path}: {to_mindformers(name)!r} has shape {list(tensor.shape)}, "
                                      f"expected {list(want)} for {module!r} with model_config "
                                      f"{_config_hint(config)}")
    return lora


# ---- writing ----------------------------------------------------------------------------------

def _pet_value(pet_config, key: str, default=None):
    if pet_config is None:
        return default
    if isinstance(pet_config, dict):
        return pet_config.get(key, default)
    return getattr(pet_config, key, default)


def _scaling(module: str, rank: int, pet_config, model) -> float:
    if model is not None:
        try:
            value = getattr(model.get_submodule(module), "scaling", None)
        except AttributeError:
            value = None
        if isinstance(value, (int, float)):
            return float(value)
    alpha = _pet_value(pet_config, "lora_alpha")
    if alpha is None:
        raise AdapterError(f"merging {module!r} needs lora_alpha: pass pet_config (the YAML's model_config.pet_config)")
    return lora_scaling(rank, float(alpha), bool(_pet_value(pet_config, "use_rslora", False)))


def merge_lora_tensors(base: dict, lora: dict, pet_config=None, model=None) -> dict[str, torch.Tensor]:
    """`base` with every adapted weight replaced by W + scaling·B@A (computed in float32, cast back to W's dtype).

    scaling is the LoRA module's own `scaling` when `model` has one, else alpha/r (alpha/√r with
    use_rslora) from `pet_config` (a PetConfig or the YAML's pet_config mapping).
    """
    out = dict(base)
    for name in lora:
        module, ab = _PF_LORA.match(name).groups()
        if ab == "b":
            continue
        a, b = lora[name], lora.get(f"{module}.lora_b.weight")
        weight = out.get(f"{module}.weight")
        if b is None or weight is None:
            raise AdapterError(f"cannot merge {module!r}: its lora_b or base weight is missing")
        if a.shape[0] != b.shape[1] or (b.shape[0], a.shape[1]) != tuple(weight.shape):
            raise AdapterError(f"cannot merge {module!r}: lora_a {list(a.shape)} and lora_b {list(b.shape)} do not "
                               f"fit its weight {list(weight.shape)}")
        delta = _scaling(module, a.shape[0], pet_config, model) * (b.detach().float() @ a.detach().float())
        out[f"{module}.weight"] = (weight.detach().float() + delta).to(weight.dtype)
    return out


def save_mindformers_ckpt(model_or_state, path, mode: str = "trainable", pet_config=None,
                          dtype: torch.dtype | None = None, crc: bool = False) -> Path:
    """Write a petformers model (or its state dict) as a `.ckpt` MindFormers loads; returns the path.

    mode:
    - "trainable": the adapter only, mindpet names (`...wq.mindpet_delta_lora_a`), as MindFormers
      saves trainable parameters; given a model in training, every parameter with requires_grad
      is written (modules_to_save under their base names).
    - "merged": base weights with the LoRA update folded in (see `merge_lora_tensors`),
      MindFormers names, no LoRA tensors: what MindFormers' transform_ckpt_lora produces, for a
      plain (non-PET) MindFormers Llama.
    - "full": base weights and mindpet LoRA tensors side by side (a PET network's full checkpoint).
    `dtype` casts floating tensors (default: as they are). Tensors are written in MindFormers' order.
    """
    if mode not in ("trainable", "merged", "full"):
        raise AdapterError(f"save_mindformers_ckpt: mode {mode!r} is not one of trainable, merged, full")
    model = model_or_state if isinstance(model_or_state, torch.nn.Module) else None
    if model is not None and mode != "trainable" and any(getattr(m, "merged", False) is True for m in model.modules()):
        raise AdapterError(f"save_mindformers_ckpt(mode={mode!r}): the model's LoRA is merged in place; "
                           "unmerge it first")
    state = model.state_dict(keep_vars=True) if model is not None else dict(model_or_state)
    # LoRALinear keeps W as `<module>.weight`; ModuleToSave wraps its copy as `<module>.module.*`.
    state = {n.replace(".base_layer.", ".").replace(".module.", "."): t for n, t in state.items()}
    if any(n.endswith("magnitude") for n in state):
        raise AdapterError("DoRA adapters have no mindpet equivalent: save mode='merged' from a merged model, "
                           "or train plain LoRA")
    lora = {n: t for n, t in state.items() if _is_lora(n)}
    if mode == "trainable":
        # A model being trained says what is trainable; a frozen one (or a state dict) gives its LoRA tensors.
        chosen = {n: t for n, t in state.items() if getattr(t, "requires_grad", False)} or lora
        if not chosen:
            raise AdapterError("save_mindformers_ckpt: nothing trainable to save (no LoRA tensors)")
    elif mode == "full":
        chosen = state
    else:
        chosen = merge_lora_tensors({n: t for n, t in state.items() if not _is_lora(n)}, lora, pet_config, model)
    out = {}
    for name in sorted(chosen, key=_order_key):
        tensor = chosen[name].detach()
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        out[to_mindformers(name)] = tensor
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_ckpt(path, out, crc=crc)
