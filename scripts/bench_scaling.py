"""`make bench-scaling`: how the cost of a LoRA step grows with the row length and with the model size,
petformers beside transformers + peft (group_by_length).

One invocation runs every (model, seq_length, tool) cell, one after another, each in a process of its own
(so each peak RSS is that cell's alone), and writes the `scaling` section of docs/benchmarks.md (between
`<!-- section: scaling -->` and `<!-- end of section -->`; the rest of the file is left as it is, and
`make bench` keeps the section when it rewrites the file) and docs/benchmarks_scaling.json.

Models: 135m is SmolLM2-135M-Instruct's real weights (its Q4_1 GGUF, as in `make bench`); 360m has
SmolLM2-360M's shape and 1.1b TinyLlama-1.1B's, with random weights (seed 0) made once by transformers'
LlamaForCausalLM and saved in bf16 (as SmolLM2-360M and TinyLlama publish theirs) as a Hugging Face
safetensors directory under the work directory, which both tools load. Speed and memory do not depend
on the weights' values. Their tokenizer is SmolLM2's (from the GGUF); for 1.1b's 32000-token vocabulary
it is cut to its first 32000 tokens (and the BPE merges that make a dropped token), so every id fits the
embedding and the text still tokenizes.

The cells lie on two axes (`--grid axes`, the default): the first model (135m, real weights) at every
length, and every model at --axis-length (default 1024); `--grid cross` runs every model at every length
(on 2 cores in fp32 its 1.1b rows at 2048 and 4096 alone take ~45 min a timed step).

Every cell: the bench's Alpaca conversations (scripts/bench.py's data), the model's chat template, the
prompt masked; LoRA r16, alpha 16, dropout 0.05 on q, k, v, o; AdamW; one untimed warm-up step, then
--steps timed steps, each one micro-batch of about seq_length positions and one optimizer step:
  petformers       `petformers run --config configs/bench/smollm2_bench.yaml`: one packed row of seq_length
                   per step (best-fit-decreasing packing, batch 1, no accumulation), compute_dtype auto (a bf16
                   frozen base and fp32 adapters where the CPU has bf16 matrix instructions, else fp32)
  petformers_nf4   the same over the frozen base quantized to NF4 at load (quantization_bit 4, double
                   quantization: QLoRA), at --quantized-lengths only (default 1024)
  hf_peft_grouped  scripts/bench_hf.py --group-by-length --max-positions seq_length: transformers'
                   LengthGroupedSampler order (Trainer's group_by_length), each step one micro-batch of as
                   many neighbouring samples as fit in seq_length positions once padded to their longest: the
                   budget of petformers' row, which a fixed micro-batch size cannot keep (the sampler puts the
                   longest samples first: 3 samples, fitted to the mean length, padded 1308 positions for a
                   512 row); bf16 autocast where the CPU has bf16 matrix instructions, else fp32, the rule
                   `make bench` applies to torchtune
A cell that passes --cell-time-limit seconds, or --memory-limit-mib resident, is stopped and says so.

Time: a step's cost grows about linearly with its positions (the samples, ~200 tokens, are far shorter
than the rows) and with the model's FLOPs per token (about 1 : 2.7 : 8 for 135m : 360m : 1.1b). On 2 quiet
AVX2 cores in fp32 (petformers ~9 s per 1024-token row of the 135m, transformers + peft about the same per
position), one step of every cell of the default grid is ~6 min; with the warm-up step, process starts,
loading and building the two random models, the default (--steps 3) took 36 min (2158 s, 2026-12-03).

    python scripts/bench_scaling.py                  # the two axes, 3 timed steps a cell (~36 min, 2 quiet cores)
    python scripts/bench_scaling.py --quick          # 135m, 512 tokens, 1 timed step, into the work dir
    python scripts/bench_scaling.py --models 135m,360m --lengths 512,1024 --steps 2 --doc /tmp/benchmarks.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import bench  # noqa: E402  (scripts/bench.py: the workload, the child runner, the machine line)
from bench_qlora import _last_line, write_section  # noqa: E402

from petformers import atomic  # noqa: E402

SECTION = "scaling"
SMOLLM2 = "smollm2-135m-instruct"
MODELS = {
    "135m": {"title": "SmolLM2-135M-Instruct, real weights (its Q4_1 GGUF)", "checkpoint": SMOLLM2},
    "360m": {"title": "SmolLM2-360M's shape (hidden 960, ffn 2560, 32 layers, 15/5 heads, vocab 49152, tied), "
                      "random weights",
             "shape": {"hidden_size": 960, "intermediate_size": 2560, "num_hidden_layers": 32,
                       "num_attention_heads": 15, "num_key_value_heads": 5, "vocab_size": 49152,
                       "tie_word_embeddings": True, "rope_theta": 100000.0}},
    "1.1b": {"title": "TinyLlama-1.1B's shape (hidden 2048, ffn 5632, 22 layers, 32/4 heads, vocab 32000), "
                      "random weights",
             "shape": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
                       "num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": 32000,
                       "tie_word_embeddings": False, "rope_theta": 10000.0}},
}
LENGTHS = (512, 1024, 2048, 4096)
AXIS_LENGTH = 1024  # --grid axes: every model runs at this length, the first model at every length
TOOLS = {"petformers": "petformers", "petformers_nf4": "petformers over an NF4 4-bit base (QLoRA)",
         "hf_peft_grouped": "transformers + peft, group_by_length"}
QUANTIZED_LENGTHS = (1024,)  # petformers_nf4 runs at these lengths only: its rows, not another full grid
PETFORMERS_TOOLS = ("petformers", "petformers_nf4")  # cells run by `petformers run`, read from its metrics.jsonl
NF4 = ("model.model_config.quantization_bit=4", "model.model_config.quantization_type=nf4",
       "model.model_config.double_quantization=True")
SEED = 0


# ---- the random-weight models (built in a child: the parent stays small) ------------------------------

def truncate_bpe(tokenizer_json: Path, vocab_size: int):
    """Cut a byte-level BPE tokenizer.json to the tokens with ids below vocab_size, with the merges that make
    only kept tokens: a smaller, consistent vocabulary (BPE ids follow merge order, so the first merges stay)."""
    data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    model = data["model"]
    vocab = {t: i for t, i in model["vocab"].items() if i < vocab_size}

    def pair(m):
        return m.split(" ", 1) if isinstance(m, str) else m

    model["vocab"] = vocab
    model["merges"] = [m for m in model["merges"]
                       if all(t in vocab for t in pair(m)) and "".join(pair(m)) in vocab]
    data["added_tokens"] = [t for t in data.get("added_tokens", []) if t["id"] < vocab_size]
    atomic.write_text(tokenizer_json, json.dumps(data, ensure_ascii=False))


def write_tokenizer(out: Path, vocab_size: int, source: str | None = None):
    """`source`'s tokenizer files, or SmolLM2's tokenizer as transformers reads it from the GGUF (cut to
    vocab_size when smaller)."""
    out.mkdir(parents=True, exist_ok=True)
    if source:
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
            if (Path(source) / name).exists():
                shutil.copyfile(Path(source) / name, out / name)
        return
    from transformers import AutoTokenizer

    from petformers.checkpoint.download import download

    gguf = download(SMOLLM2)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer.save_pretrained(str(out))
    if vocab_size < len(tokenizer):
        truncate_bpe(out / "tokenizer.json", vocab_size)


def build_model(spec: dict, out: Path):
    """Random weights of spec's shape (seed 0; transformers' own init), saved as bf16 safetensors with the
    tokenizer; skipped when `out` already holds this very spec."""
    marker = out / "bench_scaling_model.json"
    if marker.exists() and json.loads(marker.read_text()) == spec:
        return
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if out.exists():
        shutil.rmtree(out)
    write_tokenizer(out, spec["shape"]["vocab_size"], spec.get("tokenizer"))
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    config = LlamaConfig(**spec["shape"], rms_norm_eps=1e-5, max_position_embeddings=spec["max_positions"],
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(spec.get("seed", SEED))
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(str(out))
    atomic.write_json(marker, spec)


# ---- the workload, per model and length -----------------------------------------------------------

def sample_stats(train: Path, checkpoint, seq_length: int) -> dict:
    """The samples as petformers tokenizes them with this model's tokenizer at this seq_length (truncated):
    their mean length and the packed rows they make."""
    import numpy as np

    from petformers.checkpoint.load import load_tokenizer
    from petformers.data.packing import best_fit_decreasing
    from petformers.data.prepare import prepare

    ds, summary = prepare(str(train), load_tokenizer(checkpoint), seq_length, template="chat", packing=False,
                          progress=False)
    lengths = (ds.arrays["segment_ids"] == 0).sum(axis=1).astype(np.int64)  # one sample per row, then padding
    rows = int(best_fit_decreasing(lengths, seq_length)[2])
    mean = float(lengths.mean())
    return {"samples": int(len(lengths)), "tokens": int(lengths.sum()), "mean_length": mean,
            "max_length": int(lengths.max()), "truncated": summary.truncated, "packed_rows": rows,
            "row_fill": float(lengths.sum()) / (rows * seq_length)}


# ---- one cell ---------------------------------------------------------------------------------------

def run_cell(model: str, seq_length: int, tool: str, ctx: dict) -> dict:
    """One (model, seq_length, tool) cell in a child process; its numbers, or why there are none."""
    args, out = ctx["args"], ctx["out"] / "cells" / f"{model}_{seq_length}_{tool}"
    shutil.rmtree(out, ignore_errors=True)  # nothing of an earlier invocation (metrics.jsonl appends)
    out.mkdir(parents=True)
    checkpoint = ctx["checkpoints"][model]
    steps = args.steps + 1  # the first is the warm-up
    if tool in PETFORMERS_TOOLS:
        cmd = [sys.executable, "-m", "petformers", "run", "--config", str(bench.CONFIG),
               "--train_dataset_dir", str(ctx["train"]), "--output_dir", str(out / "run"), "--do_eval", "False",
               f"load_checkpoint={checkpoint}", f"model.model_config.seq_length={seq_length}",
               f"max_steps={steps}", f"runner_config.epochs={steps}", "runner_config.batch_size=1",
               "runner_config.gradient_accumulation_steps=1", *(NF4 if tool == "petformers_nf4" else ())]
    else:
        cmd = [sys.executable, str(ROOT / "scripts" / "bench_hf.py"), "--data", str(ctx["train"]),
               "--dtype", ctx["hf_dtype"], "--steps", str(steps), "--max-positions", str(seq_length),
               "--seq-length", str(seq_length), "--group-by-length", "--threads", str(args.threads),
               "--out", str(out / "result.json"),
               *(["--gguf", str(checkpoint)] if str(checkpoint).endswith(".gguf") else ["--model", str(checkpoint)])]
    log = out / "log.txt"
    child = bench._run_child(cmd, args.threads, log, time_limit=args.cell_time_limit,
                             memory_limit_mib=ctx["memory_limit_mib"])
    cell = {"model": model, "seq_length": seq_length, "tool": tool, "command": shown_command(cmd),
            "wall_s": child["wall_s"], "peak_rss_mib_wait4": child["peak_rss_mib"]}
    if child["stopped"] == "time":
        return cell | {"error": f"timed out after {args.cell_time_limit:g} s"}
    if child["stopped"] == "memory":
        return cell | {"error": f"stopped at the memory limit ({ctx['memory_limit_mib']:.0f} MiB resident)"}
    if child["rc"] != 0:
        return cell | {"error": _last_line(log, child["rc"])}
    if tool in PETFORMERS_TOOLS:
        records = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()
                   if line.strip()]
        records = sorted((r for r in records if "loss" in r), key=lambda r: r["step"])
        tokens = [r["trained_tokens"] for r in records]
        seconds = [r["trained_tokens"] / r["tokens_per_s"] for r in records]
        samples = positions = None  # one packed row of seq_length per step (its fill: the stats)
        peak = json.loads((out / "run" / "run_summary.json").read_text())["peak_rss_mib"]
    else:
        r = json.loads((out / "result.json").read_text())
        tokens, seconds = r["step_trained_tokens"], r["step_seconds"]
        positions, samples = r["step_positions"][1:], r["step_samples"][1:]
        peak = r["peak_rss_mib_self"]
    timed = slice(1, None)
    return cell | {"steps_timed": len(seconds[timed]), "warmup_s": seconds[0],
                   "trained_tokens_per_s": sum(tokens[timed]) / sum(seconds[timed]),
                   "seconds_per_step": sum(seconds[timed]) / len(seconds[timed]),
                   "trained_tokens_per_step": sum(tokens[timed]) / len(tokens[timed]),
                   "peak_rss_mib": peak,
                   **({"positions_per_step": sum(positions) / len(positions),
                       "samples_per_step": sum(samples) / len(samples)} if positions else {})}


def shown_command(cmd: list[str]) -> str:
    """A child's command as typed from the repository root: paths inside it relative (`key=path` too)."""
    def shown(arg: str) -> str:
        key, eq, value = arg.partition("=") if "=" in arg and not arg.startswith("-") else ("", "", arg)
        if os.path.isabs(value) and Path(value).resolve().is_relative_to(ROOT):
            value = os.path.relpath(value, ROOT)
        return key + eq + value
    return "python " + " ".join(shown(a) for a in cmd[1:])


