"""knn and retrieval_metrics against a float64 brute force and pytorch-metric-learning's
AccuracyCalculator."""
from __future__ import annotations

import math

import pytest
import torch

import tripletops

from conftest import devices_for

DEVICES = devices_for("knn")
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
METRICS = ["euclidean", "sqeuclidean", "cosine"]
TOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def canonical_unit(x: torch.Tensor) -> torch.Tensor:
    """x / max|x| / norm, in float64: rows of one direction give identical unit rows."""
    m = x.abs().amax(1, keepdim=True)
    p = torch.where(m > 0, x / torch.where(m > 0, m, torch.ones_like(m)), x)
    return p / p.norm(dim=1, keepdim=True).clamp_min(1e-300)


def brute_force(q, g, k, metric, exclude_self, offset=0):
    """The float64 definition: every distance in difference form, a stable sort (ties to the
    smallest index, NaN last), the excluded row dropped, -1 / inf past the gallery."""
    q = q.double()
    g = q if g is None else g.double()
    if metric == "cosine":
        d = torch.cdist(canonical_unit(q), canonical_unit(g), compute_mode="donot_use_mm_for_euclid_dist").square() / 2
        zero = (q.norm(dim=1) <= 1e-12)[:, None] | (g.norm(dim=1) <= 1e-12)[None, :]
        d = torch.where(zero, torch.ones_like(d), d)  # F.normalize leaves a zero row at 0: cos 0
        d = torch.where(q.isfinite().all(1)[:, None] & g.isfinite().all(1)[None, :], d, torch.full_like(d, math.nan))
    else:
        d = ((q[:, None, :] - g[None, :, :]) ** 2).sum(-1)
        if metric == "euclidean":
            d = d.sqrt()
    Q, G = d.shape
    dist = torch.full((Q, k), math.inf, dtype=torch.float64)
    idx = torch.full((Q, k), -1, dtype=torch.int64)
    for i in range(Q):
        order = torch.sort(d[i], stable=True).indices
        if exclude_self:
            order = order[order != i + offset]
        n = min(k, order.numel())
        idx[i, :n] = order[:n]
        dist[i, :n] = d[i, order[:n]]
    brute_force.matrix = d
    return dist, idx


def check(nb, q, g, k, metric, exclude_self, dtype, offset=0):
    """nb: the neighbours of queries q (rows offset.. of the query set) in g (q when None)."""
    dist, idx = brute_force(q.cpu(), None if g is None else g.cpu(), k, metric, exclude_self, offset)
    assert nb.idx.dtype == torch.int64 and nb.dist.dtype == dtype
    assert nb.idx.shape == nb.dist.shape == (q.shape[0], k)
    got = nb.dist.detach().double().cpu()
    if metric != "cosine":
        assert torch.equal(nb.idx.cpu(), idx), (nb.idx.cpu(), idx)
    else:
        # Two directions at mathematically equal cosine distance differ in double by a
        # rounding, in the kernels as in this brute force (rows of one direction meet at
        # exactly 0 in both): the neighbours must be a valid k nearest, each at its distance.
        got_idx = nb.idx.cpu()
        d = brute_force.matrix
        for i in range(q.shape[0]):
            found = got_idx[i][got_idx[i] >= 0]
            assert found.unique().numel() == found.numel()
            assert torch.equal(got_idx[i] >= 0, idx[i] >= 0)
            near = d[i, found]
            ok = (near - dist[i, :found.numel()]).abs() <= 1e-14 * near.abs().clamp_min(1.0)
            assert bool((ok | (near.isnan() & dist[i, :found.numel()].isnan())).all()), (i, got_idx[i], idx[i])
    dist = dist.to(dtype).double()  # what the dtype can hold: inf past its range
    assert torch.equal(got.isnan(), dist.isnan())
    fin = dist.isfinite()
    assert torch.equal(got.isinf(), dist.isinf())
    err = (got[fin] - dist[fin]).abs() / dist[fin].abs().clamp_min(1.0)
    assert err.numel() == 0 or err.max() <= TOL[dtype] * 4, err.max()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (5, 7, 3, 2), (40, 90, 16, 5), (130, 170, 33, 10), (70, None, 9, 4),
                                   (300, None, 5, 3)])
