"""The levers of docs/benchmarks.md: what each of petformers' optimizations buys, one at a time.

Each variant trains a few optimizer steps (after one untimed warm-up step) with petformers' own
model, LoRA, collate and loss, as petformers/train/finetune.py does, on the bench workload's rows, in a
child process of its own (so its peak RSS is its own). The weights are random with SmolLM2-135M's
shapes: speed and memory do not depend on their values, and skipping the GGUF load keeps each
variant short. `scripts/bench.py --levers` runs them all and puts the table in docs/benchmarks.md.

    python scripts/bench_levers.py --child '{"packing": false}' --rows output/bench/levers --out r.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name -> (what it changes against the bench's petformers settings, the change)
VARIANTS: dict[str, tuple[str, dict]] = {
    "petformers": ("the bench's settings: packed rows, 2 rows of 1024 per step, frozen-head cross-entropy", {}),
    "petformers_epoch": ("as petformers, over a whole epoch of rows (the baseline of no_shared_prefix, whose rows "
                         "hold other samples: a few steps would compare different samples)", {"epoch": True}),
    "no_shared_prefix": ("packed rows with every sample's own copy of the prefix all samples share (system prompt, "
                         "template header), instead of one copy per row that the row's samples attend to; a whole "
                         "epoch, against petformers_epoch",
                         {"rows": "packed_plain", "epoch": True, "baseline": "petformers_epoch"}),
    "no_packing": ("one sample per row, 8 samples per step, each batch cut to its longest sample "
                   "(the baseline's dynamic padding)", {"packing": False}),
    "other_dtype": ("the other compute dtype for the frozen base (bf16 <-> fp32); adapters stay fp32",
                    {"other_dtype": True}),
    "checkpointed_ce": ("cross-entropy in chunks that recompute lm_head in backward (petformers before the "
                        "frozen-head path)", {"loss": "checkpointed"}),
    "plain_ce": ("float32 logits for every position, then cross-entropy (what transformers does)",
                 {"loss": "plain"}),
    "masked_attention": ("packed rows attended through one [T, T] block-diagonal mask shared by the layers, "
                         "instead of sample by sample (petformers before)", {"masked": True}),
    "bool_mask": ("as masked_attention, but the mask boolean: SDPA converts it and keeps a float copy in "
                  "every layer (petformers before that)", {"masked": True, "bool_mask": True}),
    "unfused_lora": ("the LoRA update scaled and added in separate passes, W·x + (B·A·x)·s, instead of one "
                     "addmm (petformers before)", {"unfused_lora": True}),
    "plain_ops": ("autograd's own SwiGLU, RMSNorm and dropout-then-A, which keep silu(a), the normalised output "
                  "and a float dropout noise for backward, instead of petformers' lean ops that recompute those "
                  "elementwise results and keep only the matmul outputs (selective recompute, "
                  "petformers/models/lean_ops.py)", {"plain_ops": True}),
    "fused_projections": ("q, k, v (and w1, w3) as one matmul over their frozen weights stacked in one storage, "
                          "LoRA added per projection (model.model_config.fused_projections)",
                          {"fused_projections": True}),
    "glibc_malloc": ("glibc's malloc instead of jemalloc, the allocator petformers runs on where it is "
                     "installed (petformers/allocator.py; PETFORMERS_ALLOCATOR=glibc)", {"allocator": "glibc"}),
    "low_rss": ("glibc's malloc returning freed activations to the OS at once (a fixed 128 KiB mmap threshold, "
                "PETFORMERS_LOW_RSS=1): the memory setting before jemalloc", {"low_rss": True, "allocator": "glibc"}),
    "recompute": ("activation checkpointing of every decoder layer (recompute_config.recompute)",
                  {"recompute": True}),
    "threads_1": ("1 thread instead of all cores", {"threads": 1}),
    "compile": ("torch.compile of hidden_states (inductor); the compile itself is in the warm-up step",
                {"compile": True}),
    "regional_compile": ("torch.compile of the decoder block (petformers/models/compile.py), dynamic sequence "
                         "length, the per-sample attention left eager (a graph break), so the layers share one "
                         "compiled graph whatever the packing",
                         {"compile": "regional"}),
}


# ---- the child: a few training steps ----------------------------------------------------------------

def child(spec: dict, rows_dir: Path, steps: int, dtype_name: str, time_limit: float) -> dict:
    if spec.get("low_rss"):
        from petformers.train.setup import return_freed_memory_to_os

        return_freed_memory_to_os()
    import torch
    import torch.nn.functional as F

    from petformers import allocator
    from petformers.checkpoint.load import load_config
    from petformers.config.schema import ModelSection
    from petformers.peak_rss import peak_rss_bytes
    from petformers.data.dataset import PreparedDataset
    from petformers.models.llama import build_model
    from petformers.pet.config import PetConfig
    from petformers.pet.fused import fuse_projections
    from petformers.pet.inject import apply_lora
    from petformers.data.loader import collate
    from petformers.train.loss import chunked_cross_entropy_sum, plain_cross_entropy_sum

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype_name]
    if spec.get("other_dtype"):
        dtype = torch.float32 if dtype == torch.bfloat16 else torch.bfloat16
    if spec.get("bool_mask"):  # hand SDPA a boolean mask again, as the model did before
        sdpa = F.scaled_dot_product_attention

        def bool_mask_sdpa(q, k, v, attn_mask=None, **kw):
            return sdpa(q, k, v, attn_mask=None if attn_mask is None else attn_mask == 0, **kw)

        F.scaled_dot_product_attention = bool_mask_sdpa

    if spec.get("unfused_lora"):  # LoRALinear's update as PEFT writes it: scale, then add
        from petformers.pet.lora import LoRALinear

        def unfused_update(self, x, result):
            return (result + self.lora_b(self.lora_a(self.dropout(x.to(self.lora_a.weight.dtype))))
                    * self.scaling).to(result.dtype)

        LoRALinear.add_update = unfused_update
    if spec.get("plain_ops"):  # the same formulas through torch's ops (lean_ops' docstring says what they keep)
        from petformers.models import llama
        from petformers.pet import lora

        def plain_rms_norm(x, weight, eps):
            xf = x.float()
            return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

        llama.rms_norm = plain_rms_norm
        llama.swiglu = lambda a, b: F.silu(a) * b
        lora.dropout_linear = lambda x, weight, p, training: F.linear(F.dropout(x, p, training), weight)
    config, _ = load_config("smollm2-135m-instruct")
    model = build_model(config, device="cpu", dtype=torch.float32)
    model.init_weights(generator=torch.Generator().manual_seed(0))
    model.to(dtype)
    apply_lora(model, PetConfig(lora_rank=16, lora_alpha=16, lora_dropout=0.05,
                                target_modules=".*wq|.*wk|.*wv|.*wo"))
    if spec.get("fused_projections", ModelSection().fused_projections):  # as the recipe (train/finetune.py)
        fuse_projections(model)
    model.gradient_checkpointing = bool(spec.get("recompute"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4, foreach=True)
    hidden_states = model.hidden_states
    if spec.get("compile") == "regional":
        from petformers.models.compile import compile_blocks  # loads torch._dynamo: this variant only

        compile_blocks(model)  # tests/test_regional_compile.py checks it against the eager model
    elif spec.get("compile"):
        hidden_states = torch.compile(model.hidden_states)

    packed = spec.get("packing", True)
    ds = PreparedDataset(rows_dir / spec.get("rows", "packed" if packed else "unpacked"))
    rows_per_micro, micro_per_step = (1, 2) if packed else (8, 1)
    pad_id = int(ds.meta["pad_id"])

    def loss_of(b):
        # An all-ones attention_mask sends packed rows down the masked path (the same block-diagonal mask).
        ones = torch.ones_like(b["input_ids"]) if spec.get("masked") and packed else None
        hidden = hidden_states(b["input_ids"], b["position_ids"], b["segment_ids"], ones)
        if spec.get("loss") == "plain":
            return plain_cross_entropy_sum(model.lm_head(hidden), b["targets"])
        head = (lambda h: model.lm_head(h)) if spec.get("loss") == "checkpointed" else model.lm_head
        return chunked_cross_entropy_sum(head, hidden, b["targets"])

    cursor, step_s, tokens = 0, [], []
    started = time.perf_counter()
    profile = None
    if spec.get("epoch"):  # every row once: the warm-up step, then the rest of the epoch
        steps = -(-len(ds) // (rows_per_micro * micro_per_step)) - 1
    for step in range(steps + 1):
        if spec.get("profile") and step == steps:  # the last step, under the profiler
            from torch.profiler import ProfilerActivity
            profile = torch.profiler.profile(activities=[ProfilerActivity.CPU])
            profile.__enter__()
        t0 = time.perf_counter()
        batches = []
        for _ in range(micro_per_step):
            idx = [(cursor + i) % len(ds) for i in range(rows_per_micro)]
            cursor += rows_per_micro
            batches.append(collate([ds[i] for i in idx], pad_id, packed, "cpu"))
        n = sum(int((b["targets"] != -100).sum()) for b in batches)
        for b in batches:
            (loss_of(b) / n).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_s.append(time.perf_counter() - t0)
        tokens.append(n)
        if profile is not None:
            profile.__exit__(None, None, None)
        print(f"step {step} {step_s[-1]:.1f}s {n} trained tokens", file=sys.stderr, flush=True)
        if time.perf_counter() - started > time_limit:
            break
    timed = slice(1, None) if len(step_s) > 1 else slice(0, None)  # step 0 warms up (and compiles)
    extra = {"profile": top_ops(profile)} if profile is not None else {}
    return {**extra, "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
            "steps_timed": len(step_s[timed]), "warmup_s": step_s[0], "step_s": step_s[timed],
            "trained_tokens_per_s": sum(tokens[timed]) / sum(step_s[timed]),
            "peak_rss_mib_self": peak_rss_bytes() / 2**20, "allocator": allocator.current()}


def top_ops(profile, n: int = 12) -> dict:
    """The operators that took the profiled step's time: self CPU time of each, largest first."""
    rows = sorted(((e.key, e.self_cpu_time_total, e.count) for e in profile.key_averages()), key=lambda r: -r[1])
    total = sum(r[1] for r in rows)
    return {"total_s": total / 1e6, "ops": [{"op": k, "self_s": t / 1e6, "share": t / total, "calls": c}
                                            for k, t, c in rows[:n]]}


