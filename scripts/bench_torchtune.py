"""The torchtune peer of `make bench`: its own `lora_finetune_single_device` recipe, as a skilled user runs it.

torchtune 0.6.1 (with torchao 0.15.0; 0.16+ and 0.12 break its imports beside torch 2.13) lives in a
virtual environment of its own under $PETFORMERS_HOME/bench (made once), so the project's environment
is untouched. What a torchtune user would do for SmolLM2-135M-Instruct, which torchtune has no builder
for: the Llama-3.2 LoRA component builder with SmolLM2's shapes (rope base 100000, `scale_factor: 1`,
which leaves rope unscaled, tied embeddings), the HF checkpointer over the model saved by transformers
from the GGUF, the same tokens as the other runs (pre-tokenized by scripts/bench_hf.py's `encode`, fed
through torchtune's own `PackedDataset`, so packing and its block-causal masks are torchtune's), AdamW
(fused), cosine schedule with warmup, chunked cross-entropy, clipping at 1.0, on the CPU in float32, or in
bf16 where the hardware has bf16 matrix instructions (`--dtype`, chosen by bench.py).

Steps:  prepare (project venv: HF dir + tokens)  ->  `tune run` (torchtune venv)  ->  held-out loss of
its PEFT-format adapter by scripts/bench_hf.py --eval-adapter (project venv, the same rule as the others).

Top-level imports are the standard library only: torchtune imports `packed_dataset` and `FixedTokenizer`
from this file inside its own environment.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

TORCHTUNE, TORCHAO = "0.6.1", "0.15.0"
IGNORE = -100


# ---- inside torchtune's process ---------------------------------------------------------------------

class FixedTokenizer:
    """The tokenizer the recipe asks for: the samples arrive tokenized, so it only names the pad id."""

    def __init__(self, pad_id: int, eos_id: int, max_seq_len: int):
        self.pad_id, self.eos_id, self.max_seq_len = pad_id, eos_id, max_seq_len


class _Counted:
    """A map-style dataset of {"tokens", "labels"} that appends each fetched sample's trained-token count
    (labels after the recipe's one-position shift) to a file: torchtune logs tokens/s per step but not the
    tokens, and these counts give the training-loop seconds of each step exactly (tokens / tokens-per-s)."""

    def __init__(self, inner, count_file: str):
        self.inner, self.count_file = inner, count_file

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        item = self.inner[i]
        labels = item["labels"]
        trained = int((labels[1:] != IGNORE).sum()) if hasattr(labels, "sum") else sum(x != IGNORE for x in labels[1:])
        with open(self.count_file, "a") as fh:
            fh.write(f"{trained}\n")
        return item


def packed_dataset(tokenizer, path: str, max_seq_len: int, count_file: str, packed: bool = True):
    """The pre-tokenized samples packed by torchtune's own PackedDataset (split_across_pack False, as its
    chat datasets do for SFT). `packed` is not read here: the recipe reads it from this config section to
    choose its packed collate function, and torchtune passes every key of the section to this builder."""
    from torchtune.datasets import PackedDataset

    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]

    class Samples:
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            return {"tokens": rows[i]["tokens"], "labels": rows[i]["labels"]}

    return _Counted(PackedDataset(Samples(), max_seq_len=max_seq_len, padding_idx=tokenizer.pad_id,
                                  split_across_pack=False), count_file)


# ---- the project's side -----------------------------------------------------------------------------

def ensure_venv(home: Path) -> Path:
    """torchtune's own environment, made once: the torch of this environment (its local file where the
    machine has one), torchtune and torchao at the versions that import together."""
    import torch

    venv = home / "bench" / f"torchtune-{TORCHTUNE}-torch-{torch.__version__.split('+')[0]}"
    stamp = venv / ".installed"
    if not stamp.exists():
        print(f"bench: making torchtune's environment in {venv} (once)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
        subprocess.run(pip + [f"torch=={torch.__version__.split('+')[0]}"], check=True)
        subprocess.run(pip + [f"torchtune=={TORCHTUNE}", f"torchao=={TORCHAO}"], check=True)
        stamp.touch()
    return venv


def prepare(gguf: Path, train: Path, out: Path, seq_length: int) -> dict:
    """The base as an HF safetensors directory (transformers' GGUF reader, as a torchtune user would get
    one) and the training samples as tokens + labels (bench_hf.encode: the same tokens as the HF runs)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_hf import encode, read_conversations

    hf = out / "hf_model"
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if not (hf / "model.safetensors").exists():
        from safetensors.torch import save_file

        # transformers marks a model read from GGUF as not serializable: write its float32 weights directly.
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        hf.mkdir(parents=True, exist_ok=True)
        state = {k: v.contiguous() for k, v in model.state_dict().items()
                 if not (k == "lm_head.weight" and model.config.tie_word_embeddings)}
        save_file(state, str(hf / "model.safetensors"), metadata={"format": "pt"})
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        (hf / "config.json").write_text(json.dumps(config, indent=2))
        tokenizer.save_pretrained(str(hf))
    tokens = out / "tokens.jsonl"
    with open(tokens, "w") as fh:
        for messages in read_conversations(train):
            ids, labels = encode(tokenizer, messages, seq_length)
            fh.write(json.dumps({"tokens": ids, "labels": labels}) + "\n")
    config = json.loads((hf / "config.json").read_text())
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return {"hf_dir": hf, "tokens": tokens, "config": config, "pad_id": pad, "eos_id": tokenizer.eos_token_id}


