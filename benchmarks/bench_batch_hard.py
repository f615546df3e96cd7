"""Batch-hard triplet loss, forward + backward, on CPU: tripletops against the eager
recipe (cdist + masks + max/min), torch.compile of that recipe, tripletops.reference
(exact but slow: difference-form cdist), torch.compile(reference) and
pytorch-metric-learning, with one x @ x.T GEMM as the floor.

    make bench        # or: pytest benchmarks/bench_batch_hard.py --benchmark-only

Not part of the test suite (pytest's testpaths is tests/). Medians are what counts;
every peer runs in the same process, on the same inputs, one after the other.
"""
from __future__ import annotations

import pytest
import torch

import tripletops
from tripletops import reference

SIZES = [(256, 128), (1024, 256), (4096, 512)]
MARGIN = 0.2


def eager_batch_hard(x: torch.Tensor, y: torch.Tensor, margin: float = MARGIN) -> torch.Tensor:
    """The chain everyone writes: full distance matrix, masks, max/min, mean over valid anchors."""
    d = torch.cdist(x, x)
    same = y[:, None] == y[None, :]
    pos = same & ~torch.eye(len(y), dtype=torch.bool, device=x.device)
    d_ap = d.masked_fill(~pos, float("-inf")).max(1).values
    d_an = d.masked_fill(same, float("inf")).min(1).values
    valid = pos.any(1) & (~same).any(1)
    return torch.relu(d_ap - d_an + margin)[valid].mean()


_compiled_reference = torch.compile(reference.batch_hard_loss)
_compiled_eager = torch.compile(eager_batch_hard)


def _pml():
    pml = pytest.importorskip("pytorch_metric_learning")
    from pytorch_metric_learning import distances, losses, miners, reducers

    dist = distances.LpDistance(normalize_embeddings=False)
    miner = miners.BatchHardMiner(distance=dist)
    loss = losses.TripletMarginLoss(margin=MARGIN, distance=dist, reducer=reducers.MeanReducer())
    return lambda x, y: loss(x, y, miner(x, y))


IMPLS = {
    "tripletops": lambda: (lambda x, y: tripletops.batch_hard_loss(x, y, margin=MARGIN)),
    "eager": lambda: eager_batch_hard,
    "compile(eager)": lambda: _compiled_eager,
    "reference": lambda: (lambda x, y: reference.batch_hard_loss(x, y, margin=MARGIN)),
    "compile(reference)": lambda: (lambda x, y: _compiled_reference(x, y, margin=MARGIN)),
    "pml": _pml,
}


def _rounds(b):
    return {256: 200, 1024: 30, 4096: 3}.get(b, 5)


@pytest.mark.parametrize("b,d", SIZES, ids=[f"B{b}-D{d}" for b, d in SIZES])
@pytest.mark.parametrize("impl", list(IMPLS) + ["gemm"])
def test_batch_hard_fwd_bwd(benchmark, impl, b, d):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, d, generator=g).requires_grad_(True)
    y = torch.randint(0, b // 4, (b,), generator=g)  # ~4 samples per class, as in P x K batches
    benchmark.group = f"B={b} D={d}"
    benchmark.extra_info.update(impl=impl, B=b, D=d, device="cpu", threads=torch.get_num_threads(),
                                torch=torch.__version__)
    if impl == "gemm":
        xd = x.detach()
        fn = lambda: xd @ xd.T  # the floor: one x x^T in the same precision
    else:
        loss_fn = IMPLS[impl]()

        def fn():
            x.grad = None
            loss_fn(x, y).backward()

    warmup = 3 if impl.startswith("compile") else 1
    benchmark.pedantic(fn, rounds=_rounds(b), warmup_rounds=warmup, iterations=1)


def test_memory_bank_2pow20(benchmark):
    """B = 1024 against a bank of 2^20 x 64 (a B x M float matrix would be 4 GiB)."""
    g = torch.Generator().manual_seed(0)
    bank = torch.randn(1 << 20, 64, generator=g)
    bank_y = torch.randint(0, 1000, (1 << 20,), generator=g)
    x = torch.randn(1024, 64, generator=g).requires_grad_(True)
    y = torch.randint(0, 1000, (1024,), generator=g)
    benchmark.group = "bank B=1024 M=2^20 D=64"
    benchmark.extra_info.update(impl="tripletops", B=1024, M=1 << 20, D=64, device="cpu")

    def fn():
        x.grad = None
        tripletops.batch_hard_loss(x, y, ref_embeddings=bank, ref_labels=bank_y).backward()

    benchmark.pedantic(fn, rounds=3, warmup_rounds=1, iterations=1)
