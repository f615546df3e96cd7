"""Batch-hard triplet loss: tripletops against the eager recipe users write (cdist +
masks + max/min), torch.compile of that recipe, tripletops.reference (exact but slow:
difference-form cdist), torch.compile(reference) and pytorch-metric-learning, with one
x @ x.T GEMM as the floor. Forward and forward + backward, B from 32 up, D = 128, plus
the target sizes and a 2^20-row memory bank.

    make bench        # or: pytest benchmarks/bench_batch_hard.py --benchmark-only

Not part of the test suite (pytest's testpaths is tests/). Every peer runs in the same
process, on the same inputs, one after the other; medians are what counts.
"""
from __future__ import annotations

import pytest
import torch

import tripletops
from tripletops import reference

import harness

MARGIN = 0.2
D_SWEEP = 128
TARGET_SIZES = [(1024, 256), (4096, 512)]  # (256, 128) is in the sweep


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
    pml = harness.pml_or_none()
    if pml is None:
        pytest.skip("pytorch-metric-learning is not installed")
    distances, losses, miners, reducers = pml
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

CUDA_TARGET_SIZES = [(8192, 512)]  # issue 10: <= 1.0x one x @ x.T, fp32 and bf16

CASES = [(dev, b, D_SWEEP) for dev in harness.DEVICES for b in harness.SWEEP[dev]]
CASES += [(dev, b, d) for dev in harness.DEVICES for b, d in TARGET_SIZES]
CASES += [("cuda", b, d) for b, d in CUDA_TARGET_SIZES if "cuda" in harness.DEVICES]


@pytest.mark.parametrize("device,b,d", CASES, ids=[f"{dev}-B{b}-D{d}" for dev, b, d in CASES])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_batch_hard(benchmark, impl, mode, device, b, d):
    x, y = harness.inputs(b, d, device)
    benchmark.group = f"batch_hard {device} {mode} B={b} D={d}"
    fn = harness.fwd_bwd(IMPLS[impl](), x, y, mode=mode)
    harness.run(benchmark, fn, device=device, warmup=3 if impl.startswith("compile") else 1,
                family="batch_hard", impl=impl, mode=mode, B=b, D=d)


@pytest.mark.parametrize("device,b,d", CASES, ids=[f"{dev}-B{b}-D{d}" for dev, b, d in CASES])
def test_gemm_floor(benchmark, device, b, d):
    """One x @ x.T in the same precision: the floor any B x B method pays."""
    x, _ = harness.inputs(b, d, device)
    x = x.detach()
    benchmark.group = f"batch_hard {device} gemm B={b} D={d}"
    harness.run(benchmark, lambda: x @ x.T, device=device, family="batch_hard", impl="gemm", mode="gemm", B=b, D=d)


CUDA_BF16 = [("cuda", b, d) for b, d in CUDA_TARGET_SIZES if "cuda" in harness.DEVICES]


@pytest.mark.parametrize("device,b,d", CUDA_BF16, ids=[f"{dev}-B{b}-D{d}" for dev, b, d in CUDA_BF16])
@pytest.mark.parametrize("impl", ["tripletops", "gemm"])
def test_batch_hard_bf16(benchmark, impl, device, b, d):
    """bf16 embeddings: tripletops forward + backward against one bf16 x @ x.T."""
    x, y = harness.inputs(b, d, device, dtype=torch.bfloat16)
    benchmark.group = f"batch_hard_bf16 {device} B={b} D={d}"
    if impl == "gemm":
        xd = x.detach()
        fn, mode = (lambda: xd @ xd.T), "gemm"
    else:
        fn, mode = harness.fwd_bwd(IMPLS["tripletops"](), x, y, mode="fwd+bwd"), "fwd+bwd"
    harness.run(benchmark, fn, device=device, family="batch_hard_bf16", impl=impl, mode=mode, B=b, D=d)


# The bank's width: 64 on CPU (time), 128 on CUDA (issue 10's target size).
BANK_CASES = [(dev, 64 if dev == "cpu" else 128) for dev in harness.DEVICES]


@pytest.mark.parametrize("device,d", BANK_CASES, ids=[f"{dev}-D{d}" for dev, d in BANK_CASES])
@pytest.mark.parametrize("impl", ["tripletops", "gemm"])
def test_memory_bank_2pow20(benchmark, impl, device, d):
    """B = 1024 against a bank of 2^20 rows (a B x M float matrix would be 4 GiB); on CUDA
    also one B x M GEMM against the bank, the floor of any method that forms distances."""
    if impl == "gemm" and device == "cpu":
        pytest.skip("the 4 GiB B x M GEMM is timed on CUDA only")
    b, m = 1024, 1 << 20
    g = torch.Generator().manual_seed(0)
    bank = torch.randn(m, d, generator=g).to(device)
    bank_y = torch.randint(0, 1000, (m,), generator=g).to(device)
    x, y = harness.inputs(b, d, device, seed=1, classes=1000)
    benchmark.group = f"bank {device} B={b} M=2^20 D={d}"
    if impl == "gemm":
        xd = x.detach()
        fn = lambda: xd @ bank.T  # noqa: E731
    else:
        fn = harness.fwd_bwd(lambda x, y: tripletops.batch_hard_loss(x, y, ref_embeddings=bank, ref_labels=bank_y),
                             x, y, mode="fwd+bwd")
    harness.run(benchmark, fn, device=device, family="bank", impl=impl, mode="fwd+bwd", B=b, M=m, D=d)


# Multi-label mining (issue 15): (B, 64) multi-hot labels, about two labels per row, against
# class ids (about 4 rows per class), side by side in one run; the target is <= 1.2x.
ML_CASES = [(dev, 1024, 128) for dev in harness.DEVICES]


@pytest.mark.parametrize("device,b,d", ML_CASES, ids=[f"{dev}-B{b}-D{d}" for dev, b, d in ML_CASES])
@pytest.mark.parametrize("mode", ["mine", "fwd+bwd"])
@pytest.mark.parametrize("impl", ["tripletops", "single-label"])
def test_multilabel(benchmark, impl, mode, device, b, d):
    x, y = harness.inputs(b, d, device)
    if impl == "tripletops":
        g = torch.Generator().manual_seed(2)
        y = (torch.rand(b, 64, generator=g) < 2 / 64).to(device)
    benchmark.group = f"multilabel {device} {mode} B={b} D={d}"
    if mode == "mine":
        xd = x.detach()
        fn = lambda: tripletops.batch_hard_mine(xd, y)  # noqa: E731
    else:
        fn = harness.fwd_bwd(lambda x, y: tripletops.batch_hard_loss(x, y, margin=MARGIN), x, y, mode="fwd+bwd")
    harness.run(benchmark, fn, device=device, family="multilabel", impl=impl, mode=mode, B=b, D=d)
