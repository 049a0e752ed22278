"""QLoRA memory and speed on a Llama-2-7B-shaped model that exists only in quantized form.

The base is created directly as NF4 blocks with a fixed seed (petformers.quant.model.random_quantized_weight):
the 27 GB float model is never made. Embeddings, norms and lm_head are float32 (QLoRA's rule); LoRA as in
the seed's configs/llama2/lora_llama2_7b.yaml (rank 16, alpha 16, dropout 0.05, wq|wk|wv|wo); AdamW;
batch 1 x seq_length tokens per step through the model's own loss path (chunked cross-entropy), with
recompute (activation checkpointing per layer) on by default. Peak RSS is the process's own high-water mark (petformers/peak_rss.py: VmHWM, not ru_maxrss).

    nice python scripts/qlora_memory.py                 # the 7B shape, 3 steps of 256 tokens
    python scripts/qlora_memory.py --layers 2 --hidden 256 --ffn 688 --heads 4 --vocab 512 --steps 2

Prints a markdown section (date, command, start time, machine load, figures) for docs/benchmarks.md;
--json writes the figures too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from types import SimpleNamespace

import torch

from petformers.models.config import LlamaConfig
from petformers.models.llama import RMSNorm, build_model
from petformers.peak_rss import peak_rss_bytes
from petformers.pet.config import PetConfig
from petformers.pet.inject import apply_lora
from petformers.quant.linear import QuantLinear
from petformers.quant.model import (QuantConfig, base_weight_bytes, quantized_bytes, quantized_targets,
                                    random_quantized_weight, replace_module)
from petformers.quant.weight import QuantizedWeight
from petformers.train.dry_run import estimate_memory
from petformers.train.loss import chunked_cross_entropy_sum


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--ffn", type=int, default=11008)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--quantization-type", default="nf4", choices=["nf4", "fp4", "int8"])
    p.add_argument("--no-double-quantization", action="store_true")
    p.add_argument("--no-recompute", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.add_argument("--write-docs", metavar="BENCHMARKS_MD",
                   help="put the section into this file (docs/benchmarks.md), replacing this script's previous one")
    return p.parse_args(argv)


def build_quantized_model(args, quant: QuantConfig):
    """The model on meta, every target linear replaced by random quantized blocks, the rest float32
    random normal(0, 0.02) (norms 1): layer by layer, so the peak is the quantized model."""
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers,
                         num_heads=args.heads, intermediate_size=args.ffn, seq_length=max(args.seq_length, 256))
    model = build_model(config, device="meta", dtype=torch.float32)
    gen = torch.Generator().manual_seed(args.seed)
    for name in quantized_targets(model):
        meta = model.get_submodule(name)
        weight = random_quantized_weight((meta.out_features, meta.in_features), quant, gen)
        replace_module(model, name, QuantLinear(weight, None))
    with torch.no_grad():
        for module in model.modules():  # only the float parts remain to allocate: norms, embeddings, lm_head
            if isinstance(module, (RMSNorm, torch.nn.Embedding)) or module is model.lm_head:
                module.to_empty(device="cpu")  # (never the whole model: that would empty the quantized blocks)
            if isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
        model.tok_embeddings.weight.normal_(0, 0.02, generator=gen)
        model.lm_head.weight.normal_(0, 0.02, generator=gen)
    model.requires_grad_(False)
    return model, config


class DequantTimer:
    """Seconds spent in QuantizedWeight.dequantize (forward, recompute and backward)."""

    def __init__(self):
        self.seconds = 0.0
        self._original = None

    def __enter__(self):
        cls, original, timer = QuantizedWeight, None, self
        originals = {}
        for sub in cls.__subclasses__():
            originals[sub] = sub.dequantize

            def timed(self_, dtype=None, _f=sub.dequantize):
                start = time.perf_counter()
                out = _f(self_, dtype)
                timer.seconds += time.perf_counter() - start
                return out
            sub.dequantize = timed
        self._originals = originals
        return self

    def __exit__(self, *exc):
        for sub, f in self._originals.items():
            sub.dequantize = f


def run(args) -> dict:
    started = datetime.now(timezone.utc)
    quant = QuantConfig.from_keys(4 if args.quantization_type != "int8" else 8, args.quantization_type,
                                  False if args.no_double_quantization or args.quantization_type == "int8" else None)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    model, config = build_quantized_model(args, quant)
    build_s = time.perf_counter() - t0
    rss_after_build = peak_rss_bytes()
    pet = PetConfig.from_dict({"pet_type": "lora", "lora_rank": 16, "lora_alpha": 16, "lora_dropout": 0.05,
                               "target_modules": ".*wq|.*wk|.*wv|.*wo"})
    apply_lora(model, pet)
    model.gradient_checkpointing = not args.no_recompute
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    before = {id(p): p.detach().clone() for p in params[:4]}
    gen = torch.Generator().manual_seed(args.seed + 1)
    losses, step_s = [], []
    with DequantTimer() as timer:
        dequant_start = 0.0
        dequant_s = []
        for _ in range(args.steps):
            ids = torch.randint(0, config.vocab_size, (1, args.seq_length + 1), generator=gen)
            start = time.perf_counter()
            hidden = model.hidden_states(ids[:, :-1])
            loss = chunked_cross_entropy_sum(model.lm_head, hidden, ids[:, 1:]) / args.seq_length
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step_s.append(time.perf_counter() - start)
            dequant_s.append(timer.seconds - dequant_start)
            dequant_start = timer.seconds
            losses.append(loss.item())
            print(f"step {len(losses)}/{args.steps}: loss {losses[-1]:.4f}, {step_s[-1]:.1f} s "
                  f"(dequantization {dequant_s[-1]:.1f} s), peak RSS {peak_rss_bytes() / 2**30:.2f} GiB",
                  file=sys.stderr, flush=True)
    changed = any(not torch.equal(before[id(p)], p.detach()) for p in params[:4])
    steady = step_s[1:] or step_s  # the first step also pays for allocator warm-up
    steady_dq = dequant_s[1:] or dequant_s
    quantized = quantized_bytes(model)
    base = base_weight_bytes(model, quant, torch.float32)
    parameters = sum(p.numel() for p in model.parameters()) + sum(
        m.numel() for m in model.modules() if isinstance(m, QuantizedWeight))
    run_cfg = SimpleNamespace(model=SimpleNamespace(compute_dtype="float32", seq_length=args.seq_length,
                                                    recompute=not args.no_recompute),
                              runner=SimpleNamespace(batch_size=1))
    estimate = estimate_memory(config, parameters, sum(p.numel() for p in params), run_cfg, base)
    return {
        "started_utc": started.strftime("%Y-%m-%d %H:%M:%S"), "command": "python " + " ".join(sys.argv),
        "shape": {"layers": config.num_layers, "hidden": config.hidden_size, "ffn": config.intermediate_size,
                  "heads": config.num_heads, "vocab": config.vocab_size},
        "quantization": quant.describe(), "recompute": not args.no_recompute, "seq_length": args.seq_length,
        "parameters": parameters,
        "trainable": sum(p.numel() for p in params), "quantized_bytes": quantized,
        "base_bytes": base, "dry_run_estimate_bytes": estimate["total"],
        "build_seconds": round(build_s, 1), "peak_rss_after_build_bytes": rss_after_build,
        "peak_rss_bytes": peak_rss_bytes(), "losses": losses, "adapter_changed": changed,
        "seconds_per_step": [round(s, 2) for s in step_s], "dequant_seconds_per_step": [round(s, 2) for s in dequant_s],
        "tokens_per_second": round(args.seq_length / (sum(steady) / len(steady)), 3),
        "dequant_share": round(sum(steady_dq) / sum(steady), 3),
        "threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "load_average_at_end": os.getloadavg(),
        "cpu": platform.processor() or platform.machine(),
    }


def markdown(r: dict) -> str:
    gib = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
    s = r["shape"]
    return "\n".join([
        f"### QLoRA on a Llama-2-7B-shaped base created in {r['quantization']} (scripts/qlora_memory.py)",
        "",
        f"Run started {r['started_utc']} UTC: `{r['command']}` ({r['threads']} torch threads; the machine was "
        f"shared with other jobs, load average {r['load_average_at_end'][0]:.1f} at the end, so times are upper bounds).",
        "",
        "| figure | value |", "|---|---|",
        f"| shape | {s['layers']} layers, hidden {s['hidden']}, ffn {s['ffn']}, {s['heads']} heads, vocab {s['vocab']} |",
        f"| parameters (base + adapter) | {r['parameters']:,} |",
        f"| trainable (LoRA r16 on wq/wk/wv/wo) | {r['trainable']:,} |",
        f"| quantized linear weights | {gib(r['quantized_bytes'])} |",
        f"| whole frozen base (float32 embeddings, norms, lm_head included) | {gib(r['base_bytes'])} |",
        f"| peak RSS after creating the model | {gib(r['peak_rss_after_build_bytes'])} |",
        f"| **peak RSS over {len(r['losses'])} LoRA steps of {r['seq_length']} tokens** (recompute {r['recompute']}) | "
        f"**{gib(r['peak_rss_bytes'])}** |",
        f"| the dry run's estimate for this run (petformers/train/dry_run.py) | {gib(r['dry_run_estimate_bytes'])} "
        f"({100 * (r['dry_run_estimate_bytes'] / r['peak_rss_bytes'] - 1):+.1f}% of the measured peak) |",
        f"| seconds per step | {', '.join(str(x) for x in r['seconds_per_step'])} |",
        f"| dequantization seconds per step | {', '.join(str(x) for x in r['dequant_seconds_per_step'])} |",
        f"| tokens/s (steps after the first; of the only step when there is one) | {r['tokens_per_second']} |",
        f"| dequantization share of step time | {100 * r['dequant_share']:.0f}% |",
        f"| losses | {', '.join(f'{x:.4f}' for x in r['losses'])} |",
    ])


SECTION = "qlora-7b"


def write_section(path: str, text: str):
    """Replace (or append) this script's section of benchmarks.md; scripts/bench.py keeps it when it
    rewrites the file (the markers below)."""
    from pathlib import Path

    begin, end = f"<!-- section: {SECTION} -->", "<!-- end of section -->"
    block = f"{begin}\n{text}\n{end}"
    file = Path(path)
    old = file.read_text(encoding="utf-8") if file.exists() else ""
    if begin in old:
        head, _, rest = old.partition(begin)
        _, _, tail = rest.partition(end)
        new = head + block + tail
    else:
        new = old.rstrip("\n") + "\n\n" + block + "\n"
    tmp = file.with_suffix(".tmp")
    tmp.write_text(new, encoding="utf-8")
    os.replace(tmp, file)


def main(argv=None) -> dict:
    args = parse_args(argv)
    result = run(args)
    text = markdown(result)
    print(text)
    if args.write_docs:
        write_section(args.write_docs, text)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=1)
    return result


if __name__ == "__main__":
    main()
