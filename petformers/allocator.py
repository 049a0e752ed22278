"""Which malloc a petformers process runs on: jemalloc where it is installed, else the C library's.

A CPU training step frees and reallocates the same activations every row. glibc raises its mmap threshold
at the first free of a large block and from then on keeps freed activations in its heaps, so the peak RSS
of the bench run is ~2x the tensors alive at its peak (4.3 GiB, docs/benchmarks.md); a fixed threshold
(PETFORMERS_LOW_RSS=1) gives memory back but maps fresh, zeroed pages for every activation (1.5x slower
steps). jemalloc reuses freed blocks by size class and returns idle pages on its own: the bench run's peak
RSS is close to the tensors alive. PyTorch's CPU performance guide recommends it, and its CPU launcher
(`torch.backends.xeon.run_cpu`) preloads it the same way.

A malloc is chosen when a process starts (LD_PRELOAD), so `python -m petformers` re-executes itself once
under jemalloc before importing anything heavy. PETFORMERS_ALLOCATOR=glibc keeps the C library's malloc;
=jemalloc requires jemalloc (a clear error where it is missing); unset or =auto uses it where found.
Only the command-line entry points do this: petformers used as a library never replaces its process.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ENV = "PETFORMERS_ALLOCATOR"
CHOICES = ("auto", "jemalloc", "glibc")
# Debian/Ubuntu's libjemalloc2 (x86-64, arm64), Fedora's jemalloc, then the usual other places.
_CANDIDATES = ("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
               "/usr/lib64/libjemalloc.so.2", "/usr/lib/libjemalloc.so.2", "/usr/local/lib/libjemalloc.so.2")


def find_jemalloc() -> str | None:
    """The path of an installed libjemalloc.so.2, or None."""
    for path in _CANDIDATES:
        if Path(path).is_file():
            return path
    return None


def choice() -> str:
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in CHOICES:
        sys.stderr.write(f"petformers: {ENV}={value!r}: expected one of {', '.join(CHOICES)}\n")
        raise SystemExit(2)
    return value


def current() -> str:
    """'jemalloc' when this process runs on it (it is mapped into the process), else 'glibc'."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "glibc"
    return "jemalloc" if "libjemalloc" in maps else "glibc"


def reexec_under_jemalloc(argv: list[str]) -> None:
    """Replace this process by `python -m petformers ARGV` with jemalloc preloaded, when chosen and
    found and not already loaded; otherwise return and run on as is. Exits with code 2 when
    PETFORMERS_ALLOCATOR=jemalloc and jemalloc is missing."""
    wanted = choice()
    if wanted == "glibc" or not sys.platform.startswith("linux"):
        return
    lib = find_jemalloc()
    if lib is None:
        if wanted == "jemalloc":
            sys.stderr.write(f"petformers: {ENV}=jemalloc but no libjemalloc.so.2 is installed (looked in "
                             f"{', '.join(_CANDIDATES)}); install it (Debian: apt-get install libjemalloc2) "
                             f"or set {ENV}=glibc\n")
            raise SystemExit(2)
        return
    preload = os.environ.get("LD_PRELOAD", "")
    if "libjemalloc" in preload or current() == "jemalloc":
        return
    env = dict(os.environ, LD_PRELOAD=f"{lib}:{preload}" if preload else lib)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "petformers", *argv], env)