def fused_matmuls(tokens: int = 2048, repeats: int = 5) -> dict:
    """q/k/v as three products or one over the concatenated weight (and gate/up), forward + input grad:
    what fusing the projections could buy at most, before any LoRA bookkeeping."""
    import torch

    def best(fn):
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    x = torch.randn(tokens, 576)
    g = {n: torch.randn(tokens, n) for n in (576, 192, 1536, 960, 3072)}
    w = {n: torch.randn(n, 576) for n in (576, 192, 1536, 960, 3072)}

    def split(widths):
        def run():
            for n in widths:
                y = x @ w[n].T
                _ = g[n] @ w[n]  # gradient for x (the base weights are frozen)
                del y
        return run

    def fused(n):
        def run():
            y = x @ w[n].T
            _ = g[n] @ w[n]
            del y
        return run

    qkv = best(split((576, 192, 192))), best(fused(960))
    gate_up = best(split((1536, 1536))), best(fused(3072))
    return {"qkv_split_s": qkv[0], "qkv_fused_s": qkv[1], "gate_up_split_s": gate_up[0],
            "gate_up_fused_s": gate_up[1]}


# ---- the parent ---------------------------------------------------------------------------------------

def prepare_rows(train: Path, out: Path, seq_length: int) -> Path:
    """The workload as petformers prepares it (packed with the shared prefix, packed without it, unpacked),
    written once for every variant."""
    from petformers.checkpoint.download import download
    from petformers.checkpoint.load import load_tokenizer
    from petformers.data.prepare import prepare

    rows = out / "levers"
    tokenizer = load_tokenizer(download("smollm2-135m-instruct"))
    for name, packing, shared in (("packed", True, True), ("packed_plain", True, False), ("unpacked", False, False)):
        prepare(str(train), tokenizer, seq_length, template="chat", packing=packing, output_dir=rows / name,
                progress=False, shared_prefix=shared)
    return rows


