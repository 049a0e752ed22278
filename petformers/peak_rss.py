"""The process's peak resident memory, as petformers reports and its scripts measure it.

Linux's `ru_maxrss` is not this program's alone: fork copies the parent's memory map with its high-water
mark and exec keeps it, so a run started from a big process (a test runner holding 2.5 GiB, measured)
reports at least the parent's size. `VmHWM` in /proc/self/status is the high-water mark of this process
image only, reset at exec. Elsewhere `ru_maxrss` is what there is (bytes on macOS, KiB on Linux).
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path


def peak_rss_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # "VmHWM:  123456 kB"
    except (OSError, ValueError, IndexError):
        pass
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024
