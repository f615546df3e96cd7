# tripletops — the commands a newcomer needs: `make demo` (the main job: three trainings, each
# tripletops against the eager reference, with the speedups), `make test` (what CI runs) and
# `make bench` (the benchmark report).
# Each installs what it needs into the project's own environment, .venv in the checkout
# (ignored by git), made on first use from the first `python3` on PATH (a system Python
# that is PEP 668-managed is fine: nothing is installed into it). PYTHON=/path/to/python
# uses another environment instead, and installs into that one.
VENV ?= .venv
ifeq ($(origin PYTHON),undefined)
PYTHON := $(VENV)/bin/python
ENV_DEP := $(VENV)/bin/python
endif
PIP := $(PYTHON) -m pip
# The CPU wheel of torch 2.13.0 sits in pip's local wheel folder on our machines; an
# unpinned `pip install torch` would download several GB of CUDA packages instead.
TORCH_SPEC ?= torch==2.13.0
MAX_JOBS ?= 2
export MAX_JOBS

.PHONY: install test test-fast demo demo-results bench bench-run bench-overhead bench-integrations bench-protocols bench-retrieval cuda-check cuda-perf torch-range cuda-emu package-check gpu-check clean

# The project environment: `python3 -m venv` (on Debian/Ubuntu without the venv module:
# apt-get install python3-venv), then a pip that reads current wheels.
$(VENV)/bin/python:
	@python3 -m venv $(VENV) || { echo "tripletops: python3 -m venv failed; on Debian/Ubuntu: apt-get install python3-venv, or pass PYTHON=/path/to/python"; exit 1; }
	@$(VENV)/bin/python -m pip install -q --upgrade pip

# Builds only when the extension is missing, built against another torch, or older than a
# source (tools/build_is_current.py).
install: $(ENV_DEP)
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH_SPEC)"
	@if $(PYTHON) tools/build_is_current.py; then echo "tripletops: the built extension is current"; else \
	  $(PIP) install "setuptools>=77" wheel ninja numpy && $(PIP) install --no-build-isolation -e ".[test]"; fi
	@# fast-reid's and torchreid's eval_market1501, the reference of tests/test_protocols.py: their
	@# rank.py files only, so without their dependencies (fastreid pins torch 1.13).
	@$(PYTHON) -c "import importlib.metadata as m; m.version('fastreid'); m.version('torchreid')" 2>/dev/null || \
	  $(PIP) install --no-deps "fastreid==1.4.0" "torchreid==0.2.5"

# The full suite, against the compiled kernels only (TRIPLETOPS_STRICT=1: no silent fallback).
test: install
	TRIPLETOPS_STRICT=1 $(PYTHON) -m pytest tests

test-fast: install
	TRIPLETOPS_STRICT=1 $(PYTHON) -m pytest tests -m "not slow"

# The reference training script, three times: digits with tripletops and with the eager
# reference in lockstep (identical trajectories, retrieval, speedup), then the
# cross-batch-memory mode where the loss dominates the step, then the multi-label mode.
# Results go to runs/demo (ignored): a checkout stays clean. `make demo-results` rewrites
# the committed ones (benchmarks/results/train_digits*/ and docs/demo.md's three sections).
DEMO_OUT ?= runs/demo
DEMO_README ?=
demo: install
	$(PYTHON) benchmarks/train_reference.py --out $(DEMO_OUT)/train_digits $(DEMO_README)
	$(PYTHON) benchmarks/train_reference.py --bank-size 262144 --steps 30 --dtype float32 \
		--out $(DEMO_OUT)/train_digits_bank $(DEMO_README)
	$(PYTHON) benchmarks/train_reference.py --multi-label --out $(DEMO_OUT)/train_digits_multilabel $(DEMO_README)

demo-results:
	$(MAKE) demo DEMO_OUT=benchmarks/results DEMO_README="--readme docs/demo.md"

