"""The evaluation protocols re-ID and face papers report, exact and without an N×N matrix.

- `reid_metrics`: CMC, mAP and mINP under the Market-1501 protocol (a query's gallery
  images of its own identity *and* camera are left out), as fast-reid's and torchreid's
  ``eval_market1501`` compute them from a full Q×G distance matrix.
- `verification_metrics`: TAR at fixed FAR over all unordered pairs, as IJB-B/C report.

Both stream tiles of the distance matrix (a GEMM per tile, at most ``_TILE_ELEMS``
entries) and keep per query only what the metrics need: its true matches' exact
distances (re-ID), or the impostor pairs that can still be among the smallest and the
genuine pairs (verification). Distances in a tile come from the GEMM form
``|q|² + |g|² − 2 q·g`` (unit rows for cosine), each within a proven rounding bound of
the exact one (docs/numerics.md); every comparison that the bound cannot decide is made
again on exact distances (the difference form accumulated in float64 from the input
rows; for cosine on unit rows formed in float64), and ties go to the smallest gallery
index, as for `knn`. The code is PyTorch operations, so it runs on CPU and CUDA alike;
on CUDA it has run only on the emulator-free CPU path's tests (no GPU was lent), see
docs/protocols.md.
"""
from __future__ import annotations

import math
import numbers
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from . import _validate
from .retrieval import _finite_rows

__all__ = ["reid_metrics", "verification_metrics"]

_TILE_ELEMS = 1 << 21  # distance entries per tile: ~60 MB of temporaries at most
_EXACT_CHUNK = 1 << 22  # float64 entries per chunk of exact differences


# ----------------------------------------------------------------------------- rows and keys
class _Rows:
    """One set of rows as the tiles use them.

    ``gemm``: fp32 (fp64 for fp64 input) rows for the GEMM-form keys: unit rows for
    cosine, for (sq)euclidean the rows less a common centre (distances are translation
    invariant; a centre near the data keeps the norms, hence the rounding bound, small
    for data far from the origin). ``sq``: their squared norms. ``exact``: float64 rows for
    exact keys (canonical unit rows for cosine).
    """

    def __init__(self, x: torch.Tensor, metric: str, centre: Optional[torch.Tensor]):
        cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
        x64 = x.to(torch.float64)
        if metric == "cosine":
            # x / max|x_k| first (the same for x and c·x), then unit length: rows of one
            # direction get the same float64 unit row, so they tie exactly.
            m = x64.abs().amax(1, keepdim=True)
            p = x64 / torch.where(m > 0, m, torch.ones_like(m))
            n = p.norm(dim=1, keepdim=True) * m
            # A row of norm <= eps is x / eps, as F.normalize leaves it (not a unit row).
            self.tiny = (n <= 1e-12)[:, 0]
            self.exact = torch.where(n > 1e-12, p / p.norm(dim=1, keepdim=True).clamp_min(1e-300), x64 / 1e-12)
            self.gemm = F.normalize(x.to(cdt), dim=1, eps=1e-12)
        else:
            self.tiny = None
            self.exact = x64
            self.gemm = x.to(cdt) - centre.to(cdt) if centre is not None else x.to(cdt)
        self.gemm = self.gemm.contiguous()
        self.sq = (self.gemm * self.gemm).sum(1)
        self.norm = self.sq.sqrt()


