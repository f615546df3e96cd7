"""Multi-label mining: (B, L) multi-hot labels, j a positive of i when they share at least
one label, in every mining op and loss, against the float64 definition of
tripletops.reference (shared_labels), on every device the kernels cover."""
from __future__ import annotations

import pytest
import torch

import tripletops
from tripletops import reference

from conftest import DEVICES, GRAD_RTOL, LOSS_RTOL, METRICS, assert_close_rel, assert_grad_close

LS = [1, 3, 64, 65, 200]


def multi_hot(b: int, n_labels: int, *, seed: int, dtype=torch.bool, device="cpu", empty_rows=(0, 5)):
    """About two labels per row (at least one for L = 1), some rows with none."""
    g = torch.Generator().manual_seed(seed)
    y = torch.rand(b, n_labels, generator=g) < min(0.5, 2.0 / n_labels)  # host tensor
    for r in empty_rows:
        if r < b:
            y[r] = False
    return y.to(device=device, dtype=dtype)


def embeddings(b: int, d: int, *, seed: int, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, d, dtype=torch.float64, generator=g).to(device, dtype)


def _run(fn, x, *args, **kw):
    x = x.detach().clone().requires_grad_(True)
    out = fn(x, *args, **kw)
    (out.sum() if out.dim() else out).backward()
    return out.detach(), x.grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("n_labels", LS)
