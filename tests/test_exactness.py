"""Properties the definitions fix exactly, on every device the kernels cover (issue 12):
the hinge convention at the kink, identical inputs giving identical distances, and
arguments that the ops themselves must check."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import tripletops
from tripletops import reference

from conftest import DTYPES, METRICS, devices_for

# Integer-valued rows: every euclidean distance below is an exact small integer, so
# d(a,p) - d(a,n) + 1 == 0 holds exactly for some triplets (the kink).
GRID_X = torch.tensor([[0.0, 0, 0], [1, 0, 0], [2, 0, 0], [3, 0, 0], [5, 0, 0], [7, 0, 0]], dtype=torch.float64)
GRID_Y = torch.tensor([0, 0, 1, 1, 0, 1])


def _grad(fn, x, *args, **kw):
    x = x.detach().clone().requires_grad_(True)
    loss = fn(x, *args, **kw)
    (loss.sum() if loss.dim() else loss).backward()
    return loss.detach(), x.grad


def _has_kink(d_ap, d_an, margin):
    return bool(((d_ap - d_an + margin) == 0).any())


@pytest.mark.parametrize("device", devices_for("triplet_margin_loss"))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_triplet_margin_gradient_passes_at_the_kink(device, reduction):
    """d_ap - d_an + margin == 0 exactly: the gradient passes, as clamp(min=0) and
    F.triplet_margin_loss do (the kernel used to give 0 there)."""
    a = torch.tensor([[0.0, 0], [0, 0]], dtype=torch.float64, device=device)
    p = torch.tensor([[1.0, 0], [2, 0]], dtype=torch.float64, device=device)
    n = torch.tensor([[2.0, 0], [3, 0]], dtype=torch.float64, device=device)
    assert _has_kink(torch.tensor([1.0, 2.0]), torch.tensor([2.0, 3.0]), 1.0)  # host tensor
    grads = []
    for fn in (tripletops.triplet_margin_loss, reference.triplet_margin_loss):
        leaves = [t.clone().requires_grad_(True) for t in (a, p, n)]
        loss = fn(*leaves, margin=1.0, reduction=reduction)
        (loss.sum() if loss.dim() else loss).backward()
        grads.append([t.grad.cpu() for t in leaves])
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want)
    assert grads[0][1].abs().sum() > 0  # the positives' gradient is not zeroed at the kink
    # torch's own loss agrees (its eps=1e-6 inside the norm moves the kink by ~1e-6)
    leaves = [t.cpu().clone().requires_grad_(True) for t in (a, p, n)]
    F.triplet_margin_loss(*leaves, margin=1.0, eps=0.0, reduction=reduction if reduction != "none" else "sum").backward()
    if reduction != "mean":
        for got, leaf in zip(grads[0], leaves):
            torch.testing.assert_close(got, leaf.grad)


@pytest.mark.parametrize("device", devices_for("batch_hard_loss"))
@pytest.mark.parametrize("reduction", ["mean", "sum", "mean_nonzero"])
def test_batch_hard_gradient_passes_at_the_kink(device, reduction):
    x, y = GRID_X[:4].to(device), torch.tensor([0, 0, 1, 1], device=device)  # anchors 0 and 3 at the kink
    m = reference.batch_hard_mine(x, y)
    assert _has_kink(m.pos_dist, m.neg_dist, 1.0)
    loss, grad = _grad(tripletops.batch_hard_loss, x, y, margin=1.0, reduction=reduction)
    ref_loss, ref_grad = _grad(reference.batch_hard_loss, x, y, margin=1.0, reduction=reduction)
    torch.testing.assert_close(loss.cpu(), ref_loss.cpu())
    torch.testing.assert_close(grad.cpu(), ref_grad.cpu())


@pytest.mark.parametrize("name", ["batch_all_loss", "semi_hard_loss"])
def test_pair_family_gradient_passes_at_the_kink(name):
    fn, ref = getattr(tripletops, name), getattr(reference, name)
    d = reference.pairwise_distance(GRID_X)
    same = GRID_Y[:, None] == GRID_Y[None, :]
    # some (a, p, n) with d(a,p) + 1 == d(a,n) exactly
    assert any(bool(((d[a, p] + 1 == d[a]) & ~same[a]).any()) for a in range(6) for p in range(6) if same[a, p] and a != p)
    kws = [{"reduction": r} for r in ("mean", "sum", "mean_nonzero")] if name == "batch_all_loss" else [{}]
    for kw in kws:
        loss, grad = _grad(fn, GRID_X, GRID_Y, margin=1.0, **kw)
        ref_loss, ref_grad = _grad(ref, GRID_X, GRID_Y, margin=1.0, **kw)
        torch.testing.assert_close(loss, ref_loss)
        torch.testing.assert_close(grad, ref_grad)


# ---- identical inputs, identical distances (semi-hard's strict comparison) -------------


@pytest.mark.parametrize("device", devices_for("semi_hard_loss"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean", "cosine"])
def test_semi_hard_on_duplicated_rows_matches_its_definition(device, dtype, metric):
    """Every row three times, B * B * D past the direct path (the GEMM path): copies of a row
    must be at bitwise-identical distances, or d(a,n) > d(a,p) flips on the last bit (before:
    about half of random batches disagreed, loss up to 6% off)."""
    mismatches = 0
    for seed in range(10):
        g = torch.Generator().manual_seed(seed)
        base = torch.randn(40, 16, generator=g, dtype=torch.float64)  # host tensor
        if metric == "cosine":  # unit rows made as x * (1/|x|): same-direction distances must be 0
            base = base * (1 / base.norm(dim=1, keepdim=True))
        x = base.repeat(3, 1).to(device, dtype)
        y = torch.randint(0, 8, (40,), generator=g).repeat(3).to(device)
        d = tripletops.pairwise_distance(x, metric=metric)
        assert torch.equal(d[:40], d[40:80]) and torch.equal(d[:, :40], d[:, 40:80])
        assert bool((d[torch.arange(40, device=device), torch.arange(40, device=device) + 40] == 0).all()) and bool((d.diagonal() == 0).all())
        loss, grad = _grad(tripletops.semi_hard_loss, x, y, margin=0.5, metric=metric)
        ref_loss, ref_grad = _grad(reference.semi_hard_loss, x.cpu().double(), y.cpu(), margin=0.5, metric=metric)
        rtol = 1e-9 if dtype == torch.float64 else 1e-5
        mismatches += not torch.allclose(loss.cpu().double(), ref_loss, rtol=rtol, atol=1e-7)
        torch.testing.assert_close(grad.cpu().double(), ref_grad, rtol=100 * rtol, atol=1e-6)
    assert mismatches == 0


@pytest.mark.parametrize("device", devices_for("pairwise_distance"))
def test_identical_rows_across_x_and_y_are_at_distance_zero(device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 20, generator=g).to(device)
    y = torch.cat([x[:50], torch.randn(250, 20, generator=g).to(device), x[:50]])
    for metric in ("euclidean", "sqeuclidean", "cosine"):
        d = tripletops.pairwise_distance(x, y, metric=metric)
        assert bool((d[torch.arange(50, device=device), torch.arange(50, device=device)] == 0).all())
        assert torch.equal(d[:, :50], d[:, 300:])
    x[3, 1] = float("nan")  # a NaN row keeps NaN distances, to its copy as well
    d = tripletops.pairwise_distance(torch.cat([x, x[3:4]]))
    assert bool(torch.isnan(d[3]).all()) and bool(torch.isnan(d[3, 300]))


# ---- the ops check what they are given ---------------------------------------------------


def test_backward_ops_refuse_arguments_they_would_read_past():
    """torch.ops.tripletops.*_backward are public: an out-of-range index or a short saved
    tensor used to segfault or read garbage; now it is a ValueError naming the argument."""
    ops = torch.ops.tripletops
    x = torch.randn(8, 4, dtype=torch.float64)
    y = torch.arange(8) // 2
    loss, pi, ni, pd, nd = ops.batch_hard_loss(x, y, None, None, 0.2, "euclidean", False, "mean")
    g = torch.ones((), dtype=torch.float64)
    args = dict(pi=pi, ni=ni, pd=pd, nd=nd)

    def call(**kw):
        a = {**args, **kw}
        return ops.batch_hard_loss_backward(g, x, None, a["pi"], a["ni"], a["pd"], a["nd"], 0.2, "euclidean", False,
                                            "mean", False)

    call()  # the forward's own outputs are accepted
    with pytest.raises(ValueError, match="pos_idx and neg_idx must hold row indices"):
        call(pi=torch.full_like(pi, 10**9))
    with pytest.raises(ValueError, match="pos_idx and neg_idx must hold row indices"):
        call(ni=torch.full_like(ni, -5))
    with pytest.raises(ValueError, match="pos_dist must be the forward's"):
        call(pd=pd[:3])
    with pytest.raises(ValueError, match="grad must have 8"):
        ops.batch_hard_loss_backward(g, x, None, pi, ni, pd, nd, 0.2, "euclidean", False, "none", False)
    a, p, n = torch.randn(3, 5, 4, dtype=torch.float64).unbind(0)
    _, dap, dan, dpn = ops.triplet_margin_loss(a, p, n, 1.0, "euclidean", False, "mean")
    with pytest.raises(ValueError, match="d_ap must be the forward's"):
        ops.triplet_margin_loss_backward(g, a, p, n, dap[:2], dan, dpn, 1.0, "euclidean", False, "mean")
    with pytest.raises(ValueError, match="d_pn must be the forward's"):  # swap needs d_pn
        ops.triplet_margin_loss_backward(g, a, p, n, dap, dan, dpn, 1.0, "euclidean", True, "mean")


def test_numpy_margins_and_strict_flags():
    np = pytest.importorskip("numpy")
    x, y = GRID_X.float(), GRID_Y
    want = tripletops.batch_hard_loss(x, y, margin=0.25)
    for m in (np.float32(0.25), np.float64(0.25), 0.25):
        assert tripletops.batch_hard_loss(x, y, margin=m) == want
    assert tripletops.batch_all_loss(x, y, margin=np.float32(0.25)) == tripletops.batch_all_loss(x, y, margin=0.25)
    for bad in ("yes", 1, None):
        with pytest.raises(TypeError, match="soft_margin must be a bool"):
            tripletops.batch_hard_loss(x, y, soft_margin=bad)
        with pytest.raises(TypeError, match="soft_margin must be a bool"):
            tripletops.BatchAllTripletLoss(soft_margin=bad)
    with pytest.raises(TypeError, match="swap must be a bool"):
        tripletops.triplet_margin_loss(x, x, x, swap="no")
    with pytest.raises(TypeError, match="margin must be a real number"):
        tripletops.batch_hard_loss(x, y, margin=np.bool_(True))
    assert tripletops.batch_hard_loss(x, y, soft_margin=np.bool_(True)) == tripletops.batch_hard_loss(
        x, y, soft_margin=True)


def test_center_loss_compiles_fullgraph_and_matches_eager():
    torch.manual_seed(0)
    eager, compiled_mod = tripletops.CenterLoss(5, 4, momentum=0.5), tripletops.CenterLoss(5, 4, momentum=0.5)
    step = torch.compile(lambda m, x, y: m(x, y), fullgraph=True)
    for _ in range(3):
        x, y = torch.randn(10, 4), torch.randint(0, 4, (10,))  # class 4 never seen
        torch.testing.assert_close(step(compiled_mod, x, y), eager(x, y))
        torch.testing.assert_close(compiled_mod.centers, eager.centers)
    assert not bool(eager.initialized[4]) and bool((eager.centers[4] == 0).all())
    with pytest.raises(ValueError, match="labels must be in"):
        eager(torch.randn(2, 4), torch.tensor([0, 5]))


# ---- squared norms that overflow while the distances do not -----------------------------


@pytest.mark.parametrize("device", devices_for("batch_hard_loss"))
@pytest.mark.parametrize("dtype,offset,spread", [(torch.float64, 1e154, 1e145), (torch.float32, 2e19, 1e13)])
@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean", "cosine"])
@pytest.mark.parametrize("bank", [False, True])
@pytest.mark.parametrize("b", [12, 150])  # the direct path and the GEMM path
def test_overflowing_norms_are_mined_right(device, dtype, offset, spread, metric, bank, b, request):
    """Every row near `offset`: squared norms overflow, distances (~spread) do not. The
    kernel used to mine on NaN keys (first positive, first negative) and return a finite
    loss 5x off. CPU: mined on rows scaled by a power of two, so right; CUDA: NaN or right."""
    if metric == "sqeuclidean" and dtype == torch.float32:
        pytest.skip("squared fp32 distances of 1e13 overflow themselves: inf is the honest value")
    g = torch.Generator().manual_seed(b)
    x = (offset + spread * torch.randn(b, 8, generator=g, dtype=torch.float64)).to(dtype).to(device)
    y = torch.randint(0, 4, (b,), generator=g).to(device)
    kw = {}
    if bank:
        r = (offset + spread * torch.randn(90, 8, generator=g, dtype=torch.float64)).to(dtype).to(device)
        kw = dict(ref_embeddings=r, ref_labels=torch.randint(0, 4, (90,), generator=g).to(device))
    got = tripletops.batch_hard_loss(x, y, metric=metric, reduction="none", **kw).double().cpu()
    ref = reference.batch_hard_loss(x.double(), y, metric=metric, reduction="none",
                                    **{k: (v.double() if v.is_floating_point() else v) for k, v in kw.items()}).cpu()
    finite = torch.isfinite(got)
    on_cpu_kernels = device == "cpu" and request.node.get_closest_marker("cuda_emu") is None
    if on_cpu_kernels and not (metric == "cosine" and dtype == torch.float32):
        assert bool(finite.all())
    rtol = 1e-9 if dtype == torch.float64 else 1e-4
    scale = ref.abs().max().clamp(min=1e-300)
    assert torch.allclose(got[finite], ref[finite], rtol=rtol, atol=float(scale) * rtol), (got, ref)


@pytest.mark.parametrize("device", devices_for("contrastive_loss"))
@pytest.mark.parametrize("b", [6, 300])  # the direct path, and the GEMM path of the backward
def test_contrastive_fp32_gradient_on_a_very_close_pair(b, device):
    """A positive pair 1.3e-5 apart (normalize=True, D=2): the fp32 gradient stays at the fp32
    reference's own rounding. At B=300 the GEMM-form backward used to cancel on that pair
    (2e-5..4e-5 relative against 5e-7); close pairs now go in difference form (on CUDA:
    the fused path at B=6 and, under cuda-emu, pairwise_distance's backward at B=300)."""
    torch.manual_seed(0)
    y = torch.arange(b) // 2  # host tensor
    for _ in range(3):
        a = torch.randn(1, 2, dtype=torch.float64)  # host tensor
        near = a + 1.3e-5 * torch.randn(1, 2, dtype=torch.float64)  # host tensor
        x = torch.cat([a, near, torch.randn(b - 2, 2, dtype=torch.float64)])  # host tensor

        def grad(fn, dtype, on=device):
            leaf = x.detach().to(device=on, dtype=dtype).clone().requires_grad_(True)
            fn(leaf, y.to(on), normalize=True, pos_margin=0.0, neg_margin=1.0).backward()
            return leaf.grad.double().cpu()

        want = grad(reference.contrastive_loss, torch.float64, "cpu")
        err = lambda g: float((g - want).norm() / want.norm())
        assert err(grad(tripletops.contrastive_loss, torch.float32)) <= 10 * err(grad(reference.contrastive_loss,
                                                                                       torch.float32, "cpu")) + 1e-6


# ---- exact ties on shifted rows ------------------------------------------------------------


@pytest.mark.parametrize("device", devices_for("batch_hard_loss"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bank", [False, True])
def test_exact_ties_far_from_the_origin_go_to_the_smallest_index(device, dtype, bank):
    """Integer-valued rows around 100: mining runs on shifted rows there. The shift used to be
    the (fractional) mean, which took the rows off the integer grid, so exact ties were broken
    by rounding (40 of 40 batches picked differently from the definition); a shift rounded to
    a power of two below the spread keeps the rows, keys and ties exact."""
    for seed in range(8):
        g = torch.Generator().manual_seed(seed)
        x = (torch.randint(-3, 4, (300, 6), generator=g) + 100).to(dtype)  # host tensor
        y = torch.randint(0, 5, (300,), generator=g)  # host tensor
        kw = {}
        if bank:
            r = (torch.randint(-3, 4, (500, 6), generator=g) + 100).to(dtype)  # host tensor
            kw = dict(ref_embeddings=r.to(device), ref_labels=torch.randint(0, 5, (500,), generator=g).to(device))
        m = tripletops.batch_hard_mine(x.to(device), y.to(device), **kw)
        want = reference.batch_hard_mine(x.double(), y, **{k: (v.cpu().double() if v.is_floating_point() else v.cpu())
                                                           for k, v in kw.items()})
        assert torch.equal(m.pos_idx.cpu(), want.pos_idx) and torch.equal(m.neg_idx.cpu(), want.neg_idx), seed


# ---- near-ties below the Gram rounding floor -------------------------------------------------


def _near_pair_batch(seed, dtype, offset, groups=60, dim=64):
    """Groups of five rows around a random v (|v| = 4, plus `offset` in every column): v,
    positives v + 2.4e-4 u1 and v + 1.6e-3 u2 (its class), negatives v + 2.4e-4 u3 and
    v + 1.6e-3 u4 (two other classes). Gram-form keys of these pairs (d^2 of 6e-8 and
    2.6e-6) sit below the keys' rounding (~1e-5 at |a|^2 + |b|^2 = 32 in fp32), so an
    uncertified kernel picks between the two at random; the definition never ties them."""
    g = torch.Generator().manual_seed(seed)
    rows, labels = [], []
    for k in range(groups):
        v = torch.randn(dim, generator=g, dtype=torch.float64)
        v = 4 * v / v.norm() + offset
        for dist, cls in [(0.0, 0), (2.4e-4, 0), (1.6e-3, 0), (2.4e-4, 1), (1.6e-3, 2)]:
            u = torch.randn(dim, generator=g, dtype=torch.float64)
            rows.append(v + dist * u / u.norm())
            labels.append(3 * k + cls)
    perm = torch.randperm(len(rows), generator=g)
    return torch.stack(rows)[perm].to(dtype), torch.tensor(labels)[perm]


@pytest.mark.parametrize("device", devices_for("batch_hard_loss"))
@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean", "cosine"])
@pytest.mark.parametrize("offset", [0.0, 50.0])
@pytest.mark.parametrize("bank", [False, True])
def test_candidates_below_the_gram_rounding_floor_are_settled_exactly(device, metric, offset, bank, request):
    """fp32 mining used to pick the pair at 1.6e-3 over the true closest at 2.4e-4 when both
    Gram keys fell inside |a|^2 + |b|^2 rounding. Every key now comes with its rounding bound
    and a choice that does not beat its runner-up by twice that is settled on exact distances:
    the indices equal the float64 definition's, on every anchor."""
    emulated = request.node.get_closest_marker("cuda_emu") is not None
    for seed in range(1 if emulated else 3):  # every anchor settles: slow under the emulator
        # 150 rows: past the CPU's exact small-problem path and the emulator's whole-Gram limit.
        x, y = _near_pair_batch(seed, torch.float32, offset, groups=30)
        kw = {}
        if bank:  # the batch's own rows as reference set, behind unrelated rows
            g = torch.Generator().manual_seed(100 + seed)
            extra = torch.randn(400, x.shape[1], generator=g).to(x.dtype) + offset
            r = torch.cat([extra, x])
            kw = dict(ref_embeddings=r.to(device), ref_labels=torch.cat([torch.full((400,), -1), y]).to(device))  # host tensor
            x = x[::3].contiguous()
            y = y[::3].contiguous()
        m = tripletops.batch_hard_mine(x.to(device), y.to(device), metric=metric, **kw)
        want = reference.batch_hard_mine(x.double(), y, metric=metric,
                                         **{k: (v.cpu().double() if v.is_floating_point() else v.cpu())
                                            for k, v in kw.items()})
        wrong_p = int((m.pos_idx.cpu() != want.pos_idx).sum())
        wrong_n = int((m.neg_idx.cpu() != want.neg_idx).sum())
        assert wrong_p == 0 and wrong_n == 0, (seed, wrong_p, wrong_n, len(y))


@pytest.mark.parametrize("device", devices_for("batch_hard_loss"))
@pytest.mark.parametrize("bank", [False, True])
def test_duplicated_rows_tie_to_the_smallest_index_on_the_gram_path(device, bank):
    """Rows repeated at several indices (fp32, past the direct path): their keys are exact ties
    in the definition, so the smallest index must win, whatever the GEMM's rounding does to
    each copy's Gram entry."""
    g = torch.Generator().manual_seed(7)
    base = torch.randn(40, 48, generator=g)  # host tensor
    idx = torch.randint(0, 40, (240,), generator=g)  # host tensor
    x = base[idx] * 3
    y = torch.randint(0, 6, (240,), generator=g)  # host tensor
    kw = {}
    if bank:
        ridx = torch.randint(0, 40, (400,), generator=g)  # host tensor
        kw = dict(ref_embeddings=(base[ridx] * 3).to(device), ref_labels=torch.randint(0, 6, (400,), generator=g).to(device))
    m = tripletops.batch_hard_mine(x.to(device), y.to(device), **kw)
    want = reference.batch_hard_mine(x.double(), y, **{k: (v.cpu().double() if v.is_floating_point() else v.cpu())
                                                       for k, v in kw.items()})
    assert torch.equal(m.pos_idx.cpu(), want.pos_idx) and torch.equal(m.neg_idx.cpu(), want.neg_idx)


@pytest.mark.parametrize("device", devices_for("batch_hard_loss"))
@pytest.mark.parametrize("bank", [False, True])
def test_settle_stats_count_the_settled_and_the_rescanned_anchors(device, bank, request):
    """tripletops.batch_hard._settle_stats: how many anchors settle on exact distances, and
    how many of those rescan the reference set. Here every anchor settles (its candidates
    sit below the Gram rounding floor). Where the window holds at most the kKept = 3
    candidates the CUDA mining state keeps (an anchor of a 3-row class: 2 positives) it
    settles from those, with no rescan; a window of more (4 negatives within 1.6e-3, or
    rows duplicated many times) is rescanned.
    The CPU settles every such anchor by one more GEMM (settled == rescanned). Either way
    the indices equal the float64 definition's."""
    from tripletops.batch_hard import _settle_stats

    cuda_kernels = device == "cuda" or request.node.get_closest_marker("cuda_emu") is not None
    x, y = _near_pair_batch(0, torch.float32, 0.0, groups=30)
    g = torch.Generator().manual_seed(5)
    base = torch.randn(20, 16, generator=g)  # host tensor
    dup = base[torch.randint(0, 20, (160,), generator=g)] * 3  # host tensor
    dup_y = torch.randint(0, 4, (160,), generator=g)  # host tensor
    for rows, labels, rescans in ((x, y, False), (dup, dup_y, True)):
        kw = {}
        if bank:
            kw = dict(ref_embeddings=rows.flip(0).contiguous().to(device), ref_labels=labels.flip(0).to(device))
        settled, rescanned = _settle_stats(rows.to(device), labels.to(device), **kw)
        assert 0 < settled <= len(labels) and 0 <= rescanned <= settled, (settled, rescanned)
        if not cuda_kernels:
            assert rescanned == settled
        elif rescans:
            assert rescanned > 0
        else:
            assert rescanned < settled, (settled, rescanned)
        m = tripletops.batch_hard_mine(rows.to(device), labels.to(device), **kw)
        want = reference.batch_hard_mine(rows.double(), labels, **{k: (v.cpu().double() if v.is_floating_point()
                                                                     else v.cpu()) for k, v in kw.items()})
        assert torch.equal(m.pos_idx.cpu(), want.pos_idx) and torch.equal(m.neg_idx.cpu(), want.neg_idx)


@pytest.mark.parametrize("device", devices_for("pairwise_distance"))
@pytest.mark.parametrize("n", [6, 300])  # the direct path and the GEMM path (CPU)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cosine_same_direction_rows_meet_at_zero_and_zero_rows_stay_at_one(device, n, dtype):
    """SPEC: same-direction rows have cosine distance exactly 0. x and 2x (unit rows that
    round alike) used to come out 1.2e-7 apart in fp32; and zero rows, which F.normalize
    leaves at 0 (distance 1 to everything, themselves included), used to be set to 0 when
    they were copies of each other."""
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, 5, generator=g, dtype=torch.float64).to(dtype)  # host tensor
    x[1] = 2 * x[0]
    x[2] = 0.25 * x[0]
    x[3] = 0
    x[4] = 0
    d = tripletops.pairwise_distance(x.to(device), metric="cosine").cpu()
    want = reference.pairwise_distance(x.double(), metric="cosine")
    same = [0, 1, 2]
    assert bool((d[same][:, same] == 0).all()), d[same][:, same]
    assert bool((d[3:5] == 1).all()) and bool((d[:, 3:5] == 1).all()), d[:5, :5]
    assert torch.allclose(d.double(), want, atol=1e-6 if dtype == torch.float32 else 1e-12)


def test_zero_dim_tensor_margins_are_taken_like_numbers():
    """As PyTorch's own losses: a 0-d real tensor margin equals the Python number, in every
    entry point and in the reference; other tensors, bools and NaN are refused."""
    x, y = GRID_X.float(), GRID_Y
    for m in (torch.tensor(0.25), torch.tensor(0.25, dtype=torch.float64)):
        assert tripletops.batch_hard_loss(x, y, margin=m) == tripletops.batch_hard_loss(x, y, margin=0.25)
        assert tripletops.batch_all_loss(x, y, margin=m) == tripletops.batch_all_loss(x, y, margin=0.25)
        assert tripletops.semi_hard_loss(x, y, margin=m) == tripletops.semi_hard_loss(x, y, margin=0.25)
        assert tripletops.contrastive_loss(x, y, neg_margin=m) == tripletops.contrastive_loss(x, y, neg_margin=0.25)
        assert tripletops.triplet_margin_loss(x, x.flip(0), x, margin=m) == tripletops.triplet_margin_loss(
            x, x.flip(0), x, margin=0.25)
        assert torch.equal(tripletops.reference.batch_hard_loss(x, y, margin=m),
                           tripletops.reference.batch_hard_loss(x, y, margin=0.25))
        assert tripletops.BatchHardTripletLoss(margin=m)(x, y) == tripletops.batch_hard_loss(x, y, margin=0.25)
    assert tripletops.batch_hard_loss(x, y, margin=torch.tensor(1)) == tripletops.batch_hard_loss(x, y, margin=1.0)
    for bad in (torch.tensor([0.25]), torch.tensor(True), torch.tensor(1 + 0j)):
        with pytest.raises(TypeError, match="margin must be a real number or a 0-d real tensor"):
            tripletops.batch_hard_loss(x, y, margin=bad)
    for bad in (torch.tensor(-0.5), torch.tensor(float("nan")), torch.tensor(float("inf"))):
        with pytest.raises(ValueError, match="margin must be a finite number >= 0"):
            tripletops.batch_hard_loss(x, y, margin=bad)


def test_label_messages_say_what_was_probably_meant():
    x = torch.randn(6, 3)
    with pytest.raises(TypeError, match=r"look like class ids: class ids are \(B,\), so squeeze the last dimension"):
        tripletops.batch_hard_loss(x, torch.arange(6)[:, None])
    with pytest.raises(TypeError, match="any integer dtype: int8, int16, int32, int64, uint8"):
        tripletops.batch_hard_loss(x, torch.arange(6).float())
    for dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):  # what the message promises
        assert torch.isfinite(tripletops.batch_hard_loss(x, (torch.arange(6) % 3).to(dtype)))


# Four unit vectors: every pair is at distance sqrt(2), bit for bit, so with margin 0 every
# batch-hard, batch-all and explicit triplet term sits exactly at its kink (and every
# contrastive pair, with both margins sqrt(2)).
SIMPLEX = torch.eye(4, dtype=torch.float64)
SIMPLEX_Y = torch.tensor([0, 0, 1, 1])


def _kink_loss(lib, name, x, y, margin):
    if name == "contrastive_loss":
        m = 2.0 ** 0.5 + margin
        return lib.contrastive_loss(x, y, pos_margin=2.0 ** 0.5 - margin, neg_margin=m, reduction="mean_nonzero")
    if name == "triplet_margin_loss":
        return lib.triplet_margin_loss(x[[0, 1]], x[[1, 0]], x[[2, 3]], margin=margin, reduction="mean_nonzero")
    return getattr(lib, name)(x, y, margin=margin, reduction="mean_nonzero")


@pytest.mark.parametrize("device", devices_for("contrastive_loss"))
@pytest.mark.parametrize("lib", [tripletops, reference], ids=["kernel", "reference"])
@pytest.mark.parametrize("name", ["batch_hard_loss", "batch_all_loss", "contrastive_loss", "triplet_margin_loss"])
def test_mean_nonzero_with_every_term_at_its_kink_is_zero_with_zero_gradients(device, lib, name):
    """docs/semantics.md: an empty denominator gives exactly 0 and zero gradients. Every term
    at its kink has loss 0, so "mean_nonzero" counts none of them: every kernel and the
    reference give 0 and zero gradients (the contrastive kernel and the reference used to
    pass the kink terms' gradient, sum / clamp(count, 1)). With a term above its kink, the
    kink terms pass their gradient again (g / count), as docs/numerics.md says."""
    x = SIMPLEX.to(device).clone().requires_grad_(True)
    loss = _kink_loss(lib, name, x, SIMPLEX_Y.to(device), 0.0)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(x.grad, torch.zeros_like(x))
    x = SIMPLEX.to(device).clone().requires_grad_(True)  # control: above the kink, a gradient flows
    loss = _kink_loss(lib, name, x, SIMPLEX_Y.to(device), 0.25)
    loss.backward()
    assert loss.item() > 0 and x.grad.abs().sum() > 0


# Scales c for which c·x is exact for small-integer rows x: powers of two and non-powers,
# tiny and huge norms (per dtype: the result must be a normal number of that dtype, and
# the row's norm above F.normalize's eps, 1e-12 ~ 2^-40, below which a row is no unit row).
SAME_DIRECTION_SCALES = {
    torch.float64: [1.0, 2.0, 3.0, 0.75, 5.0, 1.5 * 2.0 ** -35, 3.0 * 2.0 ** 500, 2.0 ** -38, 7.0 * 2.0 ** 900],
    torch.float32: [1.0, 2.0, 3.0, 0.75, 5.0, 1.5 * 2.0 ** -35, 3.0 * 2.0 ** 100, 2.0 ** -38, 7.0 * 2.0 ** 110],
    torch.float16: [1.0, 2.0, 3.0, 0.75, 5.0, 2.0 ** -6, 3.0 * 2.0 ** 5],
    torch.bfloat16: [1.0, 2.0, 3.0, 0.75, 5.0, 1.5 * 2.0 ** -35, 3.0 * 2.0 ** 100, 7.0 * 2.0 ** 110],
}


@pytest.mark.parametrize("device", devices_for("pairwise_distance"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [1, 2, 3, 7, 64])
def test_rows_of_one_direction_meet_at_exactly_zero_under_cosine(device, dtype, d):
    """docs/numerics.md: rows of one direction meet at exactly 0 under cosine, whatever their
    scales (x and c·x, c > 0, with c·x exact), norms tiny or huge included (an fp32 norm
    past 1.8e19 used to overflow the unit row to 0), in every dtype, on the GEMM path and
    the direct one. Opposite rows are at 2, and every other distance stays at float64's."""
    g = torch.Generator().manual_seed(d)
    base = torch.randint(-7, 8, (4, d), generator=g, dtype=torch.float64)  # host tensor
    base[base.abs().sum(1) == 0, 0] = 1.0
    scales = SAME_DIRECTION_SCALES[dtype]
    rows = torch.cat([base[i:i + 1] * torch.tensor(scales, dtype=torch.float64)[:, None]  # host tensor
                      for i in range(len(base))])
    rows = torch.cat([rows, -base[:1]])  # the opposite of direction 0
    x = rows.to(dtype)
    assert torch.equal(x.double(), rows)  # every c·x is exact in the dtype
    direction = torch.arange(len(base)).repeat_interleave(len(scales))  # host tensor
    for n_extra in (0, 300):  # the direct path, then the GEMM path
        extra = torch.randn(n_extra, d, generator=g, dtype=torch.float64).to(dtype)  # host tensor
        xs = torch.cat([x, extra]).to(device)
        dist = tripletops.pairwise_distance(xs, metric="cosine").cpu()
        k = len(direction)
        same = direction[:, None] == direction[None, :]
        assert bool((dist[:k, :k][same] == 0).all()), dist[:k, :k][same].abs().max()
        opposite = dist[:len(scales), k]
        assert torch.allclose(opposite.double(), torch.full_like(opposite.double(), 2.0), rtol=1e-3)
        # The float64 definition on rows scaled to max |x_k| = 1 (the same directions; the
        # reference's own F.normalize overflows on the 7·2^900 rows, giving them distance 1).
        safe = xs.cpu().double() / xs.cpu().double().abs().amax(1, keepdim=True)
        want = reference.pairwise_distance(safe, metric="cosine")
        tol = {torch.float64: 1e-12, torch.float32: 1e-6}.get(dtype, 1e-2)
        assert torch.allclose(dist.double(), want, atol=tol)


@pytest.mark.parametrize("device", devices_for("semi_hard_loss"))
def test_semi_hard_on_one_dimensional_rows_under_cosine(device):
    """The issue's case: D = 1, every positive row is one direction. Cosine distances of
    1.1e-16 between them used to flip semi-hard's strict d(a,n) > d(a,p): 0.667 against
    the definition's 0.389."""
    torch.manual_seed(3)
    x = torch.randn(12, 1, dtype=torch.float64)  # host tensor
    y = torch.arange(12) % 3  # host tensor
    got = tripletops.semi_hard_loss(x.to(device), y.to(device), metric="cosine")
    want = reference.semi_hard_loss(x, y, metric="cosine")
    assert abs(got.item() - want.item()) <= 1e-12, (got, want)


@pytest.mark.parametrize("device", devices_for("batch_hard_mine"))
@pytest.mark.parametrize("b", [64, 150])  # the whole-Gram path and, under cuda-emu, the tiled one
def test_zero_rows_in_cosine_settling(device, b):
    """A near tie on the Gram path is settled on exact keys |â - b̂|², which equal 2 (1 - cos)
    only for unit rows: a zero row (F.normalize: distance 1 to everything) scored 1, as if
    at distance 0.5, and won. Anchor e0 has a negative at distance 1 - 5e-6 and a zero row
    at 1: the first must be its closest negative; a zero anchor, at distance 1 from every
    row, takes the smallest index. Everything as the float64 definition picks."""
    g = torch.Generator().manual_seed(b)
    d = 32
    x = -torch.eye(d, dtype=torch.float64)[0] + 0.3 * torch.randn(b, d, generator=g, dtype=torch.float64)  # host tensor
    y = 3 + torch.arange(b) % 7  # host tensor
    x[0] = 0.0
    x[0, 0] = 1.0                                            # the anchor, e0
    x[1] = torch.randn(d, generator=g, dtype=torch.float64)  # host tensor: its positive
    x[2] = 0.0
    x[2, 0], x[2, 1] = 5e-6, (1 - 25e-12) ** 0.5             # a negative at distance 1 - 5e-6
    x[3] = 0.0                                               # a zero row, at distance 1
    x[5] = 0.0                                               # a zero anchor (its class: 3 + 5 % 7)
    y[0], y[1], y[2], y[3] = 0, 0, 1, 2
    x32 = x.float()
    m = tripletops.batch_hard_mine(x32.to(device), y.to(device), metric="cosine")
    want = reference.batch_hard_mine(x32.double(), y, metric="cosine")
    assert int(m.neg_idx[0]) == 2
    # (tripletops.reference normalizes the plain way: its own zeros come out ~1e-17 apart.)
    assert torch.equal(m.pos_idx.cpu(), want.pos_idx)


# Rows whose squares leave fp32's range although every value fits: the CPU kernels measure
# them on rows times 2^-e and scale the distances back exactly (rows_cpu.h:
# safe_scale_exponent); the CUDA kernels recompute such distances in double, and CUDA
# batch-hard ranks a kind whose Gram keys overflow on exact keys (certify's all_p / all_n).
_TINY = [[0.0], [1.0], [2.0], [5.0]]
_HUGE = [[0.0, 0.0], [1.0, 0.0], [0.0, 3.0], [2.0, 2.0]]


@pytest.mark.parametrize("device", devices_for("batch_hard_loss"))
@pytest.mark.parametrize("rows,scale", [(_TINY, 1e-30), (_TINY, 3e-25), (_HUGE, 1e20), (_HUGE, 7e30)])
@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean"])
def test_fp32_rows_of_extreme_norm_are_measured_exactly(device, rows, scale, metric, request):
    """fp32 rows of norm 1e-30 used to meet at distance 0 (squares underflow: batch-hard
    picked positive 1 over 2, contrastive gave 1.0 against 0.5), and rows of norm 1e20 at
    inf (squares overflow: the batch-hard loss was NaN) although every distance fits."""
    x64 = (torch.tensor(rows, dtype=torch.float64) * scale).float().double()  # host tensor
    x = x64.float().to(device)
    y = (torch.tensor([0, 0, 0, 1]) if len(rows[0]) == 1 else torch.tensor([0, 0, 1, 1])).to(device)  # host tensor
    y64 = y.cpu()
    want = reference.pairwise_distance(x64, metric=metric)
    got = tripletops.pairwise_distance(x, metric=metric).cpu()
    want32 = want.float().double()  # correctly rounded to fp32: inf or 0 where it leaves fp32's range
    fits = torch.isfinite(want32)
    assert torch.equal(torch.isfinite(got), fits), (got, want)
    assert torch.allclose(got[fits].double(), want32[fits], rtol=2e-6, atol=0), (got, want)
    margin = 0.37 * float(want[fits].max())  # on the data's scale, so the loss is not all margin
    got_c = tripletops.contrastive_loss(x, y, metric=metric, neg_margin=2 * margin).double().cpu()
    want_c = reference.contrastive_loss(x64, y64, metric=metric, neg_margin=2 * margin)
    if bool(fits.all()) and bool((want32 > 0).sum() > len(y)):  # (sqeuclidean of 1e-30 rows: all 0 in fp32)
        assert torch.allclose(got_c, want_c, rtol=1e-5, atol=0), (got_c, want_c)
    m, r = tripletops.batch_hard_mine(x, y, metric=metric), reference.batch_hard_mine(x64, y64, metric=metric)
    assert torch.equal(m.pos_idx.cpu(), r.pos_idx) and torch.equal(m.neg_idx.cpu(), r.neg_idx), (m, r)
    assert torch.allclose(m.pos_dist.double().cpu(), r.pos_dist.float().double(), rtol=2e-6, atol=0)
    assert torch.allclose(m.neg_dist.double().cpu(), r.neg_dist.float().double(), rtol=2e-6, atol=0)
    if not bool(fits.all()) or not bool((want32 > 0).sum() > len(y)):
        return  # sqeuclidean: 1e40 overflows fp32 itself, 1e-60 underflows (inf / 0: the honest values)
    xg, xg64 = x.clone().requires_grad_(True), x64.clone().requires_grad_(True)
    loss = tripletops.batch_hard_loss(xg, y, metric=metric, margin=margin)
    loss64 = reference.batch_hard_loss(xg64, y64, metric=metric, margin=margin)
    assert torch.allclose(loss.double().cpu(), loss64, rtol=1e-5, atol=0), (loss, loss64)
    loss.backward()
    loss64.backward()
    g, g64 = xg.grad.double().cpu(), xg64.grad
    assert torch.isfinite(g).all()
    assert torch.allclose(g, g64, rtol=1e-4, atol=1e-6 * float(g64.abs().max())), (g, g64)


@pytest.mark.parametrize("device", devices_for("pairwise_distance"))
def test_cosine_rows_below_eps_keep_normalize_semantics_when_tiny(device):
    """Scaling tiny rows up is for (sq)euclidean only: under cosine a row of norm <= 1e-12
    is F.normalize's x / eps, at distance ~1 from everything, and stays so."""
    x = (torch.tensor([[1.0, 0.0], [1.0, 1e-3], [0.0, 1.0]]) * 1e-30).to(device)  # host tensor
    got = tripletops.pairwise_distance(x, metric="cosine").cpu()
    want = reference.pairwise_distance(x.double().cpu(), metric="cosine")
    assert torch.allclose(got.double(), want, atol=1e-6), (got, want)


@pytest.mark.parametrize("device", devices_for("batch_hard_mine"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("b", [64, 150])  # the whole-Gram path and, under cuda-emu, the tiled one
def test_batch_hard_rows_of_one_direction_tie_to_the_smallest_index_under_cosine(device, dtype, b):
    """Every anchor's negatives include rows of its own direction at other scales (c·x, c
    not a power of two): all at cosine distance exactly 0, so the closest negative is the
    smallest index of them. Settling ranks them on canonical unit rows, bitwise the same for
    x and c·x (the CUDA kernels used x / |x| in double: 1e-17 apart, any of them could win)."""
    g = torch.Generator().manual_seed(b)
    d = 12
    n_dir = b // 6
    base = torch.randint(-9, 10, (n_dir, d), generator=g, dtype=torch.float64)  # host tensor
    base[base.abs().sum(1) == 0, 0] = 1.0
    scales = torch.tensor([1.0, 3.0, 0.75, 5.0, 1.5, 7.0], dtype=torch.float64)  # host tensor
    x = (base[:, None, :] * scales[None, :, None]).reshape(-1, d)
    y = torch.arange(len(x)) % 5  # host tensor; rows of one direction carry several labels
    perm = torch.randperm(len(x), generator=g)  # host tensor
    x, y = x[perm].to(dtype), y[perm]
    assert torch.equal(x.double(), x.double().to(dtype).double())  # every c·x is exact
    m = tripletops.batch_hard_mine(x.to(device), y.to(device), metric="cosine")
    want = reference.batch_hard_mine(x.double(), y, metric="cosine")
    direction = (perm // len(scales))
    same_dir = direction[:, None] == direction[None, :]
    column = torch.arange(len(x))  # host tensor
    expected_neg = torch.where(same_dir & (y[:, None] != y[None, :]), column, len(x)).min(1).values
    has = expected_neg < len(x)
    assert torch.equal(m.neg_idx.cpu()[has], expected_neg[has]), (m.neg_idx.cpu()[has], expected_neg[has])
    # (tripletops.reference normalizes the plain way: its own zeros come out ~1e-17 apart.)
    assert torch.equal(m.pos_idx.cpu(), want.pos_idx)


@pytest.mark.parametrize("device", devices_for("batch_hard_loss"))
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("b,bank", [(40, False), (150, False), (60, True)])  # small, tiled (cuda-emu), bank
def test_batch_hard_on_rows_whose_squares_overflow_fp32(device, metric, b, bank):
    """fp32 rows of norm ~1e20: every squared norm overflows fp32, so every Gram key is inf
    or NaN, although every distance fits. Mining (indices) and the loss equal float64 on the
    unscaled rows; the CUDA kernels rank such kinds on exact keys (they gave NaN before)."""
    g = torch.Generator().manual_seed(b)
    base = torch.randint(-6, 7, (b, 5), generator=g).double()  # host tensor
    base[base.abs().sum(1) == 0, 0] = 1.0
    y = torch.randint(0, 4, (b,), generator=g)  # host tensor
    scale = 2.0 ** 66  # exact in fp32, ~7.4e19
    x = (base * scale).float().to(device)
    kw, kw64 = {}, {}
    if bank:
        kw = dict(ref_embeddings=x.flip(0), ref_labels=y.flip(0).to(device))
        kw64 = dict(ref_embeddings=base.flip(0), ref_labels=y.flip(0))
    m = tripletops.batch_hard_mine(x, y.to(device), metric=metric, **kw)
    r = reference.batch_hard_mine(base, y, metric=metric, **kw64)
    assert torch.equal(m.pos_idx.cpu(), r.pos_idx) and torch.equal(m.neg_idx.cpu(), r.neg_idx)
    if metric == "sqeuclidean":  # squared distances of ~1e41 overflow fp32 themselves: inf is honest
        assert torch.isinf(m.pos_dist.cpu()).all()
        return
    unit = 1.0 if metric == "cosine" else scale
    for got, want in ((m.pos_dist, r.pos_dist), (m.neg_dist, r.neg_dist)):
        assert torch.allclose(got.double().cpu() / unit, want, rtol=1e-6, atol=1e-6), (got, want)
    loss = tripletops.batch_hard_loss(x, y.to(device), metric=metric, margin=0.5 * unit, **kw).double().cpu()
    want = reference.batch_hard_loss(base, y, metric=metric, margin=0.5, **kw64)
    assert torch.allclose(loss / unit, want, rtol=1e-5), (loss / unit, want)
