"""Evaluation in one place: loss and perplexity on an eval set, and answers scored against references.

Used during training (evaluate_loss, every eval_step_interval steps), by run_mode eval and by run_mode
predict (which shares petformers/inference.py with `petformers predict` and `chat`).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch
from tqdm import tqdm

from petformers import atomic
from petformers.atomic import atomic_open
from petformers.checkpoint.peft import merge_adapter
from petformers.data.formats import load_samples
from petformers.data.loader import collate, open_dataset
from petformers.data.packing import IGNORE_INDEX
from petformers.distributed.env import DistEnv, all_reduce_sum
from petformers.errors import ConfigError
from petformers.eval.metrics import generation_metrics
from petformers.faults import kill_point
from petformers.generate import GenerationConfig
from petformers.inference import answer, encode_prompt, read_prompts
from petformers.monitor.tensorboard import write_eval_scalars
from petformers.train.loss import chunked_cross_entropy_sum
from petformers.train.setup import data_pad_id, load_model_for_run

log = logging.getLogger("petformers")


def evaluate_loss(model, dataset, batch_size: int, device, env: DistEnv, progress: bool = False,
                  forward=None) -> dict:
    """Mean token loss and perplexity (= exp(mean token loss)) over the whole eval set.

    `forward` gives hidden states (default `model.hidden_states`; the FSDP wrapper when sharded).
    Every rank runs the same number of batches (a rank out of rows repeats row 0, uncounted):
    under FSDP each forward is a collective."""
    was_training = model.training
    model.eval()
    packed = bool(getattr(dataset, "packing", False))
    loss_sum = torch.zeros((), dtype=torch.float64)
    tokens = torch.zeros((), dtype=torch.float64)
    indices = list(range(env.rank, len(dataset), env.world_size))
    forward = forward or model.hidden_states
    per_rank = math.ceil(len(dataset) / env.world_size)
    with torch.no_grad():
        for start in tqdm(range(0, per_rank, batch_size), desc="eval", disable=not progress, leave=False):
            kill_point("eval")
            chunk = indices[start:start + batch_size]
            batch = collate([dataset[i] for i in chunk or [0]], dataset.pad_id, packed, device)
            hidden = forward(batch["input_ids"], batch["position_ids"], batch["segment_ids"])
            if not chunk:
                continue
            loss_sum += chunked_cross_entropy_sum(model.lm_head, hidden, batch["targets"]).double().cpu()
            tokens += (batch["targets"] != IGNORE_INDEX).sum().double().cpu()
    loss_sum, tokens = all_reduce_sum(loss_sum, env), all_reduce_sum(tokens, env)
    model.train(was_training)
    mean = (loss_sum / tokens.clamp(min=1)).item()
    return {"eval_loss": mean, "eval_ppl": math.exp(min(mean, 700)), "eval_tokens": int(tokens.item())}


def evaluate_generation(model, tokenizer, samples, template: str, max_new_tokens: int = 128,
                        batch_size: int = 8, progress: bool = True) -> dict:
    """Greedy answers to each sample's last user turn, scored against its reference answer.

    Returns {"metrics": {exact_match, rouge_l, bleu4, f1}, "samples": [{prompt, reference, prediction}]}.
    """
    prompts, refs, shown = [], [], []
    for s in samples:
        messages = s.messages if hasattr(s, "messages") else s
        if messages[-1]["role"] != "assistant":
            continue
        prompts.append(encode_prompt(messages[:-1], template, tokenizer))
        refs.append(messages[-1]["content"])
        shown.append(messages[-2]["content"] if len(messages) > 1 else "")
    preds = [text.strip() for text in answer(model, tokenizer, prompts, GenerationConfig(max_new_tokens=max_new_tokens),
                                             batch_size, by_length=True, progress=progress)]
    metrics = generation_metrics(preds, refs)
    return {"metrics": metrics,
            "samples": [{"prompt": p, "reference": r, "prediction": y} for p, r, y in zip(shown, refs, preds)]}


def _load_for_inference(cfg, env):
    """The run's model with its adapter merged in, in eval mode, and its tokenizer."""
    model, tokenizer = load_model_for_run(cfg, env)
    if cfg.adapter:
        model, _ = merge_adapter(model, cfg.adapter)
    return model.eval(), tokenizer


def run_eval(cfg, env, out: Path) -> dict:
    """run_mode eval: loss and perplexity on the eval set (and generation metrics); eval_results.json."""
    path = cfg.data.eval_dataset_dir or cfg.data.train_dataset_dir
    if not path:
        raise ConfigError("eval_dataset.data_loader.dataset_dir: run_mode eval needs an eval set "
                          "(or pass --eval_dataset_dir)")
    model, tokenizer = _load_for_inference(cfg, env)
    ds = open_dataset(path, tokenizer, cfg.model.seq_length, cfg.data.template, False, cfg.data.drop_long, "finetune",
                      pad_id=data_pad_id(cfg, model, tokenizer), progress=env.is_main)
    eval_batch = max(cfg.runner.batch_size, 8)  # no gradients: larger batches fit, and are faster
    results = {"metrics": evaluate_loss(model, ds, eval_batch, env.device, env, progress=env.is_main)}
    if cfg.eval.eval_generation:
        samples = load_samples(path).samples
        gen = evaluate_generation(model, tokenizer, samples, cfg.data.template, cfg.eval.max_new_tokens, eval_batch)
        results["metrics"] |= gen["metrics"]
        results["samples"] = gen["samples"]
    results["model"] = cfg.load_checkpoint
    results["adapter"] = cfg.adapter or None
    if env.is_main:
        atomic.write_json(out / "eval_results.json", results)
        resolved = out / "resolved_config.yaml"
        write_eval_scalars(cfg.tensorboard.tensorboard_dir, cfg.tensorboard.tensorboard_queue_size, results["metrics"],
                           resolved.read_text(encoding="utf-8") if resolved.is_file() else "")
        for key, value in results["metrics"].items():
            print(f"{key}: {value:.6g}" if isinstance(value, float) else f"{key}: {value}")
    return results


def run_predict(cfg, env, out: Path) -> dict:
    """run_mode predict: answers to predict_data in the run's template; predictions.jsonl."""
    data = cfg.predict_data
    if not data:
        raise ConfigError("predict_data: run_mode predict needs --predict_data (a prompt or a file of prompts)")
    model, tokenizer = _load_for_inference(cfg, env)
    prompts = read_prompts(data)
    encoded = [encode_prompt([{"role": "user", "content": p}], cfg.data.template, tokenizer) for p in prompts]
    answers = answer(model, tokenizer, encoded, GenerationConfig(cfg.eval.max_new_tokens), cfg.runner.batch_size)
    if env.is_main:
        for a in answers:
            print(a)
        with atomic_open(out / "predictions.jsonl") as fh:
            for p, a in zip(prompts, answers):
                fh.write(json.dumps({"prompt": p, "answer": a}, ensure_ascii=False) + "\n")
    return {"predictions": len(answers)}
