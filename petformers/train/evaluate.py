"""run_mode eval and predict: perplexity on an eval set, generation metrics, batch prediction."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from tqdm import tqdm

from petformers.errors import ConfigError

log = logging.getLogger("petformers")


def prompt_text(messages: list[dict], template: str, tokenizer) -> str:
    """The text a model sees before it answers the last turn, in the run's template."""
    if template == "chat":
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    from petformers.data.templates import render_prompt

    return render_prompt(messages, template, tokenizer)


def evaluate_generation(model, tokenizer, samples, template: str, max_new_tokens: int = 128,
                        batch_size: int = 8, progress: bool = True) -> dict:
    """Greedy answers to each sample's last user turn, scored against its reference answer.

    Returns {"metrics": {exact_match, rouge_l, bleu4, f1}, "samples": [{prompt, reference, prediction}]}.
    """
    from petformers.eval.metrics import generation_metrics
    from petformers.generate import GenerationConfig, generate

    prompts, refs, shown = [], [], []
    for s in samples:
        messages = s.messages if hasattr(s, "messages") else s
        if messages[-1]["role"] != "assistant":
            continue
        prompts.append(tokenizer.encode(prompt_text(messages[:-1], template, tokenizer),
                                        add_special_tokens=template != "chat"))
        refs.append(messages[-1]["content"])
        shown.append(messages[-2]["content"] if len(messages) > 1 else "")
    cfg = GenerationConfig(max_new_tokens=max_new_tokens)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths batch together
    out = [None] * len(prompts)
    for start in tqdm(range(0, len(order), batch_size), desc="generate", disable=not progress, leave=False):
        idx = order[start:start + batch_size]
        for i, ids in zip(idx, generate(model, [prompts[i] for i in idx], cfg, tokenizer.eos_ids, tokenizer.pad_id)):
            out[i] = tokenizer.decode(ids).strip()
    preds = out
    metrics = generation_metrics(preds, refs)
    return {"metrics": metrics,
            "samples": [{"prompt": p, "reference": r, "prediction": y} for p, r, y in zip(shown, refs, preds)]}


def _load_for_inference(cfg, env):
    from petformers.train.run import load_model_for_run

    model, tokenizer = load_model_for_run(cfg, env)
    if cfg.adapter:
        from petformers.pet.merge import merge_and_unload
        from petformers.checkpoint.peft import load_peft_adapter

        load_peft_adapter(model, cfg.adapter)
        model = merge_and_unload(model)
    return model.eval(), tokenizer


def run_eval(cfg, env, out: Path) -> dict:
    from petformers.data.loader import open_dataset
    from petformers.train.loop import evaluate_loss

    path = cfg.data.eval_dataset_dir or cfg.data.train_dataset_dir
    if not path:
        raise ConfigError("eval_dataset.data_loader.dataset_dir: run_mode eval needs an eval set "
                          "(or pass --eval_dataset_dir)")
    model, tokenizer = _load_for_inference(cfg, env)
    ds = open_dataset(path, tokenizer, cfg.model.seq_length, cfg.data.template, False, cfg.data.drop_long, "finetune",
                      progress=env.is_main)
    pad = tokenizer.pad_id if tokenizer is not None else 0
    eval_batch = max(cfg.runner.batch_size, 8)  # no gradients: larger batches fit, and are faster
    results = {"metrics": evaluate_loss(model, ds, eval_batch, pad, env.device, env, progress=env.is_main)}
    if cfg.eval.eval_generation:
        from petformers.data.formats import load_samples

        samples, _, _, _, _ = load_samples(path)
        gen = evaluate_generation(model, tokenizer, samples, cfg.data.template, cfg.eval.max_new_tokens, eval_batch)
        results["metrics"] |= gen["metrics"]
        results["samples"] = gen["samples"]
    results["model"] = cfg.load_checkpoint
    results["adapter"] = cfg.adapter or None
    if env.is_main:
        (out / "eval_results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False), encoding="utf-8")
        for key, value in results["metrics"].items():
            print(f"{key}: {value:.6g}" if isinstance(value, float) else f"{key}: {value}")
    return results


def run_predict(cfg, env, out: Path) -> dict:
    from petformers.cli.predict import read_prompts
    from petformers.generate import GenerationConfig, generate

    data = cfg.predict_data
    if not data:
        raise ConfigError("predict_data: run_mode predict needs --predict_data (a prompt or a file of prompts)")
    model, tokenizer = _load_for_inference(cfg, env)
    prompts = read_prompts(data)
    encoded = [tokenizer.encode(prompt_text([{"role": "user", "content": p}], cfg.data.template, tokenizer),
                                add_special_tokens=cfg.data.template != "chat") for p in prompts]
    answers = []
    for start in range(0, len(encoded), max(cfg.runner.batch_size, 1)):
        with torch.no_grad():
            outs = generate(model, encoded[start:start + cfg.runner.batch_size], GenerationConfig(cfg.eval.max_new_tokens),
                            tokenizer.eos_ids, tokenizer.pad_id)
        answers += [tokenizer.decode(o) for o in outs]
    if env.is_main:
        for a in answers:
            print(a)
        with open(out / "predictions.jsonl", "w", encoding="utf-8") as fh:
            for p, a in zip(prompts, answers):
                fh.write(json.dumps({"prompt": p, "answer": a}, ensure_ascii=False) + "\n")
    return {"predictions": len(answers)}
