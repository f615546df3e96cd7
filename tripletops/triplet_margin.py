"""Triplet margin loss over explicit (anchor, positive, negative) triplets."""
from __future__ import annotations

import torch

from . import _validate, reference
from . import _ext
from ._ext import use_extension


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
    """``max(0, d(a, p) − d(a, n) + margin)`` for each row of three ``(N, D)`` tensors.

    With ``metric="euclidean"`` this equals ``torch.nn.functional.triplet_margin_loss``
    (which adds eps=1e-6 inside its norm; tripletops does not, so its gradient at zero
    distance is exactly 0). At the kink (``d(a, p) − d(a, n) + margin == 0``) the gradient
    passes, as in ``F.triplet_margin_loss``. ``swap=True`` uses ``min(d(a, n), d(p, n))`` (Balntas et al.).

    Args:
        anchor, positive, negative: ``(N, D)`` float tensors, same dtype and device.
        margin: >= 0. metric: ``"euclidean"``, ``"sqeuclidean"`` or ``"cosine"``.
        reduction: ``"mean"``, ``"sum"``, ``"mean_nonzero"`` or ``"none"`` (``(N,)``).
        normalize: L2-normalize the three inputs first.

    Example::

        >>> a, p, n = torch.randn(3, 10, 4).unbind(0)
        >>> tripletops.triplet_margin_loss(a, p, n, margin=1.0)
        tensor(...)
    """
    _validate.rows(anchor, "anchor")
    _validate.like(positive, "positive", anchor, "anchor", same_rows=True)
    _validate.like(negative, "negative", anchor, "anchor", same_rows=True)
    _validate.metric(metric)
    _validate.margin(margin)
    _validate.reduction(reduction)
    _validate.flag(swap, "swap")
    _validate.flag(normalize, "normalize")
    if not use_extension("triplet_margin_loss", anchor):
        return reference._triplet_margin_loss(anchor, positive, negative, margin, metric, swap, reduction, normalize)
    if normalize:
        anchor, positive, negative = (torch.nn.functional.normalize(t, dim=1) for t in (anchor, positive, negative))
    return _ext.ops.triplet_margin_loss(
        anchor, positive, negative, float(margin), metric, bool(swap), reduction
    )[0]
