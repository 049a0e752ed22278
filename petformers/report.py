"""A run's report: one self-contained HTML file (`RUN/report.html`) a person can open or mail.

It gathers what a run left in its output directory; every piece is optional, and a missing or
unreadable one is shown as "not available" so that a report of a half-finished run still renders:

- `resolved_config.yaml`: the config the run used, after overrides.
- `data_summary.json`: what the data pipeline saw (records, tokens, ...), any JSON object.
- `loss.png`, or else `metrics.jsonl` drawn on the spot: train and eval loss against step.
- `eval_before.json`, `eval_after.json`: `{"metrics": {name: value}, "samples": [{"prompt",
  "reference", "prediction"}]}` for the base model and for the fine-tuned one.
- `run_summary.json`: the trainer's closing summary, any JSON object.

All text from the run directory goes through html.escape; the loss plot is embedded as base64, and
there is no external CSS or JavaScript.
"""

from __future__ import annotations

import base64
import datetime
import html
import json
import os
from pathlib import Path

from petformers import __version__
from petformers import atomic
from petformers.errors import ConfigError, PetformersError
from petformers.eval.metrics import exact_match
from petformers.train.metrics_log import loss_png_bytes, read_metrics

REPORT_NAME = "report.html"
MAX_SAMPLES = 20  # sample generations shown; the rest are counted

# What each metric means, for readers who did not write the evaluation code.
METRIC_DESCRIPTIONS = {
    "exact_match": "exact match: fraction of answers equal to the reference after case/whitespace normalisation",
    "f1": "token F1: SQuAD-style token overlap between answer and reference",
    "rouge_l": "ROUGE-L: F-measure of the longest common token subsequence",
    "bleu4": "BLEU-4: corpus BLEU over 1- to 4-grams with brevity penalty",
    "eval_loss": "eval loss: mean cross-entropy per answer token (nats)",
    "loss": "loss: mean cross-entropy per answer token (nats)",
    "perplexity": "perplexity: exp(eval loss)",
}

ARTEFACT_DESCRIPTIONS = {
    "adapter": "LoRA adapter in PEFT format",
    "merged": "base model with the adapter merged in (Hugging Face format)",
    "checkpoint": "training checkpoints for --resume_training",
    "metrics.jsonl": "training and eval metrics, one JSON record per line",
    "loss.png": "loss curves",
    "run_summary.json": "the run's closing summary",
    "resolved_config.yaml": "the config the run used",
    "data_summary.json": "summary of the training and eval data",
    "eval_before.json": "evaluation of the base model",
    "eval_after.json": "evaluation of the fine-tuned model",
    "msrun_log": "per-rank logs",
}

