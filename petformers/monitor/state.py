"""`RUN/run_state.json`: the run's own word on what it is doing, so that a board (or a person) tells a
running run from a finished, stopped or crashed one by reading files, never by asking a process.

The run writes `running` (with its pid and host) when it starts and `finished`, `stopped` or `crashed`
when it ends. A run killed outright (SIGKILL, power loss) cannot write its end: the file still says
`running`, and readers check the pid on the same host (`petformers.board.runs`).
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import traceback
from pathlib import Path

from petformers import atomic

STATE_FILE = "run_state.json"
STATES = ("running", "finished", "stopped", "crashed")


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def write_state(run_dir: str | os.PathLike, fields: dict) -> Path:
    """Write `fields` as RUN/run_state.json atomically (temp file, fsync, rename)."""
    path = Path(run_dir) / STATE_FILE
    atomic.write_text(path, json.dumps(fields, indent=2, ensure_ascii=False) + "\n")
    return path


class RunState:
    """`with RunState(out, enabled=is_rank0) as state: ...; state.ended(summary)`.

    Leaving the block by an exception records `crashed` with the error's last line (Ctrl-C: `stopped`);
    leaving it normally records `finished`, or `stopped` when the summary says the run was stopped.
    """

    def __init__(self, run_dir: str | os.PathLike, run_mode: str = "", enabled: bool = True):
        self.run_dir, self.enabled = Path(run_dir), enabled
        self.fields = {"state": "running", "pid": os.getpid(), "host": socket.gethostname(),
                       "run_mode": run_mode, "started": _now()}
        self.summary: dict | None = None

    def ended(self, summary: dict | None):
        self.summary = summary

    def __enter__(self):
        if self.enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_state(self.run_dir, self.fields)
        return self

    def __exit__(self, exc_type, exc, tb):
        if not self.enabled:
            return False
        fields = dict(self.fields, ended=_now())
        if exc_type is None:
            stopped = bool(self.summary and self.summary.get("stopped"))
            fields["state"] = "stopped" if stopped else "finished"
            if stopped and self.summary.get("signal"):
                fields["reason"] = f"stopped by {self.summary['signal']}"
        elif issubclass(exc_type, KeyboardInterrupt):
            fields.update(state="stopped", reason="interrupted")
        else:
            last = "".join(traceback.format_exception_only(exc_type, exc)).strip().splitlines()
            fields.update(state="crashed", reason=last[-1] if last else exc_type.__name__)
        try:
            write_state(self.run_dir, fields)
        except OSError:
            pass  # the run's own error matters more than its state file
        return False
