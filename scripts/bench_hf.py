"""The baseline of `make bench`: LoRA fine-tuning with transformers + peft, as a user would write it.

A plain PyTorch loop doing what HF Trainer does with a skilled user's settings: the model loaded by
transformers (SDPA attention), PEFT's LoRA on q/k/v/o, micro-batches (`--micro-batch`, default 4)
each padded to its longest sample (dynamic padding, DataCollatorForSeq2Seq's rule), accumulated over
`--grad-accum` micro-batches (default 2) with the loss normalised by the trained tokens of the whole
step (Trainer's `num_items_in_batch`), AdamW, cosine schedule with warmup, gradient clipping at 1.0.
`--group-by-length` orders the samples with transformers' own `LengthGroupedSampler` over
micro-batch x accumulation samples, as Trainer's `group_by_length=True` does, so rows of a batch have
similar lengths and little padding; with `--max-positions N` each optimizer step is instead one
micro-batch of as many samples, in that order, as fit in N positions padded to their longest (a packed
row's budget; scripts/bench_scaling.py). `--dtype bf16` wraps the forward pass and the loss in
`torch.autocast(device, torch.bfloat16)`, the easiest speed setting transformers offers.
`--eval-adapter DIR` only computes the held-out loss of a PEFT adapter written by another tool.
`--bnb-4bit WORK` is QLoRA as PEFT users run it: the base loaded 4-bit NF4 by bitsandbytes (double
quantization, float32 compute), `prepare_model_for_kbit_training`, then the same LoRA and loop; the time
spent in bitsandbytes' `dequantize_4bit` during the training steps is reported (`dequant_s`).

Reads the conversations written by scripts/bench.py (OpenAI `messages` JSONL), renders each with
the tokenizer's chat template, masks the prompt (label -100) and anything after the answer's
end-of-turn token. Writes one JSON result; scripts/bench.py runs this in a subprocess of its own,
so that the peak resident memory it measures belongs to this run alone.

    python scripts/bench_hf.py --data bench/train.jsonl --dtype fp32 --steps 32 --out result.json
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

from petformers.peak_rss import peak_rss_bytes

IGNORE = -100


def read_conversations(path: Path) -> list[list[dict]]:
    return [json.loads(line)["messages"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def encode(tokenizer, messages: list[dict], seq_length: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels): the prompt (everything up to the assistant header) masked, the answer and its
    end-of-turn token trained, the template's trailing text after it masked. Truncated to seq_length."""
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt):
        raise SystemExit("bench_hf: the chat template does not render the prompt as a prefix of the conversation")
    answer_end = full.find(tokenizer.eos_token, len(prompt) + len(messages[-1]["content"].strip()))
    answer_end = len(full) if answer_end < 0 else answer_end + len(tokenizer.eos_token)
    pieces = [(full[:len(prompt)], False), (full[len(prompt):answer_end], True), (full[answer_end:], False)]
    ids, labels = [], []
    for text, trained in pieces:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        ids += piece
        labels += piece if trained else [IGNORE] * len(piece)
    return ids[:seq_length], labels[:seq_length]


def pad_batch(samples: list[tuple[list[int], list[int]]], pad_id: int) -> dict:
    """Right-pad to the longest sample of this batch (transformers' DataCollatorForSeq2Seq does the same)."""
    width = max(len(ids) for ids, _ in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for i, (x, y) in enumerate(samples):
        ids[i, :len(x)], labels[i, :len(y)], mask[i, :len(x)] = torch.tensor(x), torch.tensor(y), 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def cosine_with_warmup(step: int, total: int, warmup: int) -> float:
    """The multiplier of the base lr at optimizer step `step` (0-based): transformers'
    get_cosine_schedule_with_warmup, which is also MindFormers' CosineWithWarmUpLR with lr_end 0."""
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def load_model(gguf: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32,
                                                 attn_implementation="sdpa")
    return model, tokenizer


def load_model_dir(path: Path):
    """A Hugging Face model directory (config.json, safetensors, its tokenizer): the random-weight models of
    scripts/bench_scaling.py, which petformers loads from the same files."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation="sdpa")
    return model, tokenizer


def load_model_bnb4(gguf: Path, work: Path):
    """The GGUF's float model with its linear layers in bitsandbytes NF4. transformers refuses a
    quantization_config together with a GGUF file, so the float model is first written as an HF
    directory under `work` (what a user does once) and loaded from there with BitsAndBytesConfig."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    hf_dir = work / "hf_float32"
    if not (hf_dir / "config.json").is_file():
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        config = loaded.config
        config.__dict__.pop("quantization_config", None)  # the GGUF marker would refuse BitsAndBytesConfig
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(loaded.state_dict())
        plain.save_pretrained(str(hf_dir))
        del loaded, plain
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32, quantization_config=quant,
                                                 attn_implementation="sdpa")
    from peft import prepare_model_for_kbit_training

    # no gradient checkpointing: the float rows of the bench do not recompute either
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False), tokenizer


