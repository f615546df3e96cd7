"""Batch-hard mining (Hermans et al. 2017) and its fused triplet loss."""
from __future__ import annotations

from typing import Optional

import torch

from . import _validate, reference
from . import _ext
from ._ext import use_extension
from .reference import Mined, _maybe_normalize


def batch_hard_mine(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    *,
    metric: str = "euclidean",
    ref_embeddings: Optional[torch.Tensor] = None,
    ref_labels: Optional[torch.Tensor] = None,
    normalize: bool = False,
) -> Mined:
    """Every anchor's farthest positive and closest negative, without a B×M matrix.

    Args:
        embeddings: ``(B, D)`` float tensor, the anchors.
        labels: ``(B,)`` integer class ids (only equality counts), or ``(B, L)`` multi-hot
            bool/uint8 labels: then j is a positive of i when they share a label, and a
            row with no label is everyone's negative.
        metric: ``"euclidean"``, ``"sqeuclidean"`` or ``"cosine"``.
        ref_embeddings, ref_labels: optional ``(M, D)`` / ``(M,)`` reference set (a
            memory bank); by default the batch itself, where an anchor is not its own positive.
        normalize: L2-normalize embeddings (and the reference set) first.

    Returns:
        ``Mined(pos_idx, neg_idx, pos_dist, neg_dist, valid)``, each ``(B,)``: indices
        into the reference set (-1 where none; ties go to the smallest index), the exact
        distances in the embeddings' dtype (0 where none), and ``valid`` = both exist.
        No gradient flows through mining.

    Mining is certified: the GEMM-form keys carry a proven rounding bound, and any anchor
    whose best candidate does not beat the runner-up by more than twice that bound is
    settled on exact difference-form distances. So no candidate is misranked by rounding,
    and exact ties go to the smallest index, even far from the origin (docs/numerics.md).

    Example::

        >>> x, y = torch.randn(8, 16), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
        >>> m = tripletops.batch_hard_mine(x, y)
        >>> m.pos_idx[0].item()   # the only other row of class 0
        1
    """
    _validate.mining(embeddings, labels, metric, ref_embeddings, ref_labels)
    _validate.flag(normalize, "normalize")
    with torch.no_grad():
        embeddings, ref_embeddings = _maybe_normalize(normalize, embeddings, ref_embeddings)
        if not use_extension("batch_hard_mine", embeddings):
            return reference._mine(embeddings, labels, ref_embeddings, ref_labels, metric)
        pos_idx, neg_idx, pos_dist, neg_dist = _ext.ops.batch_hard_mine(
            embeddings, labels, ref_embeddings, ref_labels, metric
        )
    dtype = embeddings.dtype
    return Mined(pos_idx, neg_idx, pos_dist.to(dtype), neg_dist.to(dtype), (pos_idx >= 0) & (neg_idx >= 0))


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
    """Batch-hard triplet loss: mining and loss fused, O(B·D) backward.

    For each anchor i with a positive and a negative: ``max(0, d(a, p) − d(a, n) + margin)``
    with p its farthest positive and n its closest negative, or ``softplus(d(a, p) − d(a, n))``
    with ``soft_margin=True``; 0 for an anchor without both. At the hinge's kink the
    gradient passes (``torch.clamp(min=0)``'s convention, in every tripletops loss).

    Args:
        embeddings: ``(B, D)`` float tensor (fp32, fp64, fp16, bf16; halves accumulate in fp32).
        labels: ``(B,)`` integer class ids, or ``(B, L)`` multi-hot bool/uint8 labels
            (positives share a label), as in `batch_hard_mine`.
        margin: the margin, >= 0 (ignored with ``soft_margin=True``).
        metric: ``"euclidean"``, ``"sqeuclidean"`` or ``"cosine"``.
        soft_margin: use softplus instead of the hinge.
        reduction: ``"mean"`` over valid anchors, ``"mean_nonzero"`` over anchors with
            loss > 0, ``"sum"``, or ``"none"`` for the ``(B,)`` per-anchor losses. An empty
            denominator gives exactly 0 and zero gradients.
        ref_embeddings, ref_labels: optional ``(M, D)`` / ``(M,)`` reference set (e.g. a
            cross-batch memory); gradients flow to it when it requires grad.
        normalize: L2-normalize embeddings (and the reference set) first.

    Returns:
        A scalar (or ``(B,)`` for ``reduction="none"``) in the embeddings' dtype.

    Example::

        >>> x = torch.randn(32, 64, requires_grad=True)
        >>> y = torch.arange(8).repeat_interleave(4)
        >>> loss = tripletops.batch_hard_loss(x, y, margin=0.2)
        >>> loss.backward()
    """
    _validate.mining(embeddings, labels, metric, ref_embeddings, ref_labels)
    _validate.margin(margin)
    _validate.reduction(reduction)
    _validate.flag(soft_margin, "soft_margin")
    _validate.flag(normalize, "normalize")
    embeddings, ref_embeddings = _maybe_normalize(normalize, embeddings, ref_embeddings)
    if not use_extension("batch_hard_loss", embeddings):
        return reference._batch_hard_loss(
            embeddings, labels, margin, metric, soft_margin, reduction, ref_embeddings, ref_labels
        )
    return _ext.ops.batch_hard_loss(
        embeddings, labels, ref_embeddings, ref_labels, float(margin), metric, bool(soft_margin), reduction
    )[0]


def _settle_stats(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    *,
    metric: str = "euclidean",
    ref_embeddings: Optional[torch.Tensor] = None,
    ref_labels: Optional[torch.Tensor] = None,
) -> tuple:
    """Diagnostics of certified mining, for benchmarks and tests (not public API).

    Mines as :func:`batch_hard_mine` does and returns ``(settled, rescanned)``: how many
    anchors' choice did not clear its rounding bound and was settled on exact distances,
    and how many of those rescanned the reference set (CPU: all of them, by a GEMM over
    just those anchors; CUDA: those whose window holds more candidates than the mining
    state keeps). Needs the compiled extension for the embeddings' device.
    """
    _validate.mining(embeddings, labels, metric, ref_embeddings, ref_labels)
    if not use_extension("batch_hard_mine", embeddings):
        raise RuntimeError("tripletops._settle_stats needs the compiled extension for this device")
    with torch.no_grad():
        stats = _ext.ops.batch_hard_settle_stats(embeddings, labels, ref_embeddings, ref_labels, metric)
    settled, rescanned = stats.tolist()
    return settled, rescanned