def _exact_keys(a: _Rows, ia: torch.Tensor, b: _Rows, ib: torch.Tensor) -> torch.Tensor:
    """Exact keys of the pairs (ia[t], ib[t]) in float64: |a − b|² from the difference
    (unit rows for cosine, where it is 2 − 2 cos without the cancellation); 2 − 2 a·b for
    a cosine pair with a row of norm <= eps, which is not a unit row."""
    out = torch.empty(ia.numel(), dtype=torch.float64, device=a.exact.device)
    step = max(1, _EXACT_CHUNK // a.exact.shape[1])
    for s in range(0, ia.numel(), step):
        ra, rb = a.exact[ia[s:s + step]], b.exact[ib[s:s + step]]
        d = ra - rb
        k = (d * d).sum(1)
        if a.tiny is not None:
            tiny = a.tiny[ia[s:s + step]] | b.tiny[ib[s:s + step]]
            k = torch.where(tiny, 2.0 - 2.0 * (ra * rb).sum(1), k)
        out[s:s + step] = k
    return out


def _bound(q: _Rows, g_norm_max: float, metric: str) -> torch.Tensor:
    """(Q,) a bound on |GEMM-form key − exact key| for each query row against any gallery
    row of norm at most g_norm_max: (D + 8)·u·(|q| + max|g|)², docs/numerics.md, doubled
    (the centre's and the unit rows' own rounding; a wider bound costs only more exact
    comparisons, never a wrong one). TF32 is allowed for nothing here: the GEMMs run
    under `_full_precision`."""
    u = torch.finfo(q.gemm.dtype).eps / 2
    d = q.gemm.shape[1]
    scale = 2.0 * (d + 8) * u * 1.02
    if metric == "cosine":
        scale *= 2.0  # fp32 unit rows differ from the float64 ones by ~D·u each
        return torch.full_like(q.norm, scale * 4.0, dtype=torch.float64)
    return scale * (q.norm.to(torch.float64) + g_norm_max) ** 2


class _full_precision:
    """Context manager: no TF32 in CUDA matmuls (the bound assumes fp32 products)."""

    def __enter__(self):
        self.saved = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32 = self.saved


def _gemm_keys(q: _Rows, q0: int, q1: int, g: _Rows, g0: int, g1: int, metric: str) -> torch.Tensor:
    """(q1 − q0, g1 − g0) GEMM-form keys, the same units as `_exact_keys`."""
    dots = q.gemm[q0:q1] @ g.gemm[g0:g1].T
    if metric == "cosine":
        return (2.0 - 2.0 * dots).to(torch.float64)
    return (q.sq[q0:q1, None] + g.sq[None, g0:g1] - 2.0 * dots).to(torch.float64)


def _to_distance(key: torch.Tensor, metric: str) -> torch.Tensor:
    """Exact keys (|a − b|², unit rows for cosine) to the metric's distance."""
    if metric == "euclidean":
        return key.sqrt()
    if metric == "cosine":
        return key / 2.0
    return key


def _centre(x: torch.Tensor, metric: str) -> Optional[torch.Tensor]:
    return None if metric == "cosine" else x.to(torch.float64).mean(0).to(x.dtype if x.dtype == torch.float64
                                                                            else torch.float32)


def _int_ids(y: torch.Tensor, name: str, n: int, rows_name: str, x: torch.Tensor) -> None:
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"tripletops: {name} must be a torch.Tensor, got {type(y).__name__}")
    if y.dim() != 1 or y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise TypeError(f"tripletops: {name} must be a 1-D integer tensor (one id per row of {rows_name}), got "
                        f"{y.dtype} of shape {tuple(y.shape)}")
    if y.shape[0] != n:
        raise ValueError(f"tripletops: {name} must have {n} entries, one per row of {rows_name}, got {y.shape[0]}")
    _validate.device(y, name, x, rows_name)


