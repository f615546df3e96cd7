"""Pure-PyTorch twins of every tripletops function: the readable definition, the
test oracle (run them in float64), and the fallback when the kernels are missing.

They build the full distance matrix, so they cost O(B*M) memory: fine as a
definition, not as a training loss against a large memory bank.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from . import _validate

__all__ = ["Mined", "Neighbors", "knn", "pairwise_distance", "batch_hard_mine", "batch_hard_loss", "triplet_margin_loss", "batch_all_loss",
           "semi_hard_loss", "contrastive_loss"]


class Mined(NamedTuple):
    """Result of batch-hard mining, one entry per anchor (shape (B,) each).

    pos_idx / neg_idx index the reference set (the batch itself when no
    ref_embeddings), -1 where the anchor has no positive / negative; pos_dist /
    neg_dist are the exact distances to them (0 where none); valid marks anchors
    with both.
    """

    pos_idx: torch.Tensor
    neg_idx: torch.Tensor
    pos_dist: torch.Tensor
    neg_dist: torch.Tensor
    valid: torch.Tensor


class Neighbors(NamedTuple):
    """Result of `knn`: ``dist`` and ``idx``, ``(Q, k)`` each, nearest first. ``idx`` holds
    int64 gallery rows (-1 where the gallery has fewer than k rows to offer), ``dist`` the
    exact distances in the queries' dtype (+inf where no neighbour)."""

    dist: torch.Tensor
    idx: torch.Tensor


def knn(queries: torch.Tensor, gallery: Optional[torch.Tensor] = None, *, k: int, metric: str = "euclidean",
        exclude_self: Optional[bool] = None, normalize: bool = False) -> Neighbors:
    """The k nearest gallery rows of every query; see `tripletops.knn`."""
    _validate.search(queries, gallery, k, metric, exclude_self, normalize)
    with torch.no_grad():
        queries, gallery = _maybe_normalize(normalize, queries, gallery)
        exclude = (gallery is None) if exclude_self is None else bool(exclude_self)
        dist, idx = _knn(queries, gallery, int(k), metric, exclude)
    return Neighbors(dist.to(queries.dtype), idx)


