# tripletops — the two commands a newcomer needs: `make test` and `make bench`.
# Each installs what it needs into the current Python (PYTHON=... to pick another).
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# The CPU wheel of torch 2.13.0 sits in pip's local wheel folder on our machines; an
# unpinned `pip install torch` would download several GB of CUDA packages instead.
TORCH_SPEC ?= torch==2.13.0
MAX_JOBS ?= 2
export MAX_JOBS

.PHONY: install test test-fast bench clean

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH_SPEC)"
	$(PIP) install "setuptools>=64" wheel ninja numpy
	$(PIP) install --no-build-isolation -e ".[test]"

# The full suite, against the compiled kernels only (TRIPLETOPS_STRICT=1: no silent fallback).
test: install
	TRIPLETOPS_STRICT=1 $(PYTHON) -m pytest tests

test-fast: install
	TRIPLETOPS_STRICT=1 $(PYTHON) -m pytest tests -m "not slow"

# CPU benchmarks (pytest-benchmark) -> benchmarks/results/cpu.json, then the markdown
# table in benchmarks/results/cpu.md and in README.md's performance section.
bench: install
	TRIPLETOPS_STRICT=1 $(PYTHON) -m pytest benchmarks/bench_batch_hard.py --benchmark-only \
		--benchmark-json=benchmarks/results/cpu.json --benchmark-columns=median,iqr,rounds -q
	$(PYTHON) benchmarks/report.py benchmarks/results/cpu.json --markdown benchmarks/results/cpu.md --readme README.md

clean:
	rm -rf build *.egg-info tripletops/*.so .pytest_cache .benchmarks