# ----------------------------------------------------------------------------- re-ID
def reid_metrics(
    query: torch.Tensor,
    query_ids: torch.Tensor,
    query_cams: torch.Tensor,
    gallery: torch.Tensor,
    gallery_ids: torch.Tensor,
    gallery_cams: torch.Tensor,
    *,
    metric: str = "euclidean",
    max_rank: int = 50,
    normalize: bool = False,
) -> Dict[str, object]:
    """CMC, mAP and mINP under the Market-1501 protocol, exact, with no Q×G matrix.

    For each query, the gallery rows of its identity *and* its camera are left out (the
    same shot seen again); of the rest ("kept"), its true matches are the rows of its
    identity. With r₁ < … < rₙ the ranks (1-based, among the kept rows, nearest first) of
    its n matches:

    - CMC@k = 1 if r₁ ≤ k (``cmc[k − 1]``, averaged over the valid queries);
    - AP = (1/n) Σₜ t / rₜ, averaged into ``mAP``;
    - INP = n / rₙ (Ye et al. 2021), averaged into ``mINP``.

    A query with no kept match is skipped and counted nowhere but in
    ``num_valid_queries`` (valid = not skipped). These are fast-reid's and torchreid's
    ``eval_market1501`` definitions. Ranks are exact: distances that the GEMM's rounding
    bound cannot order are compared on exact float64 distances, and ties go to the
    smallest gallery index (where ``argsort`` leaves the order undefined).

    Args:
        query, gallery: ``(Q, D)`` and ``(G, D)`` float embeddings (one dtype, one device).
        query_ids, gallery_ids: ``(Q,)`` / ``(G,)`` integer identities.
        query_cams, gallery_cams: ``(Q,)`` / ``(G,)`` integer camera ids.
        metric: ``"euclidean"``, ``"sqeuclidean"`` or ``"cosine"`` (1 − cos).
        max_rank: the length of ``cmc``. Past the kept gallery's size the definition
            still holds (1.0 there).
        normalize: L2-normalize both sets first (the ranking of euclidean on unit rows).

    Returns:
        A dict: ``cmc`` (a ``(max_rank,)`` float64 CPU tensor), ``mAP`` and ``mINP``
        (floats), ``num_valid_queries`` (int).

    Raises:
        ValueError: for an unknown metric, a row holding NaN or Inf, mismatched sizes,
        or when no query has a kept match. TypeError for wrong dtypes.

    Memory is O((Q + G)·D + tile + matches): the tiles stream ``2^21`` distances at a
    time.
    """
    _validate.rows(query, "query")
    _validate.like(gallery, "gallery", query, "query", same_rows=False)
    _int_ids(query_ids, "query_ids", query.shape[0], "query", query)
    _int_ids(query_cams, "query_cams", query.shape[0], "query", query)
    _int_ids(gallery_ids, "gallery_ids", gallery.shape[0], "gallery", query)
    _int_ids(gallery_cams, "gallery_cams", gallery.shape[0], "gallery", query)
    _validate.metric(metric)
    max_rank = _validate.positive_int(max_rank, "max_rank")
    _validate.flag(normalize, "normalize")
    _finite_rows(query, "query")
    _finite_rows(gallery, "gallery")
    with torch.no_grad(), _full_precision():
        return _reid(query, query_ids.long(), query_cams.long(), gallery, gallery_ids.long(),
                     gallery_cams.long(), metric, max_rank, bool(normalize))


