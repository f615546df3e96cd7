"""Data that training produces (issue 38): one exploding row, collapsed embeddings,
subnormal rows, kinks one ulp away, and the retrieval metrics' definitions and errors.
Each case failed on the commit before its fix."""
from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

import tripletops

from conftest import devices_for
from test_retrieval import brute_force, check


# ---- 1. cosine: one exploding row must not move every other row -----------------------


@pytest.mark.parametrize("device", devices_for("knn"))
def test_knn_cosine_one_exploding_row(device):
    torch.manual_seed(11)
    g = torch.randn(40, 4, device=device)
    g[5] = torch.tensor([-1e20, 0.0, 0.0, 0.0], device=device)  # norm 1e20: its square overflows fp32
    nb = tripletops.knn(g, k=4, metric="cosine")
    check(nb, g, None, 4, "cosine", True, torch.float32)
    q = torch.randn(7, 4, device=device)
    nb = tripletops.knn(q, g, k=5, metric="cosine")
    check(nb, q, g, 5, "cosine", False, torch.float32)
    # the distances are not all ~1 (the symptom: every ordinary row pushed below eps)
    assert float(nb.dist[:, 0].max()) < 0.9


@pytest.mark.parametrize("device", devices_for("batch_hard_mine"))
def test_batch_hard_mine_cosine_one_exploding_row(device):
    torch.manual_seed(12)
    x = torch.randn(24, 6, dtype=torch.float64)  # host tensor
    x[3] *= 1e20
    y = torch.arange(24) % 4  # host tensor
    ref = tripletops.reference.batch_hard_mine(x, y, metric="cosine")
    got = tripletops.batch_hard_mine(x.float().to(device), y.to(device), metric="cosine")
    assert torch.equal(got.pos_idx.cpu(), ref.pos_idx) and torch.equal(got.neg_idx.cpu(), ref.neg_idx)
    assert torch.allclose(got.neg_dist.double().cpu(), ref.neg_dist, rtol=1e-5, atol=1e-6)


# ---- 2. euclidean: small rows next to a huge one keep their bits -----------------------


@pytest.mark.parametrize("device", devices_for("knn"))
def test_knn_small_rows_beside_an_exploding_row(device):
    torch.manual_seed(13)
    x = (torch.randn(20, 4, dtype=torch.float64) * 1e-23).float()  # host tensor
    x[0] = 0.0
    x[0, 0] = 1e20
    for metric in ("euclidean", "sqeuclidean"):
        nb = tripletops.knn(x.to(device), k=3, metric=metric)
        check(nb, x, None, 3, metric, True, torch.float32)
    big = (torch.randn(300, 8, dtype=torch.float64) * 1e-23).float()  # host tensor; past the direct path
    big[7] = 1e20
    nb = tripletops.knn(big.to(device), k=4)
    check(nb, big, None, 4, "euclidean", True, torch.float32)


# ---- 3. all-subnormal rows ------------------------------------------------------------


@pytest.mark.parametrize("device", devices_for("knn"))
@pytest.mark.parametrize("dtype, scale", [(torch.float32, 2.0 ** -135), (torch.float64, 2.0 ** -1030)])
def test_knn_on_subnormal_rows(device, dtype, scale):
    """Every entry below the dtype's smallest normal: the squares vanish in any dtype, so
    the float64 definition is taken on the rows times 1/scale (exact) and scaled back."""
    torch.manual_seed(14)
    ints = torch.randint(-8, 9, (30, 4)).double()  # host tensor
    x = (ints * scale).to(dtype)
    assert torch.equal(x.double() / scale, ints)  # exact multiples: representable
    ref_dist, ref_idx = brute_force(ints, None, 3, "euclidean", True)
    for metric in ("euclidean", "sqeuclidean"):
        nb = tripletops.knn(x.to(device), k=3, metric=metric)
        assert not bool(nb.dist.isnan().any()) and not bool(nb.dist.isinf().any())
        assert torch.equal(nb.idx.cpu(), ref_idx)
    got = tripletops.knn(x.to(device), k=3).dist.double().cpu() / scale
    assert torch.allclose(got, ref_dist, rtol=1e-3, atol=0), (got, ref_dist)