NOT_AVAILABLE = "not available"

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 72em; color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.5em 0; max-width: 100%; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; vertical-align: top; overflow-wrap: anywhere; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.text { white-space: pre-wrap; }
table.samples { table-layout: fixed; width: 100%; }
table.samples th:first-child { width: 28%; }
pre { background: #f7f7f7; padding: 0.8em; white-space: pre-wrap; overflow-wrap: anywhere; font-size: 0.9em; }
code { overflow-wrap: anywhere; } td:first-child > code { overflow-wrap: normal; }
.na { color: #888; font-style: italic; }
.good { color: #080; } .bad { color: #b00; }
img { max-width: 100%; }
"""


def _esc(value) -> str:
    return html.escape(str(value), quote=True)


def _na(reason: str = "") -> str:
    return f'<p class="na">{NOT_AVAILABLE}{_esc(" (" + reason + ")") if reason else ""}</p>'


def _fmt(value) -> str:
    """Numbers rounded to 4 decimals (0.8333, 12.3457, 1.0); anything else as its text."""
    if isinstance(value, float):
        return str(round(value, 4))
    return str(value)


def _read_json(path: Path):
    """(object, None) or (None, why it is not available)."""
    if not path.is_file():
        return None, f"no {path.name}"
    try:
        return json.loads(path.read_text(encoding="utf-8")), None
    except json.JSONDecodeError as e:
        return None, f"{path.name}: invalid JSON at line {e.lineno}: {e.msg}"
    except (OSError, UnicodeDecodeError) as e:
        return None, f"{path.name}: unreadable ({e})"


def _value_cell(value) -> str:
    if isinstance(value, (dict, list)):
        return f"<td><pre>{_esc(json.dumps(value, indent=2, ensure_ascii=False))}</pre></td>"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f'<td class="num">{_esc(_fmt(value))}</td>'
    return f"<td>{_esc(value)}</td>"


def _json_section(path: Path) -> str:
    """A JSON object as a key/value table (nested values as indented JSON)."""
    obj, why = _read_json(path)
    if obj is None:
        return _na(why)
    if not isinstance(obj, dict):
        return f"<pre>{_esc(json.dumps(obj, indent=2, ensure_ascii=False))}</pre>"
    if not obj:
        return _na(f"{path.name} is empty")
    rows = "".join(f"<tr><th>{_esc(k)}</th>{_value_cell(v)}</tr>" for k, v in obj.items())
    return f"<table>{rows}</table>"


def _config_section(run: Path) -> str:
    path = run / "resolved_config.yaml"
    if not path.is_file():
        return _na(f"no {path.name}")
    return f"<pre>{_esc(path.read_text(encoding='utf-8', errors='replace'))}</pre>"


def _loss_section(run: Path) -> str:
    parts = []
    records = None
    metrics_path = run / "metrics.jsonl"
    if metrics_path.is_file():
        try:
            records = read_metrics(metrics_path)
        except PetformersError as e:
            parts.append(_na(str(e)))
    png, note = None, ""
    if (run / "loss.png").is_file():
        png = (run / "loss.png").read_bytes()
    elif records is not None:
        png, note = loss_png_bytes(records, f"Loss: {run.name}"), " (drawn from metrics.jsonl)"
    if png is None:
        parts.append(_na("no loss.png and no metrics.jsonl"))
    else:
        data = base64.b64encode(png).decode("ascii")
        parts.append(f'<img alt="train and eval loss against step{_esc(note)}" '
                     f'src="data:image/png;base64,{data}">')
    if records:
        parts.append(_loss_stats(records))
    return "\n".join(parts)


def _loss_stats(records: list[dict]) -> str:
    rows = []
    for key, label in (("loss", "train loss"), ("eval_loss", "eval loss")):
        points = [(r["step"], r[key]) for r in records
                  if "step" in r and isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
        if points:
            (s0, v0), (s1, v1) = points[0], points[-1]
            rows.append(f"<tr><th>{label}</th><td>{len(points)}</td><td>{_esc(s0)}</td>"
                        f'<td class="num">{_esc(_fmt(float(v0)))}</td><td>{_esc(s1)}</td>'
                        f'<td class="num">{_esc(_fmt(float(v1)))}</td></tr>')
    if not rows:
        return ""
    return ("<table><tr><th></th><th>records</th><th>first step</th><th>first</th>"
            f"<th>last step</th><th>last</th></tr>{''.join(rows)}</table>")


def _read_eval(path: Path):
    """(metrics dict, samples list, why-not) of an eval_before/after.json; missing parts are empty."""
    obj, why = _read_json(path)
    if obj is None:
        return {}, [], why
    if not isinstance(obj, dict):
        return {}, [], f"{path.name}: expected a JSON object"
    metrics, samples = obj.get("metrics"), obj.get("samples")
    metrics = metrics if isinstance(metrics, dict) else {}
    samples = [s for s in samples if isinstance(s, dict)] if isinstance(samples, list) else []
    return metrics, samples, None


def _metrics_section(before: dict, after: dict, why_before, why_after) -> str:
    names = list(before) + [k for k in after if k not in before]
    if not names:
        return _na("; ".join(w for w in (why_before, why_after) if w) or "no metrics recorded")
    rows = []
    for name in names:
        b, a = before.get(name), after.get(name)
        cells = [f"<td><code>{_esc(name)}</code></td>", f"<td>{_esc(METRIC_DESCRIPTIONS.get(name, ''))}</td>"]
        for v in (b, a):
            cells.append(f'<td class="na">{NOT_AVAILABLE}</td>' if v is None else _value_cell(v))
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b))
        cells.append(f'<td class="num">{_esc(f"{a - b:+.4f}")}</td>' if numeric else "<td></td>")
        rows.append(f"<tr>{''.join(cells)}</tr>")
    notes = "".join(_na(w) for w in (why_before, why_after) if w)
    return ("<table><tr><th>metric</th><th>meaning</th><th>before (base model)</th>"
            f"<th>after (fine-tuned)</th><th>change</th></tr>{''.join(rows)}</table>{notes}")


def _samples_section(before: list[dict], after: list[dict]) -> str:
    base = after or before
    if not base:
        return _na("no samples in eval_before.json / eval_after.json")
    same_order = [s.get("prompt") for s in before] == [s.get("prompt") for s in after]
    before_by_prompt = {s.get("prompt"): s for s in before}
    rows = []
    for i, sample in enumerate(base[:MAX_SAMPLES]):
        prompt, reference = sample.get("prompt", ""), sample.get("reference", "")
        if after:
            b = before[i] if same_order else before_by_prompt.get(prompt)
            a = sample
        else:
            b, a = sample, None
        cells = [f'<td class="text">{_esc(prompt)}</td>', f'<td class="text">{_esc(reference)}</td>']
        for s in (b, a):
            if s is None or "prediction" not in s:
                cells.append(f'<td class="na">{NOT_AVAILABLE}</td>')
                continue
            ok = exact_match(str(s["prediction"]), str(reference))
            mark = '<span class="good">&#10003; </span>' if ok else '<span class="bad">&#10007; </span>'
            cells.append(f'<td class="text">{mark}{_esc(s["prediction"])}</td>')
        rows.append(f"<tr>{''.join(cells)}</tr>")
    shown = f"<p>Showing {min(len(base), MAX_SAMPLES)} of {len(base)} samples; &#10003; marks an exact match.</p>"
    return (f'{shown}<table class="samples"><tr><th>prompt</th><th>reference</th><th>before (base model)</th>'
            f"<th>after (fine-tuned)</th></tr>{''.join(rows)}</table>")


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _artefacts_section(run: Path) -> str:
    entries = [p for p in sorted(run.iterdir()) if p.name != REPORT_NAME and not p.name.endswith(".tmp")]
    if not entries:
        return _na("the run directory is empty")
    rows = []
    for p in entries:
        name = p.name + ("/" if p.is_dir() else "")
        rows.append(f"<tr><td><code>{_esc(name)}</code></td><td>{_esc(ARTEFACT_DESCRIPTIONS.get(p.name, ''))}</td>"
                    f'<td class="num">{_esc(_human(_size(p)))}</td></tr>')
    return f"<table><tr><th>path</th><th>what</th><th>size</th></tr>{''.join(rows)}</table>"


def render_report(run_dir: str | os.PathLike) -> str:
    """The report of `run_dir` as one HTML string."""
    run = Path(run_dir)
    if not run.is_dir():
        raise ConfigError(f"--output_dir {run}: no such run directory")
    run = run.resolve()
    before, before_samples, why_before = _read_eval(run / "eval_before.json")
    after, after_samples, why_after = _read_eval(run / "eval_after.json")
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
    sections = [
        ("Evaluation: before and after fine-tuning", _metrics_section(before, after, why_before, why_after)),
        ("Loss curves", _loss_section(run)),
        ("Sample generations", _samples_section(before_samples, after_samples)),
        ("Run summary", _json_section(run / "run_summary.json")),
        ("Data summary", _json_section(run / "data_summary.json")),
        ("Resolved config", _config_section(run)),
        ("Artefacts", f"<p>In <code>{_esc(run)}</code>:</p>{_artefacts_section(run)}"),
    ]
    body = "\n".join(f"<h2>{_esc(title)}</h2>\n{content}" for title, content in sections)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f"<title>petformers report: {_esc(run.name)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            f"<h1>petformers run report: {_esc(run.name)}</h1>\n"
            f"<p>Run directory <code>{_esc(run)}</code>; written {_esc(now)} by petformers {_esc(__version__)}.</p>\n"
            f"{body}\n</body>\n</html>\n")


def write_report(run_dir: str | os.PathLike) -> Path:
    """Render the report of `run_dir` and write it to `run_dir/report.html` atomically; return its path."""
    text = render_report(run_dir)
    out = Path(run_dir).resolve() / REPORT_NAME
    atomic.write_text(out, text)
    return out
