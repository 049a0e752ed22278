"""`metrics.jsonl`: one JSON object per line, appended and flushed as training goes, and its loss plot.

Records are free-form dicts; the plot reads two kinds: `{"step", "loss"}` (a training step) and
`{"step", "eval_loss"}` (an evaluation). A resumed run appends to the same file and replays the steps
after its checkpoint, so when a step appears twice the later record wins.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
from pathlib import Path

from petformers import atomic
from petformers.errors import DataError

log = logging.getLogger("petformers")


def _to_json(value):
    """Scalars that json cannot write itself: 0-d tensors, numpy numbers."""
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"metrics record value of type {type(value).__name__} is not JSON serialisable")


class MetricsLog:
    """Appends one JSON line per `write`, flushed at once so that a killed process loses no record."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict):
        # One write call per line: a crash can cut off at most the line being written.
        self._file.write(json.dumps(record, ensure_ascii=False, default=_to_json) + "\n")
        self._file.flush()

    def close(self):
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Every record of a metrics.jsonl, in order. A cut-off last line (the process was killed while
    writing it) is skipped with a warning; a malformed line elsewhere is a DataError naming it."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such metrics file")
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if lineno == len(lines):
                log.warning("petformers: %s:%d: skipping a cut-off last line", path, lineno)
                break
            raise DataError(f"{path}:{lineno}: invalid JSON: {e.msg}") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
    return records


def _curve(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the records holding `step` and a finite `key`, later records winning."""
    by_step = {}
    for r in records:
        value = r.get(key)
        if "step" in r and isinstance(value, (int, float)) and math.isfinite(value):
            by_step[r["step"]] = value
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def loss_figure(records: list[dict], title: str = "Training loss"):
    """A matplotlib Figure (Agg canvas, no pyplot global state) of train and eval loss against step."""
    # matplotlib is heavy to import (~0.5 s): only runs that draw a plot pay for it
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    train_steps, train_loss = _curve(records, "loss")
    eval_steps, eval_loss = _curve(records, "eval_loss")
    if train_steps:
        ax.plot(train_steps, train_loss, label="train loss", color="tab:blue", linewidth=1.2,
                marker="." if len(train_steps) < 50 else None)
    if eval_steps:
        ax.plot(eval_steps, eval_loss, label="eval loss", color="tab:orange", linewidth=1.5, marker="o")
    if not (train_steps or eval_steps):
        ax.text(0.5, 0.5, "no loss recorded", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (cross-entropy, nats/token)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if train_steps or eval_steps:
        ax.legend()
    fig.tight_layout()
    return fig


def loss_png_bytes(records: list[dict], title: str = "Training loss") -> bytes:
    buf = io.BytesIO()
    loss_figure(records, title).savefig(buf, format="png")
    return buf.getvalue()


def plot_loss(metrics_path: str | os.PathLike, png_path: str | os.PathLike, title: str = "Training loss") -> Path:
    """Draw train loss (and eval loss, when recorded) against step into `png_path`, atomically."""
    png_path = Path(png_path)
    atomic.write_bytes(png_path, loss_png_bytes(read_metrics(metrics_path), title))
    return png_path