# The benchmark suite (pytest-benchmark; CPU, and CUDA when present) -> results/<device>.json,
# then compare.py -> the markdown report, the PNG plot and docs/performance.md.
BENCH_NAME ?= $(shell $(PYTHON) -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')" 2>/dev/null || echo cpu)
BENCH_FILES ?= benchmarks/bench_batch_hard.py benchmarks/bench_pairwise_distance.py \
	benchmarks/bench_triplet_margin.py benchmarks/bench_loss_family.py
BENCH_SELECT ?=
bench: install bench-run

# The benchmarks and the report alone, with what is installed (the GPU machine has no network).
bench-run:
	TRIPLETOPS_STRICT=1 $(PYTHON) -m pytest $(BENCH_FILES) $(BENCH_SELECT) --benchmark-only \
		--benchmark-json=benchmarks/results/$(BENCH_NAME).json --benchmark-columns=median,iqr,rounds -q
	$(PYTHON) benchmarks/compare.py benchmarks/results/$(BENCH_NAME).json --markdown benchmarks/results/$(BENCH_NAME).md \
		--plot benchmarks/results/$(BENCH_NAME).png
	$(PYTHON) benchmarks/compare.py $(wildcard benchmarks/results/cpu.json benchmarks/results/cuda.json) --readme docs/performance.md

# The fixed cost of one loss call (forward + backward at B = 8, 32, 256) against one autograd
# GEMM and the eager recipe, side by side -> benchmarks/results/overhead_cpu.md and docs/performance.md.
bench-overhead: install
	TRIPLETOPS_STRICT=1 $(PYTHON) benchmarks/bench_overhead.py --readme docs/performance.md

# reid_metrics and verification_metrics against one GEMM and fast-reid's eval_market1501.
bench-protocols: install
	TRIPLETOPS_STRICT=1 $(PYTHON) benchmarks/bench_protocols.py --readme docs/protocols.md

# The drop-ins (tripletops.integrations) against sentence-transformers' and PML's own classes.
bench-integrations: install
	TRIPLETOPS_STRICT=1 $(PYTHON) benchmarks/bench_integrations.py --readme docs/performance.md

# Exact k-nearest search against faiss-cpu, cdist + topk and one GEMM, and the retrieval
# metrics against AccuracyCalculator -> benchmarks/results/retrieval_<device>.md and docs/performance.md.
bench-retrieval: install
	TRIPLETOPS_STRICT=1 $(PYTHON) benchmarks/bench_retrieval.py --readme docs/performance.md

# Compile every csrc/cuda/*.cu with nvcc for sm_80 and sm_90 against the installed torch
# headers and print ptxas' register/spill report. No GPU needed; .ci/run runs it when nvcc exists.
# The CUDA kernels' cost models, executable (no GPU): registers and occupancy from the
# compiled sm_90 code, and each target row's kernels with their modelled H200 times.
cuda-perf: $(ENV_DEP)
	$(PYTHON) tools/cuda_perf.py

cuda-check: install
	$(PYTHON) tools/cuda_check.py

# The supported torch range (pyproject.toml: torch>=2.6): every C++ and CUDA source compiled
# against the headers of the oldest and the newest release, fetched without installing them
# (tools/torch_headers.py: ~50 MB of a wheel by HTTP range requests, or a local wheel; cached
# in ~/.cache/tripletops). The installed torch (2.13) builds and runs the suite (make test).
TORCH_RANGE ?= 2.6.0 2.14.1
torch-range: install
	$(PYTHON) tools/cuda_check.py $(addprefix --torch ,$(TORCH_RANGE))

# The CUDA kernels executed on the CPU: csrc/cuda/*.cu compiled by g++ against the SIMT
# emulator in tools/cuda_emu (ASan + UBSan), its self-test, then the suite's cuda-emu cases
# against the same references. Ends with "cuda-emu: N of M __global__ kernels launched".
cuda-emu: install
	$(PYTHON) tools/cuda_emu/run.py

# The package as a user gets it: sdist -> wheel (in a fresh venv) -> installed -> smoke test
# from outside the tree; an isolated `pip install` must refuse at once (tools/package_check.sh).
package-check: $(ENV_DEP)
	PYTHON=$(PYTHON) TORCH_SPEC="$(TORCH_SPEC)" bash tools/package_check.sh

# On a GPU machine with no network (torch with CUDA, nvcc, ninja, pytest, pytest-xdist and
# pytest-timeout preinstalled): what a GPU lease should tell us, in one unattended run of at
# most 8 minutes (tools/gpu_check.py): the build (compiler versions, link line, GPU code,
# nm of _C), the suite's CUDA cases in parallel, compute-sanitizer's memcheck, racecheck,
# synccheck and initcheck over tools/gpu_sanitize_driver.py, the issues' target rows with
# their peers, a per-kernel profile and a short CUDA training run -> $(GPU_CHECK_OUT)/, the
# summary last (and in summary.md). Missing packages (pytorch-metric-learning) come as
# wheels from $(WHEELS): `pip download --no-deps -d .whl pytorch-metric-learning` beforehand.
WHEELS ?= .whl
GPU_CHECK_OUT ?= benchmarks/results/gpu-check
# The GPU machine's own python3 (torch with CUDA preinstalled, no network), not .venv.
GPU_PYTHON := $(if $(ENV_DEP),python3,$(PYTHON))
gpu-check:
	$(GPU_PYTHON) tools/gpu_check.py --out $(GPU_CHECK_OUT) --wheels $(WHEELS)

clean:
	rm -rf build *.egg-info tripletops/*.so .pytest_cache .benchmarks runs