class BnbDequantTimer:
    """Seconds spent in bitsandbytes.functional.dequantize_4bit (forward and backward of its 4-bit
    matmul call it through the module attribute)."""

    def __init__(self):
        import bitsandbytes.functional as bnb_functional

        self.seconds, self.calls, self._module = 0.0, 0, bnb_functional
        self._original = bnb_functional.dequantize_4bit

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return self._original(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
                self.calls += 1
        bnb_functional.dequantize_4bit = timed


def add_lora(model, rank: int, alpha: float, dropout: float):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, bias="none", task_type="CAUSAL_LM",
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    return get_peft_model(model, config)


DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the GPU when there is one, as a user would


def batch_loss(model, batch: dict, autocast: bool) -> torch.Tensor:
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=autocast):
        return model(**{k: v.to(DEVICE) for k, v in batch.items()}).loss


def summed_loss(model, batch: dict, autocast: bool) -> torch.Tensor:
    """The sum (not the mean) of the token losses of a micro-batch, so that micro-batches of one step can be
    normalised together by the step's trained tokens, as Trainer does with `num_items_in_batch`."""
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=autocast):
        logits = model(input_ids=batch["input_ids"].to(DEVICE), attention_mask=batch["attention_mask"].to(DEVICE)).logits
    labels = batch["labels"].to(DEVICE)
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                             ignore_index=IGNORE, reduction="sum")


def sample_order(lengths: list[int], step_samples: int, group_by_length: bool, rng: random.Random,
                 generator: torch.Generator):
    """Endless sample indices, one shuffled epoch after another: plain shuffling, or transformers'
    LengthGroupedSampler (Trainer's `group_by_length`) over the samples of one optimizer step."""
    while True:
        if group_by_length:
            from transformers.trainer_pt_utils import LengthGroupedSampler

            yield from LengthGroupedSampler(step_samples, lengths=lengths, generator=generator)
        else:
            epoch = list(range(len(lengths)))
            rng.shuffle(epoch)
            yield from epoch


def budget_batches(order, lengths: list[int], budget: int):
    """Micro-batches of consecutive samples of `order` holding at most `budget` positions once padded to their
    longest (at least one sample each): in LengthGroupedSampler's order, neighbours have similar lengths."""
    batch, longest = [], 0
    for i in order:
        if batch and (len(batch) + 1) * max(longest, lengths[i]) > budget:
            yield batch
            batch, longest = [], 0
        batch.append(i)
        longest = max(longest, lengths[i])
    if batch:
        yield batch


def evaluate(model, samples, batch_size: int, pad_id: int, autocast: bool) -> float | None:
    """Mean token loss over held-out samples (the same samples for every run of the bench)."""
    if not samples:
        return None
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(samples), batch_size):
            batch = pad_batch(samples[start:start + batch_size], pad_id)
            n = int((batch["labels"][:, 1:] != IGNORE).sum())
            total += float(batch_loss(model, batch, autocast)) * n
            count += n
    model.train()
    return total / max(count, 1)