def measure_levers(args, train: Path, eval_path, out: Path, steps: int = 3, time_limit: float = 600) -> dict:
    from bench import _run_child

    rows = prepare_rows(train, out, args.seq_length)
    results = {}
    for name, (what, spec) in VARIANTS.items():
        if spec.get("other_dtype") and args.compute_dtype == "float32":
            # bf16 is only "the other dtype" here because this CPU multiplies bf16 far slower than fp32
            # (compute_dtype_for): a few steps would take most of an hour, and the peaks say what they would show.
            results[name] = {"what": what, "skipped": "this CPU multiplies bf16 many times slower than fp32 (the "
                                                      "measured peaks above): a bf16 base only pays with bf16 hardware"}
            continue
        print(f"bench: lever {name} ...", flush=True)
        result_file = out / "levers" / f"{name}.json"
        limit = 3 * time_limit if spec.get("compile") else time_limit  # compiling takes minutes on 2 cores
        cmd = [sys.executable, __file__, "--child", json.dumps(spec), "--rows", str(rows), "--steps", str(steps),
               "--dtype", args.compute_dtype, "--time-limit", str(limit), "--out", str(result_file)]
        run = _run_child(cmd, spec.get("threads", args.threads), out / "levers" / f"{name}.log",
                         allocator=spec.get("allocator", "auto"))
        if run["rc"] != 0:
            results[name] = {"what": what, "error": f"exit {run['rc']}, see {out / 'levers' / (name + '.log')}"}
            continue
        child = json.loads(result_file.read_text())
        # The child's own high-water mark (VmHWM): wait4's ru_maxrss starts at this parent's (petformers/peak_rss.py).
        results[name] = {"what": what, **child, "peak_rss_mib": child["peak_rss_mib_self"]}
    print("bench: a profiled petformers step ...", flush=True)
    cmd = [sys.executable, __file__, "--child", json.dumps({"profile": True}), "--rows", str(rows), "--steps", "1",
           "--dtype", args.compute_dtype, "--time-limit", str(time_limit), "--out", str(out / "levers" / "profile.json")]
    if _run_child(cmd, args.threads, out / "levers" / "profile.log")["rc"] == 0:
        results["profile"] = json.loads((out / "levers" / "profile.json").read_text())["profile"]
    print("bench: fused projections (matmuls only) ...", flush=True)
    fused = _run_child([sys.executable, __file__, "--fused-matmuls"], args.threads)
    results["fused_matmuls"] = json.loads(fused["stdout"].strip().splitlines()[-1])
    results["load_average_after"] = os.getloadavg()[0]
    return results


