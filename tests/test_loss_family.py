"""batch_all_loss, semi_hard_loss, contrastive_loss, their modules, CenterLoss and
CrossBatchMemory against float64 references and their documented semantics."""
from __future__ import annotations

import pytest
import torch

import tripletops
from tripletops import reference

from conftest import (DEVICES, DTYPES, EMU, GRAD_RTOL, LOSS_RTOL, METRICS, assert_close_rel, assert_grad_close,
                      make_batch)

SHAPES = [(1, 4, 1), (2, 3, 2), (7, 5, 3), (33, 1, 4), (65, 9, 5), (130, 17, 13)]
FAMILY = {
    "batch_all": (tripletops.batch_all_loss, reference.batch_all_loss, ["mean_nonzero", "mean", "sum"]),
    "semi_hard": (tripletops.semi_hard_loss, reference.semi_hard_loss, [None]),
    "contrastive": (tripletops.contrastive_loss, reference.contrastive_loss, ["mean_nonzero", "mean", "sum", "none"]),
}
CASES = [(name, r) for name, (_, _, reds) in FAMILY.items() for r in reds]


def _kwargs(name, reduction, metric, soft=False):
    kw = {"metric": metric}
    if reduction is not None:
        kw["reduction"] = reduction
    if name == "batch_all":
        kw.update(margin=0.3, soft_margin=soft)
    elif name == "semi_hard":
        kw["margin"] = 0.5
    else:
        kw.update(pos_margin=0.1, neg_margin=1.2)
    return kw


def _run(fn, x, y, kw):
    x = x.detach().clone().requires_grad_(True)
    loss = fn(x, y, **kw)
    (loss.sum() if loss.dim() else loss).backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("b,d,c", SHAPES)
@pytest.mark.parametrize("name,reduction", CASES)
def test_matches_float64_reference(name, reduction, device, dtype, metric, b, d, c, poisoned):
    fn, ref_fn, _ = FAMILY[name]
    if name == "semi_hard" and metric == "cosine" and d == 1:
        pytest.skip("D = 1 cosine distances are all 0 or 2: semi-hard's strict d(a,n) > d(a,p) is decided by "
                    "1e-16 rounding there (a near-tie), so kernel and reference may pick different negatives")
    x, y = make_batch(b, d, c, dtype=dtype, device=device)
    kw = _kwargs(name, reduction, metric)
    loss, grad = _run(fn, x, y, kw)
    ref_loss, ref_grad = _run(ref_fn, x.double(), y, kw)
    assert loss.dtype == dtype and loss.shape == ref_loss.shape
    if loss.numel() == 0:  # B = 1: no pairs
        assert torch.equal(grad, torch.zeros_like(grad))
        return
    if ref_loss.abs().max() > torch.finfo(dtype).max:  # a fp16 "sum" past 65504: inf is the honest result
        assert torch.isinf(loss).any()
        return
    assert_close_rel(loss, ref_loss, LOSS_RTOL[dtype], "loss")
    if name == "contrastive" and metric == "cosine" and d == 1 and dtype != torch.float64:
        # D = 1 cosine distances are constant (0 or 2): the exact gradient is 0, and what
        # either side computes is the rounding noise of its normalization.
        assert torch.isfinite(grad).all()
    elif dtype in (torch.float64, torch.float32):
        assert_grad_close(grad, ref_grad, GRAD_RTOL[dtype])
    else:
        assert torch.isfinite(grad).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("reduction", ["mean_nonzero", "mean", "sum"])
