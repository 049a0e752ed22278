"""`make bench`: petformers against its strongest peers, same model, data, LoRA, steps and lr.

Runs, one after another in this one invocation, each in a subprocess of its own (so each peak RSS is
that run's alone), every peer configured as a skilled user of it would:
  (a) hf_peft_fp32          scripts/bench_hf.py   transformers + peft, float32, micro-batch 4 x
                            accumulation 2, each micro-batch padded to its longest sample
  (b) hf_peft_fp32_grouped  the same with Trainer's group_by_length order (LengthGroupedSampler)
  (c) torchtune             scripts/bench_torchtune.py   torchtune 0.6.1's lora_finetune_single_device
                            recipe, its PackedDataset, float32
  (d) petformers            petformers run --config configs/bench/smollm2_bench.yaml   its defaults
  (e) hf_peft_bf16          (a) under torch.autocast(bfloat16), only where the hardware has bf16 matrix
                            instructions (the measured peaks say; otherwise the file says why not)
then writes docs/benchmarks.json and docs/benchmarks.md from these runs only, with the invocation's
start and end times, and prints the ratios. Re-measuring one row means running the whole bench again:
no row is kept from an earlier invocation and none is typed by hand.

Workload: the first 256 records of ../shared/data/alpaca_en_demo.json as conversations (instruction
and input as the user turn, output as the assistant turn, written to output/bench/data/train.jsonl),
rendered by each tool with the model's chat template, prompt masked, seq_length 1024; 32 optimizer
steps; the next 32 records are a held-out set whose mean token loss every run reports at the end.

    python scripts/bench.py            # the full bench (~25 min on 2 cores)
    python scripts/bench.py --quick    # 2 steps on 16 records: checks that everything runs
    python scripts/bench.py --levers   # also measure the levers (scripts/bench_levers.py)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "alpaca_en_demo.json"
CONFIG = ROOT / "configs" / "bench" / "smollm2_bench.yaml"

from petformers.allocator import find_jemalloc  # noqa: E402  (after sys.path names the repo)
RUNS = ("hf_peft_fp32", "hf_peft_fp32_grouped", "torchtune", "petformers", "hf_peft_bf16")
PEERS = ("hf_peft_fp32", "hf_peft_fp32_grouped", "torchtune")


# ---- the workload ---------------------------------------------------------------------------------

def alpaca_conversation(record: dict) -> dict:
    """An Alpaca record as an OpenAI `messages` record: instruction (+ blank line + input) -> answer."""
    user = record["instruction"] + ("\n\n" + record["input"] if record.get("input") else "")
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]}


def write_workload(out: Path, records: int, eval_records: int) -> tuple[Path, Path | None]:
    """train.jsonl (the first `records` records) and eval.jsonl (the next `eval_records`) under out/."""
    data = json.loads(DATA.read_text(encoding="utf-8"))
    if records + eval_records > len(data):
        raise SystemExit(f"bench: {DATA} has {len(data)} records, fewer than {records} + {eval_records}")
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, chunk in (("train", data[:records]), ("eval", data[records:records + eval_records])):
        path = out / f"{name}.jsonl"
        path.write_text("".join(json.dumps(alpaca_conversation(r), ensure_ascii=False) + "\n" for r in chunk),
                        encoding="utf-8")
        paths.append(path if chunk else None)
    return paths[0], paths[1]


def workload_stats(train: Path, seq_length: int, batch: int) -> dict:
    """Token counts of the training set as petformers tokenizes it (the same text the baseline renders)."""
    import numpy as np

    from petformers.checkpoint.download import download
    from petformers.checkpoint.load import load_tokenizer
    from petformers.data.prepare import prepare

    tokenizer = load_tokenizer(download("smollm2-135m-instruct"))
    ds, summary = prepare(str(train), tokenizer, seq_length, template="chat", packing=False, progress=False)
    _, packed = prepare(str(train), tokenizer, seq_length, template="chat", packing=True, shared_prefix=True,
                        progress=False)  # as the bench's petformers run packs them
    segments = ds.arrays["segment_ids"]
    lengths = (segments == 0).sum(axis=1).astype(np.int64)  # one sample per row; padding is segment 1
    padded = sum(int(lengths[i:i + batch].max()) * len(lengths[i:i + batch]) for i in range(0, len(lengths), batch))
    return {"samples": int(len(lengths)), "tokens": int(lengths.sum()), "trained_tokens": summary.trained_tokens,
            "sum_sq_lengths": int((lengths ** 2).sum()), "max_length": int(lengths.max()),
            "packed_rows": packed.rows, "shared_prefix_tokens": packed.shared_prefix_tokens,
            "padding_fraction_dynamic_batches_in_file_order": 1 - int(lengths.sum()) / padded}


# ---- model FLOPs ----------------------------------------------------------------------------------

# SmolLM2-135M: 30 layers, hidden 576, 9 query / 3 key-value heads of 64, SwiGLU 1536, vocab 49152 (tied).
LAYERS, HIDDEN, KV, FFN, VOCAB, RANK = 30, 576, 192, 1536, 49152, 16
N_BODY = LAYERS * (2 * HIDDEN * HIDDEN + 2 * HIDDEN * KV + 3 * HIDDEN * FFN)  # linear weights of the blocks
N_HEAD = HIDDEN * VOCAB
N_LORA = LAYERS * RANK * (2 * (HIDDEN + HIDDEN) + 2 * (HIDDEN + KV))  # A and B of wq, wo, wk, wv

FLOPS_DOC = (
    "Model FLOPs are the useful work of one LoRA training pass, the same formula for every run: for each "
    "real (non-padding) token, 4·N_body (forward 2·N, backward 2·N for the activation gradients; the frozen "
    "base needs no weight gradients) + 6·N_lora (forward, backward, weight gradients of the adapters); for "
    "each trained token, 4·N_head (lm_head forward and backward: the logits of masked positions are not "
    "needed); for each sample of L tokens, 6·L²·d·layers of causal attention (forward 2·L²·d, backward "
    "4·L²·d, d = 576). N_body = {body:,} (block linear weights), N_head = {head:,}, N_lora = {lora:,}. "
    "Padding, masked-position logits and recomputation are not counted: they are overhead, not work. "
    "Every sample is counted with its whole prompt: a run that computes less (petformers' shared prefix "
    "computes the prompt's common start once per row) gets the same count, so its MFU is a rate of the "
    "workload's model FLOPs, above what its matmuls did. "
    "Divided by the run's trained tokens, the workload gives a fixed cost per trained token, so "
    "MFU = trained tokens/s × FLOPs per trained token / matmul peak of the run's compute dtype "
    "(fp32 or bf16).").format(body=N_BODY, head=N_HEAD, lora=N_LORA)


def flops_per_trained_token(stats: dict) -> float:
    total = ((4 * N_BODY + 6 * N_LORA) * stats["tokens"] + 4 * N_HEAD * stats["trained_tokens"]
             + 6 * HIDDEN * LAYERS * stats["sum_sq_lengths"])
    return total / stats["trained_tokens"]


# ---- the machine ----------------------------------------------------------------------------------

def matmul_peak(threads: int, size: int = 2048, seconds: float = 3.0) -> dict:
    """Best GFLOP/s of a size x size matmul loop in float32 and bfloat16 (run in a child process)."""
    out = _run_child([sys.executable, __file__, "--measure-peak", str(size), str(seconds)], threads)
    return json.loads(out["stdout"].strip().splitlines()[-1])


def _measure_peak(size: int, seconds: float) -> dict:
    """Best GFLOP/s of size x size products, over the three operand layouts a linear layer's forward and
    backward use (A·B, A·Bᵀ, Aᵀ·B): where a dtype has no fast kernel (bf16 without AVX512-BF16/AMX) they
    differ 20x. A layout so slow that one product would take over ~4 s is measured on smaller matrices
    (the rate hardly depends on size once it is that slow)."""
    import torch

    result = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        best = 0.0
        for layout in ("nn", "nt", "tn"):
            def product(a, b, layout=layout):
                return torch.mm(a.t() if layout == "tn" else a, b.t() if layout == "nt" else b)

            probe = torch.randn(256, 256, dtype=dtype)
            product(probe, probe)  # the first call pays for thread start-up
            t0 = time.perf_counter()
            product(probe, probe)
            n, probe_s = size, time.perf_counter() - t0
            while n > 256 and probe_s * (n / 256) ** 3 > 4.0:
                n //= 2
            a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
            product(a, b)
            deadline = time.perf_counter() + seconds / 3
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                product(a, b)
                best = max(best, 2 * n ** 3 / (time.perf_counter() - t0))
        result[name] = best / 1e9
    return result


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch
    import transformers

    try:
        import peft
        peft_version = peft.__version__
    except ImportError:
        peft_version = "not installed"
    malloc = f"every run on jemalloc ({JEMALLOC})" if JEMALLOC else "every run on glibc's malloc (no jemalloc installed)"
    return (f"{cpu}, {os.cpu_count()} logical CPUs, Linux {platform.release()}, Python {platform.python_version()}, "
            f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft_version}; {malloc}")


# ---- running a child ------------------------------------------------------------------------------

JEMALLOC = find_jemalloc()

def _run_child(cmd: list[str], threads: int, log: Path | None = None, cwd: Path = ROOT,
               allocator: str = "auto", time_limit: float | None = None,
               memory_limit_mib: float | None = None) -> dict:
    """Run cmd; wall seconds, peak RSS (MiB) of that child alone (wait4), exit code, stdout.
    `allocator`: "auto" runs it on jemalloc where installed, "glibc" on glibc's malloc (the allocator lever).
    `time_limit` (s) / `memory_limit_mib` (resident): the child is killed once past either, so one slow or
    huge run cannot stall the bench or push the machine into its OOM killer; `stopped` says which limit
    ("time", "memory"; None when the child ended by itself)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), TQDM_DISABLE="1")
    if allocator == "glibc":
        env["PETFORMERS_ALLOCATOR"] = "glibc"
    elif JEMALLOC:  # the peers too, as PyTorch's CPU performance guide tells their users
        env["LD_PRELOAD"] = JEMALLOC + (os.pathsep + env["LD_PRELOAD"] if env.get("LD_PRELOAD") else "")
    started = time.perf_counter()
    out_fh = open(log, "w") if log else subprocess.PIPE
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=out_fh if log else None,
                            text=True)
    captured: list[str] = []
    reader = threading.Thread(target=lambda: captured.append(proc.stdout.read()), daemon=True)
    reader.start()
    watched = bool(time_limit or memory_limit_mib)
    stopped = None
    while True:  # poll (when watched) so that the child is killed before it is reaped: its pid stays its own
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG if watched else 0)
        if pid:
            break
        if stopped is None and time_limit and time.perf_counter() - started > time_limit:
            stopped = "time"
        elif stopped is None and memory_limit_mib and _rss_mib(proc.pid) > memory_limit_mib:
            stopped = "memory"
        if stopped:
            proc.kill()
        time.sleep(0.25)
    reader.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if log:
        out_fh.close()
    return {"wall_s": time.perf_counter() - started, "peak_rss_mib": usage.ru_maxrss / 1024,
            "rc": proc.returncode, "stdout": "".join(captured), "stopped": stopped}