@pytest.mark.parametrize("device", devices_for("pairwise_distance"))
def test_pairwise_distance_on_subnormal_rows(device):
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0]], dtype=torch.float64) * 2.0 ** -140  # host tensor
    d = tripletops.pairwise_distance(x.float().to(device)).double().cpu()
    assert not bool(d.isnan().any())
    assert torch.allclose(d, torch.cdist(x, x).float().double(), rtol=1e-6, atol=0)


# ---- 4. mean_reciprocal_rank at AccuracyCalculator's depth -----------------------------


def test_mean_reciprocal_rank_is_accuracy_calculators():
    from test_retrieval import _pml

    torch.manual_seed(15)
    y = torch.arange(100).repeat_interleave(3)
    x = torch.randn(300, 16)
    ref = _pml(x, y, None, None)
    for k in ((1, 5, 10), (1, 2), 50):  # the depth does not depend on the recall cut-offs
        got = tripletops.retrieval_metrics(x, y, k=k)
        assert abs(got["mean_reciprocal_rank"] - ref["mean_reciprocal_rank"]) <= 1e-6, (k, got, ref)


# ---- 6. and 7. memory on collapsed embeddings and multi-hot labels ---------------------

MEMORY_SCRIPT = r"""
import resource, time, torch, tripletops
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
ones = torch.ones(16000, 16)
clusters = torch.full((10000, 128), 100.0)
clusters[5000:] = -100.0
tripletops.knn(torch.randn(3000, 16), k=10)  # warm the allocator and the thread pool
for name, x in (("identical", ones), ("two clusters", clusters)):
    before, t = peak(), time.time()
    nb = tripletops.knn(x, k=10)
    growth, sec = peak() - before, time.time() - t
    print(f"{name}: +{growth:.1f} MiB, {sec:.2f} s")
    assert growth < 100, (name, growth)
    first = 0 if name == "identical" else 5000  # every row's neighbours: the smallest indices of its class
    assert nb.idx[first + 20].tolist() == [first + j for j in range(11) if j != 20][:10]
    assert float(nb.dist.abs().max()) == 0.0
# multi-hot labels: no Q x K x L temporary
torch.manual_seed(0)
emb = torch.randn(1000, 8)
labels = torch.zeros(1000, 512, dtype=torch.bool)
labels[torch.arange(1000), torch.randint(0, 4, (1000,))] = True
labels[:500, 100] = True  # one label shared by half of the rows: K ~ 500
before = peak()
tripletops.retrieval_metrics(emb, labels)
growth = peak() - before
print(f"multi-hot L=512: +{growth:.1f} MiB")
assert growth < 100, growth
"""


def test_knn_and_metrics_memory_on_collapsed_embeddings():
    """Peak memory above the inputs (ru_maxrss): identical rows at N = 16,000 and two far
    clusters stay under 100 MB (a window used to keep every tied row: ~4 GB), and so do
    multi-hot metrics with L = 512."""
    res = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT], capture_output=True, text=True, timeout=600)
    print(res.stdout, res.stderr)
    assert res.returncode == 0, res.stderr


# ---- the first hour's errors ----------------------------------------------------------


def test_retrieval_metrics_rejects_k_beyond_the_gallery_and_non_finite_rows():
    x, y = torch.randn(20, 3), torch.arange(20) % 4
    with pytest.raises(ValueError, match=r"k=50 .*19"):
        tripletops.retrieval_metrics(x, y, k=(1, 50))
    with pytest.raises(ValueError, match=r"k=21 .*20"):
        tripletops.retrieval_metrics(x, y, x, y, k=21)
    bad = x.clone()
    bad[7, 1] = math.nan
    with pytest.raises(ValueError, match="queries row 7"):
        tripletops.retrieval_metrics(bad, y)
    bad = x.clone()
    bad[3, 0] = math.inf
    with pytest.raises(ValueError, match="gallery row 3"):
        tripletops.retrieval_metrics(x, y, bad, y)


def test_knn_rejects_exclude_self_with_a_short_gallery_and_huge_k():
    q = torch.randn(6, 3)
    with pytest.raises(ValueError, match="exclude_self"):
        tripletops.knn(q, q[:4], k=2, exclude_self=True)
    for k in (2 ** 31, 2 ** 63, 2 ** 70):
        with pytest.raises(ValueError, match="k must be a positive integer"):
            tripletops.knn(q, k=k)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        tripletops.knn(q, k=0)