def test_batch_all_soft_margin(device, metric, reduction):
    x, y = make_batch(40, 6, 5, dtype=torch.float64, device=device)
    kw = _kwargs("batch_all", reduction, metric, soft=True)
    loss, grad = _run(tripletops.batch_all_loss, x, y, kw)
    ref_loss, ref_grad = _run(reference.batch_all_loss, x, y, kw)
    assert_close_rel(loss, ref_loss, 1e-10, "loss")
    assert_grad_close(grad, ref_grad, 1e-9)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_and_int32_labels(device):
    x, y = make_batch(30, 8, 4, dtype=torch.float64, device=device)
    xt = x.T.contiguous().T  # same values, transposed strides
    for name, (fn, ref_fn, reds) in FAMILY.items():
        kw = _kwargs(name, reds[0], "euclidean")
        assert_close_rel(fn(xt, y.int(), **kw), ref_fn(x, y, **kw), 1e-10, name)
        assert_close_rel(fn(x[::2], y[::2], **kw), ref_fn(x[::2].contiguous(), y[::2], **kw), 1e-10, name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(FAMILY))
def test_no_valid_triplet_or_pair_gives_zero_and_zero_gradients(name, device):
    fn, _, reds = FAMILY[name]
    x = torch.randn(6, 4, dtype=torch.float64, device=device)
    for y in (torch.arange(6, device=device), torch.zeros(6, dtype=torch.int64, device=device)):  # all distinct / all one class
        for reduction in reds:
            kw = _kwargs(name, reduction, "euclidean")
            if name == "contrastive":
                kw.update(neg_margin=0.0, pos_margin=100.0)  # every pair inside its margin: nothing nonzero
            loss, grad = _run(fn, x, y, kw)
            if reduction != "none":
                assert loss.item() == 0.0, (name, reduction)
            assert torch.equal(grad, torch.zeros_like(grad)), (name, reduction)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(FAMILY))
def test_duplicates_give_finite_gradients(name, device):
    fn, _, reds = FAMILY[name]
    x = torch.randn(4, 5, dtype=torch.float64).repeat(3, 1).to(device)  # every row three times
    y = torch.arange(4).repeat(3).to(device)
    for metric in METRICS:
        loss, grad = _run(fn, x, y, _kwargs(name, reds[0], metric))
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all(), metric


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(FAMILY))
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_gives_nan(name, bad, device):
    fn, _, reds = FAMILY[name]
    x, y = make_batch(12, 4, 3, dtype=torch.float32, device=device)
    x[5, 1] = bad
    for reduction in reds:
        x_ = x.clone().requires_grad_(True)
        loss = fn(x_, y, **_kwargs(name, reduction, "euclidean"))
        assert torch.isnan(loss).any(), (name, reduction)
        (loss.sum() if loss.dim() else loss).backward()
        assert torch.isnan(x_.grad).any(), (name, reduction)  # the NaN reaches the gradient


@pytest.mark.parametrize("device", DEVICES)
def test_ties_pick_the_smallest_index_in_semi_hard(device):
    # Anchor 0 with positive 1 at distance 1; negatives 2 and 3 both at distance 2: the
    # gradient must go to row 2 only (the smaller index).
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [0.0, -2.0]], dtype=torch.float64, device=device,
                     requires_grad=True)
    y = torch.tensor([0, 0, 1, 2], device=device)
    tripletops.semi_hard_loss(x, y, margin=5.0).backward()
    ref = x.detach().clone().requires_grad_(True)
    reference.semi_hard_loss(ref, y, margin=5.0).backward()
    torch.testing.assert_close(x.grad, ref.grad)
    assert x.grad[2].abs().sum() > 0 and x.grad[3].abs().sum() == 0  # the tie went to row 2


@pytest.mark.parametrize("device", DEVICES)
def test_semi_hard_semantics_by_hand(device):
    # One anchor-positive pair per class. Class 0: d(0,1) = 1. Negatives at 0.5 (closer:
    # not semi-hard), 1.5 and 3: the semi-hard one is 1.5 -> loss 1 - 1.5 + m.
    x = torch.tensor([[0.0], [1.0], [0.5], [1.5], [3.0]], dtype=torch.float64, device=device)
    y = torch.tensor([0, 0, 1, 2, 3], device=device)
    m = 1.0
    got = tripletops.semi_hard_loss(x, y, margin=m)
    # pairs (0,1): negatives of 0 at 0.5, 1.5, 3 -> 1.5 -> 1 - 1.5 + 1 = 0.5
    #       (1,0): d = 1; negatives of 1 at 0.5, 0.5, 2 -> farther than 1: 2 -> 1 - 2 + 1 = 0
    assert abs(got.item() - 0.25) < 1e-12


