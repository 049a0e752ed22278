"""Fault injection for the kill-anywhere campaign (scripts/fault_campaign.py, tests/test_kill_anywhere.py).

PETFORMERS_KILL_AT=POINT:N makes this process SIGKILL itself the N-th time it passes `kill_point(POINT)`
(points: `step` after each optimizer step, `checkpoint` between the files of a checkpoint write and
around its rename, `eval` before each evaluation batch); PETFORMERS_KILL_RANK limits it to one rank.
A real SIGKILL, not an exception: nothing runs after it, no finally, no flush, as with `kill -9` or
the OOM killer. Unset (always, outside tests) it costs one environment lookup.
"""

from __future__ import annotations

import os
import signal

_passed: dict[str, int] = {}


def kill_point(name: str):
    spec = os.environ.get("PETFORMERS_KILL_AT")
    if not spec:
        return
    point, _, count = spec.partition(":")
    if point != name:
        return
    rank = os.environ.get("PETFORMERS_KILL_RANK")
    if rank is not None and rank != os.environ.get("RANK", "0"):
        return
    _passed[name] = _passed.get(name, 0) + 1
    if _passed[name] == int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)
