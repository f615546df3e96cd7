"""The losses over every triplet or pair of a batch: batch-all, semi-hard, contrastive.

Each is one op (csrc/cpu/loss_family_cpu.cpp, csrc/cuda/loss_family_cuda.cu) that builds
the batch's (B, B) distance matrix with the `pairwise_distance` kernel (a GEMM plus an
exact recompute of close pairs; exact differences for small batches on CPU) and reduces
it per anchor row (on CUDA one block per row, then one block for the loss, on the
device). Batch-all and semi-hard work on float64 distances for every input dtype: they
sum small differences of distances (d(a,p) + m − d(a,n) near the hinge), so the few-ulp
error of float32 distances would reach ~1e-5 of the loss. Contrastive works on
compute-dtype distances. Memory is O(B²) (on CUDA a few (B, B) buffers: the distances,
each row's sorted negatives and their prefix sums), never the O(B³) of the textbook
formulations, and the backward ends in `pairwise_distance`'s O(B²·D) one. Results have
the input's dtype.
"""
from __future__ import annotations

import torch

from . import _validate, reference
from . import _ext
from ._ext import use_extension
from .reference import _maybe_normalize


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
    """Triplet loss over every valid triplet (a, p, n) of the batch, without a B³ tensor.

    Each triplet (p a positive of a, n a negative) contributes ``max(0, d(a,p) − d(a,n) +
    margin)``, or ``softplus(d(a,p) − d(a,n))`` with ``soft_margin=True``. At the hinge's
    kink the gradient passes (``torch.clamp(min=0)``'s convention).

    Args:
        embeddings: ``(B, D)`` float tensor; labels: ``(B,)`` integer class ids, or ``(B, L)``
            multi-hot bool/uint8 labels (positives share a label; see `batch_hard_mine`).
        reduction: ``"mean_nonzero"`` (over triplets with loss > 0; the default, as in
            pytorch-metric-learning's AvgNonZeroReducer), ``"mean"`` (over all valid
            triplets) or ``"sum"``. There is no ``"none"``: it would be B³ values.
        margin, metric, soft_margin, normalize: as in `batch_hard_loss`.

    With the hinge the kernel sorts each anchor's negatives once, so the cost is
    O(B² log B) plus the distance matrix's O(B²·D); the soft margin touches every triplet
    (O(B·Σ|P|·|N|), no memory for it). An empty denominator gives exactly 0.

    Example::

        >>> loss = tripletops.batch_all_loss(x, y, margin=0.2)   # mean over nonzero triplets
    """
    _validate.family(embeddings, labels, metric, reduction, margin, batch_all=True)
    _validate.flag(soft_margin, "soft_margin")
    _validate.flag(normalize, "normalize")
    embeddings, _ = _maybe_normalize(normalize, embeddings, None)
    if not use_extension("batch_all_loss", embeddings):
        return reference.batch_all_loss(embeddings, labels, margin=margin, metric=metric, soft_margin=soft_margin,
                                        reduction=reduction)
    return _ext.ops.batch_all_loss(embeddings, labels, float(margin), metric, bool(soft_margin), reduction)[0]


def semi_hard_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    *,
    margin: float = 1.0,
    metric: str = "euclidean",
    normalize: bool = False,
) -> torch.Tensor:
    """FaceNet semi-hard triplet loss with TF-Addons ``TripletSemiHardLoss`` semantics.

    For each anchor–positive pair (a, p): the negative n closest to a among those
    farther from a than p (``d(a,n) > d(a,p)``); if there is none, the farthest negative.
    Ties go to the smallest index. The loss is ``max(0, d(a,p) − d(a,n) + margin)``,
    averaged over the anchor–positive pairs whose anchor has a negative (0 if none). At
    the hinge's kink the gradient passes. Bitwise-identical rows are at bitwise-identical
    distances (0 between them), so the strict comparison never depends on which copy of a
    row it meets.

    Example::

        >>> loss = tripletops.semi_hard_loss(x, y, margin=1.0)
    """
    _validate.family(embeddings, labels, metric, "mean", margin)
    _validate.flag(normalize, "normalize")
    embeddings, _ = _maybe_normalize(normalize, embeddings, None)
    if not use_extension("semi_hard_loss", embeddings):
        return reference.semi_hard_loss(embeddings, labels, margin=margin, metric=metric)
    return _ext.ops.semi_hard_loss(embeddings, labels, float(margin), metric)[0]


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
    """Contrastive loss over all pairs i < j (the Siamese loss of Hadsell et al.).

    Positive pairs (same label) contribute ``max(0, d − pos_margin)``, negative pairs
    ``max(0, neg_margin − d)``.

    Args:
        reduction: ``"mean_nonzero"`` (over pairs with loss > 0; default), ``"mean"``
            (over all B(B−1)/2 pairs), ``"sum"``, or ``"none"`` for the per-pair losses
            in ``torch.triu_indices(B, B, 1)`` order.

    The distance matrix comes from the `pairwise_distance` kernel (fp32 for fp16/bf16/fp32
    inputs, fp64 for fp64); the kernel reduces the pairs i < j from it in float64
    (O(B²), what all-pairs needs). At a margin's kink (``d == pos_margin`` for a positive
    pair, ``d == neg_margin`` for a negative one) the gradient is passed, as
    ``torch.clamp(min=0)`` does.

    Example::

        >>> loss = tripletops.contrastive_loss(x, y, pos_margin=0.0, neg_margin=1.0)
    """
    _validate.contrastive(embeddings, labels, metric, reduction, pos_margin, neg_margin)
    _validate.flag(normalize, "normalize")
    embeddings, _ = _maybe_normalize(normalize, embeddings, None)
    if not use_extension("contrastive_loss", embeddings):
        return reference.contrastive_loss(embeddings, labels, pos_margin=pos_margin, neg_margin=neg_margin,
                                          metric=metric, reduction=reduction)
    return _ext.ops.contrastive_loss(embeddings, labels, float(pos_margin), float(neg_margin), metric, reduction)[0]
