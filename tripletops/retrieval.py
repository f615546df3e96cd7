"""After training: exact k-nearest search and the retrieval metrics of metric-learning papers."""
from __future__ import annotations

import math
import numbers
from typing import Dict, Optional, Sequence, Union

import torch

from . import _ext, _validate, reference
from ._ext import use_extension
from .reference import Neighbors, _maybe_normalize

__all__ = ["Neighbors", "knn", "retrieval_metrics"]


def knn(
    queries: torch.Tensor,
    gallery: Optional[torch.Tensor] = None,
    *,
    k: int,
    metric: str = "euclidean",
    exclude_self: Optional[bool] = None,
    normalize: bool = False,
) -> Neighbors:
    """The k nearest gallery rows of every query, exactly, without a Q×G matrix.

    Args:
        queries: ``(Q, D)`` float tensor (fp32, fp64, fp16, bf16), any strides.
        gallery: ``(G, D)`` tensor with the queries' dtype and device, or None: then the
            queries are searched against themselves.
        k: neighbours per query (>= 1). Above what the gallery offers, the missing ones
            get index -1 and distance +inf.
        metric: ``"euclidean"``, ``"sqeuclidean"`` or ``"cosine"`` (1 − cos, F.normalize's eps).
        exclude_self: query i never finds gallery row i. Default: True without a gallery
            (a query never finds itself), False with one. With a gallery, True means that
            gallery row i is query i (a gallery that starts with the queries).
        normalize: L2-normalize queries and gallery first.

    Returns:
        ``Neighbors(dist, idx)``, ``(Q, k)`` each, nearest first: the exact distances in
        the queries' dtype and int64 gallery rows. Ties go to the smallest index; a NaN
        distance (a row holding NaN, or Inf under cosine) ranks after every number. No
        gradient flows. Past the gallery, idx is -1 (FAISS's padding): ``labels[idx]``
        would silently read the last row there, so mask it first, e.g.
        ``torch.where(idx >= 0, labels[idx.clamp(min=0)], -1)``.

    Exactness: the gallery is walked in tiles of Gram GEMMs; every candidate that could
    reach the k nearest under the GEMM's proven rounding bound is ranked on exact
    difference-form distances in double. So the result equals a float64 brute force,
    indices included (docs/retrieval.md).

    Example::

        >>> x = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
        >>> tripletops.knn(x, k=2).idx[0].tolist()
        [1, 2]
    """
    _validate.search(queries, gallery, k, metric, exclude_self, normalize)
    exclude = (gallery is None) if exclude_self is None else bool(exclude_self)
    if exclude and gallery is not None and gallery.shape[0] < queries.shape[0]:
        raise ValueError(f"tripletops: exclude_self=True means that gallery row i is query i, so the gallery needs at "
                         f"least as many rows as the queries: got {gallery.shape[0]} gallery rows for "
                         f"{queries.shape[0]} queries (pass exclude_self=False, or a gallery that starts with the "
                         "queries)")
    with torch.no_grad():
        queries, gallery = _maybe_normalize(normalize, queries, gallery)
        if use_extension("knn", queries):
            dist, idx = _ext.ops.knn(queries, gallery, int(k), metric, exclude)
        else:
            dist, idx = reference._knn(queries, gallery, int(k), metric, exclude)
    return Neighbors(dist.to(queries.dtype), idx)


def _ks(k: Union[int, Sequence[int]]) -> tuple:
    if isinstance(k, numbers.Integral) and not isinstance(k, bool):
        k = (k,)
    if not isinstance(k, (tuple, list)) or len(k) == 0:
        raise TypeError(f"tripletops: k must be a positive integer or a non-empty sequence of them, got {k!r}")
    return tuple(sorted({_validate.positive_int(v, "each k") for v in k}))


