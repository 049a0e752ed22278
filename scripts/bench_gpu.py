"""The GPU part of issue 8: LoRA on Llama2-7B-shaped random weights, petformers against transformers + peft.

One process per runner (so each peak memory is its own): seq_length 4096, batch 1, LoRA r16 / alpha 16
on wq/wk/wv/wo (q/k/v/o_proj), bf16 frozen base, fp32 adapters, AdamW. Random weights and random tokens:
speed and memory do not depend on their values, and no 13 GB download is needed. Reports trained
tokens/s (every position is trained: no padding), peak GiB (torch.cuda.max_memory_allocated) and MFU
against the device's measured bf16 matmul peak. Reference points (issue 8): MindFormers 5,217 tokens/s
per Ascend 910B for this job; torchtune 3,083 tokens/s for Llama-3.1-8B LoRA on an RTX 4090.

    python scripts/bench_gpu.py --out output/bench/gpu.json             # both runners, on CUDA
    python scripts/bench_gpu.py --layers 1 --hidden-size 256 --seq-length 64 --device cpu --dtype fp32 \\
        --out /tmp/gpu.json                                             # a smoke run (tests do this)

Without --runner it runs each runner in a child process and writes the combined JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32, n_kv_heads=32,
                 intermediate_size=11008, rms_norm_eps=1e-5, theta=10000.0, seq_length=4096)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def shape(args) -> dict:
    s = dict(LLAMA2_7B, num_layers=args.layers)
    if args.hidden_size:  # scaled-down smoke runs keep the 7B proportions
        s.update(hidden_size=args.hidden_size, num_heads=max(1, args.hidden_size // 128),
                 n_kv_heads=max(1, args.hidden_size // 128), intermediate_size=int(args.hidden_size * 11008 / 4096))
    return s


def flops_per_token(s: dict, seq: int, lora_params: int) -> float:
    """The useful work per trained token: 4·N (frozen weights: forward + input gradient), 6·N_lora, and
    causal attention (6·L·d per token per layer, half of the full L² product, forward and backward)."""
    h, f, layers = s["hidden_size"], s["intermediate_size"], s["num_layers"]
    per_layer = 4 * h * h + 3 * h * f
    n = layers * per_layer + s["vocab_size"] * h  # lm_head included: every position is trained
    return 4 * n + 6 * lora_params + 6 * seq * h * layers


def matmul_peak(device, dtype, size: int = 8192, seconds: float = 2.0) -> float:
    a, b = torch.randn(size, size, device=device, dtype=dtype), torch.randn(size, size, device=device, dtype=dtype)
    torch.mm(a, b)
    sync(device)
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        best = max(best, 2 * size ** 3 / (time.perf_counter() - t0))
    return best


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def petformers_model(s: dict, device, dtype):
    from petformers.models.config import LlamaConfig
    from petformers.models.llama import build_model
    from petformers.pet.config import PetConfig
    from petformers.pet.inject import apply_lora

    model = build_model(LlamaConfig(**s), device=device, dtype=dtype)
    model.init_weights(std=0.02)
    apply_lora(model, PetConfig(lora_rank=16, lora_alpha=16, lora_dropout=0.05,
                                target_modules=".*wq|.*wk|.*wv|.*wo"))
    model.gradient_checkpointing = True  # MindFormers' recompute for this job; 7B at 4096 needs it on 24 GB cards

    def loss_fn(ids):
        from petformers.train.loss import chunked_cross_entropy_sum

        targets = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
        hidden = model.hidden_states(ids)
        return chunked_cross_entropy_sum(model.lm_head, hidden, targets) / (ids.numel() - ids.shape[0])

    return model, loss_fn


def hf_model(s: dict, device, dtype):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=s["vocab_size"], hidden_size=s["hidden_size"],
                         intermediate_size=s["intermediate_size"], num_hidden_layers=s["num_layers"],
                         num_attention_heads=s["num_heads"], num_key_value_heads=s["n_kv_heads"],
                         rms_norm_eps=s["rms_norm_eps"], max_position_embeddings=s["seq_length"],
                         attn_implementation="sdpa")
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.05,
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))

    def loss_fn(ids):
        return model(input_ids=ids, labels=ids).loss

    return model, loss_fn


def run_one(args) -> dict:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    torch.manual_seed(0)
    s = shape(args)
    model, loss_fn = (petformers_model if args.runner == "petformers" else hf_model)(s, device, dtype)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:  # adapters in fp32 for both runners (PEFT keeps them in the base dtype otherwise)
        p.data = p.data.float()
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    lora_params = sum(p.numel() for p in params)
    ids = torch.randint(0, s["vocab_size"], (1, args.seq_length), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    for step in range(args.warmup + args.steps):
        sync(device)
        t0 = time.perf_counter()
        loss = loss_fn(ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
        print(f"{args.runner} step {step} {times[-1]:.3f}s loss {losses[-1]:.4f}", file=sys.stderr, flush=True)
    timed = times[args.warmup:]
    tokens_per_s = (args.seq_length - 1) * len(timed) / sum(timed)
    peak = matmul_peak(device, dtype, size=8192 if device.type == "cuda" else 512)
    return {"runner": args.runner, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "dtype": args.dtype, "shape": s, "seq_length": args.seq_length, "lora_params": lora_params,
            "trained_tokens_per_s": tokens_per_s, "step_s": timed, "final_loss": losses[-1],
            "peak_gib": torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None,
            "matmul_peak_tflops": peak / 1e12,
            "mfu": tokens_per_s * flops_per_token(s, args.seq_length, lora_params) / peak}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runner", choices=["petformers", "hf_peft"], help="run one runner in this process")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    ap.add_argument("--seq-length", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--hidden-size", type=int, default=0, help="scale the width down (smoke runs)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    if args.runner:
        args.out.write_text(json.dumps(run_one(args), indent=2))
        return 0
    results = {}
    for runner in ("petformers", "hf_peft"):
        part = args.out.with_name(f"{args.out.stem}.{runner}.json")
        cmd = [sys.executable, __file__, "--runner", runner, "--device", args.device, "--dtype", args.dtype,
               "--seq-length", str(args.seq_length), "--layers", str(args.layers), "--hidden-size",
               str(args.hidden_size), "--steps", str(args.steps), "--warmup", str(args.warmup), "--out", str(part)]
        done = subprocess.run(cmd, cwd=ROOT)
        results[runner] = json.loads(part.read_text()) if done.returncode == 0 else {"error": f"exit {done.returncode}"}
    pf, hf = results["petformers"], results["hf_peft"]
    if "error" not in pf and "error" not in hf:
        results["ratios"] = {"throughput_vs_hf_peft": pf["trained_tokens_per_s"] / hf["trained_tokens_per_s"]}
        if pf["peak_gib"] and hf["peak_gib"]:
            results["ratios"]["peak_memory_vs_hf_peft"] = pf["peak_gib"] / hf["peak_gib"]
    args.out.write_text(json.dumps(results, indent=2))
    print(json.dumps({k: v.get("trained_tokens_per_s") if isinstance(v, dict) and "runner" in v else v
                      for k, v in results.items()}, indent=2))
    return 0 if all("error" not in results[r] for r in ("petformers", "hf_peft")) else 1


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