def _knn(queries, gallery, k: int, metric: str, exclude_self: bool):
    """(dist, idx) in the compute dtype: the distances of `_pairwise_distance`, a block of
    queries at a time (O(block * G) memory), stably sorted, so ties go to the smallest
    index and NaN distances rank last."""
    x = _compute(queries)
    y = x if gallery is None else _compute(gallery)
    Q, G = x.shape[0], y.shape[0]
    dist = x.new_full((Q, k), float("inf"))
    idx = torch.full((Q, k), -1, dtype=torch.int64, device=x.device)
    block = max(1, (1 << 22) // G)
    for q0 in range(0, Q, block):
        d = _pairwise_distance(x[q0:q0 + block], y, metric)
        rows = torch.arange(q0, q0 + d.shape[0], device=x.device)
        order = torch.sort(d, dim=1, stable=True).indices
        n = min(k, G)
        if exclude_self:  # gallery row i moves to the end of query i's order, and is then dropped
            is_self = order == rows[:, None]
            rank = torch.arange(G, device=x.device) + is_self * G
            order = order.gather(1, rank.argsort(dim=1))
        top = order[:, :n]
        found = top != rows[:, None] if exclude_self else torch.ones_like(top, dtype=torch.bool)
        dist[q0:q0 + d.shape[0], :n] = torch.where(found, d.gather(1, top), torch.full_like(d[:, :n], float("inf")))
        idx[q0:q0 + d.shape[0], :n] = torch.where(found, top, torch.full_like(top, -1))
    return dist, idx


def pairwise_distance(x: torch.Tensor, y: Optional[torch.Tensor] = None, *, metric: str = "euclidean") -> torch.Tensor:
    """(N, D), (M, D) -> (N, M) distances; see `tripletops.pairwise_distance`."""
    _validate.rows(x, "x")
    if y is not None:
        _validate.like(y, "y", x, "x", same_rows=False)
    _validate.metric(metric)
    return _pairwise_distance(x, x if y is None else y, metric)


def _pairwise_distance(x: torch.Tensor, y: torch.Tensor, metric: str) -> torch.Tensor:
    if metric == "cosine":
        return 1 - F.normalize(x, dim=1, eps=1e-12) @ F.normalize(y, dim=1, eps=1e-12).T
    # The difference form: exact (no |x|^2 + |y|^2 - 2xy cancellation), and cdist's
    # backward gives 0 at zero distance.
    if metric == "sqeuclidean":
        return _squared_distances(x, y)
    return torch.cdist(x, y, compute_mode="donot_use_mm_for_euclid_dist")


def _squared_distances(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """|x_i - y_j|^2 summed from the differences, never the square of a square root (which
    rounds twice and moves a term at a kink: sqrt(2)^2 = 2 + 4.4e-16). Blocks of rows keep
    the (rows, M, D) differences at most 2^24 entries."""
    N, M, D = x.shape[0], y.shape[0], x.shape[1]
    block = max(1, (1 << 24) // max(1, M * D))
    parts = [(x[i:i + block, None, :] - y[None, :, :]).square().sum(-1) for i in range(0, N, block)]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def shared_labels(labels: torch.Tensor, ref_labels: torch.Tensor) -> torch.Tensor:
    """(B, M) bool: whether row i and reference row j are of a class. Class ids: equal
    ids. Multi-hot (B, L) labels: at least one label in common (the definition of DPSH
    and the deep-hashing literature), so a row with no label is a positive of nobody and
    a negative of everyone.

    Example::

        >>> y = torch.tensor([[1, 0, 1], [0, 1, 1], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
        >>> shared_labels(y, y).int()
        tensor([[1, 1, 1, 0],
                [1, 1, 0, 0],
                [1, 0, 1, 0],
                [0, 0, 0, 0]], dtype=torch.int32)
    """
    if labels.dim() == 1:
        return labels[:, None] == ref_labels[None, :]
    # Counts of common labels, exact in float64 (L < 2^53).
    return (labels.double() @ ref_labels.double().T) > 0


def _mine(embeddings, labels, ref_embeddings, ref_labels, metric) -> Mined:
    self_mining = ref_embeddings is None
    ref = embeddings if self_mining else ref_embeddings
    ref_lab = labels if self_mining else ref_labels
    d = _pairwise_distance(embeddings, ref, metric)
    # A distance involving a row with NaN/Inf is NaN, so it wins max/min below and
    # the loss comes out NaN rather than finite and wrong.
    finite = torch.isfinite(embeddings).all(1)[:, None] & torch.isfinite(ref).all(1)[None, :]
    d = d.masked_fill(~finite, float("nan"))

    same = shared_labels(labels, ref_lab)
    is_pos, is_neg = same, ~same
    if self_mining:  # an anchor is neither its own positive nor (with no label) its own negative
        eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
        is_pos, is_neg = same & ~eye, ~same & ~eye
    # torch.max / torch.min return the first (smallest) index among ties and propagate NaN.
    pos_dist, pos_idx = d.masked_fill(~is_pos, float("-inf")).max(dim=1)
    neg_dist, neg_idx = d.masked_fill(~is_neg, float("inf")).min(dim=1)
    has_pos, has_neg = is_pos.any(1), is_neg.any(1)
    pos_idx = torch.where(has_pos, pos_idx, -1)
    neg_idx = torch.where(has_neg, neg_idx, -1)
    pos_dist = torch.where(has_pos, pos_dist, torch.zeros_like(pos_dist))
    neg_dist = torch.where(has_neg, neg_dist, torch.zeros_like(neg_dist))
    return Mined(pos_idx, neg_idx, pos_dist, neg_dist, has_pos & has_neg)


def batch_hard_mine(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    *,
    metric: str = "euclidean",
    ref_embeddings: Optional[torch.Tensor] = None,
    ref_labels: Optional[torch.Tensor] = None,
    normalize: bool = False,
) -> Mined:
    """Every anchor's farthest positive and closest negative; see `tripletops.batch_hard_mine`."""
    _validate.mining(embeddings, labels, metric, ref_embeddings, ref_labels)
    with torch.no_grad():
        embeddings, ref_embeddings = _maybe_normalize(normalize, embeddings, ref_embeddings)
        return _mine(embeddings, labels, ref_embeddings, ref_labels, metric)


def _maybe_normalize(normalize, x, ref):
    if not normalize:
        return x, ref
    return F.normalize(x, dim=1), (None if ref is None else F.normalize(ref, dim=1))


def _triplet_term(diff: torch.Tensor, margin: float, soft_margin: bool) -> torch.Tensor:
    # logaddexp(x, 0) = softplus(x) exactly (F.softplus turns linear above x = 20); clamp keeps NaN.
    return torch.logaddexp(diff, torch.zeros_like(diff)) if soft_margin else torch.clamp(diff + margin, min=0)


def _reduce(per_item: torch.Tensor, counted: torch.Tensor, reduction: str) -> torch.Tensor:
    """counted: the items in the "mean" denominator. An empty denominator gives exactly 0
    and zero gradients (every term at or below its kink under "mean_nonzero" included); a
    NaN among the items still shows."""
    if reduction == "none":
        return per_item
    total = per_item.sum()
    if reduction == "sum":
        return total
    count = counted.sum() if reduction == "mean" else (per_item > 0).sum()
    return torch.where(count > 0, total / count.clamp(min=1), total * 0)


def _batch_hard_loss(embeddings, labels, margin, metric, soft_margin, reduction, ref_embeddings, ref_labels):
    ref = embeddings if ref_embeddings is None else ref_embeddings
    with torch.no_grad():
        mined = _mine(embeddings, labels, ref_embeddings, ref_labels, metric)
    # Differentiable distances of the selected pairs only, recomputed from the rows.
    pos = ref[mined.pos_idx.clamp(min=0)]
    neg = ref[mined.neg_idx.clamp(min=0)]
    d_ap = _pairwise_distance_rows(embeddings, pos, metric)
    d_an = _pairwise_distance_rows(embeddings, neg, metric)
    loss = _triplet_term(d_ap - d_an, margin, soft_margin)
    finite = torch.isfinite(embeddings).all(1) & torch.isfinite(pos).all(1) & torch.isfinite(neg).all(1)
    loss = torch.where(finite, loss, torch.full_like(loss, float("nan")))
    loss = torch.where(mined.valid, loss, torch.zeros_like(loss))
    return _reduce(loss, mined.valid, reduction)


def _pairwise_distance_rows(a: torch.Tensor, b: torch.Tensor, metric: str) -> torch.Tensor:
    """d(a[i], b[i]) for each row i."""
    if metric == "cosine":
        return 1 - (F.normalize(a, dim=1, eps=1e-12) * F.normalize(b, dim=1, eps=1e-12)).sum(1)
    if metric == "sqeuclidean":  # from the differences, never a square root squared
        return (a - b).square().sum(1)
    # vector_norm's backward is 0 at zero distance (a plain sqrt would give NaN).
    return torch.linalg.vector_norm(a - b, dim=1)


def batch_hard_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    *,
    margin: float = 0.2,
    metric: str = "euclidean",
    soft_margin: bool = False,
    reduction: str = "mean",
    ref_embeddings: Optional[torch.Tensor] = None,
    ref_labels: Optional[torch.Tensor] = None,
    normalize: bool = False,
) -> torch.Tensor:
    """Batch-hard triplet loss (Hermans et al. 2017); see `tripletops.batch_hard_loss`."""
    _validate.mining(embeddings, labels, metric, ref_embeddings, ref_labels)
    _validate.margin(margin)
    _validate.reduction(reduction)
    embeddings, ref_embeddings = _maybe_normalize(normalize, embeddings, ref_embeddings)
    return _batch_hard_loss(embeddings, labels, margin, metric, soft_margin, reduction, ref_embeddings, ref_labels)


def triplet_margin_loss(
    anchor: torch.Tensor,
    positive: torch.Tensor,
    negative: torch.Tensor,
    *,
    margin: float = 1.0,
    metric: str = "euclidean",
    swap: bool = False,
    reduction: str = "mean",
    normalize: bool = False,
) -> torch.Tensor:
    """Triplet margin loss over explicit triplets; see `tripletops.triplet_margin_loss`."""
    _validate.rows(anchor, "anchor")
    _validate.like(positive, "positive", anchor, "anchor", same_rows=True)
    _validate.like(negative, "negative", anchor, "anchor", same_rows=True)
    _validate.metric(metric)
    _validate.margin(margin)
    _validate.reduction(reduction)
    return _triplet_margin_loss(anchor, positive, negative, margin, metric, swap, reduction, normalize)


def _triplet_margin_loss(anchor, positive, negative, margin, metric, swap, reduction, normalize):
    if normalize:
        anchor, positive, negative = (F.normalize(t, dim=1) for t in (anchor, positive, negative))
    d_ap = _pairwise_distance_rows(anchor, positive, metric)
    d_neg = _pairwise_distance_rows(anchor, negative, metric)
    if swap:
        d_pn = _pairwise_distance_rows(positive, negative, metric)
        d_neg = torch.where(d_pn < d_neg, d_pn, d_neg)
    loss = torch.clamp(d_ap - d_neg + margin, min=0)
    finite = torch.isfinite(anchor).all(1) & torch.isfinite(positive).all(1) & torch.isfinite(negative).all(1)
    loss = torch.where(finite, loss, torch.full_like(loss, float("nan")))
    return _reduce(loss, torch.ones_like(finite), reduction)


# ---- the rest of the family: every triplet, semi-hard, contrastive ---------------------


def _masked_distances(embeddings: torch.Tensor, labels: torch.Tensor, metric: str):
    """(B, B) distances (NaN wherever a row is not finite), positive and negative masks."""
    d = _pairwise_distance(embeddings, embeddings, metric)
    finite = torch.isfinite(embeddings).all(1)
    d = d.masked_fill(~(finite[:, None] & finite[None, :]), float("nan"))
    same = shared_labels(labels, labels)
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    return d, same & ~eye, ~same & ~eye


def _compute(x: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 accumulate in fp32."""
    return x if x.dtype == torch.float64 else x.float()


def batch_all_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    *,
    margin: float = 0.2,
    metric: str = "euclidean",
    soft_margin: bool = False,
    reduction: str = "mean_nonzero",
    normalize: bool = False,
) -> torch.Tensor:
    """Triplet loss over every valid triplet (a, p, n); see `tripletops.batch_all_loss`.

    The readable definition: it builds all B³ triplet terms, so it needs B³ memory.
    """
    _validate.family(embeddings, labels, metric, reduction, margin, batch_all=True)
    embeddings, _ = _maybe_normalize(normalize, embeddings, None)
    d, pos, neg = _masked_distances(_compute(embeddings), labels, metric)
    valid = pos[:, :, None] & neg[:, None, :]                     # (a, p, n)
    terms = _triplet_term(d[:, :, None] - d[:, None, :], margin, soft_margin)
    terms = torch.where(valid, terms, torch.zeros_like(terms))
    return _reduce(terms.flatten(), valid.flatten(), reduction).to(embeddings.dtype)


def semi_hard_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    *,
    margin: float = 1.0,
    metric: str = "euclidean",
    normalize: bool = False,
) -> torch.Tensor:
    """FaceNet semi-hard triplet loss, TF-Addons ``TripletSemiHardLoss`` semantics; see
    `tripletops.semi_hard_loss`. B³ memory, like TF-Addons' own formulation."""
    _validate.family(embeddings, labels, metric, "mean", margin)
    embeddings, _ = _maybe_normalize(normalize, embeddings, None)
    d, pos, neg = _masked_distances(_compute(embeddings), labels, metric)
    d_ap = d[:, :, None]                                          # (a, p, 1)
    d_an = d[:, None, :]                                          # (a, 1, n)
    farther = neg[:, None, :] & (d_an > d_ap)                     # negatives farther than p
    inf = torch.full_like(d_an, float("inf"))
    semi = torch.where(farther, d_an, inf).min(dim=2).values      # the closest of them
    hardest_far = torch.where(neg, d, torch.full_like(d, float("-inf"))).max(dim=1).values  # farthest negative
    d_n = torch.where(farther.any(dim=2), semi, hardest_far[:, None])
    counted = pos & neg.any(dim=1)[:, None]                       # pairs whose anchor has a negative
    loss = torch.clamp(d - d_n + margin, min=0)
    # A NaN among an anchor's distances makes its pairs NaN (comparisons would hide it).
    row_nan = (torch.isnan(d) & (pos | neg)).any(dim=1)
    loss = torch.where(row_nan[:, None], torch.full_like(loss, float("nan")), loss)
    loss = torch.where(counted, loss, torch.zeros_like(loss))
    return _reduce(loss.flatten(), counted.flatten(), "mean").to(embeddings.dtype)


def contrastive_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    *,
    pos_margin: float = 0.0,
    neg_margin: float = 1.0,
    metric: str = "euclidean",
    reduction: str = "mean_nonzero",
    normalize: bool = False,
) -> torch.Tensor:
    """All-pairs contrastive loss; see `tripletops.contrastive_loss`."""
    _validate.contrastive(embeddings, labels, metric, reduction, pos_margin, neg_margin)
    embeddings, _ = _maybe_normalize(normalize, embeddings, None)
    return _contrastive(_pairwise_distance(_compute(embeddings), _compute(embeddings), metric), embeddings, labels,
                        pos_margin, neg_margin, reduction)


def _contrastive(d, embeddings, labels, pos_margin, neg_margin, reduction):
    """The contrastive terms of pairs i < j of a (B, B) distance matrix, reduced."""
    i, j = torch.triu_indices(len(labels), len(labels), offset=1, device=labels.device)
    dij = d[i, j]
    finite = torch.isfinite(embeddings).all(1)
    dij = torch.where(finite[i] & finite[j], dij, torch.full_like(dij, float("nan")))
    same = shared_labels(labels, labels)[i, j]
    loss = torch.where(same, torch.clamp(dij - pos_margin, min=0), torch.clamp(neg_margin - dij, min=0))
    return _reduce(loss, torch.ones_like(same), reduction).to(embeddings.dtype)
