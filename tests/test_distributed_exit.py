"""A process that joined a gloo process group leaves through `exit_process` and so cannot abort at exit.

torch keeps gloo's worker threads alive after destroy_process_group; a worker that frees a finished
collective's tensors while the interpreter is finalizing aborts the process (exit -6, "terminate called
without an active exception"), which made 2-rank runs that had succeeded fail now and then. The scripts
below make that moment certain instead of rare: rank 0 joins rank 1's collective a second late, while
rank 1 holds the GIL (the worker then waits for it), then rank 1 exits and a finalizer releases the GIL
while its interpreter finalizes. Through `exit_process` rank 1 ends with its own exit code; through a plain return it
aborts (the control case, so the scenario is known to reproduce the crash).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import atexit, gc, os, sys, time
gc.disable()
import torch
import torch.distributed as dist
from petformers.distributed.env import init_distributed
from petformers.distributed.leave import exit_process

env = init_distributed(True)
tensor = torch.ones(4096)
if env.rank == 0:
    time.sleep(1.0)  # joins rank 1's collective a second late
    dist.all_reduce(tensor)
    os._exit(0)  # this rank's exit is not what is tested

sys.setswitchinterval(100.0)  # this thread keeps the GIL unless it blocks
work = dist.all_reduce(tensor, async_op=True)
del work  # gloo's worker thread holds the last reference: it needs the GIL to free it
deadline = time.monotonic() + 2.5
while time.monotonic() < deadline:  # rank 0 joins: the worker finishes, then waits for the GIL
    pass


class SlowFinalizer:
    def __del__(self, sleep=time.sleep):
        sleep(0.5)  # run while the interpreter finalizes; it releases the GIL to the waiting worker


cycle = SlowFinalizer()
cycle.self = cycle
del cycle
atexit._clear()  # no exit handler releases the GIL before finalization starts
raise SystemExit(exit_process(3) if sys.argv[1] == "exit_process" else 3)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank1_exit_code(tmp_path: Path, how: str) -> tuple[int, str]:
    script = tmp_path / "leave.py"
    script.write_text(SCRIPT, encoding="utf-8")
    port = str(_free_port())
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
               "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank), "PETFORMERS_DIST_TIMEOUT": "30",
               "PYTHONPATH": str(REPO)}
        procs.append(subprocess.Popen([sys.executable, str(script), how], cwd=tmp_path, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=120) for p in procs]
    return procs[1].returncode, outputs[1][1]


def test_a_rank_leaving_through_exit_process_keeps_its_exit_code(tmp_path):
    code, err = _rank1_exit_code(tmp_path, "exit_process")
    assert code == 3, err[-2000:]


@pytest.mark.skipif(sys.version_info >= (3, 14), reason="from 3.14 a thread taking the GIL while Python "
                    "finalizes hangs instead of exiting: the control's crash is a 3.11-3.13 one")
def test_the_scenario_aborts_a_rank_that_finalizes_normally(tmp_path):
    """The control: without exit_process the same rank dies of SIGABRT, so the test above tests something.
    Should a later torch free those tensors safely, this fails and exit_process's os._exit can go."""
    code, err = _rank1_exit_code(tmp_path, "return")
    assert code == -6, (code, err[-2000:])
    assert "terminate called without an active exception" in err