def test_knn_matches_the_float64_brute_force(device, dtype, metric, shape, poisoned):
    Q, G, D, k = shape
    torch.manual_seed(Q * 31 + D)
    # Integer-valued rows of a few values: many exact ties and duplicates, exact in every dtype.
    q = torch.randint(-3, 4, (Q, D)).to(device=device, dtype=dtype)
    g = None if G is None else torch.randint(-3, 4, (G, D)).to(device=device, dtype=dtype)
    nb = tripletops.knn(q, g, k=k, metric=metric)
    check(nb, q, g, k, metric, G is None, dtype)
    # Continuous rows far from the origin.
    q = (torch.randn(Q, D, dtype=torch.float64) + 50).to(device=device, dtype=dtype)
    g = None if G is None else (torch.randn(G, D, dtype=torch.float64) + 50).to(device=device, dtype=dtype)
    nb = tripletops.knn(q, g, k=k, metric=metric)
    check(nb, q, g, k, metric, G is None, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("metric", METRICS)
def test_knn_k_beyond_the_gallery_duplicates_and_self(device, metric):
    torch.manual_seed(1)
    q = torch.randn(20, 6, dtype=torch.float64, device=device)
    q[7] = q[3]  # a duplicate: distance exactly 0 from 3, so it is 3's nearest (and 7's is 3)
    q[11] = 2.5 * q[3]  # one direction: cosine distance exactly 0
    nb = tripletops.knn(q, k=25, metric=metric)  # 19 exist
    check(nb, q, None, 25, metric, True, torch.float64)
    assert (nb.idx[:, 19:] == -1).all() and torch.isinf(nb.dist[:, 19:]).all()
    assert nb.idx[3, 0].item() == 7 and nb.idx[7, 0].item() == 3
    # exclude_self=False: a query finds itself (or a smaller duplicate first)
    nb = tripletops.knn(q, k=3, metric=metric, exclude_self=False)
    check(nb, q, None, 3, metric, False, torch.float64)
    # a gallery that starts with the queries, exclude_self=True
    g = torch.cat([q, torch.randn(5, 6, dtype=torch.float64, device=device)])
    nb = tripletops.knn(q, g, k=4, metric=metric, exclude_self=True)
    check(nb, q, g, 4, metric, True, torch.float64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("metric", METRICS)
def test_knn_non_finite_rows_rank_last(device, metric):
    torch.manual_seed(2)
    q = torch.randn(30, 4, dtype=torch.float32, device=device)
    g = torch.randn(50, 4, dtype=torch.float32, device=device)
    g[3, 1] = math.nan
    g[8, 0] = math.inf
    q[5, 2] = math.nan
    nb = tripletops.knn(q, g, k=49, metric=metric)
    check(nb, q, g, 49, metric, False, torch.float32)
    # Past the direct path: the Gram tiles (under the emulator about k columns each) skip
    # the non-finite rows, and the NaN query is searched directly.
    q = torch.randn(300, 8, dtype=torch.float32, device=device)
    g = torch.randn(400, 8, dtype=torch.float32, device=device)
    g[2, 1], g[150, 0], q[7, 4] = math.nan, math.inf, math.nan
    nb = tripletops.knn(q, g, k=12, metric=metric)
    check(nb, q, g, 12, metric, False, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("capacity", [None, "0", "4096"])
def test_knn_tile_selection_every_k_and_a_full_candidate_buffer(device, capacity, monkeypatch):
    """Past the direct path, a gallery sorted by class (each class's keys fall below the
    running k-th as it arrives: many candidates), k on every register layout of the CUDA
    tile selection (1, 33, 100, 200: 1, 2, 4 and 8 keys per lane) and past it (300: topk).
    The emulator build reads its candidate buffer's size from TRIPLETOPS_EMU_KNN_CAPACITY:
    0 makes every tile run again; 4096 entries, one emulated tile of keys, holds the first
    tile and overflows at a later one. 16 queries: each row in several segments."""
    if capacity is not None:
        monkeypatch.setenv("TRIPLETOPS_EMU_KNN_CAPACITY", capacity)
    torch.manual_seed(5)
    centers = 4 * torch.randn(12, 8, dtype=torch.float64)  # host tensor
    g_labels = torch.arange(600) // 50  # host tensor; sorted by class
    g = (centers[g_labels] + torch.randn(600, 8, dtype=torch.float64)).float().to(device)
    q = (centers[torch.randint(0, 12, (120,))] + torch.randn(120, 8, dtype=torch.float64)).float().to(device)
    for k in (1, 20, 33, 100, 200, 300):
        check(tripletops.knn(q, g, k=k), q, g, k, "euclidean", False, torch.float32)
    few = q[:16]  # few queries: each row's columns in several segments (one warp each)
    for k in (3, 40):
        check(tripletops.knn(few, g, k=k), few, g, k, "euclidean", False, torch.float32)
    s = g[::3]  # 200 rows against themselves
    for k in (20, 100):
        check(tripletops.knn(s, k=k, metric="cosine"), s, None, k, "cosine", True, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_knn_extreme_norms(device):
    for scale in (1e20, 1e-30):
        q = (torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 3.0], [2.0, 2.0]]) * scale).to(device)
        for metric in METRICS:
            nb = tripletops.knn(q, k=2, metric=metric)
            check(nb, q, None, 2, metric, True, torch.float32)
    # Past the direct path: the Gram keys are formed on rows scaled by a power of two.
    torch.manual_seed(7)
    base = torch.randn(300, 8, device=device)
    gal = torch.randn(200, 8, device=device)
    for scale in (1e20, 1e-30):
        for metric in METRICS:
            nb = tripletops.knn(base * scale, gal * scale, k=5, metric=metric)
            check(nb, base * scale, gal * scale, 5, metric, False, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_knn_normalize_and_non_contiguous(device):
    torch.manual_seed(3)
    base = torch.randn(40, 24, dtype=torch.float64, device=device)
    q = base[:, ::2]  # non-contiguous
    nb = tripletops.knn(q, k=5, normalize=True)
    u = torch.nn.functional.normalize(q, dim=1)
    check(nb, u, None, 5, "euclidean", True, torch.float64)


def test_knn_large_cpu_tiles():
    """Sizes past the CPU's tiles and its direct path: the Gram windows and their settling."""
    torch.manual_seed(4)
    # small and large k (a window's heap of k keys), with heavy ties
    for (Q, G, D, k) in [(2100, 3000, 8, 7), (2500, None, 4, 3), (1500, 2000, 6, 40), (1800, None, 5, 45)]:
        q = torch.randint(-2, 3, (Q, D)).float()  # heavy ties
        g = None if G is None else torch.randint(-2, 3, (G, D)).float()
        for metric in METRICS:
            nb = tripletops.knn(q, g, k=k, metric=metric)
            for q0 in range(0, Q, 700):  # the brute force a block of queries at a time
                sub = slice(q0, q0 + 700)
                part = tripletops.Neighbors(nb.dist[sub], nb.idx[sub])
                check(part, q[sub], q if g is None else g, k, metric, G is None, torch.float32, offset=q0)


@pytest.mark.parametrize("bad, err", [
    (dict(k=0), ValueError), (dict(k=2.0), TypeError), (dict(k=True), TypeError),
    (dict(k=2, metric="l1"), ValueError), (dict(k=2, exclude_self="yes"), TypeError),
    (dict(k=2, normalize=1), TypeError),
])
def test_knn_rejects_bad_arguments(bad, err):
    with pytest.raises(err):
        tripletops.knn(torch.randn(4, 3), **bad)


def test_knn_rejects_bad_tensors():
    with pytest.raises(ValueError, match="queries"):
        tripletops.knn(torch.randn(4), k=1)
    with pytest.raises(TypeError, match="queries"):
        tripletops.knn(torch.zeros(4, 3, dtype=torch.int64), k=1)
    with pytest.raises(ValueError, match="gallery"):
        tripletops.knn(torch.randn(4, 3), torch.randn(5, 2), k=1)
    with pytest.raises(TypeError, match="gallery"):
        tripletops.knn(torch.randn(4, 3), torch.randn(5, 3, dtype=torch.float64), k=1)


# ---- retrieval_metrics -------------------------------------------------------------


def _pml(q, ql, g, gl, K="max_bin_count"):
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
    from pytorch_metric_learning.utils.inference import CustomKNN
    from pytorch_metric_learning.distances import LpDistance

    kwargs = dict(include=("precision_at_1", "r_precision", "mean_average_precision_at_r", "mean_reciprocal_rank"),
                  k=K, knn_func=CustomKNN(LpDistance(normalize_embeddings=False)), device=torch.device("cpu"))
    calc = AccuracyCalculator(**kwargs)
    # numpy arrays: given tensors, AccuracyCalculator tries torch.from_numpy and catches the
    # C++ exception, which aborts the process under the cuda-emu run's ASan.
    if g is None:
        return calc.get_accuracy(q.numpy(), ql.numpy())
    return calc.get_accuracy(q.numpy(), ql.numpy(), g.numpy(), gl.numpy(), ref_includes_query=False)


def assert_same_as_pml(mine, ref):
    """Equal to 1e-12; AccuracyCalculator forms the reciprocal ranks in float32, so that
    one to float32's rounding."""
    for key in ("precision_at_1", "r_precision", "mean_average_precision_at_r", "mean_reciprocal_rank"):
        tol = 1e-6 if key == "mean_reciprocal_rank" else 1e-12
        assert abs(mine[key] - ref[key]) <= tol, (key, mine[key], ref[key])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("self_search", [True, False])
def test_retrieval_metrics_match_accuracy_calculator(device, self_search):
    torch.manual_seed(5)
    ql = torch.randint(0, 6, (120,))  # host tensor
    q = torch.randn(120, 8, dtype=torch.float64) + ql[:, None].double() * 0.4  # host tensor
    gl = torch.randint(0, 7, (90,))  # host tensor; class 6 only in the gallery
    g = torch.randn(90, 8, dtype=torch.float64) + gl[:, None].double() * 0.4  # host tensor
    ql[0] = 9  # a query with no relevant row: left out
    if self_search:
        mine = tripletops.retrieval_metrics(q.to(device), ql.to(device), k=(1, 3))
        R = torch.stack([((ql == c).sum() - 1) for c in ql])
    else:
        mine = tripletops.retrieval_metrics(q.to(device), ql.to(device), g.to(device), gl.to(device), k=(1, 3))
        R = torch.stack([(gl == c).sum() for c in ql])
    ref = _pml(q.float(), ql, None if self_search else g.float(), None if self_search else gl)
    assert_same_as_pml(mine, ref)
    assert mine["num_queries_counted"] == int((R > 0).sum())
    # recall@k by hand from the brute force
    _, idx = brute_force(q, None if self_search else g, 3, "euclidean", self_search)
    labels = ql if self_search else gl
    counted = R > 0
    for kk in (1, 3):
        hit = (labels[idx[:, :kk]] == ql[:, None]).any(1)
        assert abs(mine["recall_at_k"][kk] - hit[counted].double().mean().item()) <= 1e-12
    assert mine["recall_at_k"][1] == mine["precision_at_1"]


def metrics_by_definition(d, relevant, ks):
    """The metrics from a (Q, G) float64 distance matrix (inf on excluded pairs) and a
    (Q, G) relevance matrix, one query at a time, straight from their definitions."""
    out = {"p1": [], "rk": {kk: [] for kk in ks}, "rp": [], "map": [], "mrr": []}
    depth = int(relevant.sum(1).max())  # mean_reciprocal_rank's: the largest R
    K = max(max(ks), depth)
    for i in range(d.shape[0]):
        R = int(relevant[i].sum())
        if R == 0:
            continue
        order = torch.sort(d[i], stable=True).indices[:K]
        rel = [bool(relevant[i, j]) for j in order]
        out["p1"].append(float(rel[0]))
        for kk in ks:
            out["rk"][kk].append(float(any(rel[:kk])))
        out["rp"].append(sum(rel[:R]) / R)
        hits, ap = 0, 0.0
        for pos, r in enumerate(rel[:R], 1):
            if r:
                hits += 1
                ap += hits / pos
        out["map"].append(ap / R)
        out["mrr"].append(next((1.0 / pos for pos, r in enumerate(rel[:depth], 1) if r), 0.0))
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    return {"precision_at_1": mean(out["p1"]), "recall_at_k": {kk: mean(v) for kk, v in out["rk"].items()},
            "r_precision": mean(out["rp"]), "mean_average_precision_at_r": mean(out["map"]),
            "mean_reciprocal_rank": mean(out["mrr"]), "num_queries_counted": len(out["p1"])}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("self_search", [True, False])
def test_retrieval_metrics_multi_hot(device, self_search):
    torch.manual_seed(6)
    labels = torch.rand(80, 5) < 0.3  # host tensor; some rows have no label: relevant to nothing
    x = torch.randn(80, 6, dtype=torch.float64) + labels.double() @ torch.randn(5, 6, dtype=torch.float64)  # host tensor
    if self_search:
        mine = tripletops.retrieval_metrics(x.to(device), labels.to(device), k=(1, 5))
        g, gl = x, labels
    else:
        g, gl = x[50:], labels[50:]
        x, labels = x[:50], labels[:50]
        mine = tripletops.retrieval_metrics(x.to(device), labels.to(device), g.to(device), gl.to(device), k=(1, 5))
    d = torch.cdist(x, g)
    relevant = (labels.float() @ gl.float().T) > 0
    if self_search:
        d.fill_diagonal_(math.inf)
        relevant.fill_diagonal_(False)
    ref = metrics_by_definition(d, relevant, (1, 5))
    for key in ("precision_at_1", "r_precision", "mean_average_precision_at_r", "mean_reciprocal_rank",
                "num_queries_counted"):
        assert abs(mine[key] - ref[key]) <= 1e-12, (key, mine[key], ref[key])
    for kk in (1, 5):
        assert abs(mine["recall_at_k"][kk] - ref["recall_at_k"][kk]) <= 1e-12


def test_retrieval_metrics_definitions_by_hand():
    # 1-D points: query 0 at 0; gallery 1 (class a), 2 (b), 3 (a), 10 (a).
    q = torch.tensor([[0.0]])
    g = torch.tensor([[1.0], [2.0], [3.0], [10.0]])
    m = tripletops.retrieval_metrics(q, torch.tensor([0]), g, torch.tensor([0, 1, 0, 0]), k=(1, 2))
    # R = 3; ranks of relevant: 1, 3, 4
    assert m["precision_at_1"] == 1.0
    assert m["recall_at_k"] == {1: 1.0, 2: 1.0}
    assert m["r_precision"] == pytest.approx(2 / 3)
    assert m["mean_average_precision_at_r"] == pytest.approx((1 / 1 + 2 / 3) / 3)
    assert m["mean_reciprocal_rank"] == 1.0
    # R = 1, the relevant row second: MRR looks max R = 1 deep, whatever k is
    # (AccuracyCalculator's k="max_bin_count")
    for kk in (1, 2, 4):
        m = tripletops.retrieval_metrics(q, torch.tensor([1]), g, torch.tensor([0, 1, 0, 0]), k=kk)
        assert m["precision_at_1"] == 0.0 and m["mean_reciprocal_rank"] == 0.0 and m["r_precision"] == 0.0
    assert m["recall_at_k"] == {4: 1.0}
    # two queries: R = 3 and R = 1; MRR 3 deep for both
    m = tripletops.retrieval_metrics(torch.tensor([[0.0], [0.0]]), torch.tensor([0, 1]), g, torch.tensor([0, 1, 0, 0]),
                                     k=1)
    assert m["mean_reciprocal_rank"] == pytest.approx((1.0 + 0.5) / 2)
    none = tripletops.retrieval_metrics(q, torch.tensor([7]), g, torch.tensor([0, 1, 0, 0]), k=1)
    assert none["num_queries_counted"] == 0 and math.isnan(none["precision_at_1"])


def test_retrieval_metrics_rejects_bad_input():
    x, y = torch.randn(6, 3), torch.tensor([0, 0, 1, 1, 2, 2])
    with pytest.raises(ValueError, match="gallery"):
        tripletops.retrieval_metrics(x, y, x)
    with pytest.raises(TypeError, match="k"):
        tripletops.retrieval_metrics(x, y, k=())
    with pytest.raises(ValueError, match="k"):
        tripletops.retrieval_metrics(x, y, k=(1, 0))
    with pytest.raises(ValueError, match="query_labels"):
        tripletops.retrieval_metrics(x, y[:5])
    with pytest.raises(ValueError, match="gallery_labels"):
        tripletops.retrieval_metrics(x, y, x, torch.zeros(6, 2, dtype=torch.bool))