def _rss_mib(pid: int) -> float:
    """A running process's resident memory now (VmRSS), 0 when it cannot be read (it has just ended)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0.0


def run_hf(name: str, dtype: str, args, train: Path, eval_path: Path | None, out: Path,
           grouped: bool = False) -> dict:
    """transformers + peft (scripts/bench_hf.py) in a process of its own."""
    result_file = out / f"{name}.json"
    steps, batch = args.steps, args.batch_size
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_hf.py"), "--data", str(train), "--dtype", dtype,
           "--steps", str(steps), "--batch-size", str(batch), "--micro-batch", str(min(batch, args.micro_batch)),
           "--seq-length", str(args.seq_length),
           "--lr", str(args.lr), "--threads", str(args.threads),
           "--out", str(result_file)]
    if eval_path:
        cmd += ["--eval-data", str(eval_path)]
    if grouped:
        cmd += ["--group-by-length"]
    child = _run_child(cmd, args.threads, out / f"{name}.log")
    if child["rc"] != 0:
        raise SystemExit(f"bench: {name} failed (exit {child['rc']}); see {out / f'{name}.log'}")
    r = json.loads(result_file.read_text())
    return {"trained_tokens_per_s": r["trained_tokens_per_s"], "wall_s": child["wall_s"],
            "peak_rss_mib": child["peak_rss_mib"], "final_loss": r["final_loss"], "eval_loss": r["eval_loss"],
            "train_s": r["train_s"], "trained_tokens": r["trained_tokens"], "real_tokens": r["real_tokens"],
            "computed_positions": r["computed_positions"], "steps": r["steps"], "stopped_early": r["stopped_early"],
            "samples_per_step": r["samples_per_step"], "micro_batch": r["micro_batch"], "first_loss": r["first_loss"],
            "losses": r["losses"], "command": " ".join(os.path.relpath(c, ROOT) if os.path.isabs(c) else c
                                                       for c in cmd[1:])}


def run_torchtune(args, train: Path, eval_path: Path | None, out: Path) -> dict:
    """torchtune's own recipe (scripts/bench_torchtune.py); its peak RSS is the `tune run` process's."""
    result_file = out / "torchtune.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_torchtune.py"), "--data", str(train), "--steps",
           str(args.steps), "--grad-accum", "2", "--seq-length", str(args.seq_length), "--lr", str(args.lr),
           "--threads", str(args.threads), "--work", str(out / "torchtune"), "--out", str(result_file),
           "--dtype", "bf16" if args.bf16_hardware else "fp32"]  # what a torchtune user picks on this hardware
    if eval_path:
        cmd += ["--eval-data", str(eval_path)]
    child = _run_child(cmd, args.threads, out / "torchtune.log")
    if child["rc"] != 0:
        raise SystemExit(f"bench: torchtune failed (exit {child['rc']}); see {out / 'torchtune.log'}")
    r = json.loads(result_file.read_text())
    return {**{k: r[k] for k in ("trained_tokens_per_s", "peak_rss_mib", "final_loss", "eval_loss", "train_s",
                                 "trained_tokens", "steps", "first_loss", "losses", "step_tokens_per_s")},
            "wall_s": child["wall_s"], "runner": r["runner"], "compute_dtype": r["compute_dtype"],
            "command": " ".join(os.path.relpath(c, ROOT) if os.path.isabs(c) else c for c in cmd[1:])}


def compute_dtype_for() -> str:
    """What the bench config's `compute_dtype: auto` resolves to here (petformers/hardware.py): bf16 where
    the hardware has bf16 matrix instructions (AVX512-BF16, AMX, CUDA), else fp32."""
    from petformers.hardware import auto_compute_dtype

    return auto_compute_dtype()


def petformers_command(args, train: Path, eval_path: Path | None, out_dir: Path, overrides=()) -> list[str]:
    cmd = [sys.executable, "-m", "petformers", "run", "--config", str(args.config), "--train_dataset_dir", str(train),
           "--output_dir", str(out_dir), "--do_eval", "True" if eval_path else "False"]
    if eval_path:
        cmd += ["--eval_dataset_dir", str(eval_path)]
    # Enough epochs of rows for max_steps whatever the packing gives; the schedule spans max_steps.
    return cmd + [f"max_steps={args.steps}", f"runner_config.epochs={args.steps}",
                  f"model.model_config.seq_length={args.seq_length}", f"lr_schedule.learning_rate={args.lr}",
                  *([f"model.model_config.compute_dtype={args.compute_dtype}"] if args.compute_dtype_given else []),
                  *overrides]


def run_petformers(args, train: Path, eval_path: Path | None, out: Path, name: str = "petformers",
                   overrides=(), threads: int | None = None) -> dict:
    run_dir = out / name
    cmd = petformers_command(args, train, eval_path, run_dir, overrides)
    child = _run_child(cmd, threads or args.threads, out / f"{name}.log")
    if child["rc"] != 0:
        raise SystemExit(f"bench: {name} failed (exit {child['rc']}); see {out / f'{name}.log'}")
    summary = json.loads((run_dir / "run_summary.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in records if "loss" in r]
    shown = [os.path.relpath(c, ROOT) if os.path.isabs(c) else c for c in cmd[2:]]
    return {"trained_tokens_per_s": summary["trained_tokens_per_s"], "wall_s": child["wall_s"],
            "peak_rss_mib": child["peak_rss_mib"], "final_loss": summary["final_loss"],
            "eval_loss": summary.get("eval_loss"), "train_s": summary["train_seconds"],
            "trained_tokens": summary["trained_tokens"], "steps": summary["steps"],
            "rows_per_step": summary["global_batch"], "first_loss": summary["first_loss"],
            "losses": [r["loss"] for r in steps], "compute_dtype": args.compute_dtype,
            "step_tokens_per_s": [r["tokens_per_s"] for r in steps],
            "command": " ".join(shown)}


# ---- the report -----------------------------------------------------------------------------------

def ratios(runs: dict) -> dict:
    """petformers against each peer that ran (throughput and peak RSS), and which peer is the strongest."""
    pf = runs.get("petformers")
    measured = {n: x for n, x in runs.items() if x and not x.get("skipped") and not x.get("reduced")}
    out = {}
    for name in (*PEERS, "hf_peft_bf16"):
        x = measured.get(name)
        if pf and x:
            out[f"throughput_vs_{name}"] = pf["trained_tokens_per_s"] / x["trained_tokens_per_s"]
            out[f"peak_memory_vs_{name}"] = pf["peak_rss_mib"] / x["peak_rss_mib"]
    peers = [n for n in (*PEERS, "hf_peft_bf16") if n in measured]
    if peers:
        out["strongest_peer"] = max(peers, key=lambda n: measured[n]["trained_tokens_per_s"])
    return out


def _fmt(x, spec=".1f"):
    return "–" if x is None else format(x, spec)


TITLES = {"hf_peft_fp32": "(a) transformers + peft, fp32, dynamic padding",
          "hf_peft_fp32_grouped": "(b) transformers + peft, fp32, group_by_length",
          "torchtune": "(c) torchtune 0.6.1 LoRA recipe, packed",
          "petformers": "(d) petformers, defaults",
          "hf_peft_bf16": "(e) transformers + peft, bf16 autocast"}


def _targets(r: dict, runs: dict, report: dict) -> list[str]:
    """Issue 18's targets against this invocation's runs."""
    def verdict(ok):
        return "–" if ok is None else ("met" if ok else "**not met**")

    pf = runs.get("petformers") or {}
    bound = best_peak(report)["fp32"] * 1e9 / report["flops_per_trained_token"]
    tps, rss = pf.get("trained_tokens_per_s"), pf.get("peak_rss_mib")
    rows = ["| target (issue 18) | measured | |", "| --- | ---: | --- |"]
    rows.append(f"| ≥ 80% of the fp32 peak: ≥ {0.8 * bound:.0f} trained tokens/s | {_fmt(tps)} "
                f"({_fmt(pf.get('mfu') and 100 * pf['mfu'])}%"
                + (" of the bf16 peak: a bf16 run" if pf.get("compute_dtype") == "bfloat16" else "")
                + f") | {verdict(None if tps is None else tps >= 0.8 * bound)} |")
    fp32 = ((report.get("levers") or {}).get("other_dtype") or {})
    if pf.get("compute_dtype") == "bfloat16" and fp32.get("dtype") == "float32":
        f_tps = fp32["trained_tokens_per_s"]
        rows.append(f"| the same in fp32 (the other_dtype lever: random weights, {fp32['steps_timed']} steps) | "
                    f"{f_tps:.1f} ({100 * f_tps / bound:.0f}% of the fp32 peak) | "
                    f"{verdict(f_tps >= 0.8 * bound)} |")
    for name, factor in (("hf_peft_fp32_grouped", 2), ("hf_peft_fp32", 3), ("torchtune", 1)):
        x = r.get(f"throughput_vs_{name}")
        ok = None if x is None else (x > factor if factor == 1 else x >= factor)
        rows.append(f"| {'ahead of' if factor == 1 else f'≥ {factor}×'} {TITLES[name][4:]} | {_fmt(x, '.2f')}× | "
                    f"{verdict(ok)} |")
    rows.append(f"| peak RSS ≤ 2.1 GiB | {_fmt(rss and rss / 1024, '.2f')} GiB | "
                f"{verdict(None if rss is None else rss <= 2.1 * 1024)} |")
    base = runs.get("hf_peft_fp32_grouped") or {}
    gap = pf["eval_loss"] - base["eval_loss"] if pf.get("eval_loss") and base.get("eval_loss") else None
    rows.append(f"| held-out loss within noise of (b)'s | {_fmt(gap, '+.4f')} | see the workload |")
    return rows


OP_GROUPS = (("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")),
             ("attention", ("aten::_scaled_dot_product",)),
             ("dropout", ("aten::bernoulli_",)))


def _why_below_peak(report: dict) -> list[str]:
    """Why the throughput stays below the matmul peak, from this invocation's profiled step (the levers'
    `profile`): the share of operator time in matrix products against the rest. Nothing without a profile."""
    prof = (report.get("levers") or {}).get("profile")
    if not prof:
        return []
    shares = {name: sum(o["share"] for o in prof["ops"] if o["op"].startswith(prefixes))
              for name, prefixes in OP_GROUPS}
    listed = sum(o["share"] for o in prof["ops"])
    rest = listed - sum(shares.values())
    return [
        "**Why below the peak** (the profiled step under *Where the time goes*): matrix products, the only "
        f"operators that can run at the matmul peak, take {100 * shares['matmul']:.0f}% of its operator "
        f"time; attention kernels take {100 * shares['attention']:.0f}%, dropout's random masks for "
        f"the LoRA inputs {100 * shares['dropout']:.0f}% (torch's CPU bernoulli_, as in transformers + "
        "peft's nn.Dropout), and the other operators of the "
        f"profile's top list (elementwise products, copies, sums) {100 * rest:.0f}%, the unlisted ones "
        f"{100 * (1 - listed):.0f}%. A run at 80% of the peak needs the products to take about 80% of the time "
        "at the peak rate; everything else here runs far below it, limited by memory bandwidth or by one core.",
        ""]


KEPT_BEGIN, KEPT_END = "<!-- section:", "<!-- end of section -->"


def kept_sections(path: Path) -> str:
    """Sections other scripts wrote into benchmarks.md (scripts/qlora_memory.py), between
    `<!-- section: NAME -->` and `<!-- end of section -->`: kept as they are when this bench rewrites the file."""
    if not path.exists():
        return ""
    text, out, start = path.read_text(encoding="utf-8"), [], 0
    while (begin := text.find(KEPT_BEGIN, start)) >= 0 and (end := text.find(KEPT_END, begin)) >= 0:
        out.append("\n" + text[begin:end + len(KEPT_END)] + "\n")
        start = end + len(KEPT_END)
    return "".join(out)


def render_markdown(report: dict) -> str:
    runs, r, w, settings = report["runs"], report["ratios"], report["workload"], report["settings"]
    peak = best_peak(report)
    slow_bf16 = not report.get("bf16_hardware", peak["bf16"] >= peak["fp32"])
    lines = [
        "# Benchmarks",
        "",
        "LoRA fine-tuning of SmolLM2-135M-Instruct: petformers against what a user would otherwise run "
        "(transformers + peft configured as a skilled user would, and torchtune's own LoRA recipe), on the same "
        "machine, one run after another, each in a process of its own. Every row below comes from one "
        f"invocation of `make bench` (`scripts/bench.py`), started {report['started']} and ended "
        f"{report.get('ended', '–')}; no row is carried over from another run."
        + (f" This text was written again from that run's benchmarks.json on {report['rendered']} "
           "(`scripts/bench.py --render`: the prose changed, no figure did)." if report.get("rendered") else ""),
        "",
        f"Machine: {report['machine']}; {report['threads']} threads per run. Measured matmul peak "
        f"({report['peak_matmul']}; the better of the measurements before and after the runs, since other work "
        f"on the cores only lowers it): **{peak['fp32']:.1f} GFLOP/s fp32**, **{peak['bf16']:.1f} GFLOP/s bf16**.",
        "",
        "| run | trained tokens/s | wall s | peak RSS MiB | final loss | held-out loss | MFU |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in RUNS:
        x = runs.get(name)
        if x and x.get("skipped"):
            lines.append(f"| {TITLES[name]}: not run ({x['skipped']}) | – | – | – | – | – | – |")
        elif x:
            steps = (f" (its first {'step' if x['steps'] == 1 else str(x['steps']) + ' steps'} only, "
                     f"{x['samples_per_step']} samples each)") if x.get("reduced") else ""
            dtype = f" ({x['compute_dtype']})" if name in ("petformers", "torchtune") else ""
            lines.append(f"| {TITLES[name]}{dtype}{steps} | {x['trained_tokens_per_s']:.1f} | {x['wall_s']:.0f} | "
                         f"{x['peak_rss_mib']:.0f} | {x['final_loss']:.4f} | {_fmt(x.get('eval_loss'), '.4f')} | "
                         f"{100 * x['mfu']:.1f}% |")
    strongest = r.get("strongest_peer")
    if strongest:
        lines += ["", f"The strongest peer here is {TITLES[strongest][4:]}: petformers runs "
                      f"{r['throughput_vs_' + strongest]:.2f}× its trained tokens/s at "
                      f"{r['peak_memory_vs_' + strongest]:.2f}× its peak memory."]
    lines += ["", *_targets(r, runs, report), "", *_why_below_peak(report)]
    if slow_bf16:
        lines += [
            "**bf16 on this CPU.** It has no bf16 matrix instructions (AVX2 only: no AVX512-BF16, no AMX): "
            f"torch multiplies bf16 through a fallback {peak['fp32'] / max(peak['bf16'], 1e-9):.0f}× slower than "
            "fp32 at best (the measured peaks above), so no bf16 row is run here, and petformers computes in "
            "float32: the bench config's `compute_dtype: auto` (petformers/hardware.py) picks bfloat16 only where "
            "the hardware has bf16 matrix instructions (AVX512-BF16, AMX, CUDA).",
            "",
        ]
    lines += [
        "## The workload",
        "",
        "- Model: SmolLM2-135M-Instruct, real weights (the Q4_1 GGUF, dequantised to float32 by each tool's "
        "loader). LoRA r 16, alpha 16, dropout 0.05 on q, k, v, o: 1,843,200 trainable parameters.",
        f"- Data: the first {w['samples']} records of `../shared/data/alpaca_en_demo.json`, instruction (and "
        "input) as the user turn, output as the assistant turn, rendered with the model's chat template "
        f"(its default system prompt included), the prompt masked, seq_length {settings['seq_length']}: "
        f"{w['tokens']:,} tokens, {w['trained_tokens']:,} of them trained, the longest sample {w['max_length']}. "
        "tests/test_bench_correctness.py checks that transformers' chat template and petformers produce the "
        "same tokens and trained positions; torchtune is fed the tokens transformers' template gives.",
        f"- {settings['steps']} optimizer steps, AdamW (0.9, 0.999, eps 1e-8, no weight decay), lr "
        f"{settings['lr']:g} cosine with 3% warm-up, gradient clipping at 1.0.",
    ]
    for key in ("hf_peft_fp32", "hf_peft_fp32_grouped"):
        if key in runs:
            a = runs[key]
            lines.append(
                f"- {TITLES[key][:3]}: {settings['batch_size']} samples per step as {a['micro_batch']}"
                f"-sample micro-batches, each padded to its longest sample"
                + (", in transformers' LengthGroupedSampler order" if key.endswith("grouped") else ", shuffled")
                + f": computed {a['computed_positions']:,} positions for {a['trained_tokens']:,} trained tokens "
                f"({100 * (1 - a['real_tokens'] / a['computed_positions']):.0f}% padding), and logits for every one.")
    if "torchtune" in runs:
        lines.append("- (c): torchtune's `lora_finetune_single_device` recipe, with the config bench_torchtune.py "
                     "writes (Llama-3.2 LoRA builder with SmolLM2's shapes and unscaled rope, HF checkpointer, "
                     "`PackedDataset` rows of seq_length, batch 1 × gradient accumulation 2, fused AdamW, "
                     "chunked cross-entropy); its held-out loss is computed over its PEFT-format adapter by "
                     "transformers + peft, with the same rule as (a) and (b).")
    if "petformers" in runs:
        c = runs["petformers"]
        epochs = settings["steps"] * c["rows_per_step"] / w["packed_rows"]
        lines.append(
            f"- (d): packing puts the {w['samples']} samples in {w['packed_rows']} rows of {settings['seq_length']}"
            + (f", each starting with the {w['shared_prefix_tokens']} tokens every sample starts with (the shared "
               "prefix, once per row instead of once per sample)" if w.get("shared_prefix_tokens") else "") +
            f" (a step is {c['rows_per_step']} rows: batch_size 1 × gradient_accumulation_steps "
            f"{c['rows_per_step']}, ≈ {w['samples'] / w['packed_rows'] * c['rows_per_step']:.1f} samples against "
            f"the peers' {settings['batch_size']}), so the same {settings['steps']} "
            f"steps cover {epochs:.2f} epochs: {c['trained_tokens']:,} trained tokens"
            + (f" against (a)'s {runs['hf_peft_fp32']['trained_tokens']:,}" if "hf_peft_fp32" in runs else "")
            + ". Throughput is per trained token, so this does not favour either side; the held-out loss "
            "benefits from the extra samples.")
    lines += [
        "- Final loss: the training loss of the last step (a different batch in each run). Held-out loss: "
        f"the mean token loss of the next {settings['eval_records']} records after training, the same "
        "samples for every run: the number to compare. Differences between runs include "
        "dropout and data order, and packed runs see a few more samples (above).",
        "- Peak RSS: `ru_maxrss` of each run's own process (`os.wait4`), model loading included. Wall: the "
        "whole process, loading included; throughput: the training loop only.",
        "",
        "## MFU",
        "",
        FLOPS_DOC + f" Here: {report['flops_per_trained_token'] / 1e9:.2f} GFLOP per trained token. An fp32 "
        "run cannot go above the fp32 peak: on this CPU, a run at 100% MFU would be "
        f"{peak['fp32'] * 1e9 / report['flops_per_trained_token']:.0f} trained tokens/s.",
        "",
        "## Noise",
        "",
        report.get("noise_note", ""),
        "",
        "## How to reproduce",
        "",
        "```",
        "make bench                                    # every run above, then this file and docs/benchmarks.json",
        ".venv/bin/python scripts/bench.py --quick     # 2 steps on 16 records: checks that it all runs",
        ".venv/bin/python scripts/bench.py --levers    # the runs and the levers, in one invocation",
        "```",
        "",
        "Logs and each run's own results are kept in `output/bench/`. The runs' commands:",
        "",
        "```",
        *[runs[n]["command"] for n in RUNS if runs.get(n, {}).get("command")],
        "```",
        "",
    ]
    lines += CHANGES + render_levers(report.get("levers")) + GPU_NOTE
    return "\n".join(lines) + "\n"


CHANGES = [
    "## What petformers does for speed and memory",
    "",
    "- Packing (best-fit decreasing, `packing: True`): rows of 1024 tokens hold ~5 samples each, "
    "~2% padding instead of the ~50% of padded batches; attention is computed sample by sample "
    "(`segment_attention` in petformers/models/llama.py), causal within each sample, so packed samples "
    "never see each other and attention costs sum(L²)/2 instead of the T² of a masked row.",
    "- Shared prefix (`shared_prefix: True`, with packing): every sample of the bench starts with the same "
    "tokens (the chat template's system prompt, the user header and the Alpaca prompt's first sentence); "
    "each row holds them once, and each sample attends to them with its positions continuing after them "
    "(petformers/data/packing.py, `segment_attention`): the same loss and gradients, fewer tokens through "
    "every layer (tests/test_shared_prefix.py).",
    "- Cross-entropy only over trained positions, in chunks, never float32 logits for the whole batch; with "
    "the frozen lm_head of LoRA the gradient for the hidden states is computed in the same pass "
    "(`_FrozenHeadCrossEntropy` in petformers/train/loss.py): lm_head runs twice per chunk instead of three "
    "times, and no logits are kept for backward.",
    "- jemalloc for every run (`petformers` re-executes itself on it where installed, petformers/allocator.py; "
    "the peers here run on it too): glibc keeps a training run's freed activations in its heaps, ~2x the "
    "tensors alive. Returning them to the OS at once under glibc (`PETFORMERS_LOW_RSS=1`) costs ~1.5x the "
    "time instead (each activation lands on fresh pages the kernel must zero).",
    "- Backward keeps less (petformers/models/lean_ops.py): SwiGLU keeps w1x and w3x, not silu(w1x); LoRA's "
    "dropout keeps a one-byte mask; RMSNorm keeps x and 1/rms.",
    "- In bf16/fp16 on CPU, training attention pads each sample's length to a multiple of 64 (zeros after "
    "its last token, which causal attention never reads): torch's CPU flash-attention backward keeps ~6 MiB "
    "for every distinct length it has seen, and packed samples bring new lengths nearly every step "
    "(without it this bench's petformers RSS grew from 1.5 to 2.4 GiB over its first 23 steps).",
    "- Grouped-query attention without repeating keys and values (`enable_gqa`, CPU), and one additive "
    "mask shared by all layers where a mask is needed (generation).",
    "- The LoRA update added to the frozen layer's output in one `addmm` (`LoRALinear.add_update`): no "
    "separate scale and add passes over [tokens, out_features] in forward and backward.",
    "- Fused projections on request (`model.model_config.fused_projections: true`, petformers/pet/fused.py): "
    "each layer's q/k/v, and w1/w3, as one matmul over their frozen weights, stacked once into one storage "
    "that the weights are views of (no copy), each LoRA added to its own slice of the output. Off by "
    "default: on this machine a training step at the bench's shapes was no faster (the fused_projections "
    "row of the levers).",
    "- bf16 frozen base with float32 adapters where the hardware multiplies bf16 fast (`compute_dtype: auto`, "
    "petformers/hardware.py).",
    "",
]

GPU_NOTE = [
    "## GPU",
    "",
    "Not measured here: the machine that ran this bench has no GPU. Prepared for one: "
    "`scripts/bench_gpu.py` runs Llama2-7B-shaped random weights at seq_length 4096, batch 1, LoRA r16 on "
    "wq/wk/wv/wo, petformers then transformers + peft, each in its own process (trained tokens/s, peak GiB, "
    "MFU against the measured bf16 peak); tests/test_bench_gpu_script.py runs it scaled down on the CPU. "
    "On CUDA the main bench also runs unchanged (bench_hf.py and petformers use the GPU when torch sees one).",
    "",
]


def render_levers(levers: dict | None) -> list[str]:
    if not levers:
        return ["## Levers", "", "Not measured yet: `scripts/bench.py --levers`.", ""]
    from bench_levers import render

    return render(levers)


def best_peak(report: dict) -> dict:
    """Per dtype, the better of the matmul peaks measured before and after the runs: other work sharing the
    cores only lowers a measurement, and MFU and the targets need the machine's peak."""
    before, after = report["matmul_peak_gflops"], report.get("matmul_peak_gflops_after") or {}
    return {k: max(v, after.get(k, v)) for k, v in before.items()}


