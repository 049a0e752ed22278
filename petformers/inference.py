"""Asking a model: prompts read from `--predict_data`, rendered once, answered in batches.

The one path shared by `petformers predict`, `petformers chat`, `run_mode: predict` and evaluation
with generation, so that a prompt is rendered and answered the same way everywhere.
"""

from __future__ import annotations

import json
from pathlib import Path

import logging

import torch
from tqdm import tqdm

from petformers.checkpoint.load import load_pretrained
from petformers.checkpoint.peft import load_peft_adapter, merge_adapter
from petformers.data.templates import render_prompt
from petformers.errors import DataError
from petformers.generate import GenerationConfig, generate
from petformers.models.config import parse_dtype
from petformers.quant.model import QuantConfig

log = logging.getLogger("petformers")

RAW = "raw"  # the template of a prompt given as is (no template; bos added as the tokenizer says)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_for_inference(load_checkpoint: str, adapter: str | None = None, device: str | None = None,
                       dtype: str | None = None, quantization: QuantConfig | None = None):
    """(model, tokenizer) of a base checkpoint with a PEFT adapter applied, in eval mode: the one way predict,
    chat and the board load a model. Defaults: CUDA when available; bf16 on CUDA, fp32 on CPU. The adapter
    is merged into the weights, except over a quantized base, where it stays a LoRA layer over the
    quantized blocks (merging would need the float model)."""
    device = device or default_device()
    dtype = parse_dtype(dtype or ("bfloat16" if device.startswith("cuda") else "float32"), "--dtype")
    model, tokenizer = load_pretrained(load_checkpoint, dtype=dtype, device=device, quantization=quantization)
    if quantization is not None:
        log.info("petformers: base held quantized (%s)", quantization.describe())
    if adapter and quantization is None:
        model, _ = merge_adapter(model, adapter)
        log.info("petformers: adapter %s merged for inference", adapter)
    elif adapter:
        load_peft_adapter(model, adapter)
        log.info("petformers: adapter %s applied over the quantized base (not merged)", adapter)
    return model.eval(), tokenizer


def read_prompts(predict_data: str) -> list[str]:
    """A prompt, or a file with one prompt per line, or a .json file with a list of prompts."""
    path = Path(predict_data)
    if len(predict_data) < 4096 and path.is_file():
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json":
            try:
                prompts = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
            if not isinstance(prompts, list) or not all(isinstance(x, str) for x in prompts):
                raise DataError(f"{path}: expected a JSON list of strings")
            return prompts
        return [line for line in text.splitlines() if line.strip()]
    return [predict_data]


def encode_prompt(messages: list[dict], template: str, tokenizer) -> list[int]:
    """Token ids a model continues to answer the last user turn of `messages`.

    `template`: "chat" (the model's chat template, which writes its own bos), a training template
    ("fastchat", "alpaca": data/templates.py), or RAW (the last message's text as is, after bos)."""
    if template == RAW:
        return tokenizer.encode(messages[-1]["content"], add_special_tokens=True)
    return tokenizer.encode(render_prompt(messages, template, tokenizer), add_special_tokens=template != "chat")


def answer(model, tokenizer, prompts: list[list[int]], cfg: GenerationConfig, batch_size: int,
           generator=None, by_length: bool = False, progress: bool = False) -> list[str]:
    """The decoded answers to encoded prompts, generated `batch_size` at a time (left padded).

    `by_length`: batch prompts of similar lengths together (less padding), answers still in order."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i])) if by_length else list(range(len(prompts)))
    out: list[str] = [""] * len(prompts)
    step = max(batch_size, 1)
    for start in tqdm(range(0, len(order), step), desc="generate", disable=not progress, leave=False):
        idx = order[start:start + step]
        for i, ids in zip(idx, generate(model, [prompts[i] for i in idx], cfg, tokenizer.eos_ids, tokenizer.pad_id,
                                        generator)):
            out[i] = tokenizer.decode(ids)
    return out