def _relevant_counts(query_labels: torch.Tensor, gallery_labels: torch.Tensor, self_search: bool) -> torch.Tensor:
    """(Q,) int64: the gallery rows relevant to each query (same class; for multi-hot
    labels, at least one label in common), the query itself left out when searching the
    queries against themselves. O(Q + G) memory for class ids, blocks of queries for
    multi-hot labels."""
    if query_labels.dim() == 1:
        values, counts = torch.unique(gallery_labels.long(), return_counts=True)
        q = query_labels.long()
        pos = torch.searchsorted(values, q).clamp(max=values.numel() - 1)
        r = torch.where(values[pos] == q, counts[pos], torch.zeros_like(q))
        return r - 1 if self_search else r
    qf, gf = query_labels.to(torch.float32), gallery_labels.to(torch.float32)
    out = torch.empty(qf.shape[0], dtype=torch.int64, device=qf.device)
    block = max(1, (1 << 22) // max(1, gf.shape[0]))
    for q0 in range(0, qf.shape[0], block):
        out[q0:q0 + block] = ((qf[q0:q0 + block] @ gf.T) > 0).sum(1)
    if self_search:  # a row with a label shares it with itself
        out -= query_labels.any(1).long()
    return out


def _finite_rows(x: torch.Tensor, name: str) -> None:
    """Raises ValueError naming the first row of x that holds NaN or Inf (one host read)."""
    bad = ~torch.isfinite(x).all(1)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(f"tripletops: {name} row {row} holds NaN or Inf ({int(bad.sum())} such rows): retrieval "
                         "metrics of non-finite embeddings mean nothing; drop or fix those rows first")


def _relevance(idx: torch.Tensor, query_labels: torch.Tensor, g_labels: torch.Tensor) -> torch.Tensor:
    """(Q, K) bool: neighbour idx[i, t] exists and is relevant to query i. Multi-hot labels
    are compared a block of queries at a time (at most 2^22 label entries gathered), so
    memory stays O(Q K) beside the labels, not Q K L."""
    found = idx >= 0
    if query_labels.dim() == 1:
        return (g_labels[idx.clamp(min=0)] == query_labels[:, None]) & found
    Q, K = idx.shape
    L = max(1, g_labels.shape[1])
    block = max(1, (1 << 22) // max(1, K * L))
    rel = torch.empty((Q, K), dtype=torch.bool, device=idx.device)
    qb, gb = query_labels.bool(), g_labels.bool()
    for q0 in range(0, Q, block):
        sub = idx[q0:q0 + block].clamp(min=0)
        rel[q0:q0 + block] = (gb[sub] & qb[q0:q0 + block, None, :]).any(-1)
    return rel & found


def retrieval_metrics(
    queries: torch.Tensor,
    query_labels: torch.Tensor,
    gallery: Optional[torch.Tensor] = None,
    gallery_labels: Optional[torch.Tensor] = None,
    *,
    k: Union[int, Sequence[int]] = (1, 5, 10),
    metric: str = "euclidean",
    normalize: bool = False,
) -> Dict[str, object]:
    """Retrieval quality of embeddings, from one exact `knn` search.

    Args:
        queries, query_labels: ``(Q, D)`` embeddings and their ``(Q,)`` class ids or
            ``(Q, L)`` multi-hot bool/uint8 labels.
        gallery, gallery_labels: the ``(G, D)`` set searched and its labels, of the same
            kind; None (both): the queries are searched against themselves, and a query
            is not its own match.
        k: the cut-offs of ``recall_at_k`` (an int or a sequence of ints).
        metric, normalize: as for `knn`.

    Returns:
        A dict of Python floats, with pytorch-metric-learning's ``AccuracyCalculator``
        keys and definitions. Relevant: same class, or for multi-hot labels at least one
        label in common. With R the number of relevant gallery rows of a query:

        - ``precision_at_1``: the nearest neighbour is relevant.
        - ``recall_at_k``: ``{k: fraction of queries with a relevant row among their k
          nearest}`` (R@K of the metric-learning papers).
        - ``r_precision``: the relevant fraction of the R nearest.
        - ``mean_average_precision_at_r``: MAP@R (Musgrave et al. 2020): the mean over
          the R nearest of precision@i at the relevant ones, divided by R.
        - ``mean_reciprocal_rank``: 1 / rank of the first relevant row among the M
          nearest, 0 when none is. M is the largest R over the queries, whatever ``k`` is:
          ``AccuracyCalculator(k="max_bin_count")``'s depth.

        Raises ValueError for a cut-off in ``k`` larger than the gallery (less the query
        itself without a gallery), and for a query or gallery row that holds NaN or Inf:
        metrics of such embeddings mean nothing.

        Each averages over the queries with R >= 1; the others are left out, as
        ``AccuracyCalculator`` leaves out queries whose label has no other row
        (``num_queries_counted`` says how many count). If none counts, each is NaN.

    Example::

        >>> m = tripletops.retrieval_metrics(emb, labels)
        >>> m["precision_at_1"], m["recall_at_k"][5], m["mean_average_precision_at_r"]
    """
    _validate.rows(queries, "queries")
    _validate.labels(query_labels, "query_labels", queries.shape[0], "queries", queries)
    if (gallery is None) != (gallery_labels is None):
        raise ValueError("tripletops: gallery and gallery_labels must be given together (or both None)")
    if gallery is not None:
        _validate.like(gallery, "gallery", queries, "queries", same_rows=False)
        _validate.labels(gallery_labels, "gallery_labels", gallery.shape[0], "gallery", gallery)
        _validate.same_kind(query_labels, gallery_labels, "query_labels", "gallery_labels")
    ks = _ks(k)
    _validate.metric(metric)
    _validate.flag(normalize, "normalize")
    self_search = gallery is None
    g_labels = query_labels if self_search else gallery_labels
    G = queries.shape[0] if self_search else gallery.shape[0]
    available = G - 1 if self_search else G
    if ks[-1] > available:
        raise ValueError(f"tripletops: k={ks[-1]} is larger than the gallery, which offers {available} rows per query"
                         + (" (the queries less the query itself)" if self_search else "")
                         + f": recall@{ks[-1]} would be recall over the whole gallery; pass k <= {available}")
    _finite_rows(queries, "queries")
    if not self_search:
        _finite_rows(gallery, "gallery")
    with torch.no_grad():
        R = _relevant_counts(query_labels, g_labels, self_search)
        depth = int(R.max())  # AccuracyCalculator's k="max_bin_count" (less the query itself)
        K = max(ks[-1], depth)
        nb = knn(queries, gallery, k=max(1, min(K, available)) if available > 0 else 1, metric=metric,
                 normalize=normalize)
        rel = _relevance(nb.idx, query_labels, g_labels)
        counted = R > 0
        n = int(counted.sum())
        out: Dict[str, object] = {"num_queries_counted": n}
        if n == 0:
            nan = math.nan
            out.update(precision_at_1=nan, recall_at_k={kk: nan for kk in ks}, r_precision=nan,
                       mean_average_precision_at_r=nan, mean_reciprocal_rank=nan)
            return out
        rel, Rc = rel[counted], R[counted].to(torch.float64)
        cols = torch.arange(1, rel.shape[1] + 1, device=rel.device)
        within_r = cols[None, :] <= R[counted][:, None]
        relf = rel.to(torch.float64)
        hits = torch.cumsum(relf, 1)
        out["precision_at_1"] = relf[:, 0].mean().item()
        out["recall_at_k"] = {kk: rel[:, :kk].any(1).to(torch.float64).mean().item() for kk in ks}
        out["r_precision"] = ((relf * within_r).sum(1) / Rc).mean().item()
        out["mean_average_precision_at_r"] = ((hits / cols * relf * within_r).sum(1) / Rc).mean().item()
        top = rel[:, :max(1, depth)]
        first = torch.where(top.any(1), 1.0 / (top.to(torch.int8).argmax(1) + 1).to(torch.float64),
                            torch.zeros_like(Rc))
        out["mean_reciprocal_rank"] = first.mean().item()
    return out