# ---- the report -------------------------------------------------------------------------------------

def _measured(cells: list[dict]) -> dict:
    return {(c["model"], c["seq_length"], c["tool"]): c for c in cells if "error" not in c}


def what_grows(report: dict) -> list[str]:
    """Sentences computed from the cells: per tool, longest row against shortest, largest model against
    smallest, and petformers against transformers + peft."""
    cells, s = _measured(report["cells"]), report["settings"]
    models, lengths = s["models"], s["lengths"]
    out = []
    for tool in s["tools"]:
        parts = []
        for model in models:
            a, b = cells.get((model, lengths[0], tool)), cells.get((model, lengths[-1], tool))
            if a and b and a is not b:
                per_k = (b["peak_rss_mib"] - a["peak_rss_mib"]) / ((lengths[-1] - lengths[0]) / 1024)
                parts.append(f"{model}: {b['trained_tokens_per_s'] / a['trained_tokens_per_s']:.2f}× the tokens/s "
                             f"at {lengths[-1]} as at {lengths[0]}, peak RSS {a['peak_rss_mib']:.0f} -> "
                             f"{b['peak_rss_mib']:.0f} MiB ({per_k:+.0f} MiB per 1024 tokens of row)")
        for length in lengths:
            a, b = cells.get((models[0], length, tool)), cells.get((models[-1], length, tool))
            if a and b and a is not b:
                speed, memory = (b[k] / a[k] for k in ("trained_tokens_per_s", "peak_rss_mib"))
                parts.append(f"at {length}: {models[-1]} runs at {speed:.2f}× {models[0]}'s tokens/s with "
                             f"{memory:.2f}× its peak RSS")
        if parts:
            out.append(f"- {TOOLS[tool]}: " + "; ".join(parts) + ".")
    pairs = [(c, cells.get((m, n, "hf_peft_grouped"))) for (m, n, t), c in cells.items() if t == "petformers"]
    pairs = [(p, h) for p, h in pairs if h]
    if pairs:
        speed = [p["trained_tokens_per_s"] / h["trained_tokens_per_s"] for p, h in pairs]
        memory = [p["peak_rss_mib"] / h["peak_rss_mib"] for p, h in pairs]
        out.append(f"- petformers against transformers + peft, cell by cell ({len(pairs)} "
                   f"pair{'s' if len(pairs) != 1 else ''}): {span(speed)} the trained tokens/s at {span(memory)} "
                   "the peak RSS.")
    for (m, n, t), q in cells.items():
        p = cells.get((m, n, "petformers"))
        if t == "petformers_nf4" and p:
            out.append(f"- {m} at {n}, the NF4 base against petformers' {_short(s['petformers_compute_dtype'])} "
                       f"base: {q['trained_tokens_per_s'] / p['trained_tokens_per_s']:.2f}× the trained tokens/s at "
                       f"{q['peak_rss_mib'] / p['peak_rss_mib']:.2f}× the peak RSS.")
    failed = [c for c in report["cells"] if "error" in c]
    if failed:
        out.append(f"- {len(failed)} of {len(report['cells'])} cells gave no numbers (their rows say why).")
    return out


