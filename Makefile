# petformers: the README's two commands, plus the benchmark.
PY      := .venv/bin/python
PIP     := .venv/bin/pip
STAMP   := .venv/.petformers-installed
APT     := $(shell command -v apt-get 2>/dev/null)

.PHONY: setup test demo bench bench-qlora bench-scaling clean browser faults llamacpp-runtime jemalloc

# Create .venv once; install the pinned CPU torch only when no torch is importable,
# so an existing (e.g. CUDA) torch satisfying torch>=2.4 is kept.
$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv .venv
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	@$(PIP) install -q -e '.[dev,board,tensorboard]'
	@touch $(STAMP)

# Headless Chromium and its WebDriver for the browser tests of `petformers board` and report.html
# (Debian packages; installed only when missing, needs root on a Debian/Ubuntu machine).
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ -n "$(APT)" ] && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	else echo "make browser: chromium and chromium-driver are missing; install them (apt-get install chromium chromium-driver) for the browser tests"; fi

# llama.cpp (the xllamacpp wheel of the dev extra, for the GGUF export tests) links the system's OpenMP
# runtime: Debian's libgomp1, installed only when missing.
llamacpp-runtime:
	@if ldconfig -p 2>/dev/null | grep -q 'libgomp\.so\.1 '; then :; \
	elif [ -n "$(APT)" ] && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libgomp1 >/dev/null; \
	else echo "make llamacpp-runtime: libgomp1 is missing; install it (apt-get install libgomp1) for the llama.cpp tests"; fi

# jemalloc, the malloc `python -m petformers` runs on where it is installed (petformers/allocator.py: about
# half glibc's peak RSS for a training run): Debian's libjemalloc2, installed only when missing.
jemalloc:
	@if ls /usr/lib/*/libjemalloc.so.2 /usr/lib64/libjemalloc.so.2 >/dev/null 2>&1; then :; \
	elif [ -n "$(APT)" ] && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libjemalloc2 >/dev/null; \
	else echo "make jemalloc: libjemalloc2 is missing; install it (apt-get install libjemalloc2) for a leaner training process"; fi

setup: $(STAMP) jemalloc

test: $(STAMP) jemalloc browser llamacpp-runtime
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -q -m "not faults"

# The long fault-injection runs (docs/reliability.md): the tests marked `faults`, then the kill -9
# campaign over more seeds (SEEDS=5 KILLS=20 by default) and the 2-rank DDP/FSDP2 campaign (RANK_SEEDS=1
# RANK_KILLS=4 per strategy); figures in output/faults.json.
SEEDS ?= 5
KILLS ?= 20
RANK_SEEDS ?= 1
RANK_KILLS ?= 4
faults: $(STAMP) jemalloc
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -q -m faults
	@mkdir -p output
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) scripts/fault_campaign.py --seeds $(SEEDS) --kills $(KILLS) \
		--rank_seeds $(RANK_SEEDS) --rank_kills $(RANK_KILLS) \
		--json output/faults.json

demo: $(STAMP) jemalloc
	$(PY) scripts/demo.py

# Every row of docs/benchmarks.md and .json, the levers included, from this one invocation (~1.5 h quiet).
bench: $(STAMP) jemalloc
	$(PY) scripts/bench.py --levers

# The bench slice over a float32, a GGUF-Q4_1-kept and an NF4 base, next to transformers + peft +
# bitsandbytes 4-bit (docs/benchmarks.md, section qlora-bench; docs/benchmarks_qlora.json).
bench-qlora: $(STAMP) jemalloc
	$(PY) scripts/bench_qlora.py

# How cost grows with the row length (512-4096) and the model size (135M real, 360M- and 1.1B-shaped random
# weights), petformers beside transformers + peft group_by_length (docs/benchmarks.md, section scaling;
# docs/benchmarks_scaling.json; ~36 min on 2 quiet cores: the 135M at every length, every model at 1024).
# Options: scripts/bench_scaling.py --help (--grid cross: every model at every length, hours).
bench-scaling: $(STAMP) jemalloc
	$(PY) scripts/bench_scaling.py

clean:
	rm -rf output runs .pytest_cache