def test_batch_all_matches_pytorch_metric_learning():
    pml = pytest.importorskip("pytorch_metric_learning")
    from pytorch_metric_learning import distances, losses, miners, reducers

    x, y = make_batch(48, 8, 6, dtype=torch.float64)
    dist = distances.LpDistance(normalize_embeddings=False)
    # PML's "all" miner keeps the triplets with d(a,n) - d(a,p) <= margin, those whose
    # hinge is active, so with either reducer it gives our mean_nonzero. Without a miner
    # PML uses every valid triplet: MeanReducer is then our mean.
    miner = miners.TripletMarginMiner(margin=0.3, type_of_triplets="all", distance=dist)
    combos = (("mean_nonzero", reducers.MeanReducer(), True), ("mean_nonzero", reducers.AvgNonZeroReducer(), True),
              ("mean", reducers.MeanReducer(), False), ("mean_nonzero", reducers.AvgNonZeroReducer(), False))
    for reduction, reducer, mine in combos:
        loss_fn = losses.TripletMarginLoss(margin=0.3, distance=dist, reducer=reducer)
        xa = x.clone().requires_grad_(True)
        xb = x.clone().requires_grad_(True)
        ours = tripletops.batch_all_loss(xa, y, margin=0.3, reduction=reduction)
        theirs = loss_fn(xb, y, miner(xb, y)) if mine else loss_fn(xb, y)
        ours.backward()
        theirs.backward()
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-8, atol=1e-12)


def test_bad_input():
    x, y = make_batch(8, 4, 2)
    with pytest.raises(ValueError, match="'none'"):
        tripletops.batch_all_loss(x, y, reduction="none")
    with pytest.raises(ValueError, match="margin"):
        tripletops.semi_hard_loss(x, y, margin=-1.0)
    with pytest.raises(ValueError, match="neg_margin"):
        tripletops.contrastive_loss(x, y, neg_margin=-0.5)
    with pytest.raises(ValueError, match="metric"):
        tripletops.batch_all_loss(x, y, metric="l1")
    with pytest.raises(TypeError, match="labels"):
        tripletops.semi_hard_loss(x, y.float())
    with pytest.raises(ValueError, match="labels"):
        tripletops.contrastive_loss(x, y[:3])
    with pytest.raises(ValueError, match="embeddings"):
        tripletops.batch_all_loss(x[:0], y[:0])
    with pytest.raises(TypeError, match="embeddings"):
        tripletops.semi_hard_loss(x.long(), y)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(FAMILY))
