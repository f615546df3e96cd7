"""The evaluation protocols re-ID and face papers report, exact and without an N×N matrix.

- `reid_metrics`: CMC, mAP and mINP under the Market-1501 protocol (a query's gallery
  images of its own identity *and* camera are left out), as fast-reid's and torchreid's
  ``eval_market1501`` compute them from a full Q×G distance matrix.
- `verification_metrics`: TAR at fixed FAR over all unordered pairs, as IJB-B/C report.

Both stream tiles of the distance matrix (at most ``_TILE_ELEMS`` entries, GEMM calls of
depth ``_K_CHUNK``) and keep only what the metrics need: per query, its matches' keys and
a histogram of how many matches each kept gallery row ranks after (re-ID); the impostor
pairs that can still be among the smallest, and the genuine pairs (verification).
Distances in a tile come from the GEMM form ``|q|² + |g|² − 2 q·g`` (unit rows for
cosine), each within a proven rounding bound of the exact one (`_bound`); every
comparison that the bound cannot decide is made again on exact distances (the
difference form accumulated in float64 from the input rows; for cosine on unit rows
formed in float64), and ties go to the smallest gallery index, as for `knn`. The code is
PyTorch operations, so the same code runs on CPU and CUDA; on CUDA it has not run yet
(no GPU has been lent since it was written): docs/protocols.md.
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
    for data far from the origin). ``sq``, ``norm``: their squared norms and norms.
    ``exact(idx)``: float64 rows for exact keys, formed on demand (cosine: the canonical
    unit rows, ``unit``, formed once; ``tiny`` marks rows of norm <= eps).
    """

    def __init__(self, x: torch.Tensor, metric: str, centre: Optional[torch.Tensor]):
        cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
        self.src = x
        self.tiny = None
        self.unit = None
        if metric == "cosine":
            # x / max|x_k| first (the same for x and c·x), then unit length: rows of one
            # direction get the same float64 unit row, so they tie exactly.
            x64 = x.to(torch.float64)
            m = x64.abs().amax(1, keepdim=True)
            p = x64 / torch.where(m > 0, m, torch.ones_like(m))
            pn = p.norm(dim=1, keepdim=True)
            # A row of norm <= eps is x / eps, as F.normalize leaves it (not a unit row).
            self.tiny = (pn * m <= 1e-12)[:, 0]
            self.unit = torch.where(self.tiny[:, None], x64 / 1e-12, p / pn.clamp_min(1e-300))
            self.gemm = self.unit.to(cdt)  # within u of the float64 rows, entry by entry
        else:
            self.gemm = x.to(cdt) - centre.to(cdt) if centre is not None else x.to(cdt)
        self.gemm = self.gemm.contiguous()
        # Squares rounded once each, summed in float64: within ~u of the exact norm.
        self.sq = self.gemm.square().sum(1, dtype=torch.float64).to(cdt)
        self.norm = self.sq.sqrt()

    def exact(self, idx: torch.Tensor) -> torch.Tensor:
        """float64 rows idx for exact keys: the input rows (unit rows for cosine)."""
        return self.unit[idx] if self.unit is not None else self.src[idx].to(torch.float64)


