"""The board's chat panel: generations from a run's adapter, streamed piece by piece.

It goes through what `petformers chat` uses (`inference.load_for_inference`: base + PEFT adapter merged
on the same default device and dtype; `generate` with `StreamPrinter`; `inference.encode_prompt` in the
chat template), so an answer here is the answer there. A run trained over a quantized base is chatted
with over that same quantized base (its resolved config's quantization keys), with its adapter unmerged,
as `petformers chat --quantization_bit ...` does: the adapter was trained against those weights, not the
float ones. One model is kept loaded (the last run chatted with); one generation runs at a time.
"""

from __future__ import annotations

import queue
import threading
from pathlib import Path

import torch

from petformers.board.runs import OutsideRoot, read_run_config
from petformers.generate import GenerationConfig, StreamPrinter, generate
from petformers.inference import encode_prompt, load_for_inference
from petformers.quant.model import quant_config_of

MAX_NEW_TOKENS = 512


def adapter_of(run: Path) -> Path | None:
    """The run's final adapter, else the newest checkpoint's (a run still training can be chatted with)."""
    if (run / "adapter" / "adapter_config.json").is_file():
        return run / "adapter"
    steps = sorted((run / "checkpoint").glob("step_*/adapter/adapter_config.json")) if (run / "checkpoint").is_dir() \
        else []
    return steps[-1].parent if steps else None


class ChatModels:
    """Loads (once) and runs the model of one run at a time."""

    def __init__(self):
        self._lock = threading.Lock()
        self._key = None
        self._loaded = None

    def _load(self, run: Path):
        _, config, note = read_run_config(run)
        base = config.get("load_checkpoint")
        if not base:
            raise OutsideRoot(note or f"{run.name}: resolved_config.yaml names no load_checkpoint to chat with")
        model = config.get("model")
        quantization = quant_config_of(model.get("model_config") if isinstance(model, dict) else None)
        adapter = adapter_of(run)
        key = (str(run), str(adapter), quantization)
        if self._key != key:
            self._loaded = None  # free the previous model first
            self._loaded = load_for_inference(str(base), str(adapter) if adapter else None, quantization=quantization)
            self._key = key
        return self._loaded, base, adapter, quantization

    def stream(self, run: Path, messages: list[dict], max_new_tokens: int = 128, system: str | None = None):
        """Yield ("info", text) once, then ("token", text) pieces, then ("done", full answer); ("error", line)
        instead when something fails. Runs the generation in a thread so that pieces arrive as they come."""
        pieces: queue.Queue = queue.Queue()
        end = object()

        def work():
            try:
                with self._lock:
                    (model, tokenizer), base, adapter, quantization = self._load(run)
                    held = f", held {quantization.describe()}" if quantization is not None else ""
                    pieces.put(("info", f"base {base}{held}, adapter {adapter or 'none (base model only)'}"))
                    convo = ([{"role": "system", "content": system}] if system else []) + messages
                    ids = encode_prompt(convo, "chat", tokenizer)
                    printer = StreamPrinter(tokenizer, lambda text: pieces.put(("token", text)))
                    cfg = GenerationConfig(max_new_tokens=max(1, min(int(max_new_tokens), MAX_NEW_TOKENS)))
                    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(0)
                    generate(model, [ids], cfg, tokenizer.eos_ids, tokenizer.pad_id, generator, printer)
                    printer.finish()
                    pieces.put(("done", tokenizer.decode(printer.tokens)))
            except Exception as e:  # shown in the panel: the board itself keeps running
                pieces.put(("error", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"))
            finally:
                pieces.put(end)

        threading.Thread(target=work, daemon=True, name="board-chat").start()
        while (item := pieces.get()) is not end:
            yield item
