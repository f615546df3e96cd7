"""The rest of the family, forward + backward (and forward), D = 128:

- batch_all_loss against the eager B³ formulation (`tripletops.reference`, every
  triplet term in one (B, B, B) tensor), its torch.compile, and pytorch-metric-learning
  (TripletMarginMiner "all" + TripletMarginLoss);
- semi_hard_loss against the eager TF-Addons-style formulation (`tripletops.reference`,
  a (B, B, B) mask of "negatives farther than the positive") and its torch.compile;
- contrastive_loss against `tripletops.reference` (cdist + elementwise), its
  torch.compile and PML's ContrastiveLoss.

The B³ peers run up to B = 512 only: at 1024 a single (B, B, B) float tensor is 4 GiB.
On CUDA the sweep covers B = 32 ... 8192, D in {128, 512}, fp32 and bf16 (PML in fp32),
with one x·xᵀ GEMM per size as the floor (harness.grid).

    make bench        # or: pytest benchmarks/bench_loss_family.py --benchmark-only
"""
from __future__ import annotations

import pytest
import torch

import tripletops
from tripletops import reference

import harness

D_SWEEP = 128
CUBIC_MAX_B = 512
_compiled = {name: torch.compile(getattr(reference, name))
             for name in ("batch_all_loss", "semi_hard_loss", "contrastive_loss")}


def _pml(family):
    pml = harness.pml_or_none()
    if pml is None:
        pytest.skip("pytorch-metric-learning is not installed")
    distances, losses, miners, reducers = pml
    dist = distances.LpDistance(normalize_embeddings=False)
    if family == "batch_all":
        miner = miners.TripletMarginMiner(margin=0.2, type_of_triplets="all", distance=dist)
        loss = losses.TripletMarginLoss(margin=0.2, distance=dist, reducer=reducers.AvgNonZeroReducer())
        return lambda x, y: loss(x, y, miner(x, y))
    if family == "contrastive":
        loss = losses.ContrastiveLoss(pos_margin=0.0, neg_margin=1.0, distance=dist)
        return lambda x, y: loss(x, y)
    pytest.skip(f"no PML peer for {family}")


FAMILIES = {
    "batch_all": (lambda x, y: tripletops.batch_all_loss(x, y, margin=0.2),
                  lambda x, y: reference.batch_all_loss(x, y, margin=0.2),
                  lambda x, y: _compiled["batch_all_loss"](x, y, margin=0.2)),
    "semi_hard": (lambda x, y: tripletops.semi_hard_loss(x, y, margin=1.0),
                  lambda x, y: reference.semi_hard_loss(x, y, margin=1.0),
                  lambda x, y: _compiled["semi_hard_loss"](x, y, margin=1.0)),
    "contrastive": (lambda x, y: tripletops.contrastive_loss(x, y),
                    lambda x, y: reference.contrastive_loss(x, y),
                    lambda x, y: _compiled["contrastive_loss"](x, y)),
}
IMPLS = ["tripletops", "reference", "compile(reference)", "pml"]
CASES = harness.grid(D_SWEEP)


@pytest.mark.parametrize("device,b,d,dtype", CASES, ids=[harness.case_id(c) for c in CASES])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_loss_family(benchmark, family, impl, mode, device, b, d, dtype):
    cubic = family in ("batch_all", "semi_hard") or impl == "pml"
    if impl != "tripletops" and cubic and b > CUBIC_MAX_B:
        pytest.skip(f"the B³ formulation needs {b ** 3 * 4 / 2 ** 30:.0f} GiB per (B, B, B) tensor at B = {b}")
    if impl == "pml" and dtype != "fp32":
        pytest.skip("PML is timed in fp32 only")
    ours, ref, compiled = FAMILIES[family]
    fn = {"tripletops": ours, "reference": ref, "compile(reference)": compiled}.get(impl) or _pml(family)
    x, y = harness.inputs(b, d, device, dtype=harness.DTYPES[dtype])
    benchmark.group = f"{family} {device} {mode} B={b} D={d} {dtype}"
    harness.run(benchmark, harness.fwd_bwd(fn, x, y, mode=mode), device=device,
                warmup=3 if impl.startswith("compile") else 1, family=family, impl=impl, mode=mode, B=b, D=d,
                dtype=dtype)


@pytest.mark.parametrize("device,b,d,dtype", CASES, ids=[harness.case_id(c) for c in CASES])
def test_gemm_floor(benchmark, device, b, d, dtype):
    """One x @ x.T in the same precision: the floor of any method that forms the (B, B)
    distances, shared by the three families in the report."""
    x, _ = harness.inputs(b, d, device, dtype=harness.DTYPES[dtype])
    x = x.detach()
    benchmark.group = f"family {device} gemm B={b} D={d} {dtype}"
    harness.run(benchmark, lambda: x @ x.T, device=device, family="gemm", impl="gemm", mode="gemm", B=b, D=d,
                dtype=dtype)