# ---- 8. cosine gradients of an exploding row ------------------------------------------


def test_cosine_gradients_of_an_exploding_fp32_row():
    """CPU; the CUDA backward of pairwise_distance, the contrastive general path and
    batch-hard are not fixed yet (docs/numerics.md)."""
    torch.manual_seed(16)
    base = torch.randn(8, 4, dtype=torch.float64)
    base[0] *= 1e20
    y = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    for fn, ref in ((lambda x: tripletops.pairwise_distance(x, metric="cosine").sum(),
                     lambda x: tripletops.reference.pairwise_distance(x, metric="cosine").sum()),
                    (lambda x: tripletops.contrastive_loss(x, y, metric="cosine"),
                     lambda x: tripletops.reference.contrastive_loss(x, y, metric="cosine")),
                    (lambda x: tripletops.batch_hard_loss(x, y, metric="cosine", margin=0.5),
                     lambda x: tripletops.reference.batch_hard_loss(x, y, metric="cosine", margin=0.5))):
        x = base.float().requires_grad_()
        fn(x).backward()
        xd = base.clone().requires_grad_()
        ref(xd).backward()
        assert bool(x.grad.isfinite().all())
        assert float(xd.grad[0].abs().max()) > 0
        for row in range(4):  # the exploding row and rows that meet it
            g0, r0 = x.grad[row].double(), xd.grad[row]
            assert torch.allclose(g0, r0, rtol=1e-4, atol=1e-3 * float(r0.abs().max())), (row, g0, r0)


# ---- 9. batch-all one ulp above the kink -----------------------------------------------


@pytest.mark.parametrize("device", devices_for("batch_all_loss"))
def test_batch_all_mean_nonzero_counts_a_term_one_ulp_above_the_kink(device):
    x = torch.tensor([[0.0], [1.0], [1.2], [-3.0]], dtype=torch.float64)  # host tensor
    y = torch.tensor([0, 0, 1, 1])  # host tensor
    # (0, 1, 2): 1 - 1.2 + 0.2 = 5.55e-17 > 0, exactly and in these doubles
    assert (1.0 - 1.2) + 0.2 > 0  # Python floats are these doubles
    ref = tripletops.reference.batch_all_loss(x, y, margin=0.2, reduction="mean_nonzero")
    xd = x.clone().to(device).requires_grad_()
    got = tripletops.batch_all_loss(xd, y.to(device), margin=0.2, reduction="mean_nonzero")
    assert abs(float(got.detach()) - float(ref)) <= 1e-12, (float(got.detach()), float(ref))
    xr = x.clone().requires_grad_()
    tripletops.reference.batch_all_loss(xr, y, margin=0.2, reduction="mean_nonzero").backward()
    got.backward()
    assert torch.allclose(xd.grad.cpu(), xr.grad, atol=1e-12)


# ---- 12. explicit triplets of tiny or huge rows ----------------------------------------


@pytest.mark.parametrize("device", devices_for("triplet_margin_loss"))
@pytest.mark.parametrize("scale", [1e-30, 1e20])
def test_triplet_margin_loss_tiny_and_huge_rows(device, scale):
    torch.manual_seed(17)
    a, p, n = (torch.randn(5, 4, dtype=torch.float64) * scale for _ in range(3))  # host tensors
    margin = 0.0 if scale > 1 else 1e-30
    ref = tripletops.reference.triplet_margin_loss(a, p, n, margin=margin, reduction="none")
    leaves = [t.float().to(device).requires_grad_() for t in (a, p, n)]
    got = tripletops.triplet_margin_loss(*leaves, margin=margin, reduction="none")
    assert torch.allclose(got.double().cpu(), ref, rtol=1e-5, atol=0), (got, ref)
    got.sum().backward()
    refs = [t.clone().requires_grad_() for t in (a, p, n)]
    tripletops.reference.triplet_margin_loss(*refs, margin=margin, reduction="none").sum().backward()
    for g, r in zip(leaves, refs):
        assert torch.allclose(g.grad.double().cpu(), r.grad, rtol=1e-4, atol=1e-5), (g.grad, r.grad)


