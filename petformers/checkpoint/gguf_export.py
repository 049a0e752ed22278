"""Base checkpoint (+ LoRA adapter) -> GGUF for llama.cpp / Ollama: the steps `export gguf`,
`export gguf-lora` and `run`'s `save_gguf` share."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch

from petformers.checkpoint import download, gguf_file, gguf_quants, gguf_write
from petformers.checkpoint.load import detect_format, load_config, load_pretrained
from petformers.checkpoint.ollama import write_modelfile
from petformers.checkpoint.peft import load_peft_adapter
from petformers.errors import CheckpointError
from petformers.models.llama import build_model
from petformers.pet import merge_and_unload
from petformers.pet.lora import LoRALinear
from petformers.pet.module_to_save import ModuleToSave

log = logging.getLogger(__name__)


def touched_parameters(model: torch.nn.Module) -> set[str]:
    """Names (after merging) of the parameters an injected adapter changes."""
    out = set()
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            out.add(f"{name}.weight")
            if module.bias is not None:
                out.add(f"{name}.bias")
        elif isinstance(module, ModuleToSave):
            out.update(f"{name}.{p}" for p, _ in module.unwrap().named_parameters())
    return out


def source_reader(path_or_name):
    """The GGUF reader of a GGUF base, else None (opened once: parsing a 49k-token vocabulary takes seconds)."""
    path = download.resolve(path_or_name)
    if detect_format(path) != "gguf":
        return None
    return gguf_file.open_reader(path)


def export_merged(model: torch.nn.Module, tokenizer, output, outtype: str, *, reader=None,
                  touched: set[str] = frozenset(), modelfile: bool = True, progress: bool = True) -> dict:
    """Write an already merged `model` as a GGUF (+ Modelfile). `reader`: the base's GGUF, whose
    tokenizer is copied as is and whose tensors that `touched` does not name are copied block for
    block when their type is kept."""
    if outtype not in gguf_quants.OUTTYPES:
        raise CheckpointError(f"--outtype {outtype!r} is not supported; use one of {', '.join(gguf_quants.OUTTYPES)}")
    output = Path(output)
    if reader is not None:
        tokenizer_kv = gguf_write.gguf_source_kv(reader, "tokenizer.")
        general = gguf_write.general_from_gguf(reader)
    else:
        tokenizer_kv = gguf_write.tokenizer_kv_from_tokenizer(tokenizer, model.config.vocab_size)
        general = {}
    src = gguf_write.MergedSource(model=model, tokenizer=tokenizer, touched=set(touched), reader=reader,
                                  name=output.stem)
    result = gguf_write.write_merged_gguf(src, output, outtype, tokenizer_kv, general=general, progress=progress)
    log.info("wrote %s (%s, %.1f MB): %d tensors quantized, %d copied block for block from the base; types %s",
             output, outtype, result["bytes"] / 1e6, result["quantized"], result["copied"], result["types"])
    if modelfile and tokenizer is not None:
        result["modelfile"] = str(ollama_modelfile(output, tokenizer))
    return result


def ollama_modelfile(gguf_path: Path, tokenizer) -> Path:
    path = write_modelfile(gguf_path, tokenizer)
    log.info("wrote %s (ollama create NAME -f %s)", path, path)
    return path


def export_gguf(base, adapter, output, outtype: str, *, modelfile: bool = True, progress: bool = True) -> dict:
    """`petformers export gguf`: load BASE, merge ADAPTER (if any) into it, write the GGUF."""
    if outtype not in gguf_quants.OUTTYPES:
        raise CheckpointError(f"--outtype {outtype!r} is not supported; use one of {', '.join(gguf_quants.OUTTYPES)}")
    reader = source_reader(base)
    model, tokenizer = load_pretrained(base, dtype=torch.float32, reader=reader)
    touched: set[str] = set()
    if adapter:
        pet_config = load_peft_adapter(model, adapter)
        touched = touched_parameters(model)
        log.info("merging adapter %s (r=%d, alpha=%g) into %s", adapter, pet_config.lora_rank,
                 pet_config.lora_alpha, base)
        model = merge_and_unload(model)
    return export_merged(model, tokenizer, output, outtype, reader=reader, touched=touched, modelfile=modelfile,
                         progress=progress)


def export_gguf_lora(base, adapter, output, *, outtype: str = "f32", progress: bool = True) -> dict:
    """`petformers export gguf-lora`: the adapter alone, in llama.cpp's LoRA format (needs BASE for
    the architecture and head counts of the q/k permutation; its weights are not read)."""
    types = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}
    if outtype not in types:
        raise CheckpointError(f"--outtype {outtype!r} is not supported for a LoRA adapter; use one of "
                              f"{', '.join(types)}")
    config, _ = load_config(base)
    model = build_model(config, device="meta", dtype=torch.float32)
    model.config = config
    pet_config = load_peft_adapter(model, adapter)
    result = gguf_write.write_lora_gguf(model, Path(output), float(pet_config.lora_alpha),
                                        name=Path(output).stem, dtype=types[outtype], progress=progress)
    log.info("wrote %s (LoRA r=%d, alpha=%g, %d tensors): llama-cli -m BASE.gguf --lora %s",
             output, pet_config.lora_rank, pet_config.lora_alpha, result["tensors"], output)
    return result


def export_run_gguf(model: torch.nn.Module, tokenizer, base, out_dir, outtype: str,
                    merged: torch.nn.Module | None = None, fully_trained: bool = False) -> Path:
    """`run`'s save_gguf: the trained model as out_dir/gguf/<run>-<outtype>.gguf with a Modelfile.
    `model` still has its adapter injected (`merged`: an already merged copy to reuse); a model trained
    in full (`fully_trained`) has every tensor changed, so none is copied from a GGUF base."""
    out_dir = Path(out_dir)
    touched = set(model.state_dict()) if fully_trained else touched_parameters(model)
    if merged is None:
        merged = model if fully_trained else merge_and_unload(copy.deepcopy(model))
    reader = source_reader(base) if base else None
    path = out_dir / "gguf" / f"{out_dir.name}-{outtype}.gguf"
    export_merged(merged, tokenizer, path, outtype, reader=reader, touched=touched, progress=False)
    log.info("wrote %s: chat with it: llama-cli -m %s -cnv", path, path)
    return path
