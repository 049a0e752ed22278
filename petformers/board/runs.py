"""Reading run directories for the board: which runs exist, their state, metrics, config and artefacts.

Everything here reads files only. A run is a directory under the output root holding any of the files a
run writes (`run_state.json`, `metrics.jsonl`, `run_summary.json`, `resolved_config.yaml`); its name is
its path relative to the root. Every path derived from a request goes through `confined`, so nothing
outside the root is ever read. A damaged file becomes a note on its run, never an exception.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from petformers.monitor.state import STATE_FILE

RUN_MARKERS = (STATE_FILE, "metrics.jsonl", "run_summary.json", "resolved_config.yaml")
MAX_DEPTH = 4  # how deep under the root runs are looked for
SKIP_DIRS = {"checkpoint", "adapter", "merged", "tensorboard", "msrun_log", "__pycache__"}
MAX_SAMPLES = 50
ARTEFACT_NOTES = {
    "adapter": "LoRA adapter in PEFT format", "merged": "base model with the adapter merged in",
    "checkpoint": "training checkpoints for --resume_training", "metrics.jsonl": "metrics, one JSON record per line",
    "loss.png": "loss curves", "report.html": "static report (petformers report)",
    "run_summary.json": "the run's closing summary", "resolved_config.yaml": "the config the run used",
    "data_summary.json": "what the data pipeline saw", "eval_before.json": "evaluation of the base model",
    "eval_after.json": "evaluation of the fine-tuned model", "tensorboard": "TensorBoard event files",
    STATE_FILE: "the run's state", "msrun_log": "per-rank logs",
}


class OutsideRoot(ValueError):
    """A requested path is not inside the output root (or does not exist there)."""


def confined(root: Path, relative: str) -> Path:
    """`root/relative`, resolved, if it stays inside `root` (symlinks followed); else OutsideRoot."""
    root = Path(root).resolve()
    if not relative or "\x00" in relative or Path(relative).is_absolute():
        raise OutsideRoot(f"{relative!r}: not a path inside the output root")
    path = (root / relative).resolve()
    if path != root and root not in path.parents:
        raise OutsideRoot(f"{relative!r}: outside the output root")
    if not path.exists():
        raise OutsideRoot(f"{relative!r}: no such file under the output root")
    return path


def is_run_dir(path: Path) -> bool:
    return any((path / m).is_file() for m in RUN_MARKERS)


def find_runs(root: Path) -> list[str]:
    """Names (paths relative to `root`, '/'-separated) of every run directory under `root`, sorted."""
    root = Path(root).resolve()
    found = []

    def walk(d: Path, depth: int):
        if is_run_dir(d):
            found.append("." if d == root else d.relative_to(root).as_posix())
            return  # a run's own subdirectories are its artefacts
        if depth >= MAX_DEPTH:
            return
        try:
            children = sorted(p for p in d.iterdir() if p.is_dir() and p.name not in SKIP_DIRS
                              and not p.name.startswith("."))
        except OSError:
            return
        for child in children:
            real = child.resolve()
            if real == root or root in real.parents:  # a symlink out of the root is not followed
                walk(child, depth + 1)

    walk(root, 0)
    return found


def run_path(root: Path, name: str) -> Path:
    """The directory of run `name`, confined to the root and holding run files; else OutsideRoot."""
    path = Path(root).resolve() if name == "." else confined(root, name)
    if not path.is_dir() or not is_run_dir(path):
        raise OutsideRoot(f"{name!r}: not a run directory under the output root")
    return path


def _read_json(path: Path):
    """(object, note): the parsed file, or None and why not ('' when the file is absent)."""
    if not path.is_file():
        return None, ""
    try:
        return json.loads(path.read_text(encoding="utf-8")), ""
    except json.JSONDecodeError as e:
        return None, f"{path.name}: invalid JSON at line {e.lineno}: {e.msg}"
    except (OSError, UnicodeDecodeError) as e:
        return None, f"{path.name}: unreadable ({e})"


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError, OverflowError):
        return True  # exists but not ours, or not a pid we can judge: do not call it dead
    return True


STALE_SECONDS = 600  # no state file, no summary, and nothing written for this long: the run is gone


def run_state(run: Path) -> tuple[str, str]:
    """(state, reason): running / finished / stopped / crashed, from the run's files.

    `run_state.json` decides; a `running` whose process is gone (same host) is `crashed`. A run written
    before the state file existed is judged by `run_summary.json` and, lacking one, by how recently
    `metrics.jsonl` changed."""
    state, note = _read_json(run / STATE_FILE)
    if isinstance(state, dict) and state.get("state") in ("running", "finished", "stopped", "crashed"):
        reason = str(state.get("reason", ""))
        if state["state"] == "running" and state.get("host") == socket.gethostname() \
                and not _pid_alive(state.get("pid")):
            return "crashed", f"process {state.get('pid')} ended without recording an end (killed?)"
        return state["state"], reason
    summary, _ = _read_json(run / "run_summary.json")
    if isinstance(summary, dict):
        return ("stopped", "stopped before the last step") if summary.get("stopped") else ("finished", "")
    metrics = run / "metrics.jsonl"
    if metrics.is_file() and time.time() - metrics.stat().st_mtime < STALE_SECONDS:
        return "running", note or "no run_state.json; metrics.jsonl is being written"
    return "crashed", note or "no run_state.json and no run_summary.json: the run ended without a summary"


@dataclass
class MetricsChunk:
    records: list[dict] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    offset: int = 0  # byte offset to read from next time
    line: int = 0  # lines consumed so far


def read_metrics_since(run: Path, offset: int = 0, line: int = 0, final: bool = False) -> MetricsChunk:
    """Records of `run/metrics.jsonl` from byte `offset` on (complete lines only, so that a line being
    written is read next time; with `final`, a cut-off last line becomes an error note). A line that is
    not a JSON object becomes an error note naming its line number; the records around it still count."""
    chunk = MetricsChunk(offset=offset, line=line)
    path = run / "metrics.jsonl"
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            data = fh.read()
    except FileNotFoundError:
        return chunk
    except OSError as e:
        chunk.errors.append(f"metrics.jsonl: unreadable ({e})")
        return chunk
    end = data.rfind(b"\n") + 1
    complete, rest = data[:end], data[end:]
    for raw in complete.split(b"\n")[:-1]:
        chunk.line += 1
        _parse_line(raw, chunk)
    chunk.offset = offset + end
    if final and rest.strip():
        chunk.line += 1
        chunk.errors.append(f"metrics.jsonl:{chunk.line}: cut off (the run ended while writing it)")
        chunk.offset += len(rest)
    return chunk


def _finite(value):
    return value if not isinstance(value, float) or math.isfinite(value) else None


def _parse_line(raw: bytes, chunk: MetricsChunk):
    if not raw.strip():
        return
    try:
        record = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        chunk.errors.append(f"metrics.jsonl:{chunk.line}: not valid JSON ({getattr(e, 'msg', e)}); line skipped")
        return
    if not isinstance(record, dict):
        chunk.errors.append(f"metrics.jsonl:{chunk.line}: expected a JSON object, got {type(record).__name__}; "
                            "line skipped")
        return
    chunk.records.append({k: _finite(v) for k, v in record.items()})


def read_run_config(run: Path) -> tuple[str, dict, str]:
    """(text, parsed mapping, note) of `resolved_config.yaml`."""
    path = run / "resolved_config.yaml"
    if not path.is_file():
        return "", {}, ""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
        parsed = yaml.safe_load(text) or {}
    except (OSError, yaml.YAMLError) as e:
        return "", {}, f"resolved_config.yaml: unreadable ({str(e).splitlines()[0]})"
    if not isinstance(parsed, dict):
        return text, {}, "resolved_config.yaml: not a mapping"
    return text, parsed, ""


def flatten(tree, prefix: str = "") -> dict[str, object]:
    """{'a.b.c': value} of a nested mapping (lists kept whole)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name))
        else:
            flat[name] = value
    return flat