def recipe_config(prep: dict, out: Path, args) -> dict:
    c = prep["config"]
    rope = c.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type")) not in (None, "default"):
        raise SystemExit(f"bench_torchtune: rope scaling {rope} is not mapped to torchtune's builder")
    steps_per_epoch = 16
    return {
        "output_dir": str(out / "run"),
        "model": {"_component_": "torchtune.models.llama3_2.lora_llama3_2",
                  "lora_attn_modules": ["q_proj", "k_proj", "v_proj", "output_proj"],
                  "apply_lora_to_mlp": False, "apply_lora_to_output": False,
                  "vocab_size": c["vocab_size"], "num_layers": c["num_hidden_layers"],
                  "num_heads": c["num_attention_heads"], "num_kv_heads": c["num_key_value_heads"],
                  "embed_dim": c["hidden_size"], "max_seq_len": c["max_position_embeddings"],
                  "intermediate_dim": c["intermediate_size"], "norm_eps": c["rms_norm_eps"],
                  "rope_base": int(c["rope_theta"]) if "rope_theta" in c else int(c["rope_parameters"]["rope_theta"]),
                  "scale_factor": 1, "tie_word_embeddings": bool(c.get("tie_word_embeddings", True)),
                  "lora_rank": args.rank, "lora_alpha": args.alpha, "lora_dropout": args.dropout},
        "tokenizer": {"_component_": "bench_torchtune.FixedTokenizer", "pad_id": prep["pad_id"],
                      "eos_id": prep["eos_id"], "max_seq_len": args.seq_length},
        "checkpointer": {"_component_": "torchtune.training.FullModelHFCheckpointer",
                         "checkpoint_dir": str(prep["hf_dir"]), "checkpoint_files": ["model.safetensors"],
                         "recipe_checkpoint": None, "output_dir": str(out / "run"), "model_type": "LLAMA3_2"},
        "resume_from_checkpoint": False, "save_adapter_weights_only": True,
        "dataset": {"_component_": "bench_torchtune.packed_dataset", "path": str(prep["tokens"]),
                    "max_seq_len": args.seq_length, "count_file": str(out / "trained_counts.txt"), "packed": True},
        "seed": args.seed, "shuffle": True, "batch_size": 1,
        "optimizer": {"_component_": "torch.optim.AdamW", "fused": True, "weight_decay": 0.0, "lr": args.lr,
                      "betas": [0.9, 0.999], "eps": 1e-8},
        "lr_scheduler": {"_component_": "torchtune.training.lr_schedulers.get_cosine_schedule_with_warmup",
                         "num_warmup_steps": max(1, round(0.03 * args.steps))},
        "loss": {"_component_": "torchtune.modules.loss.CEWithChunkedOutputLoss"},
        "epochs": -(-args.steps // steps_per_epoch), "max_steps_per_epoch": min(steps_per_epoch, args.steps),
        "gradient_accumulation_steps": args.grad_accum, "clip_grad_norm": 1.0, "compile": False,
        "metric_logger": {"_component_": "torchtune.training.metric_logging.DiskLogger", "log_dir": str(out / "logs")},
        "log_every_n_steps": 1, "log_peak_memory_stats": False,
        "device": "cpu", "dtype": args.dtype, "enable_activation_checkpointing": False,
        "enable_activation_offloading": False, "profiler": {"_component_": "torchtune.training.setup_torch_profiler",
                                                            "enabled": False},
    }


def read_steps(out: Path, grad_accum: int) -> dict:
    """Per-step loss and tokens/s from the DiskLogger, the trained tokens of each step from the counts
    file; training seconds = sum over steps of tokens / (tokens per second)."""
    logs = sorted((out / "logs").glob("log_*.txt"))
    if not logs:
        raise SystemExit(f"bench_torchtune: no metrics log under {out / 'logs'}")
    steps = []
    for line in logs[-1].read_text().splitlines():
        if not line.startswith("Step "):
            continue
        fields = dict(part.split(":", 1) for part in line.split("|", 1)[1].split() if ":" in part)
        steps.append({"loss": float(fields["loss"]), "tps": float(fields["tokens_per_second_per_gpu"])})
    counts = [int(x) for x in (out / "trained_counts.txt").read_text().split()]
    per_step = [sum(counts[i * grad_accum:(i + 1) * grad_accum]) for i in range(len(steps))]
    seconds = [n / s["tps"] for n, s in zip(per_step, steps)]
    return {"steps": len(steps), "losses": [s["loss"] for s in steps], "trained_tokens": sum(per_step),
            "train_s": sum(seconds), "step_tokens_per_s": [s["tps"] for s in steps]}


def main(argv=None) -> int:
    import argparse

    import yaml

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--eval-data", type=Path)
    ap.add_argument("--gguf", type=Path)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--grad-accum", type=int, default=2, help="packed rows per optimizer step")
    ap.add_argument("--seq-length", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=16)
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="torchtune's `dtype`")
    ap.add_argument("--work", type=Path, required=True, help="working directory")
    ap.add_argument("--out", type=Path, required=True, help="result JSON")
    args = ap.parse_args(argv)

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from petformers.checkpoint.download import cache_dir, download

    gguf = args.gguf or download("smollm2-135m-instruct")
    venv = ensure_venv(cache_dir())
    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / "trained_counts.txt").unlink(missing_ok=True)
    prep = prepare(gguf, args.data, args.work, args.seq_length)
    cfg = args.work / "lora_smollm2_135m.yaml"
    cfg.write_text(yaml.safe_dump(recipe_config(prep, args.work, args), sort_keys=False))

    sys.path.insert(0, str(Path(__file__).parent))
    from bench import _run_child

    env_path = str(Path(__file__).parent)
    os.environ["PYTHONPATH"] = env_path + os.pathsep + os.environ.get("PYTHONPATH", "")
    child = _run_child([str(venv / "bin" / "tune"), "run", "lora_finetune_single_device", "--config", str(cfg)],
                       args.threads, args.work / "tune.log")
    if child["rc"] != 0:
        raise SystemExit(f"bench_torchtune: tune run failed (exit {child['rc']}); see {args.work / 'tune.log'}")
    result = read_steps(args.work, args.grad_accum)
    result.update({"runner": f"torchtune {TORCHTUNE}", "peak_rss_mib": child["peak_rss_mib"],
                   "wall_s": child["wall_s"], "trained_tokens_per_s": result["trained_tokens"] / result["train_s"],
                   "first_loss": result["losses"][0], "final_loss": result["losses"][-1], "eval_loss": None,
                   "config": str(cfg), "compute_dtype": "bfloat16" if args.dtype == "bf16" else "float32"})
    adapters = sorted((args.work / "run").glob("epoch_*/adapter_config.json"))
    if args.eval_data and adapters:
        adapter = adapters[-1].parent
        done = subprocess.run([sys.executable, str(Path(__file__).parent / "bench_hf.py"), "--data", str(args.data),
                               "--eval-data", str(args.eval_data), "--gguf", str(gguf), "--eval-adapter",
                               str(adapter), "--seq-length", str(args.seq_length), "--out",
                               str(args.work / "eval.json")], env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)))
        if done.returncode != 0:
            raise SystemExit(f"bench_torchtune: held-out loss of {adapter} failed (exit {done.returncode})")
        result["eval_loss"] = json.loads((args.work / "eval.json").read_text())["eval_loss"]
    args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
