"""nn.Module wrappers: the functional arguments, fixed at construction."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import _validate
from .batch_hard import batch_hard_loss
from .triplet_margin import triplet_margin_loss


class BatchHardTripletLoss(nn.Module):
    """Module form of `tripletops.batch_hard_loss`.

    Example::

        >>> criterion = tripletops.BatchHardTripletLoss(margin=0.2)
        >>> loss = criterion(embeddings, labels)                     # mine within the batch
        >>> loss = criterion(embeddings, labels, bank_x, bank_y)     # or against a memory bank
    """

    def __init__(self, margin: float = 0.2, metric: str = "euclidean", soft_margin: bool = False,
                 reduction: str = "mean", normalize: bool = False) -> None:
        super().__init__()
        _validate.margin(margin)
        _validate.metric(metric)
        _validate.reduction(reduction)
        self.margin, self.metric, self.soft_margin = margin, metric, soft_margin
        self.reduction, self.normalize = reduction, normalize

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, ref_embeddings: Optional[torch.Tensor] = None,
                ref_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        return batch_hard_loss(embeddings, labels, margin=self.margin, metric=self.metric,
                               soft_margin=self.soft_margin, reduction=self.reduction,
                               ref_embeddings=ref_embeddings, ref_labels=ref_labels, normalize=self.normalize)

    def extra_repr(self) -> str:
        return (f"margin={self.margin}, metric={self.metric!r}, soft_margin={self.soft_margin}, "
                f"reduction={self.reduction!r}, normalize={self.normalize}")


class TripletMarginLoss(nn.Module):
    """Module form of `tripletops.triplet_margin_loss` (a drop-in for ``nn.TripletMarginLoss``).

    Example::

        >>> criterion = tripletops.TripletMarginLoss(margin=1.0, swap=True)
        >>> loss = criterion(anchor, positive, negative)
    """

    def __init__(self, margin: float = 1.0, metric: str = "euclidean", swap: bool = False,
                 reduction: str = "mean", normalize: bool = False) -> None:
        super().__init__()
        _validate.margin(margin)
        _validate.metric(metric)
        _validate.reduction(reduction)
        self.margin, self.metric, self.swap, self.reduction, self.normalize = margin, metric, swap, reduction, normalize

    def forward(self, anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
        return triplet_margin_loss(anchor, positive, negative, margin=self.margin, metric=self.metric,
                                   swap=self.swap, reduction=self.reduction, normalize=self.normalize)

    def extra_repr(self) -> str:
        return (f"margin={self.margin}, metric={self.metric!r}, swap={self.swap}, "
                f"reduction={self.reduction!r}, normalize={self.normalize}")