# ---- 13. the reference forms squared distances from the differences --------------------


def test_reference_squared_distances_at_the_kink():
    x = torch.tensor([[0, 0], [1, 1], [2, 0], [9, 9], [9, 9.5]], dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 2, 2])
    # anchor 0: d_ap^2 = 2, d_an^2 = 4, margin 2: exactly at the kink
    ref = tripletops.reference.batch_hard_loss(x, y, margin=2.0, metric="sqeuclidean", reduction="mean_nonzero")
    got = tripletops.batch_hard_loss(x, y, margin=2.0, metric="sqeuclidean", reduction="mean_nonzero")
    assert float(ref) == 2.0 and float(got) == 2.0
    assert float(tripletops.reference.pairwise_distance(x, metric="sqeuclidean")[0, 1]) == 2.0
    # contrastive: a negative pair at squared distance exactly neg_margin passes the gradient
    # (clamp's convention at 0), as the kernels do
    x2 = torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    y2 = torch.tensor([0, 1])
    xr = x2.clone().requires_grad_()
    tripletops.reference.contrastive_loss(xr, y2, metric="sqeuclidean", neg_margin=2.0, reduction="sum").backward()
    xk = x2.clone().requires_grad_()
    tripletops.contrastive_loss(xk, y2, metric="sqeuclidean", neg_margin=2.0, reduction="sum").backward()
    assert torch.allclose(xr.grad, xk.grad) and float(xr.grad.abs().max()) > 0


# ---- 10. a compiled criterion called under inference_mode, then in training -------------


def test_compiled_criterion_under_inference_mode_then_training():
    torch._dynamo.reset()
    t = torch.arange(8) % 4
    center = tripletops.CenterLoss(4, 3)
    memory = tripletops.CrossBatchMemory(16, 3)
    memory(torch.randn(4, 3), torch.arange(4))
    for module in (center, memory):
        step = torch.compile(lambda m, e, y: m(e, y), fullgraph=True)
        with torch.inference_mode():
            step(module, torch.randn(8, 3), t)
        assert not any(b.is_inference() for b in module.buffers())
        x = torch.randn(8, 3, requires_grad=True)
        step(module, x, t).backward()  # raised "Inference tensors cannot be saved for backward"
        assert x.grad is not None and bool(x.grad.isfinite().all())


def test_compiled_memory_refuses_a_new_dtype_without_grad_mode():
    """A compiled CrossBatchMemory call under inference_mode that would widen the memory
    (fp32 memory, float64 batch) would leave inference-tensor buffers that the next compiled
    training step cannot save for backward: refused before any state changes, with the
    reason and the fix in dynamo's error; the module then trains, compiled, as it was."""
    torch._dynamo.reset()
    t = torch.arange(8) % 4
    memory = tripletops.CrossBatchMemory(16, 3)
    memory(torch.randn(8, 3), t)
    before = {k: v.clone() for k, v in memory.state_dict().items()}
    step = torch.compile(lambda m, e, y: m(e, y), fullgraph=True)
    with torch.inference_mode(), pytest.raises(Exception, match="inside a compiled call without grad mode"):
        step(memory, torch.randn(8, 3, dtype=torch.float64), t)
    for k, v in memory.state_dict().items():
        assert torch.equal(v, before[k]) and v.dtype == before[k].dtype and not v.is_inference(), k
    x = torch.randn(8, 3, dtype=torch.float64, requires_grad=True)
    step(memory, x, t).backward()  # widens here, with grad mode
    assert memory.memory.dtype == torch.float64 and bool(x.grad.isfinite().all())


# ---- 5. exact euclidean ties go to the smallest index -----------------------------------