def test_bit_identical_repeats(name, device):
    fn, _, reds = FAMILY[name]
    x, y = make_batch(97, 11, 9, device=device)
    first = _run(fn, x, y, _kwargs(name, reds[0], "euclidean"))
    for _ in range(2):
        again = _run(fn, x, y, _kwargs(name, reds[0], "euclidean"))
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("name,reduction", CASES + [("batch_all", "soft")])
def test_gradcheck(name, reduction, metric, device):
    """Finite differences against each kernel's backward (float64, random points: no kink)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(10, 4, dtype=torch.float64, generator=g).to(device).requires_grad_(True)
    y = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 3, 3], device=device)
    fn, _, _ = FAMILY[name]
    kw = _kwargs(name, "mean" if reduction == "soft" else reduction, metric, soft=reduction == "soft")
    assert torch.autograd.gradcheck(lambda a: fn(a, y, **kw), (x,))


@pytest.mark.cuda_emu
@pytest.mark.skipif(not EMU, reason="needs make cuda-emu (TRIPLETOPS_EMU_LIB)")
@pytest.mark.parametrize("metric", METRICS)
def test_emulated_cuda_bitwise_across_thread_and_block_orders(metric, monkeypatch):
    """The CUDA family kernels reduce each row and the batch in a fixed order, and
    semi-hard's shared negatives take equal addends: under other thread and block orders
    (emulator seeds) every loss and gradient is bitwise the same. Duplicated rows and
    few classes make negatives shared by many positives."""
    x, y = make_batch(50, 6, 4)
    x = torch.cat([x, x[:10]])
    y = torch.cat([y, y[:10]])
    outs = []
    for seed in ("0", "1", "7", "12345"):
        monkeypatch.setenv("TRIPLETOPS_EMU_SEED", seed)
        got = []
        for name, (fn, _, reds) in FAMILY.items():
            for reduction in reds:
                got += _run(fn, x, y, _kwargs(name, reduction, metric))
        got += _run(tripletops.batch_all_loss, x, y, _kwargs("batch_all", "mean", metric, soft=True))
        outs.append(got)
    for other in outs[1:]:
        for a, c in zip(outs[0], other):
            assert torch.equal(a, c)


def test_opcheck_on_the_family_ops():
    """Each loss is one op from the embeddings, -> (loss, dist), with a C++ autograd node."""
    x, y = make_batch(20, 6, 4)
    x.requires_grad_(True)
    ops = torch.ops.tripletops
    for metric in ("euclidean", "cosine"):
        for args in ((x, y, 0.3, metric, False, "mean"), (x, y, 0.3, metric, True, "mean_nonzero"),
                     (x, y, 0.3, metric, False, "sum")):
            torch.library.opcheck(ops.batch_all_loss.default, args)
        torch.library.opcheck(ops.semi_hard_loss.default, (x, y, 1.0, metric))
        for reduction in ("none", "mean", "mean_nonzero", "sum"):
            torch.library.opcheck(ops.contrastive_loss.default, (x, y, 0.1, 1.2, metric, reduction))
    # and on a batch large enough for the GEMM path of the distances (B * B * D > 2^16)
    xl, yl = make_batch(300, 8, 20)
    torch.library.opcheck(ops.contrastive_loss.default, (xl.requires_grad_(True), yl, 0.1, 1.2, "euclidean", "mean"))


def test_backward_ops_check_their_saved_arguments():
    """Called directly with a wrong saved tensor, a backward op raises instead of reading past it."""
    x, y = make_batch(10, 4, 3, dtype=torch.float64)
    ops = torch.ops.tripletops
    _, d = ops.batch_all_loss(x, y, 0.2, "euclidean", False, "mean")
    g = torch.ones((), dtype=torch.float64)
    with pytest.raises(ValueError, match="batch_all_loss_backward: dist must be"):
        ops.batch_all_loss_backward(g, x, y, d[:5], 0.2, "euclidean", False, "mean")
    with pytest.raises(ValueError, match="semi_hard_loss_backward: dist must be"):
        ops.semi_hard_loss_backward(g, x, y, d.float(), 0.2, "euclidean")
    _, dc = ops.contrastive_loss(x, y, 0.0, 1.0, "euclidean", "none")
    with pytest.raises(ValueError, match="contrastive_loss_backward: grad must have 45"):
        ops.contrastive_loss_backward(g, x, y, dc, 0.0, 1.0, "euclidean", "none")
    with pytest.raises(ValueError, match="labels must have"):
        ops.contrastive_loss_backward(g, x, y[:4], dc, 0.0, 1.0, "euclidean", "mean")


def test_compile_fullgraph_matches_eager():
    x, y = make_batch(24, 6, 4)
    crit = [tripletops.BatchAllTripletLoss(margin=0.3), tripletops.SemiHardTripletLoss(margin=0.5),
            tripletops.ContrastiveLoss()]

    def total(x):
        return sum(c(x, y) for c in crit)

    compiled = torch.compile(total, fullgraph=True)
    xe, xc = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    total(xe).backward()
    compiled(xc).backward()
    torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-5, atol=1e-7)


def test_modules_match_functions():
    x, y = make_batch(30, 5, 4, dtype=torch.float64)
    assert tripletops.BatchAllTripletLoss(margin=0.4, reduction="sum")(x, y) == tripletops.batch_all_loss(
        x, y, margin=0.4, reduction="sum")
    assert tripletops.SemiHardTripletLoss(margin=0.7)(x, y) == tripletops.semi_hard_loss(x, y, margin=0.7)
    assert tripletops.ContrastiveLoss(neg_margin=2.0, reduction="mean")(x, y) == tripletops.contrastive_loss(
        x, y, neg_margin=2.0, reduction="mean")
    with pytest.raises(ValueError):
        tripletops.BatchAllTripletLoss(reduction="none")


def test_autocast_gives_finite_results():
    x, y = make_batch(16, 8, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the kernels' own GEMMs must not be autocast
        torch.testing.assert_close(tripletops.pairwise_distance(x), tripletops.pairwise_distance(x.double()).float())
        h = x @ torch.eye(8)
        for fn in (tripletops.batch_all_loss, tripletops.semi_hard_loss, tripletops.contrastive_loss):
            assert torch.isfinite(fn(h, y))


# ---- CenterLoss -------------------------------------------------------------------------


def test_center_loss_value_gradient_and_ema():
    torch.manual_seed(1)
    center = tripletops.CenterLoss(num_classes=3, dim=4, momentum=0.75)
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 0, 1, 1, 2, 0])
    loss = center(x, y)  # first sight: centers start at zero for the loss, then take the batch means
    torch.testing.assert_close(loss, x.detach().square().sum(1).mean())
    means = torch.stack([x.detach()[y == c].mean(0) for c in range(3)])
    torch.testing.assert_close(center.centers, means)
    x2 = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    loss2 = center(x2, y)
    torch.testing.assert_close(loss2, (x2.detach() - means[y]).square().sum(1).mean())
    loss2.backward()
    torch.testing.assert_close(x2.grad, 2 * (x2.detach() - means[y]) / 6)
    new_means = torch.stack([x2.detach()[y == c].mean(0) for c in range(3)])
    torch.testing.assert_close(center.centers, 0.75 * means + 0.25 * new_means)
    state = center.state_dict()
    assert set(state) == {"centers", "initialized"} and bool(state["initialized"].all())
    center.eval()
    before = center.centers.clone()
    center(torch.randn(6, 4, dtype=torch.float64), y)
    assert torch.equal(center.centers, before)  # no update in eval mode
    restored = tripletops.CenterLoss(num_classes=3, dim=4)
    restored.load_state_dict(state)
    torch.testing.assert_close(restored.centers, state["centers"])  # the saved dtype: nothing is narrowed on load


def test_center_loss_bad_input():
    with pytest.raises(ValueError, match="num_classes"):
        tripletops.CenterLoss(0, 4)
    with pytest.raises(ValueError, match="momentum"):
        tripletops.CenterLoss(3, 4, momentum=1.0)
    c = tripletops.CenterLoss(3, 4)
    with pytest.raises(ValueError, match="labels"):
        c(torch.randn(2, 4), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="dim"):
        c(torch.randn(2, 5), torch.tensor([0, 1]))


# ---- CrossBatchMemory -------------------------------------------------------------------


def test_cross_batch_memory_fifo_and_loss():
    xbm = tripletops.CrossBatchMemory(size=10, dim=3)
    assert len(xbm) == 0
    x1, y1 = make_batch(6, 3, 2, dtype=torch.float64, seed=1)
    loss1 = xbm(x1, y1, margin=0.2)  # empty memory: mines within the batch
    torch.testing.assert_close(loss1, tripletops.batch_hard_loss(x1, y1, margin=0.2))
    assert len(xbm) == 6 and torch.equal(xbm.embeddings, x1)
    x2, y2 = make_batch(6, 3, 2, dtype=torch.float64, seed=2)
    x2.requires_grad_(True)
    loss2 = xbm(x2, y2, margin=0.2)  # against the 6 stored rows, before x2 joins
    torch.testing.assert_close(loss2, tripletops.batch_hard_loss(x2, y2, margin=0.2, ref_embeddings=x1,
                                                                 ref_labels=y1))
    loss2.backward()
    assert x2.grad is not None and len(xbm) == 10
    # FIFO: the oldest 2 rows of x1 were overwritten; oldest first.
    torch.testing.assert_close(xbm.embeddings, torch.cat([x1[2:], x2.detach()]))
    assert torch.equal(xbm.labels, torch.cat([y1[2:], y2]))
    xbm.eval()
    xbm(x2.detach(), y2)
    assert len(xbm) == 10 and xbm.embeddings.shape == (10, 3)  # eval: no enqueue
    xbm.reset()
    assert len(xbm) == 0
    big, yb = make_batch(25, 3, 4, dtype=torch.float64, seed=3)
    xbm.enqueue(big, yb)
    assert torch.equal(xbm.embeddings, big[-10:]) and torch.equal(xbm.labels, yb[-10:])
    assert set(xbm.state_dict()) == {"memory", "memory_labels", "count", "head"}


def test_cross_batch_memory_gradients_and_the_no_copy_path():
    x1, y1 = make_batch(8, 3, 2, dtype=torch.float64, seed=4)
    x2, y2 = make_batch(8, 3, 2, dtype=torch.float64, seed=5)
    expected = x2.clone().requires_grad_(True)
    tripletops.batch_hard_loss(expected, y2, margin=0.2, ref_embeddings=x1, ref_labels=y1).backward()
    for enqueue_in_forward in (True, False):
        xbm = tripletops.CrossBatchMemory(size=12, dim=3)
        xbm.enqueue(x1, y1)
        x = x2.clone().requires_grad_(True)
        loss = xbm(x, y2, margin=0.2, enqueue=enqueue_in_forward)
        loss.backward()
        if not enqueue_in_forward:
            assert len(xbm) == 8
            xbm.enqueue(x.detach(), y2)
        assert len(xbm) == 12
        torch.testing.assert_close(x.grad, expected.grad)


@pytest.mark.parametrize("label_dtype", [torch.int8, torch.int16, torch.int32])
def test_cross_batch_memory_keeps_labels_exact(label_dtype):
    """Stored labels stay int64: a later batch with narrower labels must not wrap them
    (300 as int8 is 44, 2**32 + 5 as int32 is 5) and turn other classes into positives."""
    xbm = tripletops.CrossBatchMemory(size=16, dim=3)
    bank, _ = make_batch(8, 3, 2, dtype=torch.float64, seed=7)
    big_labels = torch.tensor([300, 2**32 + 5, 44, 5, 300, 2**32 + 5, 44, 5])
    xbm.enqueue(bank, big_labels)
    x, _ = make_batch(6, 3, 2, dtype=torch.float64, seed=8)
    y = torch.tensor([44, 44, 5, 5, 1, 1], dtype=label_dtype)
    loss = xbm(x, y, margin=0.5, reduction="none", enqueue=False)
    expected = reference.batch_hard_loss(x, y.long(), margin=0.5, reduction="none", ref_embeddings=bank,
                                         ref_labels=big_labels)
    torch.testing.assert_close(loss, expected)
    assert torch.equal(xbm.labels, big_labels)


def test_cross_batch_memory_state_unchanged_by_a_rejected_call():
    """A call that raises leaves the module exactly as it was; a narrower batch never
    downcasts the stored rows (a wider one widens them losslessly)."""
    xbm = tripletops.CrossBatchMemory(size=8, dim=3)
    x, y = make_batch(5, 3, 2, seed=9)  # float32
    xbm(x, y)
    before = {k: v.clone() for k, v in xbm.state_dict().items()}

    def unchanged():
        after = xbm.state_dict()
        return all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())

    bad_calls = [
        lambda: xbm(torch.ones(4, 3, dtype=torch.long), y[:4]),          # integer embeddings
        lambda: xbm(x[:4].double(), y[:4].float()),                       # float labels
        lambda: xbm(x[:4].double(), y[:4], margin=-1.0),                  # a bad loss argument
        lambda: xbm(x[:4, :2].double(), y[:4]),                           # wrong dim
        lambda: xbm.enqueue(torch.ones(4, 3, dtype=torch.long), y[:4]),  # integer rows
    ]
    for call in bad_calls:
        with pytest.raises((TypeError, ValueError)):
            call()
        assert unchanged()
    # fp16: the memory stays fp32, the loss comes back in fp16 with a gradient
    xh = x.half().requires_grad_(True)
    loss = xbm(xh, y)
    assert loss.dtype == torch.float16 and xbm.memory.dtype == torch.float32
    loss.backward()
    assert xh.grad is not None and xh.grad.dtype == torch.float16
    stored = xbm.embeddings.clone()
    # fp64 into a filled fp32 memory widens it without changing a stored value
    xbm(x.double(), y, enqueue=False)
    assert xbm.memory.dtype == torch.float64
    torch.testing.assert_close(xbm.embeddings, stored.double(), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean"])
@pytest.mark.parametrize("bad", [float("inf"), float("-inf")])
@pytest.mark.parametrize("loss", ["batch_all mean", "batch_all mean_nonzero", "batch_all sum", "batch_all soft",
                                  "semi_hard"])
def test_inf_in_a_singleton_class_gives_nan(dtype, metric, bad, loss, device):
    """An ±Inf entry in a row whose class has no other member: that row is only ever a
    negative, at distance inf, which zeroes every hinge it enters. The loss must still be
    NaN (NaN/Inf in, NaN out), never finite."""
    x, _ = make_batch(10, 4, 3, dtype=dtype, seed=12, device=device)
    y = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 9], device=device)
    x[9, 1] = bad
    if loss == "semi_hard":
        out = tripletops.semi_hard_loss(x, y, metric=metric)
    else:
        reduction = "mean_nonzero" if loss.endswith("soft") else loss.split()[1]
        out = tripletops.batch_all_loss(x, y, metric=metric, reduction=reduction, soft_margin=loss.endswith("soft"))
    assert torch.isnan(out), out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["batch_all_loss", "semi_hard_loss", "contrastive_loss"])
def test_a_loss_past_the_dtypes_range_is_inf_not_an_error(device, name):
    """fp32 rows whose squared distances pass 3.4e38: the loss's float64 value does not fit, so
    the promise of docs/numerics.md is +inf or NaN, never a finite wrong value and never a
    crash ("value cannot be converted to type float without overflow", which batch_all
    raised). batch_all and semi_hard give +inf; contrastive, whose fp32 terms meet inf - inf,
    gives NaN."""
    x = (torch.tensor([[0.0], [3.0], [1.0], [4.0]], dtype=torch.float64) * 1e19).float().to(device)
    y = torch.tensor([0, 0, 1, 1], device=device)
    kw = {"metric": "sqeuclidean"} if name != "contrastive_loss" else {"metric": "sqeuclidean", "neg_margin": 1e38}
    loss = getattr(tripletops, name)(x, y, **kw)
    want = getattr(reference, name)(x.double().cpu(), y.cpu(), **kw)
    assert loss.dtype == torch.float32
    if want.abs() > torch.finfo(torch.float32).max:
        assert bool(torch.isnan(loss)) if name == "contrastive_loss" else bool(torch.isinf(loss) and loss > 0), (loss,
                                                                                                               want)
    else:
        assert_close_rel(loss, want, 1e-5, name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,reduction", CASES)
@pytest.mark.parametrize("exponent", [530, -530])
@pytest.mark.parametrize("b", [20, 70])  # under cuda-emu: the fused path and the general one
def test_fp64_rows_whose_squares_leave_the_range(name, reduction, exponent, b, device):
    """Euclidean losses scale with the rows: rows times 2^530 (squares overflow float64)
    or 2^-530 (squares underflow) give the unscaled rows' loss times 2^530 or 2^-530, with
    the margins scaled alike, and the same gradient. Powers of two: every scaling is exact."""
    fn, ref_fn, _ = FAMILY[name]
    x, y = make_batch(b, 5, 3, dtype=torch.float64, device=device)
    scale = 2.0 ** exponent
    kw = _kwargs(name, reduction, "euclidean")
    ref_loss, ref_grad = _run(ref_fn, x.cpu(), y.cpu(), kw)
    for key in ("margin", "pos_margin", "neg_margin"):
        if key in kw:
            kw[key] *= scale
    loss, grad = _run(fn, x * scale, y, kw)
    assert_close_rel(loss / scale, ref_loss, 1e-12, "loss")
    assert_grad_close(grad, ref_grad, 1e-10)


@pytest.mark.cuda_emu
@pytest.mark.skipif(not EMU, reason="needs make cuda-emu (TRIPLETOPS_EMU_LIB)")
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("name,reduction", CASES + [("batch_all", "soft")])
def test_emulated_cuda_small_batches_take_four_kernels(name, reduction, metric, tmp_path, monkeypatch):
    """A small batch (B <= 64 under the emulator, <= 1024 on a GPU) runs the fused path:
    the distances and the loss in two kernels, the backward's scale and the gradient to the
    rows in two more (contrastive "none": the pair terms, then the gradient), and under
    cosine the unit rows' kernel before each half. The emulator records every launch."""
    trace = tmp_path / "launches.txt"
    monkeypatch.setenv("TRIPLETOPS_EMU_LAUNCH_TRACE", str(trace))
    fn = FAMILY[name][0]
    x, y = make_batch(40, 7, 5)
    _run(fn, x, y, _kwargs(name, "mean" if reduction == "soft" else reduction, metric, soft=reduction == "soft"))
    rows = ["family_unit_rows_kernel"] if metric == "cosine" else []
    stats = ("contrastive_fused_kernel" if name == "contrastive" else
             "batch_all_stream_kernel" if name == "batch_all" and reduction != "soft" else
             "triplet_family_fused_kernel")
    want = [*rows, "family_distance_kernel", stats, stats, *rows, "family_embedding_grad_kernel"]
    if reduction == "none":
        want = [*rows, "family_distance_kernel", "contrastive_terms_kernel", *rows, "family_embedding_grad_kernel"]
    assert trace.read_text().split() == want


