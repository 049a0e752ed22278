"""`petformers export`: a fine-tune in the formats other tools load.

    petformers export merge --load_checkpoint BASE --adapter DIR --output_dir OUT [--dtype bfloat16]
    petformers export gguf --load_checkpoint BASE [--adapter DIR] --output FILE.gguf --outtype q8_0
    petformers export gguf-lora --load_checkpoint BASE --adapter DIR --output FILE.gguf

The output (config.json, safetensors shards of at most 5 GB with an index, tokenizer files,
generation_config.json) loads in transformers, vLLM and llama.cpp's converter like any Llama.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from petformers.checkpoint.gguf_export import export_gguf, export_gguf_lora
from petformers.checkpoint.gguf_quants import OUTTYPES
from petformers.checkpoint.hf import save_model_dir
from petformers.checkpoint.load import load_pretrained
from petformers.checkpoint.peft import merge_adapter
from petformers.cli.common import add_quantization_args, quantization_from_args
from petformers.models.config import parse_dtype

log = logging.getLogger(__name__)


def register(subparsers):
    parser = subparsers.add_parser("export", help="write a merged model for other tools",
                                   description="Write models for other tools.")
    kinds = parser.add_subparsers(dest="export_kind", metavar="KIND", required=True)
    merge = kinds.add_parser(
        "merge", help="merge a LoRA adapter into its base and write a Hugging Face model directory",
        description="Merge a LoRA adapter (PEFT format) into its base model and write a Hugging Face model "
                    "directory that transformers loads.")
    merge.add_argument("--load_checkpoint", required=True,
                       help="the base model: a Hugging Face directory, Meta directory, GGUF file or known name")
    merge.add_argument("--adapter", required=True, help="the adapter directory (adapter_config.json + "
                                                        "adapter_model.safetensors)")
    merge.add_argument("--output_dir", required=True, help="where to write the merged model")
    merge.add_argument("--dtype", default="float32",
                       help="dtype of the written weights: float32 (default), bfloat16 or float16; "
                            "the merge itself is computed in float32")
    merge.add_argument("--max_shard_size_gb", type=float, default=5.0, help="largest safetensors shard (GB)")

    add_quantization_args(merge)  # an adapter trained over a quantized base merges into that base, dequantized
    merge.set_defaults(func=run_merge)

    gguf = kinds.add_parser(
        "gguf", help="write the (merged) model as one GGUF file for llama.cpp, Ollama, LM Studio",
        description="Merge a LoRA adapter into its base model and write one GGUF file that llama.cpp loads "
                    "(and an Ollama Modelfile beside it). Tensors of a GGUF base that the adapter does not "
                    "change are copied block for block when --outtype keeps the base's type.")
    gguf.add_argument("--load_checkpoint", required=True,
                      help="the base model: a Hugging Face directory, Meta directory, GGUF file or known name")
    gguf.add_argument("--adapter", help="the adapter directory (PEFT format); without it the base is converted")
    gguf.add_argument("--output", required=True, help="the GGUF file to write")
    gguf.add_argument("--outtype", default="f16", choices=list(OUTTYPES),
                      help="tensor type of the 2-D weights (default f16); norms stay float32")
    gguf.add_argument("--no_modelfile", action="store_true", help="do not write an Ollama Modelfile beside it")
    gguf.set_defaults(func=run_gguf)

    lora = kinds.add_parser(
        "gguf-lora", help="write the LoRA adapter alone in llama.cpp's adapter format",
        description="Write a LoRA adapter as a GGUF adapter for `llama-cli -m BASE.gguf --lora FILE.gguf`.")
    lora.add_argument("--load_checkpoint", required=True, help="the base model the adapter was trained on")
    lora.add_argument("--adapter", required=True, help="the adapter directory (PEFT format)")
    lora.add_argument("--output", required=True, help="the GGUF file to write")
    lora.add_argument("--outtype", default="f32", choices=["f32", "f16", "bf16", "q8_0"],
                      help="tensor type of the adapter matrices (default f32)")
    lora.set_defaults(func=run_gguf_lora)


def run_merge(args: argparse.Namespace) -> int:
    dtype = parse_dtype(args.dtype, key="--dtype")
    # Loaded in the output dtype (half the memory of float32 for a bf16 export); LoRALinear still
    # computes W + s·BA in float32 and rounds once to that dtype. Over a quantized base (the one the
    # adapter was trained on): dequantize -> merge -> save, layer by layer in merge_and_unload.
    model, tokenizer = load_pretrained(args.load_checkpoint, dtype=dtype, quantization=quantization_from_args(args))
    model, pet_config = merge_adapter(model, args.adapter)
    log.info("merging adapter %s (r=%d, alpha=%g) into %s", args.adapter, pet_config.lora_rank,
             pet_config.lora_alpha, args.load_checkpoint)
    out = Path(args.output_dir)
    save_model_dir(model.state_dict(), model.config, out, tokenizer=tokenizer,
                   max_shard_bytes=int(args.max_shard_size_gb * 1024**3), dtype=dtype)
    log.info("wrote merged model to %s", out)
    return 0


def run_gguf(args: argparse.Namespace) -> int:
    result = export_gguf(args.load_checkpoint, args.adapter, args.output, args.outtype,
                         modelfile=not args.no_modelfile)
    print(f"{args.output}: {result['bytes'] / 1e6:.1f} MB, {args.outtype}; chat with it: "
          f"llama-cli -m {args.output} -cnv" + (f"; or: ollama create NAME -f {result['modelfile']}"
                                                if result.get("modelfile") else ""))
    return 0


def run_gguf_lora(args: argparse.Namespace) -> int:
    result = export_gguf_lora(args.load_checkpoint, args.adapter, args.output, outtype=args.outtype)
    print(f"{args.output}: {result['bytes'] / 1e6:.1f} MB LoRA adapter; use it: "
          f"llama-cli -m {args.load_checkpoint} --lora {args.output} -cnv")
    return 0
