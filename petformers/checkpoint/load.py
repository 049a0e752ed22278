"""`load_pretrained`: any supported checkpoint path (or known model name) -> (model, tokenizer).

Formats are recognised by what is on disk:
- a `.gguf` file (llama.cpp);
- a directory with `config.json` (Hugging Face, safetensors);
- a directory with `params.json` and `consolidated.*.pth` (Meta);
- a directory with a `.ckpt` (MindSpore), which needs the YAML's model_config (see `mindspore_load`).
The model is built on the meta device and materialized once, in `dtype`, on `device`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from petformers.checkpoint import download, gguf_file, hf, meta_pth, mindspore_load
from petformers.checkpoint.materialize import materialize
from petformers.errors import CheckpointError
from petformers.models.config import LlamaConfig
from petformers.models.llama import Llama, build_model
from petformers.quant.model import QuantConfig
from petformers.tokenizer import Tokenizer


def detect_format(path: Path) -> str:
    if path.is_file():
        with open(path, "rb") as fh:
            magic = fh.read(4)
        if magic == b"GGUF":
            return "gguf"
        if path.suffix == ".ckpt":
            return "mindspore"
        if path.suffix == ".safetensors":
            raise CheckpointError(f"{path}: a bare safetensors file; pass its directory (with config.json)")
        raise CheckpointError(f"{path}: unknown checkpoint format (expected a GGUF file, or a Hugging Face, "
                              "Meta or MindSpore checkpoint directory)")
    if (path / "config.json").exists():
        return "hf"
    if (path / "params.json").exists():
        return "meta"
    if list(path.glob("*.ckpt")) or list(path.glob("rank_*")):
        return "mindspore"
    raise CheckpointError(f"{path}: no config.json, params.json, .gguf or .ckpt found: "
                          "not a checkpoint petformers can read")


def load_config(path_or_name) -> tuple[LlamaConfig, str]:
    """The model config of a checkpoint, without reading its weights."""
    path = download.resolve(path_or_name)
    fmt = detect_format(path)
    if fmt == "hf":
        return hf.read_config(path), fmt
    if fmt == "meta":
        return meta_pth.read_config(path), fmt
    if fmt == "gguf":
        reader = gguf_file.open_reader(path)
        return gguf_file.read_config(reader, gguf_file.read_metadata(reader), str(path)), fmt
    raise CheckpointError(f"{path}: a MindSpore checkpoint carries no config; pass the YAML's model_config")


def load_tokenizer(path_or_name) -> Tokenizer:
    path = download.resolve(path_or_name)
    if path.is_file() and path.suffix == ".model":
        return Tokenizer.from_sentencepiece(path)
    if path.is_file() and path.suffix in (".json", ".txt"):  # tokenizer.json, or vocab.json / merges.txt
        return Tokenizer.from_dir(path.parent)
    if path.is_file() and detect_format(path) == "gguf":
        return Tokenizer.from_gguf_metadata(gguf_file.read_metadata(gguf_file.open_reader(path)), source=str(path))
    if (path / "tokenizer.model").exists() and not (path / "tokenizer.json").exists() \
            and not (path / "tokenizer_config.json").exists():
        return Tokenizer.from_sentencepiece(path / "tokenizer.model")
    return Tokenizer.from_dir(path)


def load_pretrained(path_or_name, dtype: torch.dtype = torch.float32, device="cpu",
                    config: LlamaConfig | None = None, with_tokenizer: bool = True,
                    quantization: QuantConfig | None = None, reader=None) -> tuple[Llama, Tokenizer | None]:
    """Model (frozen, eval mode) and its tokenizer. `config` is required only for MindSpore .ckpt.
    `quantization`: the linear layers are quantized as they load (petformers.quant.model says which);
    its type `gguf` keeps a GGUF file's blocks and needs a GGUF file. `reader`: this GGUF file already
    open (gguf_file.open_reader), read instead of reopened: parsing a large vocabulary takes seconds,
    and a GGUF export reads the same file again for its tokenizer and its blocks."""
    path = download.resolve(path_or_name)
    fmt = detect_format(path)
    tokenizer = None
    if reader is not None and fmt != "gguf":
        raise CheckpointError(f"{path}: a GGUF reader was given for a {fmt} checkpoint")
    if quantization is not None and quantization.type == "gguf" and fmt != "gguf":
        raise CheckpointError(f"{path}: quantization_type gguf keeps a GGUF file's blocks, and this is a {fmt} "
                              "checkpoint; use quantization_type nf4 (or fp4, int8) to quantize it at load")
    if fmt == "hf":
        config = hf.read_config(path)
        tensors = hf.iter_tensors(path)
        if with_tokenizer:
            tokenizer = Tokenizer.from_dir(path)
    elif fmt == "meta":
        config = meta_pth.read_config(path)
        if config.vocab_size <= 0:  # Meta leaves it to the tokenizer
            config.vocab_size = Tokenizer.from_sentencepiece(path / "tokenizer.model").vocab_size
        tensors = meta_pth.iter_tensors(path, config)
        if with_tokenizer:
            tokenizer = Tokenizer.from_sentencepiece(path / "tokenizer.model")
    elif fmt == "gguf":
        reader = reader if reader is not None else gguf_file.open_reader(path)
        metadata = gguf_file.read_metadata(reader)
        config = gguf_file.read_config(reader, metadata, str(path))
        tensors = gguf_file.iter_tensors(reader, config.num_heads, config.n_kv_heads, str(path),
                                         keep_blocks=quantization is not None and quantization.type == "gguf",
                                         permuted=gguf_file.permuted_qk(metadata))
        if with_tokenizer:
            tokenizer = Tokenizer.from_gguf_metadata(metadata, source=str(path))
    else:
        if config is None:
            raise CheckpointError(f"{path}: a MindSpore checkpoint carries no config; "
                                  "run it with a YAML whose model.model_config describes the model")
        tensors = mindspore_load.iter_base_tensors(path, config)
    config.compute_dtype = str(dtype).replace("torch.", "")
    model = build_model(config, device="meta", dtype=dtype)
    materialize(model, tensors, dtype=dtype, device=device, source=str(path), quantization=quantization)
    model.name_or_path = str(path_or_name)
    return model, tokenizer