@pytest.mark.cuda_emu
@pytest.mark.skipif(not EMU, reason="needs make cuda-emu (TRIPLETOPS_EMU_LIB)")
@pytest.mark.parametrize("name", ["batch_all", "semi_hard"])
@pytest.mark.parametrize("b,path", [(40, "fused"), (100, "shared sort"), (130, "general")])
def test_emulated_cuda_paths_by_batch_size(name, b, path, tmp_path, monkeypatch):
    """Which kernels each path launches (bounds under the emulator: 64 and 128; on a GPU
    1024 and 8192): the fused path; then the rows sorted in shared memory (batch-all: only
    its positives, the row streamed) around pairwise_distance's kernels, with no at::sort;
    then the general path."""
    trace = tmp_path / "launches.txt"
    monkeypatch.setenv("TRIPLETOPS_EMU_LAUNCH_TRACE", str(trace))
    fn, ref_fn, _ = FAMILY[name]
    x, y = make_batch(b, 6, 9)
    kw = _kwargs(name, None if name == "semi_hard" else "mean", "euclidean")
    loss, grad = _run(fn, x, y, kw)
    names = trace.read_text().split()
    stats, other = ("batch_all_stream_kernel", "triplet_family_fused_kernel")[:: 1 if name == "batch_all" else -1]
    assert names.count(stats) == (0 if path == "general" else 2), names
    assert other not in names, names
    assert ("family_distance_kernel" in names) == (path == "fused"), names
    assert ("split_by_label_kernel" in names) == (path == "general"), names
    ref_loss, ref_grad = _run(ref_fn, x.double(), y, kw)
    assert_close_rel(loss, ref_loss, 1e-5, "loss")
    assert_grad_close(grad, ref_grad, 1e-4)