@pytest.mark.parametrize("device", devices_for("knn"))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("queries", [1, 300])  # the direct path, and the Gram tiles
def test_knn_exact_ties_whatever_the_order_of_the_entries(device, dtype, queries):
    """Rows 2i and 2i+1 hold the same entries in reversed order: at exactly equal distance
    from the origin (in rational arithmetic), so 2i comes first. The double sums of the
    squared entries round differently in the two orders (on CPU in entry order, on CUDA in
    lane order): near ties are ranked again on correctly rounded keys."""
    from fractions import Fraction

    torch.manual_seed(18)
    base = torch.randn(100, 7, dtype=torch.float64).to(dtype)  # host tensor
    g = torch.empty(200, 7, dtype=dtype)  # host tensor
    g[0::2], g[1::2] = base, base.flip(1)
    q = torch.zeros(queries, 7, dtype=dtype)  # host tensor
    if queries > 1:
        q[1:] = torch.randn(queries - 1, 7, dtype=torch.float64).to(dtype) * 3  # host tensor
    nb = tripletops.knn(q.to(device), g.to(device), k=200)
    exact = [sum(Fraction(float(v)) ** 2 for v in row) for row in g.double().tolist()]
    want = sorted(range(200), key=lambda j: (exact[j], j))
    assert nb.idx[0].tolist() == want
    if queries > 1:  # the other queries: the float64 brute force's neighbours
        check(tripletops.knn(q[1:40].to(device), g.to(device), k=10), q[1:40], g, 10, "euclidean", False, dtype)


@pytest.mark.parametrize("device", devices_for("knn"))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_knn_exact_ties_in_a_settled_window(device, dtype):
    """500 gallery rows, each a permutation of the same 7 entries: all at exactly equal
    distance from the origin, and all inside the Gram window, so the CPU window is settled
    on exact keys (and the CUDA buffer overflows into settled slices). The k-th place is
    decided on correctly rounded keys: the first 10 rows, in index order."""
    torch.manual_seed(20)
    v = torch.randn(7, dtype=torch.float64).to(dtype)  # host tensor
    g = torch.stack([v[torch.randperm(7)] for _ in range(500)])  # host tensor
    q = torch.randn(300, 7, dtype=torch.float64).to(dtype) * 3  # host tensor; past the direct path
    q[0] = 0
    nb = tripletops.knn(q.to(device), g.to(device), k=10)
    assert nb.idx[0].tolist() == list(range(10))
    check(tripletops.knn(q[1:30].to(device), g.to(device), k=10), q[1:30], g, 10, "euclidean", False, dtype)


def peak_bytes(fn, device: str) -> int:
    """Peak bytes allocated through ATen while fn() runs, above what was allocated before:
    the CUDA caching allocator's peak on a GPU, the profiler's allocation events for host
    tensors (the emulated CUDA kernels' tensors included; the CPU kernels' own std::vector
    buffers are not seen)."""
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    now = peak = 0
    for e in prof.profiler.kineto_results.events():
        if e.name() == "[memory]":
            now += e.nbytes()
            peak = max(peak, now)
    return peak


