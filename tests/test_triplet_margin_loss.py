"""triplet_margin_loss (explicit triplets) against the float64 reference and torch.nn.functional."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import tripletops
from tripletops import reference

from conftest import (DTYPES, EMU, GRAD_RTOL, LOSS_RTOL, METRICS, REDUCTIONS, assert_close_rel, assert_grad_close,
                      devices_for)

DEVICES = devices_for("triplet_margin_loss")


def triplets(n, d, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(n * 31 + d)
    return [torch.randn(n, d, dtype=torch.float64, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
            for _ in range(3)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize("n,d", [(1, 1), (2, 5), (37, 3), (129, 64)])
def test_matches_reference(device, dtype, metric, swap, n, d, poisoned):
    a, p, neg = triplets(n, d, dtype, device)
    a64, p64, n64 = (t.detach().double().requires_grad_(True) for t in (a, p, neg))
    loss = tripletops.triplet_margin_loss(a, p, neg, margin=1.0, metric=metric, swap=swap)
    ref = reference.triplet_margin_loss(a64, p64, n64, margin=1.0, metric=metric, swap=swap)
    assert loss.dtype == dtype
    assert_close_rel(loss, ref, LOSS_RTOL[dtype])
    loss.backward()
    ref.backward()
    for got, exp, name in ((a.grad, a64.grad, "anchor"), (p.grad, p64.grad, "positive"), (neg.grad, n64.grad, "negative")):
        assert got.dtype == dtype and torch.isfinite(got).all()
        # Cosine at D = 1: unit vectors are +-1 and the exact gradient is 0; only rounding
        # noise of order eps / |x| is left, nothing to compare relatively.
        if dtype in (torch.float32, torch.float64) and not (metric == "cosine" and d == 1):
            assert_grad_close(got, exp, GRAD_RTOL[dtype], name)


@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_equals_torch_functional(swap, reduction):
    a, p, n = triplets(50, 16)
    ours = tripletops.triplet_margin_loss(a, p, n, margin=0.7, swap=swap, reduction=reduction)
    theirs = F.triplet_margin_loss(a, p, n, margin=0.7, swap=swap, reduction=reduction)
    # torch adds eps = 1e-6 inside the norm (|a - p + eps|); that is the only difference.
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    g1 = torch.autograd.grad(ours.sum(), (a, p, n))
    g2 = torch.autograd.grad(theirs.sum(), (a, p, n))
    for x, y in zip(g1, g2):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reductions(reduction):
    a, p, n = triplets(40, 4)
    a64, p64, n64 = (t.detach().double().requires_grad_(True) for t in (a, p, n))
    loss = tripletops.triplet_margin_loss(a, p, n, margin=0.5, reduction=reduction)
    ref = reference.triplet_margin_loss(a64, p64, n64, margin=0.5, reduction=reduction)
    assert_close_rel(loss, ref, 1e-5)
    w = torch.randn(ref.shape, dtype=torch.float64)
    (loss * w.float()).sum().backward()
    (ref * w).sum().backward()
    assert_grad_close(a.grad, a64.grad, 1e-4)


def test_zero_distance_gradient_is_zero_and_empty_denominator():
    a = torch.zeros(4, 3, requires_grad=True)
    p = torch.zeros(4, 3, requires_grad=True)
    n = torch.ones(4, 3, requires_grad=True) * 10
    loss = tripletops.triplet_margin_loss(a, p, n, margin=1.0, reduction="mean_nonzero")
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(a.grad, torch.zeros_like(a)) and torch.equal(p.grad, torch.zeros_like(p))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_inf_give_nan(bad):
    a, p, n = (t.detach().clone() for t in triplets(6, 3))
    n[2, 1] = bad
    assert torch.isnan(tripletops.triplet_margin_loss(a, p, n))
    per = tripletops.triplet_margin_loss(a, p, n, reduction="none")
    assert torch.isnan(per[2]) and torch.isfinite(per[[0, 1, 3, 4, 5]]).all()


def test_non_contiguous():
    base = torch.randn(3, 20, 12, dtype=torch.float64)
    a, p, n = base[0, ::2, :5], base[1, :10, 1:6], base[2, :5, :10].t()
    loss = tripletops.triplet_margin_loss(a, p, n)
    assert torch.equal(loss, tripletops.triplet_margin_loss(a.contiguous(), p.contiguous(), n.contiguous()))


@pytest.mark.parametrize("metric", METRICS)
def test_gradcheck(metric):
    a, p, n = (torch.randn(6, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(
        lambda a, p, n: tripletops.triplet_margin_loss(a, p, n, margin=2.0, metric=metric, swap=True), (a, p, n))


def test_module():
    a, p, n = triplets(10, 4)
    crit = tripletops.TripletMarginLoss(margin=0.4, swap=True)
    assert torch.equal(crit(a, p, n), tripletops.triplet_margin_loss(a, p, n, margin=0.4, swap=True))


def test_deterministic():
    a, p, n = triplets(300, 40)
    l1 = tripletops.triplet_margin_loss(a, p, n)
    g1 = torch.autograd.grad(l1, (a, p, n))
    l2 = tripletops.triplet_margin_loss(a, p, n)
    g2 = torch.autograd.grad(l2, (a, p, n))
    assert torch.equal(l1, l2) and all(torch.equal(x, y) for x, y in zip(g1, g2))


@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean"])
@pytest.mark.parametrize("swap", [False, True])
def test_far_from_origin_fp32_gradients(metric, swap):
    g = torch.Generator().manual_seed(8)
    rows = [(torch.randn(30, 8, dtype=torch.float64, generator=g) * 0.01 + 300).float().double() for _ in range(3)]
    t32 = [r.float().requires_grad_(True) for r in rows]
    t64 = [r.clone().requires_grad_(True) for r in rows]
    tripletops.triplet_margin_loss(*t32, margin=0.02, metric=metric, swap=swap).backward()
    reference.triplet_margin_loss(*t64, margin=0.02, metric=metric, swap=swap).backward()
    for a, b, name in zip(t32, t64, ("anchor", "positive", "negative")):
        assert_grad_close(a.grad, b.grad, 1e-4, name)


@pytest.mark.cuda_emu
@pytest.mark.skipif(not EMU, reason="needs make cuda-emu (TRIPLETOPS_EMU_LIB)")
@pytest.mark.parametrize("reduction", ["mean", "sum", "mean_nonzero", "none"])
def test_emulated_cuda_launches_one_kernel_each_way(reduction, tmp_path, monkeypatch):
    """The CUDA path reduces the losses inside the forward kernel (its last block) and the
    reduction's backward inside the backward kernel: one kernel each way (mean_nonzero
    counts its denominator first). The emulator records every launch."""
    trace = tmp_path / "launches.txt"
    monkeypatch.setenv("TRIPLETOPS_EMU_LAUNCH_TRACE", str(trace))
    g = torch.Generator().manual_seed(0)
    a, p, n = (torch.randn(37, 9, generator=g).requires_grad_(True) for _ in range(3))
    tripletops.triplet_margin_loss(a, p, n, margin=0.5, reduction=reduction).sum().backward()
    names = trace.read_text().split()
    backward = ["triplet_count_kernel"] if reduction == "mean_nonzero" else []
    assert names == ["triplet_forward_kernel", *backward, "triplet_backward_kernel"], names
