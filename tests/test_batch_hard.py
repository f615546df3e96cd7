"""batch_hard_mine / batch_hard_loss against the float64 reference (tripletops.reference)."""
from __future__ import annotations

import pytest
import torch

import tripletops
from tripletops import reference

from conftest import (DTYPES, EMU, GRAD_RTOL, LOSS_RTOL, METRICS, REDUCTIONS, assert_close_rel, assert_grad_close,
                      devices_for, make_batch)

# cpu, cuda (a GPU), cuda-emu (the CUDA kernels under the SIMT emulator, make cuda-emu)
DEVICES = devices_for("batch_hard_loss")

# (B, D, classes): B = 1, 2, odd sizes, sizes around the 64/128-row tiles, D = 1.
SHAPES = [(1, 4, 1), (2, 3, 2), (2, 1, 1), (7, 5, 3), (33, 1, 4), (64, 16, 8), (65, 9, 5), (130, 33, 13),
          (301, 20, 40), (600, 12, 30)]


def mined_like_reference(m, ref, dist64):
    """Indices equal, except at near-ties of the reference (best and chosen within 1e-4 relative)."""
    for got, exp, best in ((m.pos_idx, ref.pos_idx, ref.pos_dist), (m.neg_idx, ref.neg_idx, ref.neg_dist)):
        got, exp = got.cpu(), exp.cpu()
        assert torch.equal(got < 0, exp < 0)
        differ = (got != exp).nonzero().flatten()
        for i in differ.tolist():
            chosen = dist64[i, got[i]].item()
            assert abs(chosen - best[i].item()) <= 1e-4 * max(abs(best[i].item()), 1e-6), (
                f"anchor {i}: picked {got[i].item()} at {chosen}, reference {exp[i].item()} at {best[i].item()}"
            )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("b,d,c", SHAPES)
def test_mine_matches_reference(device, dtype, metric, b, d, c, poisoned):
    x, y = make_batch(b, d, c, device=device, dtype=dtype)
    m = tripletops.batch_hard_mine(x, y, metric=metric)
    r = reference.batch_hard_mine(x.double(), y, metric=metric)
    dist64 = reference.pairwise_distance(x.double(), metric=metric).cpu()
    mined_like_reference(m, r, dist64)
    assert torch.equal(m.valid.cpu(), r.valid.cpu())
    assert m.pos_dist.dtype == x.dtype and m.pos_idx.dtype == torch.int64
    # Distances of the pairs actually chosen, exact up to the output dtype's rounding.
    rows = torch.arange(b)  # host tensor
    exp_pos = torch.where(m.pos_idx.cpu() >= 0, dist64[rows, m.pos_idx.cpu().clamp(min=0)], 0.0)
    exp_neg = torch.where(m.neg_idx.cpu() >= 0, dist64[rows, m.neg_idx.cpu().clamp(min=0)], 0.0)
    assert_close_rel(m.pos_dist, exp_pos, LOSS_RTOL[dtype], "pos_dist")
    assert_close_rel(m.neg_dist, exp_neg, LOSS_RTOL[dtype], "neg_dist")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("b,d,c", [(1, 3, 1), (7, 5, 3), (65, 9, 5), (130, 33, 13), (301, 7, 40)])
