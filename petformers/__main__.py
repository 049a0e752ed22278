"""`python -m petformers` (and so `torchrun -m petformers run ...`)."""

import sys

from petformers.allocator import reexec_under_jemalloc

# Before torch is imported: the process re-executes itself once with jemalloc preloaded (petformers/allocator.py).
reexec_under_jemalloc(sys.argv[1:])

from torch.distributed.elastic.multiprocessing.errors import record  # noqa: E402  (after the re-exec above)

from petformers.cli.main import main  # noqa: E402
from petformers.distributed.leave import exit_process  # noqa: E402

# record(): under torchrun, an uncaught error of any rank is written where torchrun's failure summary shows it.
raise SystemExit(exit_process(record(main)()))
