"""tripletops: fused C++/CUDA kernels for triplet losses and batch-hard mining.

    >>> loss = tripletops.batch_hard_loss(embeddings, labels, margin=0.2)

The compiled kernels live in ``tripletops._C`` (ops under ``torch.ops.tripletops``);
``tripletops.reference`` holds the pure-PyTorch definitions, used as the fallback
(with a one-time ReferenceFallbackWarning; an error under TRIPLETOPS_STRICT=1).
"""
from . import _ext, _ops  # noqa: F401  (load the library, then register fake kernels and autograd)
from . import distributed, reference
from ._ext import ExtensionInfo, ReferenceFallbackWarning, extension_available
from .batch_hard import batch_hard_loss, batch_hard_mine
from .distance import pairwise_distance
from .modules import (BatchAllTripletLoss, BatchHardTripletLoss, CenterLoss, ContrastiveLoss, CrossBatchMemory,
                      SemiHardTripletLoss, TripletMarginLoss)
from .pair_losses import batch_all_loss, contrastive_loss, semi_hard_loss
from .protocols import reid_metrics, verification_metrics
from .reference import Mined
from .retrieval import Neighbors, knn, retrieval_metrics
from .triplet_margin import triplet_margin_loss

__version__ = "0.1.0"

__all__ = [
    "BatchAllTripletLoss",
    "BatchHardTripletLoss",
    "CenterLoss",
    "ContrastiveLoss",
    "CrossBatchMemory",
    "SemiHardTripletLoss",
    "ExtensionInfo",
    "Mined",
    "Neighbors",
    "ReferenceFallbackWarning",
    "TripletMarginLoss",
    "batch_all_loss",
    "batch_hard_loss",
    "batch_hard_mine",
    "distributed",
    "contrastive_loss",
    "extension_available",
    "knn",
    "pairwise_distance",
    "reference",
    "reid_metrics",
    "retrieval_metrics",
    "semi_hard_loss",
    "triplet_margin_loss",
    "verification_metrics",
]
