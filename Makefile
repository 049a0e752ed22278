# petformers: the README's two commands, plus the benchmark.
PY      := .venv/bin/python
PIP     := .venv/bin/pip
STAMP   := .venv/.petformers-installed

.PHONY: setup test demo bench clean

# Create .venv once; install the pinned CPU torch only when no torch is importable,
# so an existing (e.g. CUDA) torch satisfying torch>=2.4 is kept.
$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv .venv
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	@$(PIP) install -q -e '.[dev]'
	@touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -q

demo: $(STAMP)
	$(PY) scripts/demo.py

bench: $(STAMP)
	$(PY) scripts/bench.py

clean:
	rm -rf output runs .pytest_cache