def config_diff(configs: dict[str, dict]) -> list[dict]:
    """Rows `{"key", "values": {run: value}}` for each flattened key whose value differs between runs
    (a key missing from a run counts as a difference); output_dir, which always differs, is left out."""
    flat = {name: flatten(cfg) for name, cfg in configs.items()}
    keys = sorted(set().union(*flat.values())) if flat else []
    missing = object()
    rows = []
    for key in keys:
        if key == "output_dir":
            continue
        values = {name: f.get(key, missing) for name, f in flat.items()}
        if len({json.dumps(v, sort_keys=True, default=str) if v is not missing else "\0" for v in values.values()}) > 1:
            rows.append({"key": key, "values": {n: (None if v is missing else v) for n, v in values.items()},
                         "missing": [n for n, v in values.items() if v is missing]})
    return rows


def _eval_file(run: Path, name: str, notes: list[str]) -> dict:
    obj, note = _read_json(run / name)
    if note:
        notes.append(note)
    if not isinstance(obj, dict):
        if obj is not None:
            notes.append(f"{name}: expected a JSON object")
        return {"metrics": {}, "samples": []}
    metrics = obj.get("metrics") if isinstance(obj.get("metrics"), dict) else {}
    samples = [s for s in obj.get("samples", []) if isinstance(s, dict)] if isinstance(obj.get("samples"), list) else []
    return {"metrics": metrics, "samples": samples}


