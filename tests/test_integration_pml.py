"""tripletops.integrations.pml against pytorch-metric-learning's own BatchHardMiner and
TripletMarginLoss: the same triplets, values and gradients, on the fused kernels, for every
accepted distance and reducer; clear errors for the rest."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import DEVICES

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
from pytorch_metric_learning import distances, miners, reducers  # noqa: E402

T = pytest.importorskip("tripletops.integrations.pml")

DISTANCES = {
    "LpDistance()": lambda: distances.LpDistance(),
    "LpDistance(normalize_embeddings=False)": lambda: distances.LpDistance(normalize_embeddings=False),
    "LpDistance(power=2)": lambda: distances.LpDistance(power=2),
    "LpDistance(power=2, normalize_embeddings=False)": lambda: distances.LpDistance(power=2, normalize_embeddings=False),
    "CosineSimilarity()": lambda: distances.CosineSimilarity(),
}
REDUCERS = {"AvgNonZeroReducer": reducers.AvgNonZeroReducer, "MeanReducer": reducers.MeanReducer}


def grad_fn_names(t: torch.Tensor) -> set:
    """Every node's name in t's autograd graph."""
    seen, todo, names = set(), [t.grad_fn], set()
    while todo:
        f = todo.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        names.add(f.name().rsplit("::", 1)[-1].rstrip(">"))
        todo.extend(n for n, _ in f.next_functions)
    return names


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dist", list(DISTANCES))
@pytest.mark.parametrize("reducer", list(REDUCERS))
@pytest.mark.parametrize("mode", ["miner", "no miner", "explicit triplets", "pairs", "miner with ref_emb"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_same_triplets_values_and_gradients_as_pml(device, dist, reducer, mode, dtype):
    torch.manual_seed(len(dist) * 7 + len(mode))
    x = torch.randn(26, 6, dtype=dtype, device=device)
    y = (torch.arange(26) % 5).to(device)
    r = torch.randn(31, 6, dtype=dtype, device=device)
    ry = (torch.arange(31) % 6).to(device)  # class 5 only in the reference set
    ours_m, pml_m = T.BatchHardMiner(distance=DISTANCES[dist]()), miners.BatchHardMiner(distance=DISTANCES[dist]())
    ours_l = T.TripletMarginLoss(margin=0.3, distance=DISTANCES[dist](), reducer=REDUCERS[reducer]())
    pml_l = pml_losses.TripletMarginLoss(margin=0.3, distance=DISTANCES[dist](), reducer=REDUCERS[reducer]())
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ra, rb = r.clone().requires_grad_(), r.clone().requires_grad_()
    fused = None
    if mode == "miner":
        ta, tb = ours_m(xa, y), pml_m(xb, y)
        a, b, fused = ours_l(xa, y, ta), pml_l(xb, y, tb), "BatchHardLossBackward"
    elif mode == "miner with ref_emb":
        ta, tb = ours_m(xa, y, ra, ry), pml_m(xb, y, rb, ry)
        a, b, fused = ours_l(xa, y, ta, ra, ry), pml_l(xb, y, tb, rb, ry), "BatchHardLossBackward"
    elif mode == "no miner":
        ta = tb = None
        a, b, fused = ours_l(xa, y), pml_l(xb, y), "BatchAllLossBackward"
    elif mode == "explicit triplets":
        # three distinct rows each: PML's cdist forms d(a, a) in Gram form (~1e-8, not 0)
        rows = torch.stack([torch.randperm(26)[:3] for _ in range(40)])  # host tensor
        ta = tb = tuple(t.to(device) for t in rows.T)
        a, b, fused = ours_l(xa, y, ta), pml_l(xb, y, tb), "TripletMarginLossBackward"
    else:  # (a1, p, a2, n) pairs: PML turns them into triplets
        a1, p, n = torch.stack([torch.randperm(26)[:3] for _ in range(30)]).T  # host tensor
        ta = tb = tuple(t.to(device) for t in (a1, p, a1.flip(0), n))
        a, b, fused = ours_l(xa, y, ta), pml_l(xb, y, tb), "TripletMarginLossBackward"
    if ta is not None:
        assert len(ta) == len(tb) and all(torch.equal(u, v) for u, v in zip(ta, tb))
    assert fused in grad_fn_names(a), grad_fn_names(a)
    (a + 0 * ra.sum()).backward()
    (b + 0 * rb.sum()).backward()
    # the bar: losses to 1e-6 relative, gradients to 1e-5 (fp64: far tighter)
    tol, gtol = (1e-10, 1e-9) if dtype == torch.float64 else (1e-6, 1e-5)
    a_, b_ = a.detach().item(), b.detach().item()
    assert abs(a_ - b_) <= tol * max(1.0, abs(b_)), (a_, b_)
    assert torch.allclose(xa.grad, xb.grad, rtol=gtol, atol=gtol * 0.1)
    assert torch.allclose(ra.grad, rb.grad, rtol=gtol, atol=gtol * 0.1)


@pytest.mark.parametrize("device", DEVICES)
def test_swap_and_degenerate_batches(device):
    torch.manual_seed(8)
    x = torch.randn(20, 5, dtype=torch.float64, device=device)
    y = (torch.arange(20) % 4).to(device)
    ours_m, pml_m = T.BatchHardMiner(), miners.BatchHardMiner()
    ours_l, pml_l = T.TripletMarginLoss(margin=0.4, swap=True), pml_losses.TripletMarginLoss(margin=0.4, swap=True)
    a, b = ours_l(x, y, ours_m(x, y)), pml_l(x, y, pml_m(x, y))  # swap: the miner's triplets, explicitly
    assert abs(float(a) - float(b)) <= 1e-10
    one = torch.zeros(20, dtype=torch.long, device=device)  # one class: no negative, no triplet
    for lab in (one, torch.arange(20, device=device)):  # all singletons: no positive
        xo = x.clone().requires_grad_()
        t = T.BatchHardMiner()(xo, lab)
        assert all(len(v) == 0 for v in t)
        got = T.TripletMarginLoss()(xo, lab, t)
        want = pml_losses.TripletMarginLoss()(x, lab, miners.BatchHardMiner()(x, lab))
        assert got.detach().item() == float(want) == 0.0
        got.backward()
        assert xo.grad is not None and float(xo.grad.abs().max()) == 0.0
    # The miner's tuple used with other embeddings: the explicit-triplet path, PML's value
    t = ours_m(x, y)
    x2 = torch.randn_like(x)
    ours_l2, pml_l2 = T.TripletMarginLoss(margin=0.4), pml_losses.TripletMarginLoss(margin=0.4)
    assert abs(float(ours_l2(x2, y, t)) - float(pml_l2(x2, y, tuple(t)))) <= 1e-10


def test_miner_stats_as_pml():
    torch.manual_seed(9)
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.arange(16) % 3
    for dist in (distances.LpDistance, distances.CosineSimilarity):
        ours, theirs = T.BatchHardMiner(distance=dist(), collect_stats=True), miners.BatchHardMiner(distance=dist(),
                                                                                                     collect_stats=True)
        ours(x, y), theirs(x, y)
        for name in ("hardest_pos_pair", "hardest_neg_pair", "easiest_triplet", "hardest_triplet"):
            assert abs(getattr(ours, name) - getattr(theirs, name)) <= 1e-12, name


def test_clear_errors():
    with pytest.raises(ValueError, match="MeanReducer or AvgNonZeroReducer"):
        T.TripletMarginLoss(reducer=reducers.SumReducer())  # a MeanReducer subclass
    with pytest.raises(ValueError, match="LpDistance.*CosineSimilarity"):
        T.TripletMarginLoss(distance=distances.LpDistance(p=1))
    with pytest.raises(ValueError, match="LpDistance.*CosineSimilarity"):
        T.BatchHardMiner(distance=distances.DotProductSimilarity())
    with pytest.raises(ValueError, match="smooth_loss"):
        T.TripletMarginLoss(smooth_loss=True)
    with pytest.raises(ValueError, match="triplets_per_anchor"):
        T.TripletMarginLoss(triplets_per_anchor=5)
    x, y = torch.randn(8, 3), torch.arange(8) % 2
    with pytest.raises(ValueError, match="swap"):
        T.TripletMarginLoss(swap=True)(x, y)
    with pytest.raises(ValueError, match="ref_emb"):
        T.TripletMarginLoss()(x, y, ref_emb=x.clone(), ref_labels=y)
    with pytest.raises(AttributeError):
        T.NotAClass  # noqa: B018


def test_import_does_not_import_pml():
    code = ("import sys, tripletops.integrations.pml as t; "
            "assert 'pytorch_metric_learning' not in sys.modules, 'imported at import'; "
            "t.BatchHardMiner; assert 'pytorch_metric_learning' in sys.modules")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr


# CPU and CUDA, not cuda-emu: PML's get_accuracy calls torch.from_numpy on tensors and
# catches the C++ exception, which aborts under the emulator's ASan preload (a CHECK in its
# __cxa_throw interceptor); the emulated knn is tested on its own (test_retrieval).
@pytest.mark.parametrize("device", DEVICES[:2])
@pytest.mark.parametrize("k", [None, "max_bin_count", 5])
@pytest.mark.parametrize("mode", [{}, {"avg_of_avgs": True}, {"return_per_class": True}])
def test_accuracy_calculator_as_pml(device, k, mode):
    """PML's keys and values, the neighbours from tripletops.knn (no FAISS), against PML's
    own AccuracyCalculator (FaissKNN), with and without a separate reference set. PML's
    fp32 FAISS ranking can order near ties deep in the list (k=None: every row) otherwise
    than the exact one, so there the values agree to 1e-5; elsewhere exactly."""
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    torch.manual_seed(10)
    q, ql = torch.randn(60, 8, device=device), torch.randint(0, 5, (60,), device=device)
    r, rl = torch.randn(90, 8, device=device), torch.randint(0, 5, (90,), device=device)
    dev = torch.device(device)
    ours = T.AccuracyCalculator(k=k, exclude=("NMI", "AMI"), device=dev, **mode)
    theirs = AccuracyCalculator(k=k, exclude=("NMI", "AMI"), device=dev, **mode)
    for args in ((q, ql), (q, ql, r, rl)):
        got, want = ours.get_accuracy(*args), theirs.get_accuracy(*args)
        assert set(got) == set(want) == {"mean_average_precision", "mean_average_precision_at_r",
                                         "mean_reciprocal_rank", "precision_at_1", "r_precision"}
        for key in want:
            a = torch.tensor(got[key], dtype=torch.float64)  # host tensor
            b = torch.tensor(want[key], dtype=torch.float64)  # host tensor
            tol = 1e-5 if k is None else 0.0
            assert torch.allclose(a, b, rtol=tol, atol=tol), (key, got[key], want[key])


def test_accuracy_calculator_clustering_and_errors(monkeypatch):
    torch.manual_seed(11)
    x, y = torch.randn(600, 8), torch.randint(0, 6, (600,))
    got = T.AccuracyCalculator(device=torch.device("cpu")).get_accuracy(x, y)  # NMI / AMI: PML's k-means
    assert 0.0 <= got["NMI"] <= 1.0 and -1.0 <= got["AMI"] <= 1.0
    with pytest.raises(ValueError, match="knn_func"):
        T.AccuracyCalculator(knn_func=lambda *a: None)
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "faiss" else real(name, *a))
    with pytest.raises(ValueError, match="AMI, NMI need k-means"):
        T.AccuracyCalculator(device=torch.device("cpu")).get_accuracy(x, y)
    T.AccuracyCalculator(exclude=("NMI", "AMI"), device=torch.device("cpu")).get_accuracy(x, y)  # no FAISS needed
