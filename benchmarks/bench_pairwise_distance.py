"""Pairwise distance matrix (N, M) with N = M = B, D = 128: tripletops against
torch.cdist (the eager op users call), tripletops.reference (difference-form cdist),
torch.compile(reference) and pytorch-metric-learning's LpDistance. Forward, and forward
+ backward of the sum of the matrix.

    make bench        # or: pytest benchmarks/bench_pairwise_distance.py --benchmark-only
"""
from __future__ import annotations

import pytest
import torch

import tripletops
from tripletops import reference

import harness

D_SWEEP = 128
_compiled_reference = torch.compile(reference.pairwise_distance)


def _pml():
    pml = harness.pml_or_none()
    if pml is None:
        pytest.skip("pytorch-metric-learning is not installed")
    dist = pml[0].LpDistance(normalize_embeddings=False)
    return lambda x, y: dist(x, y)


IMPLS = {
    "tripletops": lambda: tripletops.pairwise_distance,
    "eager": lambda: torch.cdist,
    "reference": lambda: reference.pairwise_distance,
    "compile(reference)": lambda: _compiled_reference,
    "pml": _pml,
}

CASES = [(dev, b, D_SWEEP) for dev in harness.DEVICES for b in harness.SWEEP[dev]]


@pytest.mark.parametrize("device,b,d", CASES, ids=[f"{dev}-B{b}-D{d}" for dev, b, d in CASES])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_pairwise_distance(benchmark, impl, mode, device, b, d):
    x, _ = harness.inputs(b, d, device, seed=0)
    y, _ = harness.inputs(b, d, device, seed=1)
    benchmark.group = f"pairwise_distance {device} {mode} B={b} D={d}"
    fn = harness.fwd_bwd(IMPLS[impl](), x, y, mode=mode)
    harness.run(benchmark, fn, device=device, warmup=3 if impl.startswith("compile") else 1,
                family="pairwise_distance", impl=impl, mode=mode, B=b, D=d)
