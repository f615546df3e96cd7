"""Triplet margin loss over B explicit (anchor, positive, negative) triplets, D = 128:
tripletops against torch.nn.functional.triplet_margin_loss (the eager op),
tripletops.reference, torch.compile(reference) and pytorch-metric-learning's
TripletMarginLoss given the same triplets as an indices tuple. Forward and forward +
backward.

    make bench        # or: pytest benchmarks/bench_triplet_margin.py --benchmark-only
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import tripletops
from tripletops import reference

import harness

MARGIN = 1.0
D_SWEEP = 128
_compiled_reference = torch.compile(reference.triplet_margin_loss)


def _pml():
    pml = harness.pml_or_none()
    if pml is None:
        pytest.skip("pytorch-metric-learning is not installed")
    distances, losses, _, reducers = pml
    loss = losses.TripletMarginLoss(margin=MARGIN, distance=distances.LpDistance(normalize_embeddings=False),
                                    reducer=reducers.MeanReducer())

    def fn(a, p, n):
        idx = torch.arange(len(a), device=a.device)
        return loss(torch.cat([a, p, n]), None, (idx, idx + len(a), idx + 2 * len(a)))

    return fn


IMPLS = {
    "tripletops": lambda: (lambda a, p, n: tripletops.triplet_margin_loss(a, p, n, margin=MARGIN)),
    "eager": lambda: (lambda a, p, n: F.triplet_margin_loss(a, p, n, margin=MARGIN)),
    "reference": lambda: (lambda a, p, n: reference.triplet_margin_loss(a, p, n, margin=MARGIN)),
    "compile(reference)": lambda: (lambda a, p, n: _compiled_reference(a, p, n, margin=MARGIN)),
    "pml": _pml,
}

CASES = [(dev, b, D_SWEEP) for dev in harness.DEVICES for b in harness.SWEEP[dev]]


@pytest.mark.parametrize("device,b,d", CASES, ids=[f"{dev}-B{b}-D{d}" for dev, b, d in CASES])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_triplet_margin(benchmark, impl, mode, device, b, d):
    a, _ = harness.inputs(b, d, device, seed=0)
    p, _ = harness.inputs(b, d, device, seed=1)
    n, _ = harness.inputs(b, d, device, seed=2)
    benchmark.group = f"triplet_margin {device} {mode} B={b} D={d}"
    fn = harness.fwd_bwd(IMPLS[impl](), a, p, n, mode=mode)
    harness.run(benchmark, fn, device=device, warmup=3 if impl.startswith("compile") else 1,
                family="triplet_margin", impl=impl, mode=mode, B=b, D=d)
