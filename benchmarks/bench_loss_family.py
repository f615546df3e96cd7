"""The rest of the family, forward + backward (and forward), D = 128:

- batch_all_loss against the eager B³ formulation (`tripletops.reference`, every
  triplet term in one (B, B, B) tensor), its torch.compile, and pytorch-metric-learning
  (TripletMarginMiner "all" + TripletMarginLoss);
- semi_hard_loss against the eager TF-Addons-style formulation (`tripletops.reference`,
  a (B, B, B) mask of "negatives farther than the positive") and its torch.compile;
- contrastive_loss against `tripletops.reference` (cdist + elementwise), its
  torch.compile and PML's ContrastiveLoss.

The B³ peers run up to B = 512 only: at 1024 a single (B, B, B) float tensor is 4 GiB.

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
CASES = [(dev, b, D_SWEEP) for dev in harness.DEVICES for b in harness.SWEEP[dev]]


@pytest.mark.parametrize("device,b,d", CASES, ids=[f"{dev}-B{b}-D{d}" for dev, b, d in CASES])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_loss_family(benchmark, family, impl, mode, device, b, d):
    cubic = family in ("batch_all", "semi_hard") or impl == "pml"
    if impl != "tripletops" and cubic and b > CUBIC_MAX_B:
        pytest.skip(f"the B³ formulation needs {b ** 3 * 4 / 2 ** 30:.0f} GiB per (B, B, B) tensor at B = {b}")
    ours, ref, compiled = FAMILIES[family]
    fn = {"tripletops": ours, "reference": ref, "compile(reference)": compiled}.get(impl) or _pml(family)
    x, y = harness.inputs(b, d, device)
    benchmark.group = f"{family} {device} {mode} B={b} D={d}"
    harness.run(benchmark, harness.fwd_bwd(fn, x, y, mode=mode), device=device,
                warmup=3 if impl.startswith("compile") else 1, family=family, impl=impl, mode=mode, B=b, D=d)