def test_loss_and_grad_match_reference(device, dtype, metric, b, d, c, poisoned):
    x, y = make_batch(b, d, c, dtype=dtype, device=device)
    x.requires_grad_(True)
    x64 = x.detach().double().requires_grad_(True)
    loss = tripletops.batch_hard_loss(x, y, metric=metric, margin=0.3)
    ref = reference.batch_hard_loss(x64, y, metric=metric, margin=0.3)
    assert loss.dtype == dtype and loss.shape == ()
    assert_close_rel(loss, ref, LOSS_RTOL[dtype], "loss")
    loss.backward()
    ref.backward()
    if dtype in (torch.float16, torch.bfloat16):
        return  # half precision: mining near-ties in fp16 make gradient comparison meaningless
    assert x.grad.dtype == dtype
    assert_grad_close(x.grad, x64.grad, GRAD_RTOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("soft_margin", [False, True])
@pytest.mark.parametrize("metric", METRICS)
def test_reductions_and_soft_margin(device, reduction, soft_margin, metric, poisoned):
    x, y = make_batch(45, 7, 6, device=device)
    x.requires_grad_(True)
    x64 = x.detach().double().requires_grad_(True)
    kw = dict(metric=metric, reduction=reduction, soft_margin=soft_margin, margin=0.5)
    loss = tripletops.batch_hard_loss(x, y, **kw)
    ref = reference.batch_hard_loss(x64, y, **kw)
    assert loss.shape == ref.shape == ((45,) if reduction == "none" else ())
    assert_close_rel(loss, ref, 1e-5, "loss")
    w = torch.randn(loss.shape, dtype=torch.float64, device=device)  # a non-trivial upstream gradient
    (loss * w.to(loss)).sum().backward()
    (ref * w).sum().backward()
    assert_grad_close(x.grad, x64.grad, 1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("b,m,d", [(1, 1, 3), (5, 9, 4), (64, 300, 16), (1000, 5000, 8)])
def test_reference_set(device, metric, b, m, d, poisoned):
    """A memory bank: mining against ref_embeddings, gradients to both (M spans several tiles)."""
    x, y = make_batch(b, d, 7, device=device, seed=1)
    bank, bank_y = make_batch(m, d, 7, device=device, seed=2)
    x.requires_grad_(True)
    bank.requires_grad_(True)
    x64 = x.detach().double().requires_grad_(True)
    bank64 = bank.detach().double().requires_grad_(True)
    mined = tripletops.batch_hard_mine(x, y, metric=metric, ref_embeddings=bank, ref_labels=bank_y)
    ref_m = reference.batch_hard_mine(x64, y, metric=metric, ref_embeddings=bank64, ref_labels=bank_y)
    mined_like_reference(mined, ref_m, reference.pairwise_distance(x64, bank64, metric=metric).detach())
    loss = tripletops.batch_hard_loss(x, y, metric=metric, ref_embeddings=bank, ref_labels=bank_y)
    ref = reference.batch_hard_loss(x64, y, metric=metric, ref_embeddings=bank64, ref_labels=bank_y)
    assert_close_rel(loss, ref, 1e-5, "loss")
    loss.backward()
    ref.backward()
    assert_grad_close(x.grad, x64.grad, 1e-4, "grad embeddings")
    assert_grad_close(bank.grad, bank64.grad, 1e-4, "grad ref_embeddings")


def test_reference_set_without_grad_gives_none():
    x, y = make_batch(10, 4, 3)
    bank, bank_y = make_batch(20, 4, 3, seed=5)
    x.requires_grad_(True)
    tripletops.batch_hard_loss(x, y, ref_embeddings=bank, ref_labels=bank_y).backward()
    assert bank.grad is None and x.grad is not None


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_and_transposed(device):
    base = torch.randn(40, 24, dtype=torch.float64, device=device)
    y = torch.randint(0, 5, (20,), device=device)
    views = {"strided rows": lambda t: t[::2, :12], "transposed": lambda t: t[:12, :20].t(),
             "column slice": lambda t: t[:20, 3:17]}
    for name, view in views.items():
        leaf = base.clone().requires_grad_(True)
        x = view(leaf)
        assert not x.is_contiguous(), name
        xc = view(base).contiguous().requires_grad_(True)
        loss = tripletops.batch_hard_loss(x, y)
        loss_c = tripletops.batch_hard_loss(xc, y)
        assert torch.equal(loss, loss_c), name
        loss.backward()
        loss_c.backward()
        assert torch.equal(view(leaf.grad), xc.grad), name
    # non-contiguous labels too
    y2 = torch.randint(0, 5, (40,), device=device)[::2]
    x = base[:20, :8]
    assert torch.equal(tripletops.batch_hard_loss(x, y2), tripletops.batch_hard_loss(x, y2.contiguous()))


@pytest.mark.parametrize("label_dtype", [torch.int32, torch.int64, torch.int16, torch.uint8])
def test_label_dtypes_and_large_values(label_dtype):
    x, y = make_batch(30, 5, 4, label_dtype=label_dtype)
    expected = tripletops.batch_hard_loss(x, y.long())
    assert torch.equal(tripletops.batch_hard_loss(x, y), expected)
    if label_dtype == torch.int64:  # labels outside int32 are remapped, equality preserved
        big = y.long() * (2**40) - 2**62
        assert torch.equal(tripletops.batch_hard_loss(x, big), expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("b", [90, 300])
def test_ties_go_to_smallest_index(device, metric, dtype, b):
    """Small-integer embeddings: every distance is exact in both paths, with many exact ties."""
    g = torch.Generator().manual_seed(3)
    x = torch.randint(-1, 2, (b, 3), generator=g).to(dtype)  # host tensor
    y = torch.randint(0, 4, (b,), generator=g)  # host tensor
    if metric == "cosine":
        x[x.abs().sum(1) == 0] = 1.0  # zero rows have no direction
    x, y = x.to(device), y.to(device)
    m = tripletops.batch_hard_mine(x, y, metric=metric)
    r = reference.batch_hard_mine(x.double(), y, metric=metric)
    if metric == "cosine":  # 1 - cos is not exact in floating point: only near-ties may differ
        mined_like_reference(m, r, reference.pairwise_distance(x.double(), metric=metric).cpu())
        return
    assert torch.equal(m.pos_idx.cpu(), r.pos_idx.cpu())
    assert torch.equal(m.neg_idx.cpu(), r.neg_idx.cpu())
    # and the fused loss picks the same pairs
    loss = tripletops.batch_hard_loss(x, y, metric=metric, reduction="none")
    assert_close_rel(loss, reference.batch_hard_loss(x.double(), y, metric=metric, reduction="none"), 1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", ["one class", "all distinct", "single row"])
def test_no_valid_anchor_gives_exact_zero(device, reduction, case):
    b = 1 if case == "single row" else 12
    x = torch.randn(b, 6, device=device, requires_grad=True)
    y = torch.zeros(b, dtype=torch.long, device=device) if case == "one class" else torch.arange(b, device=device)
    loss = tripletops.batch_hard_loss(x, y, reduction=reduction)
    assert bool((loss == 0).all())
    loss.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    m = tripletops.batch_hard_mine(x, y)
    assert not m.valid.any()
    assert bool((m.pos_idx == -1).all()) if case != "one class" else bool((m.neg_idx == -1).all())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("metric", METRICS)
def test_mean_nonzero_with_all_zero_losses(device, metric):
    """Two tight, well separated clusters: every anchor is valid but satisfied (loss 0), so
    "mean_nonzero" has an empty denominator: exactly 0 with zero gradients, while "mean"
    is a plain 0 over valid anchors."""
    g = torch.Generator().manual_seed(2)
    centers = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # host tensor
    y = torch.arange(10) % 2  # host tensor
    x = (centers[y] * 10 + 0.01 * torch.randn(10, 3, generator=g)).to(device).requires_grad_(True)
    y = y.to(device)
    for reduction in ("mean_nonzero", "mean"):
        loss = tripletops.batch_hard_loss(x, y, margin=0.1, metric=metric, reduction=reduction)
        assert loss.item() == 0.0
        assert tripletops.batch_hard_mine(x, y, metric=metric).valid.all()
        (grad,) = torch.autograd.grad(loss, x)
        assert torch.equal(grad, torch.zeros_like(x))
        assert reference.batch_hard_loss(x.detach().double(), y, margin=0.1, metric=metric,
                                         reduction=reduction).item() == 0.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_duplicate_embeddings_have_finite_gradients(device, metric, dtype):
    """Duplicates sit at distance 0, where the naive sqrt(|a|^2+|b|^2-2ab) gradient is NaN.

    Copies of one vector are exact ties, which floating-point Gram entries may break
    either way; the loss and the gradient summed over each group of copies do not
    depend on which copy was picked, so those are compared."""
    base = torch.randn(6, 5, dtype=dtype, device=device)
    x = base.repeat(3, 1).requires_grad_(True)       # every row appears 3 times
    y = torch.arange(6, device=device).repeat(3)     # ... with its own class: positives at d = 0
    x64 = x.detach().double().requires_grad_(True)
    loss = tripletops.batch_hard_loss(x, y, metric=metric, margin=1.0)
    ref = reference.batch_hard_loss(x64, y, metric=metric, margin=1.0)
    assert_close_rel(loss, ref, 1e-5)
    loss.backward()
    ref.backward()
    assert torch.isfinite(x.grad).all()
    group = lambda g: g.double().view(3, 6, 5).sum(0)
    assert_grad_close(group(x.grad), group(x64.grad), 1e-4)
    # also when the anchor coincides with its negative
    x2 = torch.zeros(4, 3, dtype=dtype, device=device, requires_grad=True)
    loss2 = tripletops.batch_hard_loss(x2, torch.tensor([0, 0, 1, 1], device=device), metric="euclidean")
    loss2.backward()
    assert loss2.item() == pytest.approx(0.2) and torch.equal(x2.grad, torch.zeros_like(x2))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("where", ["batch", "bank"])
@pytest.mark.parametrize("b", [20, 130])
def test_nan_and_inf_give_nan(device, bad, metric, where, b):
    x, y = make_batch(b, 4, 3, device=device)
    bank, bank_y = make_batch(30, 4, 3, seed=9, device=device)
    kw = {}
    if where == "bank":
        bank[7, 2] = bad
        kw = dict(ref_embeddings=bank, ref_labels=bank_y)
    else:
        x[5, 1] = bad
    loss = tripletops.batch_hard_loss(x, y, metric=metric, **kw)
    assert torch.isnan(loss), loss
    per = tripletops.batch_hard_loss(x, y, metric=metric, reduction="none", **kw)
    ref = reference.batch_hard_loss(x.double(), y, metric=metric, reduction="none",
                                    **{k: (v.double() if v.is_floating_point() else v) for k, v in kw.items()})
    assert torch.equal(torch.isnan(per).cpu(), torch.isnan(ref).cpu())


def test_slow_path_agrees_on_finite_anchors():
    """A huge (norm overflowing) bank row sends mining down the scalar path: the other anchors
    must still match the reference exactly."""
    x, y = make_batch(25, 4, 3, dtype=torch.float64)
    bank, bank_y = make_batch(40, 4, 3, dtype=torch.float64, seed=4)
    bank[0] = 1e154
    bank_y[0] = 99  # its own class: a far negative for everyone, never the closest
    m = tripletops.batch_hard_mine(x, y, ref_embeddings=bank, ref_labels=bank_y)
    r = reference.batch_hard_mine(x, y, ref_embeddings=bank, ref_labels=bank_y)
    assert torch.equal(m.pos_idx, r.pos_idx) and torch.equal(m.neg_idx, r.neg_idx)
    assert_close_rel(m.pos_dist, r.pos_dist, 1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("where", ["batch", "bank"])
@pytest.mark.parametrize("b", [25, 130])
def test_overflowing_norms_never_give_a_finite_wrong_loss(device, where, b):
    """A finite row whose squared norm overflows (fp64, 1e154): the loss is NaN or right,
    never finite and wrong. (The CPU kernels mine and measure such rows on rows scaled by
    a power of two; the CUDA kernels give NaN.)"""
    x, y = make_batch(b, 4, 3, dtype=torch.float64, device=device)
    bank, bank_y = make_batch(40, 4, 3, dtype=torch.float64, seed=4, device=device)
    if where == "bank":
        bank[0] = 1e154
        kw = dict(ref_embeddings=bank, ref_labels=bank_y)
    else:
        x[3] = 1e154
        kw = {}
    got = tripletops.batch_hard_loss(x, y, reduction="none", **kw).cpu()
    # The truth, from rows scaled by 2^-300 (exact in fp64; the loss is homogeneous in the
    # rows and the margin): the reference on the rows themselves overflows its squares.
    s = 2.0 ** -300
    kw_s = {k: (v * s if v.is_floating_point() else v) for k, v in kw.items()}
    ref = reference.batch_hard_loss(x * s, y, margin=0.2 * s, reduction="none", **kw_s).cpu() / s
    finite = torch.isfinite(got)
    assert torch.allclose(got[finite], ref[finite], rtol=1e-10, atol=0), (got, ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean"])
@pytest.mark.parametrize("bank", [False, True])
def test_far_from_origin_fp32(device, metric, bank):
    """Embeddings far from the origin, spread small: d^2 << |x|^2. Mining must still find
    the right pairs in fp32 (the |a|^2 + |b|^2 - 2ab form alone would cancel to noise).
    (Cosine is left out: 1 - cos of ~1e-7 is below fp32's resolution in any formulation.)"""
    x, y = make_batch(64, 8, 8, dtype=torch.float64)
    x = (x * 0.01 + 30.0).float().double().to(device)  # the same values in both precisions
    y = y.to(device)
    kw = dict(ref_embeddings=x.flip(0).contiguous(), ref_labels=y.flip(0)) if bank else {}
    kw32 = {k: (v.float() if v.is_floating_point() else v) for k, v in kw.items()}
    m = tripletops.batch_hard_mine(x.float(), y, metric=metric, **kw32)
    r = reference.batch_hard_mine(x, y, metric=metric, **kw)
    mined_like_reference(m, r, reference.pairwise_distance(x, kw.get("ref_embeddings"), metric=metric).cpu())
    loss = tripletops.batch_hard_loss(x.float(), y, metric=metric, margin=0.01, **kw32)
    assert_close_rel(loss, reference.batch_hard_loss(x, y, metric=metric, margin=0.01, **kw), 1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("metric", METRICS)
def test_deterministic_bitwise(device, metric):
    x, y = make_batch(257, 31, 20, device=device)
    bank, bank_y = make_batch(700, 31, 20, seed=11, device=device)
    outs = []
    for _ in range(3):
        xi = x.clone().requires_grad_(True)
        bi = bank.clone().requires_grad_(True)
        loss = tripletops.batch_hard_loss(xi, y, metric=metric) + tripletops.batch_hard_loss(
            xi, y, metric=metric, ref_embeddings=bi, ref_labels=bank_y)
        loss.backward()
        m = tripletops.batch_hard_mine(x, y, metric=metric)
        outs.append((loss.detach(), xi.grad, bi.grad, m.pos_idx, m.neg_idx))
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert torch.equal(a, b)


def test_same_loss_across_thread_counts():
    """BLAS may round the Gram tiles differently with another thread count (so a near-tie
    could flip and move a gradient); the exactly recomputed loss must still agree."""
    x, y = make_batch(300, 16, 30)
    prev = torch.get_num_threads()
    losses = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            losses.append(tripletops.batch_hard_loss(x, y))
    finally:
        torch.set_num_threads(prev)
    assert_close_rel(losses[0], losses[1], 1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_normalize_flag_matches_manual_normalize(device):
    x, y = make_batch(30, 6, 4, device=device)
    x.requires_grad_(True)
    a = tripletops.batch_hard_loss(x, y, normalize=True)
    b = tripletops.batch_hard_loss(torch.nn.functional.normalize(x, dim=1), y)
    assert torch.equal(a, b)
    m = tripletops.batch_hard_mine(x, y, normalize=True)
    assert torch.equal(m.pos_idx, tripletops.batch_hard_mine(torch.nn.functional.normalize(x, dim=1), y).pos_idx)


def test_mine_has_no_gradient():
    x, y = make_batch(10, 3, 3)
    x.requires_grad_(True)
    m = tripletops.batch_hard_mine(x, y)
    assert not m.pos_dist.requires_grad and not m.neg_dist.requires_grad


def test_module_matches_functional():
    x, y = make_batch(30, 6, 4)
    crit = tripletops.BatchHardTripletLoss(margin=0.3, metric="sqeuclidean", reduction="sum")
    assert torch.equal(crit(x, y), tripletops.batch_hard_loss(x, y, margin=0.3, metric="sqeuclidean", reduction="sum"))
    assert "margin=0.3" in repr(crit)
    bank, bank_y = make_batch(50, 6, 4, seed=3)
    assert torch.equal(crit(x, y, bank, bank_y), tripletops.batch_hard_loss(
        x, y, margin=0.3, metric="sqeuclidean", reduction="sum", ref_embeddings=bank, ref_labels=bank_y))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_accumulates_in_fp32(device, dtype):
    """Half inputs: the result is within 1e-2 of the float64 loss on the same (rounded) values,
    where a half-precision accumulation over D = 512 would drift further."""
    x, y = make_batch(100, 512, 10, dtype=dtype, device=device)
    loss = tripletops.batch_hard_loss(x, y)
    assert loss.dtype == dtype
    assert_close_rel(loss, reference.batch_hard_loss(x.double(), y), 1e-2)


def test_autocast_runs_and_is_finite():
    x, y = make_batch(40, 16, 5)
    lin = torch.nn.Linear(16, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        emb = lin(x)
        loss = tripletops.batch_hard_loss(emb, y)
    loss.float().backward()
    assert torch.isfinite(loss) and torch.isfinite(lin.weight.grad).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean"])
@pytest.mark.parametrize("bank", [False, True])
def test_far_from_origin_fp32_gradients(device, metric, bank):
    """Gradients of (a - p) / d must come from the difference a - p: forming a/d - p/d
    cancels catastrophically when |a| >> |a - p| (rows near 300, spread 0.01)."""
    x, y = make_batch(64, 8, 8, dtype=torch.float64)
    x = (x * 0.01 + 300.0).float().double().to(device)
    y = y.to(device)
    bank_x = x.flip(0).contiguous()
    x32 = x.float().requires_grad_(True)
    b32 = bank_x.float().requires_grad_(True)
    x64 = x.clone().requires_grad_(True)
    b64 = bank_x.clone().requires_grad_(True)
    kw32 = dict(ref_embeddings=b32, ref_labels=y.flip(0)) if bank else {}
    kw64 = dict(ref_embeddings=b64, ref_labels=y.flip(0)) if bank else {}
    tripletops.batch_hard_loss(x32, y, metric=metric, margin=0.01, **kw32).backward()
    reference.batch_hard_loss(x64, y, metric=metric, margin=0.01, **kw64).backward()
    assert_grad_close(x32.grad, x64.grad, 1e-4, "grad embeddings")
    if bank:
        assert_grad_close(b32.grad, b64.grad, 1e-4, "grad ref_embeddings")


@pytest.mark.cuda_emu
@pytest.mark.skipif(not EMU, reason="needs make cuda-emu (TRIPLETOPS_EMU_LIB)")
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("b", [60, 130])
def test_emulated_cuda_bitwise_across_thread_and_block_orders(metric, b, monkeypatch):
    """The CUDA kernels' results must not depend on the order in which threads, warps and
    blocks run (merges by (key, index), one writer per gradient row, a fixed-order
    reduction): the emulator reruns them under other seeds, and every output is bitwise
    the same. (The test runs inside emulated_cuda, as every cuda-emu case.)"""
    x, y = make_batch(b, 9, 7)
    bank, bank_y = make_batch(150, 9, 7, seed=3)
    outs = []
    for seed in ("0", "1", "7", "12345"):
        monkeypatch.setenv("TRIPLETOPS_EMU_SEED", seed)
        xi, bi = x.clone().requires_grad_(True), bank.clone().requires_grad_(True)
        loss = tripletops.batch_hard_loss(xi, y, metric=metric) + tripletops.batch_hard_loss(
            xi, y, metric=metric, ref_embeddings=bi, ref_labels=bank_y, reduction="sum")
        loss.backward()
        m = tripletops.batch_hard_mine(x, y, metric=metric)
        outs.append((loss.detach(), xi.grad, bi.grad, m.pos_idx, m.neg_idx, m.pos_dist, m.neg_dist))
    for other in outs[1:]:
        for a, c in zip(outs[0], other):
            assert torch.equal(a, c)
