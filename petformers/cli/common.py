"""Arguments and loading shared by the commands that run a model (predict, chat, eval)."""

from __future__ import annotations

import argparse
import logging

from petformers.generate import GenerationConfig
from petformers.inference import load_for_inference
from petformers.quant.model import QuantConfig

log = logging.getLogger("petformers")


def add_model_args(p: argparse.ArgumentParser):
    p.add_argument("--load_checkpoint", required=True,
                   help="HF model dir, .gguf file, Meta dir, or a known name (smollm2-135m-instruct)")
    p.add_argument("--adapter", help="a PEFT-format LoRA adapter directory to apply")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: bf16 on CUDA, fp32 on CPU)")
    add_quantization_args(p)
    add_chat_template_args(p)


def add_quantization_args(p: argparse.ArgumentParser):
    """The YAML's model_config quantization keys as flags (docs/quantization.md)."""
    p.add_argument("--quantization_bit", type=int, default=None, help="4 or 8: hold the base quantized")
    p.add_argument("--quantization_type", default=None,
                   help="nf4 (default for 4 bits), fp4, int8 (default for 8 bits), or gguf (keep a GGUF file's blocks)")
    p.add_argument("--double_quantization", default=None,
                   help="True/False: quantize the nf4/fp4 block scales too (default True for nf4/fp4)")


def quantization_from_args(args):
    return QuantConfig.from_keys(getattr(args, "quantization_bit", None), getattr(args, "quantization_type", None),
                                 getattr(args, "double_quantization", None), where="--")


def _bool(value: str) -> bool:
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def add_chat_template_args(p: argparse.ArgumentParser):
    p.add_argument("--enable_thinking", type=_bool, default=None, metavar="{true,false}",
                   help="for chat templates with a thinking switch (Qwen3): false renders prompts with an empty "
                        "<think></think> block, as apply_chat_template(enable_thinking=False) does "
                        "(default: the template's own default)")


def apply_chat_template_args(tokenizer, args):
    """Set --enable_thinking on the tokenizer, so that every prompt it renders honours it; say so when
    the model's template has no such switch (the flag then changes nothing)."""
    value = getattr(args, "enable_thinking", None)
    if value is None or tokenizer is None:
        return
    unused = tokenizer.set_chat_template_kwargs(enable_thinking=value)
    if unused:
        log.warning("petformers: --enable_thinking %s changes nothing: the chat template of %s has no "
                    "enable_thinking switch", str(value).lower(), tokenizer.source)


def add_generation_args(p: argparse.ArgumentParser):
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--do_sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top_k", type=int, default=0)
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--repetition_penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="seed for sampling")


def generation_config(args):
    return GenerationConfig(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            repetition_penalty=args.repetition_penalty)


def load_model(args):
    """(model, tokenizer) for `--load_checkpoint` with `--adapter` applied, ready for inference (merged,
    except over a quantized base: --quantization_bit/--quantization_type); --enable_thinking set."""
    model, tokenizer = load_for_inference(args.load_checkpoint, getattr(args, "adapter", None), args.device,
                                          args.dtype, quantization_from_args(args))
    apply_chat_template_args(tokenizer, args)
    return model, tokenizer
