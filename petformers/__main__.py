"""`python -m petformers` (and so `torchrun -m petformers run ...`)."""

from torch.distributed.elastic.multiprocessing.errors import record

from petformers.cli.main import main

# record(): under torchrun, an uncaught error of any rank is written where torchrun's failure summary shows it.
raise SystemExit(record(main)())