@pytest.mark.parametrize("b", [37, 130, 600])  # difference form; Gram tiles; + the symmetric tiles' columns (CPU)
def test_batch_hard_mining_and_loss_match_the_definition(device, metric, n_labels, b, poisoned):
    x = embeddings(b, 8, seed=b + n_labels, device=device)
    y = multi_hot(b, n_labels, seed=n_labels, device=device, dtype=torch.bool if b != 130 else torch.uint8)
    m = tripletops.batch_hard_mine(x, y, metric=metric)
    want = reference.batch_hard_mine(x.cpu().double(), y.cpu(), metric=metric)
    assert torch.equal(m.pos_idx.cpu(), want.pos_idx) and torch.equal(m.neg_idx.cpu(), want.neg_idx)
    assert (m.pos_idx[0] == -1).item()  # row 0 has no label: nobody's positive, nothing its positive
    for reduction in ("mean", "none"):
        loss, grad = _run(tripletops.batch_hard_loss, x, y, metric=metric, reduction=reduction)
        ref_loss, ref_grad = _run(reference.batch_hard_loss, x.cpu().double(), y.cpu(), metric=metric,
                                  reduction=reduction)
        assert_close_rel(loss, ref_loss, LOSS_RTOL[torch.float32], "loss")
        assert_grad_close(grad, ref_grad, GRAD_RTOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n_labels", LS)
def test_reference_set_with_multi_hot_labels(device, n_labels, poisoned):
    x = embeddings(50, 6, seed=1, device=device, dtype=torch.float64)
    bank = embeddings(700, 6, seed=2, device=device, dtype=torch.float64)
    y = multi_hot(50, n_labels, seed=3, device=device)
    bank_y = multi_hot(700, n_labels, seed=4, device=device, dtype=torch.uint8, empty_rows=(0, 1, 2))
    m = tripletops.batch_hard_mine(x, y, ref_embeddings=bank, ref_labels=bank_y)
    want = reference.batch_hard_mine(x.cpu(), y.cpu(), ref_embeddings=bank.cpu(), ref_labels=bank_y.cpu())
    assert torch.equal(m.pos_idx.cpu(), want.pos_idx) and torch.equal(m.neg_idx.cpu(), want.neg_idx)
    loss, grad = _run(tripletops.batch_hard_loss, x, y, ref_embeddings=bank, ref_labels=bank_y, soft_margin=True)
    ref_loss, ref_grad = _run(reference.batch_hard_loss, x.cpu(), y.cpu(), ref_embeddings=bank.cpu(),
                              ref_labels=bank_y.cpu(), soft_margin=True)
    assert_close_rel(loss, ref_loss, LOSS_RTOL[torch.float64], "loss")
    assert_grad_close(grad, ref_grad, GRAD_RTOL[torch.float64])


FAMILY = {
    "batch_all": (tripletops.batch_all_loss, reference.batch_all_loss, dict(margin=0.3)),
    "batch_all_soft": (tripletops.batch_all_loss, reference.batch_all_loss, dict(soft_margin=True)),
    "semi_hard": (tripletops.semi_hard_loss, reference.semi_hard_loss, dict(margin=0.5)),
    "contrastive": (tripletops.contrastive_loss, reference.contrastive_loss, dict(pos_margin=0.1, neg_margin=1.2)),
    "contrastive_none": (tripletops.contrastive_loss, reference.contrastive_loss, dict(reduction="none")),
    "batch_all_mean": (tripletops.batch_all_loss, reference.batch_all_loss, dict(reduction="mean")),
    "contrastive_sum": (tripletops.contrastive_loss, reference.contrastive_loss, dict(reduction="sum")),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("n_labels", LS)
@pytest.mark.parametrize("name", list(FAMILY))
def test_pair_losses_match_the_definition(device, dtype, metric, n_labels, name, poisoned):
    fn, ref_fn, kw = FAMILY[name]
    x = embeddings(45, 7, seed=n_labels, device=device, dtype=dtype)
    y = multi_hot(45, n_labels, seed=10 + n_labels, device=device)
    loss, grad = _run(fn, x, y, metric=metric, **kw)
    ref_loss, ref_grad = _run(ref_fn, x.cpu().double(), y.cpu(), metric=metric, **kw)
    assert_close_rel(loss, ref_loss, LOSS_RTOL[dtype], "loss")
    assert_grad_close(grad, ref_grad, GRAD_RTOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n_labels", [3, 65])
def test_halves(device, dtype, n_labels):
    """fp16 / bf16 embeddings (fp32 accumulation) with multi-hot labels, against float64."""
    x = embeddings(60, 9, seed=n_labels, device=device, dtype=dtype)
    y = multi_hot(60, n_labels, seed=n_labels, device=device)
    for fn, ref_fn in ((tripletops.batch_hard_loss, reference.batch_hard_loss),
                       (tripletops.batch_all_loss, reference.batch_all_loss),
                       (tripletops.contrastive_loss, reference.contrastive_loss)):
        loss, grad = _run(fn, x, y)
        ref_loss, _ = _run(ref_fn, x.cpu().double(), y.cpu())
        assert loss.dtype == dtype and torch.isfinite(grad).all()
        assert_close_rel(loss, ref_loss, LOSS_RTOL[dtype], fn.__name__)


@pytest.mark.parametrize("device", DEVICES)
def test_one_hot_labels_are_class_ids(device):
    """(B, C) one-hot labels mine and lose exactly as the (B,) class ids they encode."""
    x = embeddings(300, 12, seed=0, device=device)
    ids = torch.randint(0, 70, (300,), generator=torch.Generator().manual_seed(1)).to(device)
    one_hot = torch.nn.functional.one_hot(ids, 70).bool()
    a, b = tripletops.batch_hard_mine(x, ids), tripletops.batch_hard_mine(x, one_hot)
    assert torch.equal(a.pos_idx, b.pos_idx) and torch.equal(a.neg_idx, b.neg_idx)
    for fn in (tripletops.batch_hard_loss, tripletops.batch_all_loss, tripletops.semi_hard_loss,
               tripletops.contrastive_loss):
        assert torch.equal(fn(x, ids), fn(x, one_hot)), fn.__name__


@pytest.mark.parametrize("device", DEVICES)
def test_semantics_by_hand(device):
    """Rows 0 and 1 share label 2; row 2 shares label 0 with row 0 only; row 3 has no
    label: nobody's positive, everybody's negative (its own anchor has no positive)."""
    y = torch.tensor([[1, 0, 1], [0, 1, 1], [1, 0, 0], [0, 0, 0]], dtype=torch.bool, device=device)
    x = torch.tensor([[0.0], [1.0], [3.0], [0.5]], dtype=torch.float64, device=device)
    m = tripletops.batch_hard_mine(x, y)
    assert m.pos_idx.tolist() == [2, 0, 0, -1]   # 0: farthest of {1, 2}; 1: {0}; 2: {0}; 3: none
    assert m.neg_idx.tolist() == [3, 3, 1, 0]    # 0: {3}; 1: closest of {2, 3}; 2: closest of {1, 3}; 3: everyone
    assert reference.shared_labels(y.cpu(), y.cpu()).int().tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 1, 0],
                                                                          [0, 0, 0, 0]]


def test_bad_multi_hot_input():
    x = embeddings(8, 4, seed=0)
    y = multi_hot(8, 5, seed=0)
    with pytest.raises(ValueError, match="same kind"):
        tripletops.batch_hard_mine(x, y, ref_embeddings=x, ref_labels=multi_hot(8, 6, seed=1))
    with pytest.raises(ValueError, match="same kind"):
        tripletops.batch_hard_loss(x, y, ref_embeddings=x, ref_labels=torch.arange(8))
    # uint8: a nonzero entry sets the label (as labels.bool(); nothing reads the values, so
    # no device sync), in the kernels and the reference alike
    wide = y.to(torch.uint8) * torch.randint(1, 256, y.shape, dtype=torch.uint8)
    for fn in (tripletops.batch_all_loss, tripletops.batch_hard_loss, tripletops.reference.batch_all_loss):
        assert torch.equal(fn(x, wide), fn(x, y))
    with pytest.raises(TypeError, match="bool or uint8"):
        tripletops.semi_hard_loss(x, y.float())
    with pytest.raises(TypeError, match="bool or uint8"):
        tripletops.contrastive_loss(x, y.long())
    with pytest.raises(ValueError, match="L >= 1"):
        tripletops.batch_hard_loss(x, y[:, :0])
    with pytest.raises(ValueError, match="shape"):
        tripletops.batch_hard_loss(x, y[:, :, None])
    # the ops themselves refuse as well (called directly)
    with pytest.raises(ValueError, match="same kind"):
        torch.ops.tripletops.batch_hard_mine(x, y, x, multi_hot(8, 6, seed=1), "euclidean")
    with pytest.raises(TypeError, match="bool or uint8"):
        torch.ops.tripletops.batch_all_loss(x, y.float(), 0.2, "euclidean", False, "mean")


@pytest.mark.parametrize("device", DEVICES)
def test_cross_batch_memory_stores_multi_hot_labels(device):
    xbm = tripletops.CrossBatchMemory(size=50, dim=6, num_labels=70)
    seen_x, seen_y = [], []
    for step in range(4):  # 4 x 20 rows into 50: the FIFO wraps
        x = embeddings(20, 6, seed=step, device=device, dtype=torch.float64)
        y = multi_hot(20, 70, seed=step, device=device, dtype=torch.uint8)
        if seen_x:
            mem_x, mem_y = torch.cat(seen_x)[-50:], torch.cat(seen_y)[-50:]
            want = tripletops.batch_hard_loss(x, y, ref_embeddings=mem_x, ref_labels=mem_y)
        else:
            want = tripletops.batch_hard_loss(x, y)
        got = xbm(x, y)
        assert_close_rel(got, want, 1e-12, f"step {step}")
        seen_x.append(x), seen_y.append(y.bool())
        assert torch.equal(xbm.labels, torch.cat(seen_y)[-50:]) and xbm.labels.dtype == torch.bool
    state = {k: v.clone() for k, v in xbm.state_dict().items()}
    with pytest.raises(ValueError, match="multi-hot labels"):
        xbm(x, torch.arange(20, device=device))          # class ids into a multi-hot memory
    with pytest.raises(ValueError, match=r"\(B, 70\)"):
        xbm(x, multi_hot(20, 71, seed=0, device=device))
    assert all(torch.equal(v, state[k]) for k, v in xbm.state_dict().items())  # a rejected call changes nothing
    with pytest.raises(ValueError, match="num_labels=L"):
        tripletops.CrossBatchMemory(size=8, dim=6)(x, multi_hot(20, 3, seed=0, device=device))


def test_center_loss_refuses_multi_hot_labels():
    center = tripletops.CenterLoss(num_classes=4, dim=6)
    with pytest.raises(ValueError, match="class ids"):
        center(embeddings(5, 6, seed=0), multi_hot(5, 4, seed=0))