# Variants that switch on something petformers does not do by default; the others take away a default.
OPTIONS = ("other_dtype", "recompute", "threads_1", "compile", "regional_compile", "low_rss", "fused_projections")


def verdict(name: str, speed: float, memory: float) -> str:
    """What the row says about the lever, from the variant's throughput and memory relative to petformers."""
    if name in OPTIONS:
        gain = "faster" if speed > 1.03 else ("slower" if speed < 0.97 else "as fast")
        mem = "less memory" if memory < 0.97 else ("more memory" if memory > 1.03 else "the same memory")
        return f"option: {gain}, {mem}"
    parts = []
    if speed < 0.97:
        parts.append(f"{1 / speed:.2f}x the throughput")
    if memory > 1.03:
        parts.append(f"{1 / memory:.2f}x the memory")
    costs = []
    if speed > 1.03:
        costs.append(f"without it {speed:.2f}x the throughput")
    if memory < 0.97:
        costs.append(f"without it {memory:.2f}x the memory")
    if costs:
        return "default, but costs here: " + ", ".join(costs) + ("; buys " + ", ".join(parts) if parts else "")
    return "kept: " + (", ".join(parts) if parts else "within noise here")


def render(levers: dict) -> list[str]:
    baseline = levers.get("baseline", "petformers")  # the row the others were measured against
    base = levers.get(baseline, {})
    lines = [
        "## Levers",
        "",
        "Each row changes one thing against petformers' bench settings and trains a few steps with the same "
        "model shapes (random weights), LoRA and rows, in a process of its own (`scripts/bench_levers.py`); "
        f"the first step is a warm-up and is not timed. × is relative to the {baseline} row, from the same session. "
        "\"kept\" rows take away something petformers does: what it buys is the inverse of their ×.",
        "",
        "| variant | what changes | trained tokens/s | × | peak RSS MiB | × | verdict |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    own_baselines = {spec.get("baseline") for _, spec in VARIANTS.values()}
    for name, (what, _) in VARIANTS.items():
        x = levers.get(name)
        if not x:
            continue
        what = x.get("what", what)  # as the run that measured it described it
        if "error" in x or "skipped" in x:
            why = "failed: " + x["error"] if "error" in x else "not run: " + x["skipped"]
            lines.append(f"| {name} | {what} | {why} | | | | |")
            continue
        tps, rss = x["trained_tokens_per_s"], x["peak_rss_mib"]
        ref = levers.get(VARIANTS[name][1].get("baseline"), base)  # a variant's own baseline, where it names one
        speed = tps / ref["trained_tokens_per_s"] if ref.get("trained_tokens_per_s") else None
        memory = rss / ref["peak_rss_mib"] if ref.get("peak_rss_mib") else None
        extra = f" ({x['dtype']})" if name in ("petformers", "other_dtype") else ""
        if name in ("compile", "regional_compile"):
            extra += f"; warm-up step with the compile {x['warmup_s']:.0f} s"
        say = "" if name == baseline or name in own_baselines or speed is None else verdict(name, speed, memory)
        if name == "petformers" and baseline != "petformers":
            say = "today's default"
        lines.append(f"| {name} | {what}{extra} | {tps:.1f} | {_x(speed)} | {rss:.0f} | {_x(memory)} | {say} |")
    if levers.get("note"):
        lines += ["", levers["note"]]
    if "no_shared_prefix" in levers and "petformers_epoch" not in levers:
        lines += ["", "This run measured no_shared_prefix over 3 steps of its own rows against 3 steps of petformers' "
                      "rows: different samples, whose trained share differs row by row, so its × compares data as "
                      "much as the lever (later runs compare whole epochs, petformers_epoch)."]
    prof = levers.get("profile")
    if prof:
        lines += ["", "### Where the time goes", "",
                  f"One petformers step at the bench settings under torch.profiler (after a warm-up step; "
                  f"{prof['total_s']:.1f} s of operator time, the profiler's own overhead included): the operators "
                  "with the most self time.", "",
                  "| operator | self s | share | calls |", "| --- | ---: | ---: | ---: |"]
        lines += [f"| `{o['op']}` | {o['self_s']:.2f} | {100 * o['share']:.1f}% | {o['calls']} |" for o in prof["ops"]]
    f = levers.get("fused_matmuls")
    if f:
        lines += [
            "",
            "Fused projections, the matmuls alone (2048 tokens, forward and input gradient, fp32): q, k, v as "
            f"three products {1e3 * f['qkv_split_s']:.0f} ms, as one over the concatenated weight "
            f"{1e3 * f['qkv_fused_s']:.0f} ms; gate and up {1e3 * f['gate_up_split_s']:.0f} ms against "
            f"{1e3 * f['gate_up_fused_s']:.0f} ms. `fused_projections: true` trains so (petformers/pet/fused.py: "
            "the frozen weights views of one stacked block, LoRA added per projection)"
            + ("; the fused_projections row is what that buys in a whole training step." if "fused_projections" in levers
               else "; this run had no fused_projections row (the option came later).")
        ]
    return lines + [""]


def _x(ratio):
    return "–" if ratio is None else f"{ratio:.2f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", help="a variant's change, as JSON")
    ap.add_argument("--rows", type=Path)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--time-limit", type=float, default=600)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--fused-matmuls", action="store_true")
    args = ap.parse_args(argv)
    if args.fused_matmuls:
        print(json.dumps(fused_matmuls()))
        return 0
    result = child(json.loads(args.child), args.rows, args.steps, args.dtype, args.time_limit)
    args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