@pytest.mark.parametrize("device", devices_for("knn"))
def test_knn_collapsed_embeddings_on_every_device(device, request, monkeypatch):
    """Identical rows and two far clusters: every key is within the window, so every pair is
    a candidate. The CUDA candidate buffer overflows and the rest of the gallery runs again
    in slices settled on exact keys (the k nearest of each query kept): memory O(Q k +
    slice), not a buffer of Q x G pairs. Likewise k > 256 (the topk path) and queries
    searched on every row. Answers: the smallest indices of the query's class, distance 0.
    The peak is checked under the emulator (ATen's allocation events), whose build reads
    the buffer's size from TRIPLETOPS_EMU_KNN_CAPACITY (2000 pairs here: slices of 20
    gallery rows); on a GPU the slices hold 2^23 pairs, more than this test's Q x G.
    Before the slices, the overflow allocated a buffer of every pair and sorted it."""
    emulated = request.node.get_closest_marker("cuda_emu") is not None
    monkeypatch.setenv("TRIPLETOPS_EMU_KNN_CAPACITY", "2000")
    Q, G = 100, 2000
    ones = torch.ones(G, 4, device=device)
    clusters = torch.full((G, 4), 100.0, device=device)
    clusters[G // 2:] = -100.0
    for name, g in (("identical", ones), ("two clusters", clusters)):
        q = torch.cat([g[:Q // 2], g[G // 2:G // 2 + Q // 2]])
        out = {}
        peak = peak_bytes(lambda: out.update(nb=tripletops.knn(q, g, k=10)), device)
        nb = out["nb"]
        for i in (0, Q // 2 - 1, Q // 2, Q - 1):
            first = 0 if (name == "identical" or i < Q // 2) else G // 2
            assert nb.idx[i].tolist() == [first + j for j in range(10)], (name, i)
        assert float(nb.dist.abs().max()) == 0.0
        if emulated:  # a buffer of every pair alone: Q * G * 12 bytes (2.4 MB); allowed: a quarter
            assert peak < Q * G * 12 // 4, (name, peak)
    # k > 256 (topk path) with few queries on a longer gallery, and queries searched on every
    # row (a non-finite query row) in blocks
    g = torch.ones(3000, 4, device=device)
    q = torch.ones(20, 4, device=device)
    q[3, 1] = math.nan
    nb = tripletops.knn(q, g, k=300)
    assert nb.idx[0].tolist() == list(range(300)) and nb.idx[3].tolist() == list(range(300))
    assert float(nb.dist[0].abs().max()) == 0.0 and bool(nb.dist[3].isnan().all())


@pytest.mark.parametrize("device", devices_for("pairwise_distance"))
@pytest.mark.parametrize("rows", [8, 80])  # contrastive: the small-batch path, and the general one (B > 64)
def test_cosine_gradients_of_an_exploding_fp32_row_on_every_device(device, rows):
    """pairwise_distance's and contrastive_loss's cosine backward; CUDA's normalize_backward
    took 1 / sqrt(inf) = 0 for the exploding row."""
    torch.manual_seed(19)
    base = torch.randn(rows, 4, dtype=torch.float64)  # host tensor
    base[0] *= 1e20
    y = torch.arange(rows) // 2  # host tensor
    for fn, ref in ((lambda x: tripletops.pairwise_distance(x, metric="cosine").sum(),
                     lambda x: tripletops.reference.pairwise_distance(x, metric="cosine").sum()),
                    (lambda x: tripletops.contrastive_loss(x, y.to(x.device), metric="cosine", reduction="sum"),
                     lambda x: tripletops.reference.contrastive_loss(x, y, metric="cosine", reduction="sum"))):
        x = base.float().to(device).requires_grad_()
        fn(x).backward()
        xd = base.clone().requires_grad_()
        ref(xd).backward()
        g0, r0 = x.grad[0].double().cpu(), xd.grad[0]
        assert float(r0.abs().max()) > 0
        assert torch.allclose(g0, r0, rtol=1e-4, atol=1e-3 * float(r0.abs().max())), (g0, r0)


@pytest.mark.parametrize("device", devices_for("batch_hard_loss"))
@pytest.mark.parametrize("rows, bank", [(8, False), (80, False), (40, True)])
def test_batch_hard_cosine_gradients_of_an_exploding_fp32_row(device, rows, bank):
    """Cosine batch-hard backward with an fp32 row of norm 1e20: the sums in fp32 gave
    inf, then NaN gradients; the pair form around a - b cancelled for the other rows."""
    torch.manual_seed(20)
    base = torch.randn(rows, 4, dtype=torch.float64)  # host tensor
    base[0] *= 1e20
    y = torch.arange(rows) // 4  # host tensor
    ref_base = torch.randn(64, 4, dtype=torch.float64) if bank else None  # host tensor
    if bank:
        ref_base[3] *= 1e20
    ref_y = torch.arange(64) % (rows // 4) if bank else None  # host tensor

    def run(x, yy, r, ry, fn):
        kwargs = dict(metric="cosine", margin=0.5, reduction="sum")
        if r is not None:
            kwargs.update(ref_embeddings=r, ref_labels=ry)
        fn(x, yy, **kwargs).backward()

    x = base.float().to(device).requires_grad_()
    r = ref_base.float().to(device).requires_grad_() if bank else None
    run(x, y.to(device), r, ref_y.to(device) if bank else None, tripletops.batch_hard_loss)
    xd = base.clone().requires_grad_()
    rd = ref_base.clone().requires_grad_() if bank else None
    run(xd, y, rd, ref_y, tripletops.reference.batch_hard_loss)
    for got, want in ((x.grad, xd.grad),) + (((r.grad, rd.grad),) if bank else ()):
        got = got.double().cpu()
        assert bool(got.isfinite().all())
        for row in range(want.shape[0]):
            scale = float(want[row].abs().max())
            assert torch.allclose(got[row], want[row], rtol=1e-4, atol=1e-3 * scale + 1e-30), (row, got[row], want[row])
