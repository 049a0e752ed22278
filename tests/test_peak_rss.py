"""The peak RSS petformers reports is its own process's, not the parent's it was forked from
(petformers/peak_rss.py): Linux's ru_maxrss carries a parent's high-water mark across fork and exec."""

import os
import subprocess
import sys

import pytest

from petformers.peak_rss import peak_rss_bytes

PROBE = ("import resource; from petformers.peak_rss import peak_rss_bytes; "
         "print(peak_rss_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the fork/exec inheritance is Linux's")
def test_a_child_of_a_big_parent_reports_its_own_peak():
    ballast = bytearray(700 * 2**20)  # touched pages: the parent's RSS is now >= 700 MiB
    for i in range(0, len(ballast), 4096):
        ballast[i] = 1
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True,
                         env=dict(os.environ, PETFORMERS_ALLOCATOR="glibc")).stdout.split()
    own, maxrss = int(out[0]), int(out[1])
    assert own < 300 * 2**20, own / 2**20  # a bare Python importing nothing heavy
    assert maxrss >= 700 * 2**20, "ru_maxrss no longer carries the parent's peak: this module may be moot"
    assert peak_rss_bytes() >= 700 * 2**20
    del ballast
