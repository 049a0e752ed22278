"""TensorBoard event files for a run: MindFormers' `tensorboard: {tensorboard_dir, tensorboard_queue_size}`.

The writer is torch's own `torch.utils.tensorboard.SummaryWriter`, which needs the `tensorboard` package
(`pip install 'petformers[tensorboard]'`); without it a run that asks for event files stops before it
starts, with one line saying so. Only rank 0 writes (the caller passes `enabled=env.is_main`).

`TeeMetrics` sits where the run writes `metrics.jsonl`: every record the loop writes there (a training
step, an evaluation) also becomes scalars, so the two never disagree and the loop needs no second call.

Tags: `train/loss`, `train/lr`, `train/grad_norm`, `train/tokens_per_s`, `train/peak_memory_mib`,
`eval/loss`, `eval/ppl`, and `eval/<name>` for any other eval metric (exact_match, rouge_l, ...), all
against the optimizer step; the resolved config is the text `config`.
"""

from __future__ import annotations

import math
import os

from petformers.errors import ConfigError

# metrics.jsonl key -> TensorBoard tag, for the records of a training step
TRAIN_TAGS = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
              "tokens_per_s": "train/tokens_per_s", "peak_memory_mib": "train/peak_memory_mib"}
# keys of an eval record that are bookkeeping, not metrics
EVAL_SKIP = {"step", "epoch", "eval_tokens", "elapsed_s"}


def scalars_of(record: dict) -> dict[str, float]:
    """{tag: value} of one metrics.jsonl record (a train step, or an eval when it holds eval_loss / metrics)."""
    out = {}
    is_eval = "loss" not in record
    for key, value in record.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        if not is_eval and key in TRAIN_TAGS:
            out[TRAIN_TAGS[key]] = float(value)
        elif is_eval and key not in EVAL_SKIP:
            name = key[len("eval_"):] if key.startswith("eval_") else key
            out[f"eval/{name}"] = float(value)
    return out


class TensorBoardLog:
    """An event-file writer in `log_dir` (created), flushing every `queue_size` events."""

    def __init__(self, log_dir: str | os.PathLike, queue_size: int = 10, config_text: str = ""):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # torch raises ImportError naming the missing `tensorboard` package
            raise ConfigError(f"tensorboard.tensorboard_dir: {log_dir}: writing TensorBoard event files needs the "
                              "tensorboard package: pip install 'petformers[tensorboard]' (or drop the "
                              "tensorboard section / --tensorboard_dir)") from None
        if int(queue_size) < 1:
            raise ConfigError(f"tensorboard.tensorboard_queue_size: {queue_size}: must be at least 1")
        self.log_dir = str(log_dir)
        self.writer = SummaryWriter(log_dir=self.log_dir, max_queue=int(queue_size), flush_secs=10)
        if config_text:
            # Markdown: indented by four spaces so that TensorBoard shows the YAML verbatim.
            self.writer.add_text("config", "\n".join("    " + line for line in config_text.splitlines()), 0)

    def write(self, record: dict):
        step = record.get("step")
        if not isinstance(step, int):
            return
        for tag, value in scalars_of(record).items():
            self.writer.add_scalar(tag, value, step)

    def close(self):
        self.writer.close()


class TeeMetrics:
    """A metrics.jsonl log that also writes each record to TensorBoard (same `write` / `close`)."""

    def __init__(self, metrics, tensorboard: TensorBoardLog):
        self.metrics, self.tensorboard = metrics, tensorboard

    def write(self, record: dict):
        self.metrics.write(record)
        self.tensorboard.write(record)

    def close(self):
        self.metrics.close()
        self.tensorboard.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_eval_scalars(log_dir, queue_size: int, metrics: dict, config_text: str = "", step: int = 0):
    """run_mode eval: its metrics (eval/loss, eval/ppl, eval/exact_match, ...) at `step`, when `log_dir` is set."""
    if not log_dir:
        return
    log = TensorBoardLog(log_dir, queue_size, config_text)
    try:
        log.write({"step": step, **metrics})
    finally:
        log.close()


def with_tensorboard(metrics, log_dir, queue_size: int = 10, config_text: str = "", enabled: bool = True):
    """`metrics` teed into TensorBoard event files under `log_dir`; `metrics` itself when `log_dir` is empty
    or this is not the writing rank."""
    if not log_dir or not enabled:
        return metrics
    return TeeMetrics(metrics, TensorBoardLog(log_dir, queue_size, config_text))