def eval_table(run: Path, notes: list[str]) -> dict:
    """Before/after metrics and paired sample generations from eval_before.json / eval_after.json."""
    before, after = _eval_file(run, "eval_before.json", notes), _eval_file(run, "eval_after.json", notes)
    names = list(before["metrics"]) + [k for k in after["metrics"] if k not in before["metrics"]]
    metrics = [{"name": n, "before": before["metrics"].get(n), "after": after["metrics"].get(n)} for n in names]
    by_prompt = {s.get("prompt"): s for s in before["samples"]}
    base = after["samples"] or before["samples"]
    samples = []
    for s in base[:MAX_SAMPLES]:
        b = by_prompt.get(s.get("prompt"), {}) if after["samples"] else s
        a = s if after["samples"] else {}
        samples.append({"prompt": str(s.get("prompt", "")), "reference": str(s.get("reference", "")),
                        "before": b.get("prediction"), "after": a.get("prediction")})
    return {"metrics": metrics, "samples": samples, "total_samples": len(base)}


def _size(path: Path) -> int:
    try:
        if path.is_file():
            return path.stat().st_size
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    except OSError:
        return 0


def artefacts(run: Path) -> list[dict]:
    """What the run left: name, absolute path, size in bytes, what it is."""
    rows = []
    for p in sorted(run.iterdir()):
        if p.name.endswith(".tmp"):
            continue
        rows.append({"name": p.name + ("/" if p.is_dir() else ""), "path": str(p), "bytes": _size(p),
                     "what": ARTEFACT_NOTES.get(p.name, ""), "file": p.is_file()})
    return rows


def run_summary_line(root: Path, name: str) -> dict:
    """One row of the run list: name, state, reason, steps done, last loss, last change (epoch seconds)."""
    run = run_path(root, name)
    state, reason = run_state(run)
    summary, _ = _read_json(run / "run_summary.json")
    metrics = run / "metrics.jsonl"
    mtimes = [p.stat().st_mtime for p in (run / STATE_FILE, metrics) if p.is_file()]
    return {"name": name, "state": state, "reason": reason, "updated": max(mtimes) if mtimes else None,
            "run_mode": (summary or {}).get("run_mode") if isinstance(summary, dict) else None}


def run_detail(root: Path, name: str) -> dict:
    """Everything the page shows about one run except its metrics (streamed separately)."""
    run = run_path(root, name)
    notes: list[str] = []
    state, reason = run_state(run)
    text, parsed, note = read_run_config(run)
    if note:
        notes.append(note)
    summary, note = _read_json(run / "run_summary.json")
    if note:
        notes.append(note)
    data_summary, note = _read_json(run / "data_summary.json")
    if note:
        notes.append(note)
    return {"name": name, "path": str(run), "state": state, "reason": reason, "config_text": text,
            "config": parsed, "summary": summary if isinstance(summary, dict) else None,
            "data_summary": data_summary if isinstance(data_summary, dict) else None,
            "eval": eval_table(run, notes), "artefacts": artefacts(run), "notes": notes,
            "has_adapter": (run / "adapter" / "adapter_config.json").is_file(),
            "base_model": parsed.get("load_checkpoint") if isinstance(parsed, dict) else None}