def _matches(qid, qcam, gid, gcam) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every query's kept matches: (query index, gallery index) pairs, query-major and in
    ascending gallery index, and the (Q,) counts. O(Q + G + matches) memory."""
    order = torch.argsort(gid, stable=True)
    sorted_ids = gid[order]
    lo = torch.searchsorted(sorted_ids, qid, right=False)
    hi = torch.searchsorted(sorted_ids, qid, right=True)
    same = hi - lo  # gallery rows of the query's identity
    qi = torch.repeat_interleave(torch.arange(qid.numel(), device=qid.device), same)
    start = torch.repeat_interleave(lo - torch.cumsum(same, 0) + same, same)
    gi = order[torch.arange(qi.numel(), device=qid.device) + start]
    keep = gcam[gi] != qcam[qi]
    qi, gi = qi[keep], gi[keep]
    counts = torch.bincount(qi, minlength=qid.numel())
    return qi, gi, counts


def _reid(query, qid, qcam, gallery, gid, gcam, metric, max_rank, normalize):
    if normalize:
        query, gallery = F.normalize(query, dim=1), F.normalize(gallery, dim=1)
    dev = query.device
    Q, G = query.shape[0], gallery.shape[0]
    centre = _centre(gallery, metric)
    q, g = _Rows(query, metric, centre), _Rows(gallery, metric, centre)
    g_norm_max = float(g.norm.max())
    bound = _bound(q, g_norm_max, metric)

    qi, gi, counts = _matches(qid, qcam, gid, gcam)
    n_max = int(counts.max()) if Q > 0 else 0
    valid = counts > 0
    if not bool(valid.any()):
        raise ValueError("tripletops.reid_metrics: no query has a match in the gallery once its own camera's "
                         "images of its identity are left out; check query_ids/gallery_ids and the camera ids")
    # Each query's matches, sorted by (exact key, gallery index), padded with +inf / G.
    keys = _exact_keys(q, qi, g, gi)
    order = torch.argsort(gi, stable=True)  # by gallery index, then stably by key, then by query
    order = order[torch.argsort(keys[order], stable=True)]
    order = order[torch.argsort(qi[order], stable=True)]
    qi_s, gi_s, keys_s = qi[order], gi[order], keys[order]
    first = torch.cumsum(counts, 0) - counts
    slot = torch.arange(qi_s.numel(), device=dev) - first[qi_s]
    K = torch.full((Q, n_max + 1), math.inf, dtype=torch.float64, device=dev)  # one +inf column past the last
    MI = torch.full((Q, n_max + 1), G, dtype=torch.int64, device=dev)
    K[qi_s, slot] = keys_s
    MI[qi_s, slot] = gi_s
    last_key = torch.where(valid, K.gather(1, (counts - 1).clamp(min=0)[:, None])[:, 0],
                           torch.full_like(K[:, 0], -math.inf))

    # before[i, t]: kept non-match rows ranked before query i's t-th match, as a histogram
    # over p = the number of i's matches ranked before the row, summed afterwards.
    hist = torch.zeros(Q, n_max + 2, dtype=torch.int64, device=dev)
    dump = n_max + 1  # the column for rows that rank after every match, or do not count
    q_step = max(1, min(Q, 1024))
    g_step = max(1, _TILE_ELEMS // q_step)
    for q0 in range(0, Q, q_step):
        q1 = min(Q, q0 + q_step)
        Kt, lastt, bt = K[q0:q1].contiguous(), last_key[q0:q1, None], bound[q0:q1, None]
        for g0 in range(0, G, g_step):
            g1 = min(G, g0 + g_step)
            a = _gemm_keys(q, q0, q1, g, g0, g1, metric)
            lo, hi = a - bt, a + bt
            # Rows of the query's identity (its matches and its own camera's shots) are
            # not among the others; rows surely past the last match change no rank.
            count = (qid[q0:q1, None] != gid[None, g0:g1]) & (lo <= lastt)
            if not bool(count.any()):
                continue
            p_lo = torch.searchsorted(Kt, lo, right=False)  # matches surely before the row
            p_hi = torch.searchsorted(Kt, hi, right=True)   # matches that may be before it
            sure = count & (p_lo == p_hi)
            hist.scatter_add_(1, torch.where(sure, p_lo, dump), sure.long())
            unsure = count & (p_lo != p_hi)
            if bool(unsure.any()):
                ui, uj = unsure.nonzero(as_tuple=True)
                ui, uj = ui + q0, uj + g0
                e = _exact_keys(q, ui, g, uj)
                # Ties go to the smallest gallery index: a match at an equal key is before
                # the row when its own index is smaller.
                before = (K[ui] < e[:, None]) | ((K[ui] == e[:, None]) & (MI[ui] < uj[:, None]))
                hist.index_put_((ui, before.sum(1)), torch.ones_like(ui), accumulate=True)

    before = torch.cumsum(hist[:, :n_max], 1)  # non-matches before the t-th match
    t = torch.arange(1, n_max + 1, device=dev, dtype=torch.int64)
    ranks = (t[None, :] + before).to(torch.float64)  # (Q, n_max); the padding is ignored below
    real = t[None, :] <= counts[:, None]
    ranks_v, real_v, counts_v = ranks[valid], real[valid], counts[valid].to(torch.float64)
    first_rank = ranks_v[:, 0]
    ks = torch.arange(1, max_rank + 1, device=dev, dtype=torch.float64)
    cmc = (first_rank[:, None] <= ks[None, :]).to(torch.float64).mean(0)
    ap = (torch.where(real_v, t[None, :].to(torch.float64) / ranks_v, torch.zeros_like(ranks_v)).sum(1) / counts_v)
    last_rank = ranks_v.gather(1, (counts[valid] - 1)[:, None])[:, 0]
    inp = counts_v / last_rank
    return {"cmc": cmc.cpu(), "mAP": float(ap.mean()), "mINP": float(inp.mean()),
            "num_valid_queries": int(valid.sum())}


# ----------------------------------------------------------------------------- verification
def verification_metrics(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    *,
    far: Sequence[float] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2),
    metric: str = "cosine",
    normalize: bool = False,
) -> Dict[str, object]:
    """TAR at fixed FAR over all unordered pairs i < j, exact, with no N×N matrix.

    A pair is genuine when its rows share a label (class ids equal; multi-hot labels
    with a label in common) and an impostor otherwise. With the M impostor distances
    sorted ascending, d₍₁₎ ≤ … ≤ d₍M₎ (ties counted separately), and K the largest integer
    with K / M ≤ FAR (⌊FAR·M⌋ up to floating point), the threshold is d₍K+1₎, in distance
    units (cosine: 1 − cos). A pair is accepted when its distance is *strictly* below the
    threshold, so the achieved FAR is at most K / M ≤ FAR, and TAR is the fraction of
    genuine pairs accepted. This is scikit-learn's TPR at the last ROC point with
    FPR ≤ FAR (``roc_curve(..., drop_intermediate=False)`` on score = −distance).

    Distances are exact: the selection runs on GEMM-form distances and every pair that
    their rounding bound cannot place is measured again in float64 (difference form).

    Args:
        embeddings: ``(N, D)`` float embeddings, N ≥ 2.
        labels: ``(N,)`` integer class ids or ``(N, L)`` multi-hot bool/uint8 labels.
        far: the false accept rates, each in (0, 1).
        metric: ``"cosine"`` (1 − cos), ``"euclidean"`` or ``"sqeuclidean"``.
        normalize: L2-normalize the rows first.

    Returns:
        A dict: ``far`` (the tuple given), ``tar`` and ``thresholds`` (float64 CPU
        tensors aligned with ``far``), ``num_genuine`` and ``num_impostor`` (ints).

    Raises:
        ValueError: a FAR outside (0, 1), fewer than two rows, no genuine or no impostor
        pair, a row holding NaN or Inf, an unknown metric.

    Memory is O(N·D + tile + K_max + genuine pairs), K_max = ⌊max(far)·M⌋: the impostor
    pairs that can still be among the K_max + 1 smallest are kept, the rest dropped.
    """
    _validate.rows(embeddings, "embeddings")
    _validate.labels(labels, "labels", embeddings.shape[0], "embeddings", embeddings)
    _validate.metric(metric)
    _validate.flag(normalize, "normalize")
    if isinstance(far, (numbers.Real, torch.Tensor)):
        raise TypeError("tripletops: far must be a sequence of floats, e.g. (1e-4,), got a single value")
    far = tuple(far)
    if not far:
        raise ValueError("tripletops: far must hold at least one false accept rate")
    for f in far:
        if isinstance(f, bool) or not isinstance(f, numbers.Real) or not (0.0 < float(f) < 1.0):
            raise ValueError(f"tripletops: every far must be a number in (0, 1), got {f!r}")
    if embeddings.shape[0] < 2:
        raise ValueError(f"tripletops: verification needs at least 2 embeddings, got {embeddings.shape[0]}")
    _finite_rows(embeddings, "embeddings")
    with torch.no_grad(), _full_precision():
        return _verification(embeddings, labels, far, metric, bool(normalize))


def _genuine_tile(labels: torch.Tensor, i0: int, i1: int, j0: int, j1: int) -> torch.Tensor:
    a, b = labels[i0:i1], labels[j0:j1]
    if labels.dim() == 1:
        return a[:, None] == b[None, :]
    return (a.to(torch.float32) @ b.to(torch.float32).T) > 0


def _verification(x, labels, far, metric, normalize):
    if normalize:
        x = F.normalize(x, dim=1)
    dev = x.device
    N = x.shape[0]
    centre = _centre(x, metric)
    r = _Rows(x, metric, centre)
    bound = _bound(r, float(r.norm.max()), metric)
    if labels.dim() == 2:
        labels = labels.bool()
    else:
        labels = labels.long()

    # Pass over the upper triangle. Genuine pairs are kept (GEMM key, bound, i, j);
    # impostor pairs only while they can be among the k_max + 1 smallest: tau is the
    # (k_max + 1)-th smallest upper bound (key + bound) seen so far, and a pair whose lower
    # bound exceeds tau cannot be (k_max + 1 pairs are surely at most tau).
    n_pairs = N * (N - 1) // 2
    gen_i, gen_j = [], []
    cand_i, cand_j, cand_lo, cand_hi = [], [], [], []
    n_gen = 0
    tau = math.inf
    cap = None  # k_max + 1, known once the impostor count is
    # The impostor count M first (labels only, O(N) memory for class ids).
    if labels.dim() == 1:
        _, c = torch.unique(labels, return_counts=True)
        n_gen_total = int((c * (c - 1) // 2).sum())
    else:
        n_gen_total = 0
        step = max(1, (1 << 22) // max(1, N))
        for i0 in range(0, N, step):
            i1 = min(N, i0 + step)
            gt = _genuine_tile(labels, i0, i1, 0, N)
            gt &= torch.arange(N, device=dev)[None, :] > torch.arange(i0, i1, device=dev)[:, None]
            n_gen_total += int(gt.sum())
    M = n_pairs - n_gen_total
    if n_gen_total == 0:
        raise ValueError("tripletops.verification_metrics: no genuine pair (no two rows share a label): TAR is "
                         "undefined")
    if M == 0:
        raise ValueError("tripletops.verification_metrics: no impostor pair (every two rows share a label): FAR is "
                         "undefined")
    ks = []
    for f in far:
        k = min(M - 1, int(math.floor(float(f) * M)))
        while k + 1 <= M - 1 and (k + 1) / M <= float(f):
            k += 1
        while k > 0 and k / M > float(f):
            k -= 1
        ks.append(k)
    cap = max(ks) + 1

    i_step = max(1, min(N, 1024))
    j_step = max(1, _TILE_ELEMS // i_step)
    held = 0
    for i0 in range(0, N, i_step):
        i1 = min(N, i0 + i_step)
        bt = bound[i0:i1, None]
        for j0 in range(i0, N, j_step):  # tiles on and above the diagonal
            j1 = min(N, j0 + j_step)
            a = _gemm_keys(r, i0, i1, r, j0, j1, metric)
            upper = torch.arange(j0, j1, device=dev)[None, :] > torch.arange(i0, i1, device=dev)[:, None]
            gen = _genuine_tile(labels, i0, i1, j0, j1) & upper
            gi, gj = gen.nonzero(as_tuple=True)
            if gi.numel():
                gen_i.append(gi + i0)
                gen_j.append(gj + j0)
                n_gen += gi.numel()
            imp = upper & ~gen & ((a - bt) <= tau)
            ii, ij = imp.nonzero(as_tuple=True)
            if ii.numel():
                lo, hi = (a - bt)[ii, ij], (a + bt)[ii, ij]
                cand_i.append(ii + i0), cand_j.append(ij + j0), cand_lo.append(lo), cand_hi.append(hi)
                held += ii.numel()
            if held > 4 * cap + (1 << 16):  # prune to what can still be among the smallest
                ci, cj, clo, chi = (torch.cat(v) for v in (cand_i, cand_j, cand_lo, cand_hi))
                if chi.numel() >= cap:
                    tau = min(tau, float(torch.kthvalue(chi.cpu(), cap).values))
                keep = clo <= tau
                cand_i, cand_j, cand_lo, cand_hi = [ci[keep]], [cj[keep]], [clo[keep]], [chi[keep]]
                held = int(keep.sum())
    ci = torch.cat(cand_i) if cand_i else torch.zeros(0, dtype=torch.int64, device=dev)
    cj = torch.cat(cand_j) if cand_j else torch.zeros(0, dtype=torch.int64, device=dev)
    # Exact distances of the candidates; every impostor among the cap smallest is here.
    ek = torch.sort(_exact_keys(r, ci, r, cj)).values
    thr_keys = ek[torch.tensor(ks, device=dev)]
    gi = torch.cat(gen_i) if gen_i else torch.zeros(0, dtype=torch.int64, device=dev)
    gj = torch.cat(gen_j) if gen_j else torch.zeros(0, dtype=torch.int64, device=dev)
    gk = _exact_keys(r, gi, r, gj)
    gk_sorted = torch.sort(gk).values
    accepted = torch.searchsorted(gk_sorted, thr_keys, right=False)  # genuine keys strictly below
    tar = accepted.to(torch.float64) / n_gen
    return {"far": far, "tar": tar.cpu(), "thresholds": _to_distance(thr_keys, metric).cpu(),
            "num_genuine": int(n_gen), "num_impostor": int(M)}