def finish(report: dict, docs: Path):
    stats, peak = report["workload"], best_peak(report)
    per_token = flops_per_trained_token(stats)
    report["flops_per_trained_token"] = per_token
    for name, run in report["runs"].items():
        if run.get("skipped"):
            continue
        dtype = "bf16" if run.get("compute_dtype", "bfloat16" if name == "hf_peft_bf16" else "float32") \
            == "bfloat16" else "fp32"
        run["mfu"] = run["trained_tokens_per_s"] * per_token / (peak[dtype] * 1e9)
    report["ratios"] = ratios(report["runs"])
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "benchmarks.json").write_text(json.dumps(report, indent=2) + "\n")
    (docs / "benchmarks.md").write_text(render_markdown(report) + kept_sections(docs / "benchmarks.md"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="petformers vs its peers (docs/benchmarks.md), all rows from one invocation")
    ap.add_argument("--quick", action="store_true", help="2 steps on 16 records, results under output/bench-quick")
    ap.add_argument("--records", type=int, default=256)
    ap.add_argument("--eval-records", type=int, default=32)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8, help="samples per optimizer step of transformers + peft")
    ap.add_argument("--micro-batch", type=int, default=4, help="samples per forward pass of transformers + peft")
    ap.add_argument("--seq-length", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--config", type=Path, default=CONFIG)
    ap.add_argument("--compute-dtype", choices=["bfloat16", "float32"],
                    help="petformers' compute dtype (default: the config's `auto`, bfloat16 where the hardware "
                         "has bf16 matrix instructions)")
    ap.add_argument("--levers", action="store_true", help="also measure the levers (bench_levers.py)")
    ap.add_argument("--render", action="store_true",
                    help="measure nothing: write benchmarks.md again from the last run's benchmarks.json (after a "
                         "change of the prose); every figure stays that run's")
    ap.add_argument("--out", type=Path, help="working directory (default output/bench)")
    ap.add_argument("--docs", type=Path, help="where benchmarks.md/json go (default docs/; --quick: the work dir)")
    ap.add_argument("--measure-peak", nargs=2, metavar=("SIZE", "SECONDS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.compute_dtype_given = args.compute_dtype is not None
    args.compute_dtype = args.compute_dtype or compute_dtype_for()  # what the config's `auto` resolves to here
    if args.measure_peak:
        print(json.dumps(_measure_peak(int(args.measure_peak[0]), float(args.measure_peak[1]))))
        return 0
    if args.quick:
        args.records, args.eval_records, args.steps = 16, 8, 2
    out = (args.out or ROOT / "output" / ("bench-quick" if args.quick else "bench")).resolve()
    docs = args.docs or (out if args.quick else ROOT / "docs")
    if args.render:
        report = json.loads((docs / "benchmarks.json").read_text())
        levers = report.get("levers") or {}
        if "qkv_split_s" in levers.get("fused_projections", {}):  # a run from before the key was renamed
            levers["fused_matmuls"] = levers.pop("fused_projections")
        report["rendered"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        finish(report, docs)
        print(f"bench: wrote {docs / 'benchmarks.md'} again from {docs / 'benchmarks.json'}")
        return 0
    train, eval_path = write_workload(out / "data", args.records, args.eval_records)

    print(f"bench: measuring the matmul peak ({args.threads} threads)", flush=True)
    started = datetime.datetime.now(datetime.timezone.utc)
    report = {"date": started.date().isoformat(), "started": started.isoformat(timespec="seconds"),
              "machine": machine(), "threads": args.threads,
              "peak_matmul": "best of 2048×2048 torch.mm loops over the layouts A·B, A·Bᵀ, Aᵀ·B, 3 s per dtype",
              "matmul_peak_gflops": matmul_peak(args.threads), "runs": {}, "ratios": {},
              "settings": {"records": args.records, "eval_records": args.eval_records, "steps": args.steps,
                           "batch_size": args.batch_size, "micro_batch": args.micro_batch,
                           "seq_length": args.seq_length, "lr": args.lr,
                           "petformers_compute_dtype": args.compute_dtype},
              "workload": workload_stats(train, args.seq_length, args.batch_size)}
    peak = report["matmul_peak_gflops"]
    # bf16 rows only where the hardware has bf16 matrix instructions (petformers/hardware.py decides, not the
    # measured peaks, which a busy machine can skew either way).
    slow_bf16 = compute_dtype_for() != "bfloat16"
    report["bf16_hardware"] = args.bf16_hardware = not slow_bf16
    load_before = os.getloadavg()[0]
    for name in RUNS:
        if name == "hf_peft_bf16" and slow_bf16:
            report["runs"][name] = {"skipped": "this CPU has no bf16 matrix instructions (no AVX512-BF16, no AMX): "
                                               f"bf16 {peak['bf16']:.1f} against fp32 {peak['fp32']:.1f} GFLOP/s"}
            continue
        report["runs"][name] = _measure_run(name, args, train, eval_path, out)
        report["runs"][name]["measured"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        report["runs"][name]["load_average_after"] = os.getloadavg()[0]  # 1 minute: other work beside this run
    report["load_average"] = {"before": load_before, "after_1min": os.getloadavg()[0]}
    print("bench: measuring the matmul peak again", flush=True)
    report["matmul_peak_gflops_after"] = matmul_peak(args.threads)
    if args.levers:
        from bench_levers import measure_levers

        report["levers"] = measure_levers(args, train, eval_path, out)
    report["ended"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    report["noise_note"] = noise_note(report)
    finish(report, docs)
    print(json.dumps(report["ratios"], indent=2))
    print(f"bench: wrote {docs / 'benchmarks.md'} and {docs / 'benchmarks.json'}")
    return 0


def _measure_run(name: str, args, train: Path, eval_path: Path | None, out: Path) -> dict:
    print(f"bench: {name} ...", flush=True)
    if name == "petformers":
        x = run_petformers(args, train, eval_path, out)
    elif name == "torchtune":
        x = run_torchtune(args, train, eval_path, out)
    else:
        x = run_hf(name, "bf16" if name == "hf_peft_bf16" else "fp32", args, train, eval_path, out,
                   grouped=name.endswith("grouped"))
    print(f"bench: {name}: {x['trained_tokens_per_s']:.1f} trained tokens/s, {x['wall_s']:.0f} s, "
          f"{x['peak_rss_mib']:.0f} MiB, final loss {x['final_loss']:.4f}, held-out {x.get('eval_loss')}", flush=True)
    return x


def noise_note(report: dict) -> str:
    """How much other work shared the cores: load average, the fp32 peak before and after, the spread of
    petformers' step throughput (each step is 2 rows of 1024 positions, but the trained share of a row varies
    with its prompts, so part of the spread is the data), and which runs were re-measured later."""
    load, before, after = report["load_average"], report["matmul_peak_gflops"], report["matmul_peak_gflops_after"]
    text = (f"This machine's {os.cpu_count()} cores are shared with other work. The 1-minute load average was "
            f"{load['before']:.1f} when the bench started and {load['after_1min']:.1f} when it ended (the bench "
            f"alone makes it ~{report['threads']}); the fp32 matmul peak was {before['fp32']:.1f} GFLOP/s before "
            f"the runs and {after['fp32']:.1f} after.")
    per_run = [(n, r["load_average_after"]) for n, r in report["runs"].items() if "load_average_after" in r]
    if per_run:
        text += " The load average at the end of each run: " + ", ".join(f"{n} {x:.1f}" for n, x in per_run) + "."
    steps = report["runs"].get("petformers", {}).get("step_tokens_per_s") or []
    if len(steps) > 2:
        ordered = sorted(steps)
        text += (f" petformers' steps ran at {ordered[0]:.0f} to {ordered[-1]:.0f} trained tokens/s (median "
                 f"{ordered[len(ordered) // 2]:.0f}).")
    return text + (" Differences of a few percent between runs are within this noise; the ratios compare runs "
                   "of this one invocation.")


if __name__ == "__main__":
    sys.exit(main())