def cells_of(names: list[str], lengths: list[int], grid: str, axis_length: int) -> list[tuple[str, int]]:
    """(model, seq_length) pairs to run: every pair (`cross`), or the first model at every length and every
    model at axis_length (`axes`)."""
    if grid == "cross":
        return [(m, n) for m in names for n in lengths]
    return [(m, n) for m in names for n in lengths if m == names[0] or n == axis_length]


def grid_text(s: dict) -> str:
    if s.get("grid", "cross") == "cross":
        return "every model at every length"
    return (f"{s['models'][0]} at every length, every model at {s['axis_length']} (`--grid cross` runs every "
            "model at every length)")


def span(xs: list[float]) -> str:
    return f"{xs[0]:.2f}×" if len(xs) == 1 else f"{min(xs):.2f}× to {max(xs):.2f}×"


def _short(dtype: str) -> str:
    return {"bfloat16": "bf16", "float32": "fp32"}.get(dtype, dtype)


def render(report: dict) -> str:
    s, stats = report["settings"], report["stats"]
    lines = [
        "### How cost grows: row length and model size (scripts/bench_scaling.py)",
        "",
        f"One invocation started {report['started']} and ended {report['ended']}: `{report['command']}`. "
        f"Machine: {report['machine']}; threads per cell: {report['threads']}; 1-minute load average "
        f"{report['load_average']['before']:.1f} at the start and {report['load_average']['after']:.1f} at the end "
        "(the cells alone make it about the thread count; more means the cores were shared).",
        "",
        "Each cell is a process of its own: LoRA r16, alpha 16, dropout 0.05 on q, k, v, o over the bench's "
        "Alpaca conversations (the chat template, the prompt masked), one untimed warm-up step, then "
        + (f"{s['steps']} timed steps of about seq_length positions each. " if s["steps"] != 1 else
           "1 timed step of about seq_length positions. ")
        + ("Cells: " + grid_text(s) + ". ")
        + "petformers: `petformers run` with the bench config, one packed row of seq_length per step, compute "
        f"dtype {s['petformers_compute_dtype']} for the frozen base (adapters float32); over an NF4 base (at "
        f"{', '.join(map(str, s.get('quantized_lengths', [])))} tokens): the same with the base's linear weights "
        "quantized to NF4 at load (quantization_bit 4, double quantization; embeddings, norms and lm_head stay "
        "as loaded) and dequantized to the compute dtype as each layer runs. transformers + peft: "
        f"scripts/bench_hf.py, {s['hf_dtype_text']}, transformers' LengthGroupedSampler order (group_by_length), "
        "each step one micro-batch of as many neighbouring samples as fit in seq_length positions padded to "
        "their longest: a row's budget. (A fixed micro-batch size fitted to the mean length padded the "
        "sampler's first groups, its longest and the only ones a few steps see, far beyond the row.) "
        "Random-weight models are transformers' own initialisation (seed 0) saved as bf16 safetensors, loaded "
        "by both tools (transformers + peft in float32, as for the 135m); their tokenizer is SmolLM2's, cut to "
        "its first 32000 tokens for the 32000-token vocabulary. "
        "Trained tokens/s: the trained (unmasked) tokens of the timed steps over their seconds; peak RSS: the "
        "cell's own process (VmHWM, loading included); seconds per step: the mean of the timed steps; trained "
        "tokens per step: theirs, which differ between the tools because their steps hold different samples "
        "(the prompt, masked, is a larger share of a short sample; transformers' sampler takes the longest "
        "samples first): compare the tools by tokens/s, not by step. A cell is "
        f"stopped after {s['cell_time_limit']:g} s or at {s['memory_limit_mib']:.0f} MiB resident.",
        "",
        "Models: " + "; ".join(f"{name}: {m['title']}" for name, m in report["models"].items()) + ".",
        "",
        "| model | seq_length | tool | trained tokens/s | peak RSS MiB | seconds per step | trained tokens per step |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for c in report["cells"]:
        tool = {"petformers": f"petformers ({_short(s['petformers_compute_dtype'])} base)",
                "petformers_nf4": "petformers (NF4 base)"}.get(
            c["tool"], f"transformers + peft, group_by_length ({s['hf_dtype']}"
            + (" autocast)" if s["hf_dtype"] == "bf16" else ")"))
        if "error" in c:
            lines.append(f"| {c['model']} | {c['seq_length']} | {tool} | {c['error']} | – | – | – |")
        else:
            lines.append(f"| {c['model']} | {c['seq_length']} | {tool} | {c['trained_tokens_per_s']:.1f} | "
                         f"{c['peak_rss_mib']:.0f} | {c['seconds_per_step']:.2f} | "
                         f"{c['trained_tokens_per_step']:.0f} |")
    lines += ["", "**What grows** (computed from the table):", "", *what_grows(report), "",
              "The data per model and length (petformers' rows; what transformers + peft's timed steps held):", ""]
    for key, st in stats.items():
        model, length = key.split("/")
        hf = _measured(report["cells"]).get((model, int(length), "hf_peft_grouped"))
        lines.append(f"- {model} at {length}: {st['samples']} samples of mean length {st['mean_length']:.0f} "
                     f"({st['truncated']} truncated) pack into {st['packed_rows']} rows ({100 * st['row_fill']:.0f}% "
                     f"filled)" + (f"; transformers + peft's timed steps held {hf['samples_per_step']:.1f} samples "
                                   f"in {hf['positions_per_step']:.0f} padded positions" if hf else "") + ".")
    lines += ["", "The commands (the invocation's, then each cell's):", "", "```", report["command"],
              *[c["command"] for c in report["cells"]], "```"]
    return "\n".join(lines)


# ---- the invocation -----------------------------------------------------------------------------------

def _mem_available_mib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return float("inf")


def main(argv=None, models: dict | None = None) -> int:
    """`models`: name -> spec, MODELS unless given (the tests pass a tiny one)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    models = models or MODELS
    if argv[:1] == ["--build-model"]:
        build_model(json.loads(argv[1]), Path(argv[2]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="135m only, 512 tokens, 1 timed step, into the work dir")
    ap.add_argument("--models", default=",".join(models), help=f"comma-separated, of {', '.join(models)}")
    ap.add_argument("--lengths", default=",".join(map(str, LENGTHS)), help="seq_length values, comma-separated")
    ap.add_argument("--tools", default=",".join(TOOLS), help=f"comma-separated, of {', '.join(TOOLS)}")
    ap.add_argument("--quantized-lengths", default=",".join(map(str, QUANTIZED_LENGTHS)),
                    help="the seq_length values (of --lengths) at which petformers_nf4 runs")
    ap.add_argument("--grid", choices=["axes", "cross"], default="axes",
                    help="axes: the first model at every length and every model at --axis-length; cross: every "
                         "model at every length")
    ap.add_argument("--axis-length", type=int, default=AXIS_LENGTH,
                    help="--grid axes: the length at which every model runs (one of --lengths)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per cell, after one warm-up step")
    ap.add_argument("--records", type=int, default=256, help="Alpaca records of the bench data")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--hf-dtype", choices=["auto", "fp32", "bf16"], default="auto",
                    help="transformers + peft: bf16 autocast or fp32 (auto: bf16 where the CPU has bf16 matrix "
                         "instructions)")
    ap.add_argument("--cell-time-limit", type=float, default=900, help="seconds before a cell is stopped")
    ap.add_argument("--memory-limit-mib", type=float,
                    help="resident MiB at which a cell is stopped (default: 90%% of MemAvailable at the start)")
    ap.add_argument("--out", type=Path, help="working directory (default output/bench-scaling)")
    ap.add_argument("--doc", type=Path, help="the benchmarks.md to write the section into (default "
                                             "docs/benchmarks.md; --quick: the work dir's); the JSON goes next to it")
    args = ap.parse_args(argv)
    if args.quick:
        args.models, args.lengths, args.quantized_lengths, args.steps = "135m", "512", "512", 1
    names = [m for m in args.models.split(",") if m]
    tools = [t for t in args.tools.split(",") if t]
    try:
        lengths = sorted(int(n) for n in args.lengths.split(",") if n)
        quantized_lengths = sorted(int(n) for n in args.quantized_lengths.split(",") if n)
    except ValueError:
        lengths = quantized_lengths = []
    bad = [m for m in names if m not in models] + [t for t in tools if t not in TOOLS]
    if (bad or not names or not tools or not lengths or min(lengths) < 16 or args.steps < 1
            or not set(quantized_lengths) <= set(lengths)
            or (args.grid == "axes" and len(names) > 1 and args.axis_length not in lengths)):
        print(f"bench_scaling: check --models ({', '.join(models)}), --tools ({', '.join(TOOLS)}), --lengths "
              f"(integers >= 16), --quantized-lengths (some of --lengths), --axis-length (one of --lengths) "
              f"and --steps (>= 1)"
              f"{': unknown ' + ', '.join(bad) if bad else ''}", file=sys.stderr)
        return 2
    out = (args.out or ROOT / "output" / ("bench-scaling-quick" if args.quick else "bench-scaling")).resolve()
    doc = args.doc or (out / "benchmarks.md" if args.quick else ROOT / "docs" / "benchmarks.md")
    train, _ = bench.write_workload(out / "data", args.records, 0)
    bf16 = bench.compute_dtype_for() == "bfloat16"
    hf_dtype = {"auto": "bf16" if bf16 else "fp32"}.get(args.hf_dtype, args.hf_dtype)
    memory_limit = args.memory_limit_mib or 0.9 * _mem_available_mib()
    started = datetime.datetime.now(datetime.timezone.utc)
    report = {"started": started.isoformat(timespec="seconds"), "machine": bench.machine(), "threads": args.threads,
              "command": " ".join(["python scripts/bench_scaling.py", *argv]),
              "load_average": {"before": os.getloadavg()[0]},
              "settings": {"models": names, "lengths": lengths, "tools": tools, "steps": args.steps,
                           "grid": args.grid, "axis_length": args.axis_length,
                           "quantized_lengths": quantized_lengths,
                           "records": args.records, "cell_time_limit": args.cell_time_limit,
                           "memory_limit_mib": memory_limit, "hf_dtype": hf_dtype,
                           "hf_dtype_text": "bf16 autocast over float32 weights" if hf_dtype == "bf16" else "float32",
                           "petformers_compute_dtype": bench.compute_dtype_for(),
                           "hf_batching": "LengthGroupedSampler order; per step one micro-batch of the most "
                                          "neighbouring samples that fit in seq_length positions padded"},
              "models": {}, "stats": {}, "cells": []}
    ctx = {"args": args, "out": out, "train": train, "hf_dtype": hf_dtype, "memory_limit_mib": memory_limit,
           "checkpoints": {}, "stats": {}}
    for name in names:
        spec = models[name]
        if "shape" in spec:
            path = out / "models" / name
            full = {**spec, "max_positions": max(4096, lengths[-1]), "seed": SEED}
            print(f"bench_scaling: model {name} (random weights) in {path} ...", flush=True)
            built = bench._run_child([sys.executable, str(Path(__file__).resolve()), "--build-model",
                                      json.dumps(full), str(path)], args.threads, out / f"build_{name}.log")
            if built["rc"] != 0:
                why = _last_line(out / f"build_{name}.log", built["rc"])
                raise SystemExit(f"bench_scaling: building {name} failed: {why}")
        else:
            from petformers.checkpoint.download import download

            path = download(spec["checkpoint"])
        ctx["checkpoints"][name] = path
        report["models"][name] = {"title": spec["title"], "checkpoint": os.path.relpath(path, ROOT)}
    pairs = cells_of(names, lengths, args.grid, args.axis_length)
    for name, length in pairs:
        ctx["stats"][(name, length)] = report["stats"][f"{name}/{length}"] = sample_stats(
            train, ctx["checkpoints"][name], length)
    for name, length in pairs:
        for tool in tools:
            if tool == "petformers_nf4" and length not in quantized_lengths:
                continue
            print(f"bench_scaling: {name} {length} {tool} ...", flush=True)
            cell = run_cell(name, length, tool, ctx)
            cell["measured"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            report["cells"].append(cell)
            print(f"bench_scaling: {name} {length} {tool}: " + (cell["error"] if "error" in cell else
                  f"{cell['trained_tokens_per_s']:.1f} trained tokens/s, {cell['peak_rss_mib']:.0f} MiB, "
                  f"{cell['seconds_per_step']:.2f} s/step (warm-up {cell['warmup_s']:.1f} s), "
                  f"{cell['wall_s']:.0f} s in all"), flush=True)
    report["load_average"]["after"] = os.getloadavg()[0]
    report["ended"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    write_section(doc, SECTION, render(report))
    atomic.write_json(doc.parent / "benchmarks_scaling.json", report)
    print(f"bench_scaling: wrote the {SECTION} section of {doc} and {doc.parent / 'benchmarks_scaling.json'} "
          f"({(datetime.datetime.now(datetime.timezone.utc) - started).total_seconds():.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