def eval_adapter(model, tokenizer, args) -> int:
    """The held-out loss of another tool's PEFT adapter over this model: the same samples and rule as ours."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(model, str(args.eval_adapter))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    samples = [encode(tokenizer, m, args.seq_length) for m in read_conversations(args.eval_data)]
    loss = evaluate(model, samples, args.micro_batch, pad_id, args.dtype == "bf16")
    args.out.write_text(json.dumps({"eval_loss": loss, "adapter": str(args.eval_adapter)}, indent=2))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="training conversations (messages JSONL)")
    ap.add_argument("--eval-data", type=Path, help="held-out conversations for the final eval loss")
    ap.add_argument("--gguf", type=Path, help="model file (default: the cached SmolLM2-135M-Instruct GGUF)")
    ap.add_argument("--model", type=Path, help="a Hugging Face model directory instead of the GGUF")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16 = torch.autocast bfloat16")
    ap.add_argument("--steps", type=int, default=32, help="optimizer steps")
    ap.add_argument("--batch-size", type=int, default=8, help="samples per optimizer step")
    ap.add_argument("--micro-batch", type=int, default=4, help="samples per forward pass (batch-size / grad-accum)")
    ap.add_argument("--group-by-length", action="store_true", help="Trainer's group_by_length sample order")
    ap.add_argument("--max-positions", type=int, default=0,
                    help="instead of --batch-size samples, each step is one micro-batch of as many samples as fit "
                         "in this many positions padded to their longest (the sample order's neighbours)")
    ap.add_argument("--eval-adapter", type=Path, help="only the held-out loss of this PEFT adapter directory")
    ap.add_argument("--bnb-4bit", type=Path, metavar="WORK",
                    help="QLoRA: base in bitsandbytes NF4 (its float HF copy is written under WORK)")
    ap.add_argument("--seq-length", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--warmup-ratio", type=float, default=0.03)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=16)
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--time-limit", type=float, default=0,
                    help="stop after the step that passes this many seconds of training (0: no limit); "
                         "the result then says how many steps ran and skips the held-out loss")
    ap.add_argument("--out", type=Path, required=True, help="where to write the result JSON")
    args = ap.parse_args(argv)

    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gguf = args.gguf
    if gguf is None and args.model is None:
        from petformers.checkpoint.download import download

        gguf = download("smollm2-135m-instruct")
    if args.model is not None and (args.gguf or args.bnb_4bit):
        raise SystemExit("bench_hf: --model is a Hugging Face directory; it does not go with --gguf or --bnb-4bit")
    model, tokenizer = load_model_bnb4(gguf, args.bnb_4bit) if args.bnb_4bit else \
        load_model_dir(args.model) if args.model else load_model(gguf)
    if not args.bnb_4bit:  # bitsandbytes places its 4-bit model itself
        model.to(DEVICE)
    if args.eval_adapter:
        return eval_adapter(model, tokenizer, args)
    model = add_lora(model, args.rank, args.alpha, args.dropout)
    model.train()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    samples = [encode(tokenizer, m, args.seq_length) for m in read_conversations(args.data)]
    eval_samples = [encode(tokenizer, m, args.seq_length) for m in read_conversations(args.eval_data)] \
        if args.eval_data else []

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    warmup = int(round(args.warmup_ratio * args.steps))
    if args.batch_size % args.micro_batch:
        raise SystemExit(f"bench_hf: --batch-size {args.batch_size} is not a multiple of --micro-batch {args.micro_batch}")
    lengths = [len(ids) for ids, _ in samples]
    # LengthGroupedSampler groups by the batch size: under a budget, the samples of an average step.
    group = max(1, round(args.max_positions / (sum(lengths) / len(lengths)))) if args.max_positions else args.batch_size
    order = sample_order(lengths, group, args.group_by_length, random.Random(args.seed),
                         torch.Generator().manual_seed(args.seed))
    steps_of = budget_batches(order, lengths, args.max_positions) if args.max_positions else None
    losses, step_seconds, step_trained_tokens, step_positions, step_samples = [], [], [], [], []
    trained = real = positions = 0
    timer = BnbDequantTimer() if args.bnb_4bit else None
    train_start = time.perf_counter()
    for step in range(args.steps):
        t0 = time.perf_counter()
        if steps_of is not None:
            micro = [pad_batch([samples[i] for i in next(steps_of)], pad_id)]
        else:
            chosen = [next(order) for _ in range(args.batch_size)]
            micro = [pad_batch([samples[i] for i in chosen[k:k + args.micro_batch]], pad_id)
                     for k in range(0, len(chosen), args.micro_batch)]
        step_trained = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in micro)
        for group in optimizer.param_groups:
            group["lr"] = args.lr * cosine_with_warmup(step, args.steps, warmup)
        step_loss = 0.0
        for batch in micro:
            loss = summed_loss(model, batch, args.dtype == "bf16") / step_trained
            loss.backward()
            step_loss += loss.detach().item()
            real += int(batch["attention_mask"].sum())
            positions += batch["input_ids"].numel()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(step_loss)
        trained += step_trained
        step_seconds.append(time.perf_counter() - t0)
        step_trained_tokens.append(step_trained)
        step_positions.append(sum(b["input_ids"].numel() for b in micro))
        step_samples.append(sum(len(b["input_ids"]) for b in micro))
        print(f"step {step + 1}/{args.steps} loss {losses[-1]:.4f} {step_seconds[-1]:.1f}s", file=sys.stderr,
              flush=True)
        if args.time_limit and time.perf_counter() - train_start > args.time_limit and step + 1 < args.steps:
            print(f"stopping after {step + 1} steps: --time-limit {args.time_limit:g} s", file=sys.stderr)
            break
    train_s = time.perf_counter() - train_start
    dequant_s, dequant_calls = (timer.seconds, timer.calls) if timer else (None, None)  # before eval
    stopped_early = len(losses) < args.steps
    eval_loss = None if stopped_early else evaluate(model, eval_samples, args.micro_batch, pad_id,
                                                    args.dtype == "bf16")

    result = {
        "runner": "transformers + peft", "dtype": args.dtype, "steps": len(losses), "stopped_early": stopped_early,
        "samples_per_step": args.batch_size, "micro_batch": args.micro_batch,
        "group_by_length": args.group_by_length, "threads": torch.get_num_threads(),
        "train_s": train_s, "trained_tokens": trained, "real_tokens": real, "computed_positions": positions,
        "trained_tokens_per_s": trained / train_s, "first_loss": losses[0], "final_loss": losses[-1],
        "losses": losses, "step_seconds": step_seconds, "step_trained_tokens": step_trained_tokens,
        "step_positions": step_positions, "eval_loss": eval_loss, "max_positions": args.max_positions or None,
        "step_samples": step_samples,
        "peak_rss_mib_self": peak_rss_bytes() / 2**20,  # this process image alone (petformers/peak_rss.py)
        "load_and_setup_s": train_start - started, "device": str(DEVICE),
        "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2 ** 20 if DEVICE.type == "cuda" else None,
        "quantization": "bitsandbytes nf4, double quantization" if args.bnb_4bit else None,
        "dequant_s": dequant_s, "dequant_calls": dequant_calls,
    }
    args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
