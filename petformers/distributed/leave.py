"""How a petformers process exits once it has joined a process group. Torch-free, so that the command
line imports it before the jemalloc re-exec (petformers/allocator.py) at no cost."""

from __future__ import annotations

import logging
import os
import sys

joined_a_process_group = False  # set by distributed.env.init_distributed: this process leaves through exit_process


def exit_process(code: int) -> int:
    """`code`, for the command line to exit with; a process that joined a process group exits here.

    Why: torch keeps gloo's worker threads alive after destroy_process_group (its gloo backend has no
    shutdown), and such a thread frees a finished collective's tensors a moment after the caller's
    wait returns, taking the GIL to do so. When the interpreter is already finalizing by then, the
    thread aborts the process ("terminate called without an active exception", exit -6) after a run
    that succeeded: a rank whose last collective (FSDP's unshard) is followed at once by its exit hit
    this now and then. Leaving with os._exit skips finalization; every file petformers writes is
    closed and fsynced by then, so only the streams and logging need flushing here."""
    if joined_a_process_group:
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)
    return code