def _exact_keys(a: _Rows, ia: torch.Tensor, b: _Rows, ib: torch.Tensor) -> torch.Tensor:
    """Exact keys of the pairs (ia[t], ib[t]) in float64: |a − b|² from the difference
    (unit rows for cosine, where it is 2 − 2 cos without the cancellation); 2 − 2 a·b for
    a cosine pair with a row of norm <= eps, which is not a unit row."""
    out = torch.empty(ia.numel(), dtype=torch.float64, device=a.src.device)
    step = max(1, _EXACT_CHUNK // a.src.shape[1])
    for s in range(0, ia.numel(), step):
        ra, rb = a.exact(ia[s:s + step]), b.exact(ib[s:s + step])
        d = ra - rb
        k = torch.linalg.vecdot(d, d)
        if a.tiny is not None:
            tiny = a.tiny[ia[s:s + step]] | b.tiny[ib[s:s + step]]
            k = torch.where(tiny, 2.0 - 2.0 * torch.linalg.vecdot(ra, rb), k)
        out[s:s + step] = k
    return out


_K_CHUNK = 256  # the GEMM's depth per call: the rounding bound grows with it, not with D


def _bound(q: _Rows, g_norm_max: float, metric: str) -> torch.Tensor:
    """(Q, 1) a width w such that a GEMM-form key and an exact key, or two GEMM-form keys,
    compare surely when they differ by more than w in the tile dtype.

    A dot product over k terms, summed in any order, is within (k + 2)·u·Σ|a_i b_i| of
    the exact one; `_gemm_keys` runs its GEMM in calls of depth _K_CHUNK accumulated in
    the output, so each key is within (_K_CHUNK + 8)·u·(|q| + max|g|)² (×1.02) of the
    exact key of the rows it multiplies (docs/numerics.md has the GEMM form's bound), plus
    one rounding of the running key per call (u·r² each). The
    rows themselves are rounded once from the inputs (the centre, the unit rows): 8u·r²
    more. Two keys compared: twice that, and the rounding of a ± w: 8u·r² more. A wider
    bound costs only more exact comparisons, never a wrong one. TF32 is allowed for
    nothing here: the GEMMs run under `_full_precision`."""
    u = torch.finfo(q.gemm.dtype).eps / 2
    d = min(q.gemm.shape[1], _K_CHUNK)
    r2 = (q.norm.to(torch.float64) + g_norm_max) ** 2 if metric != "cosine" else torch.full_like(
        q.norm, 4.0, dtype=torch.float64)
    chunks = math.ceil(q.gemm.shape[1] / _K_CHUNK)  # each call adds onto the running key: one rounding
    one = ((d + 8) * u * 1.02 + (8.0 + chunks) * u) * r2
    w = 2.0 * one + 8.0 * u * r2
    return w.to(q.gemm.dtype)[:, None]


class _full_precision:
    """Context manager: no TF32 in CUDA matmuls (the bound assumes fp32 products)."""

    def __enter__(self):
        self.saved = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32 = self.saved


def _gemm_keys(q: _Rows, q0: int, q1: int, g: _Rows, g0: int, g1: int, metric: str) -> torch.Tensor:
    """(q1 − q0, g1 − g0) GEMM-form keys in the tile dtype, the units of `_exact_keys`:
    the norms (2 for cosine) first, then −2 q·g added by GEMM calls of depth _K_CHUNK
    (see _bound), so the tile is written once by the norms and then only by the GEMMs."""
    a, b = q.gemm[q0:q1], g.gemm[g0:g1]
    if metric == "cosine":
        out = torch.full((q1 - q0, g1 - g0), 2.0, dtype=a.dtype, device=a.device)
    else:
        out = q.sq[q0:q1, None] + g.sq[None, g0:g1]
    for c in range(0, a.shape[1], _K_CHUNK):
        out.addmm_(a[:, c:c + _K_CHUNK], b[:, c:c + _K_CHUNK].T, alpha=-2.0)
    return out


def _to_distance(key: torch.Tensor, metric: str) -> torch.Tensor:
    """Exact keys (|a − b|², unit rows for cosine) to the metric's distance."""
    if metric == "euclidean":
        return key.sqrt()
    if metric == "cosine":
        return key / 2.0
    return key


def _centre(x: torch.Tensor, metric: str) -> Optional[torch.Tensor]:
    if metric == "cosine":
        return None
    return (x.sum(0, dtype=torch.float64) / x.shape[0]).to(torch.float64 if x.dtype == torch.float64 else torch.float32)


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


def _pair_gemm_keys(q: _Rows, ia: torch.Tensor, g: _Rows, ib: torch.Tensor, metric: str) -> torch.Tensor:
    """GEMM-form keys of the pairs (ia[t], ib[t]) from row dot products, in the tile dtype."""
    out = torch.empty(ia.numel(), dtype=q.gemm.dtype, device=q.gemm.device)
    step = max(1, _EXACT_CHUNK // q.gemm.shape[1])
    for s in range(0, ia.numel(), step):
        a, b = ia[s:s + step], ib[s:s + step]
        ra, rb = q.gemm[a], g.gemm[b]
        dots = torch.linalg.vecdot(ra[:, :_K_CHUNK], rb[:, :_K_CHUNK])
        for c in range(_K_CHUNK, ra.shape[1], _K_CHUNK):  # depth _K_CHUNK at a time (see _bound)
            dots += torch.linalg.vecdot(ra[:, c:c + _K_CHUNK], rb[:, c:c + _K_CHUNK])
        out[s:s + step] = 2.0 - 2.0 * dots if metric == "cosine" else q.sq[a] + g.sq[b] - 2.0 * dots
    return out


class _BandKeys:
    """Exact keys of the matches, by query and by place in the query's GEMM-form order
    (the columns of `Ka`), formed on first use and kept: only the matches whose GEMM-form
    key lies within the bound of an undecided row's need them."""

    def __init__(self, q, g, index, G):
        self.q, self.g, self.index = q, g, index  # index: (Q, n_max + 1) gallery rows, G as padding
        self.keys = torch.full(index.shape, math.nan, dtype=torch.float64, device=index.device)

    def get(self, rows: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        k = self.keys[rows, slots]
        new = torch.isnan(k)
        if bool(new.any()):
            r, c = rows[new], slots[new]
            self.keys[r, c] = _exact_keys(self.q, r, self.g, self.index[r, c])
            k = self.keys[rows, slots]
        return k


def _count_exactly(q, g, ui, uj, p_lo, p_hi, band: _BandKeys, hist) -> None:
    """hist[ui, p] += 1 with p the number of query ui's matches ranked before gallery row
    uj on exact keys, ties to the smallest gallery index: the p_lo matches surely before
    it, and of the matches in places [p_lo, p_hi) of the GEMM-form order, those whose
    exact key is smaller (or equal with a smaller gallery index)."""
    e = _exact_keys(q, ui, g, uj)
    width = p_hi - p_lo
    which = torch.repeat_interleave(torch.arange(ui.numel(), device=ui.device), width)
    slots = torch.arange(which.numel(), device=ui.device) - torch.repeat_interleave(
        torch.cumsum(width, 0) - width, width) + p_lo[which]
    rows = ui[which]
    km, im = band.get(rows, slots), band.index[rows, slots]
    ahead = (km < e[which]) | ((km == e[which]) & (im < uj[which]))
    p = p_lo + torch.zeros_like(p_lo).index_add_(0, which, ahead.long())
    hist.index_put_((ui, p), torch.ones_like(ui), accumulate=True)


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
    n_max = int(counts.max())
    valid = counts > 0
    if not bool(valid.any()):
        raise ValueError("tripletops.reid_metrics: no query has a match in the gallery once its own camera's "
                         "images of its identity are left out; check query_ids/gallery_ids and the camera ids")
    first = torch.cumsum(counts, 0) - counts  # each query's first pair in (qi, gi)

    # A rank depends on the non-matches only through p(row) = the number of the query's
    # matches ranked before the row: the t-th match's rank is t + #{rows: p(row) < t}
    # (which match is which does not matter). p is counted from the GEMM-form keys where
    # no match key lies within the bound w of the row's, and from exact keys otherwise.
    hist = torch.zeros(Q, n_max + 1, dtype=torch.int64, device=dev)  # p in [0, n_max]
    # Every query's matches: GEMM-form keys (row dot products: any summation order is
    # within the bound), sorted per query and padded with +inf; slot = place in (qi, gi).
    slot = torch.arange(qi.numel(), device=dev) - first[qi]
    Ka = torch.full((Q, n_max + 1), math.inf, dtype=q.gemm.dtype, device=dev)
    Ka[qi, slot] = _pair_gemm_keys(q, qi, g, gi, metric)
    Ka, order = torch.sort(Ka, dim=1)
    MI = torch.full((Q, n_max + 1), G, dtype=torch.int64, device=dev)
    MI[qi, slot] = gi
    band = _BandKeys(q, g, MI.gather(1, order), G)  # the matches' gallery rows in Ka's order
    last = Ka.gather(1, (counts - 1).clamp(min=0)[:, None])
    last = torch.where(valid[:, None], last, torch.full_like(last, -math.inf))
    step = max(1, _TILE_ELEMS // (n_max + 1))  # counted rows compared at a time
    q_step = max(1, min(Q, 1024))
    g_step = max(1, _TILE_ELEMS // q_step)
    for q0 in range(0, Q, q_step):
        q1 = min(Q, q0 + q_step)
        Kt, w = Ka[q0:q1].contiguous(), bound[q0:q1]
        reach = last[q0:q1] + w  # a row whose key is above this is surely past every match
        for g0 in range(0, G, g_step):
            g1 = min(G, g0 + g_step)
            a = _gemm_keys(q, q0, q1, g, g0, g1, metric)
            # Rows of the query's identity (its matches, its own camera's shots) are not
            # among the others; rows surely past the last match change no rank: few rows
            # are left, compared one by one with their query's match keys.
            ci, cj = (a <= reach).nonzero(as_tuple=True)
            keep = qid[ci + q0] != gid[cj + g0]
            ci, cj = ci[keep], cj[keep]
            if ci.numel() == 0:
                continue
            ak, wk = a[ci, cj], w[ci, 0]
            for s in range(0, ci.numel(), step):
                rows_k = Kt[ci[s:s + step]]
                p_lo = (rows_k < (ak[s:s + step] - wk[s:s + step])[:, None]).sum(1)  # surely before
                p_hi = (rows_k <= (ak[s:s + step] + wk[s:s + step])[:, None]).sum(1)  # maybe before
                sure = p_lo == p_hi
                hist.index_put_((ci[s:s + step][sure] + q0, p_lo[sure]), torch.ones_like(p_lo[sure]),
                                accumulate=True)
                if not bool(sure.all()):
                    ui, uj = ci[s:s + step][~sure] + q0, cj[s:s + step][~sure] + g0
                    _count_exactly(q, g, ui, uj, p_lo[~sure], p_hi[~sure], band, hist)

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
    gen_i, gen_j, gen_lo, gen_hi = [], [], [], []
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
        bt = bound[i0:i1]
        for j0 in range(i0, N, j_step):  # tiles on and above the diagonal
            j1 = min(N, j0 + j_step)
            a = _gemm_keys(r, i0, i1, r, j0, j1, metric)
            upper = torch.arange(j0, j1, device=dev)[None, :] > torch.arange(i0, i1, device=dev)[:, None]
            gen = _genuine_tile(labels, i0, i1, j0, j1) & upper
            gi, gj = gen.nonzero(as_tuple=True)
            if gi.numel():
                gen_i.append(gi + i0)
                gen_j.append(gj + j0)
                gen_lo.append((a - bt)[gi, gj])
                gen_hi.append((a + bt)[gi, gj])
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
    def cat(parts, dtype):
        return torch.cat(parts) if parts else torch.zeros(0, dtype=dtype, device=dev)

    ci, cj = cat(cand_i, torch.int64), cat(cand_j, torch.int64)
    clo, chi = cat(cand_lo, r.gemm.dtype), cat(cand_hi, r.gemm.dtype)
    gi, gj = cat(gen_i, torch.int64), cat(gen_j, torch.int64)
    glo, ghi = cat(gen_lo, r.gemm.dtype), cat(gen_hi, r.gemm.dtype)
    # Every impostor among the cap smallest is a candidate. For each k, with lo_(k+1) and
    # hi_(k+1) the (k+1)-th smallest lower and upper bounds, the exact (k+1)-th smallest
    # key T lies in [lo_(k+1), hi_(k+1)]: the candidates with hi < lo_(k+1) are surely below
    # it (c of them), those with lo > hi_(k+1) surely above, and T is the (k + 1 − c)-th
    # smallest exact key of the rest (the band), which alone is measured.
    lo_sorted, hi_sorted = torch.sort(clo).values, torch.sort(chi).values
    thr = []
    for k in ks:
        t_lo, t_hi = lo_sorted[k], hi_sorted[k]
        below = int((chi < t_lo).sum())
        band = ((chi >= t_lo) & (clo <= t_hi)).nonzero()[:, 0]
        ek = torch.sort(_exact_keys(r, ci[band], r, cj[band])).values
        thr.append(ek[k - below])
    thr_keys = torch.stack(thr)
    # Genuine pairs strictly below each threshold: surely (hi < T), or on exact keys.
    accepted = []
    for t in thr_keys:
        tt = float(t)
        sure = int((ghi.double() < tt).sum())
        band = ((ghi.double() >= tt) & (glo.double() < tt)).nonzero()[:, 0]
        accepted.append(sure + int((_exact_keys(r, gi[band], r, gj[band]) < t).sum()))
    tar = torch.tensor(accepted, dtype=torch.float64) / n_gen
    return {"far": far, "tar": tar.cpu(), "thresholds": _to_distance(thr_keys, metric).cpu(),
            "num_genuine": int(n_gen), "num_impostor": int(M)}
