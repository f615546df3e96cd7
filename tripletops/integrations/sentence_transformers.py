"""sentence-transformers' batch triplet losses on tripletops' fused kernels: change one import.

    # from sentence_transformers.losses import BatchHardTripletLoss
    from tripletops.integrations.sentence_transformers import BatchHardTripletLoss

    loss = BatchHardTripletLoss(model)   # same arguments, same values, no B x B matrix

Each class here is a subclass of sentence-transformers' own (built when first used, so
importing this module does not import sentence-transformers): the constructor,
``forward(sentence_features, labels)``, ``compute_loss_from_embeddings``,
``get_config_dict``, ``citation`` and the model card are the original's. Only the loss
itself is replaced, and it reproduces the original's values, including where
sentence-transformers' rules differ from tripletops' own (docs/integration.md):

- ``BatchHardTripletLoss`` / ``BatchHardSoftMarginTripletLoss`` average over *every*
  anchor: an anchor with no positive counts with a positive distance of 0, an anchor with
  no negative with its farthest row as the "negative" (so a one-class batch gives the
  margin, or softplus(0)).
- ``BatchAllTripletLoss`` averages over the triplets whose loss is positive.
- ``BatchSemiHardTripletLoss`` averages over the anchor-positive pairs; in a one-class
  batch (no negative anywhere) each pair counts max(0, d(a, p) + margin), as the
  original's masked maximum gives.

``distance_metric`` takes sentence-transformers' own functions,
``BatchHardTripletLossDistanceFunction.euclidean_distance`` (alias
``eucledian_distance``) and ``cosine_distance``; any other callable raises ValueError at
construction. Values agree with the originals to floating-point rounding (the originals
form euclidean distances from the Gram matrix; tripletops' are exact).
"""
from __future__ import annotations

import importlib
from typing import Any, Dict

import torch
import torch.nn.functional as F

import tripletops

__all__ = ["BatchHardTripletLoss", "BatchSemiHardTripletLoss", "BatchAllTripletLoss",
           "BatchHardSoftMarginTripletLoss"]

_built: Dict[str, type] = {}


def _st_losses():
    try:
        return importlib.import_module("sentence_transformers.sentence_transformer.losses")
    except ImportError:  # sentence-transformers < 6
        try:
            return importlib.import_module("sentence_transformers.losses")
        except ImportError as e:
            raise ImportError("tripletops.integrations.sentence_transformers needs sentence-transformers "
                              "(pip install sentence-transformers)") from e


def _metric_of(distance_metric: Any) -> str:
    """tripletops' metric for one of sentence-transformers' distance functions."""
    fns = _st_losses().BatchHardTripletLossDistanceFunction
    if distance_metric is fns.euclidean_distance or distance_metric is getattr(fns, "eucledian_distance", None):
        return "euclidean"
    if distance_metric is fns.cosine_distance:
        return "cosine"
    name = getattr(distance_metric, "__qualname__", None) or repr(distance_metric)
    raise ValueError("tripletops: distance_metric must be sentence-transformers' "
                     "BatchHardTripletLossDistanceFunction.euclidean_distance (or its alias eucledian_distance) "
                     f"or BatchHardTripletLossDistanceFunction.cosine_distance, got {name}; other distances "
                     "have no fused kernel (use sentence-transformers' own loss for them)")


def _checked(loss, labels: torch.Tensor, embeddings: torch.Tensor):
    """The original's label check and flattening; halves in fp32 under euclidean, as the
    original's euclidean_distance computes them."""
    batch_size = embeddings.shape[0]
    if labels.numel() != batch_size:
        raise ValueError(f"{loss.__class__.__name__} expects {batch_size} labels (one per example), "
                         f"but got {labels.numel()} labels with shape {tuple(labels.shape)}.")
    if loss._tripletops_metric == "euclidean" and embeddings.dtype in (torch.float16, torch.bfloat16):
        embeddings = embeddings.float()
    return labels.reshape(-1), embeddings


def _pair_distance(a: torch.Tensor, b: torch.Tensor, metric: str) -> torch.Tensor:
    """Differentiable distances of matched rows (B x D work): euclidean with a zero
    gradient at distance 0 (as the original's masked sqrt), cosine as 1 - cos clamped at 0."""
    if metric == "cosine":
        return (1 - (F.normalize(a, dim=1) * F.normalize(b, dim=1)).sum(1)).clamp(min=0.0)
    sq = (a - b).square().sum(1)
    pos = sq > 0
    return torch.where(pos, sq.where(pos, torch.ones_like(sq)).sqrt(), torch.zeros_like(sq))


def _hardest(loss, labels: torch.Tensor, embeddings: torch.Tensor):
    """Every anchor's (d(a, hardest positive), d(a, hardest negative)) under the original's
    rules: 0 where no positive; the farthest row (the hardest positive, or 0) where no
    negative. Mining is tripletops' exact one; the distances carry the gradient."""
    metric = loss._tripletops_metric
    m = tripletops.batch_hard_mine(embeddings, labels, metric=metric)
    has_pos, has_neg = m.pos_idx >= 0, m.neg_idx >= 0
    d_pos = _pair_distance(embeddings, embeddings[m.pos_idx.clamp(min=0)], metric)
    d_pos = torch.where(has_pos, d_pos, torch.zeros_like(d_pos))
    d_neg = _pair_distance(embeddings, embeddings[m.neg_idx.clamp(min=0)], metric)
    return d_pos, torch.where(has_neg, d_neg, d_pos)


def _build(name: str) -> type:
    st = _st_losses()
    default = st.BatchHardTripletLossDistanceFunction.euclidean_distance

    class BatchHardTripletLoss(st.BatchHardTripletLoss):
        __doc__ = st.BatchHardTripletLoss.__doc__

        def __init__(self, model, distance_metric=default, margin: float = 5) -> None:
            metric = _metric_of(distance_metric)  # before anything is built
            super().__init__(model, distance_metric=distance_metric, margin=margin)
            self._tripletops_metric = metric

        def batch_hard_triplet_loss(self, labels: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
            labels, embeddings = _checked(self, labels, embeddings)
            # The original's rules as explicit triplets for the fused triplet kernel: an
            # anchor with no positive is its own positive (distance 0), one with no
            # negative takes its hardest positive (or itself) as the negative, so its term
            # is the margin with a gradient of exactly 0.
            m = tripletops.batch_hard_mine(embeddings, labels, metric=self._tripletops_metric)
            own = torch.arange(labels.numel(), device=labels.device)
            p = torch.where(m.pos_idx >= 0, m.pos_idx, own)
            n = torch.where(m.neg_idx >= 0, m.neg_idx, p)
            return tripletops.triplet_margin_loss(embeddings, embeddings[p], embeddings[n], margin=self.triplet_margin,
                                                  metric=self._tripletops_metric, reduction="mean")

    class BatchHardSoftMarginTripletLoss(st.BatchHardSoftMarginTripletLoss):
        __doc__ = st.BatchHardSoftMarginTripletLoss.__doc__

        def __init__(self, model, distance_metric=default) -> None:
            metric = _metric_of(distance_metric)
            super().__init__(model, distance_metric=distance_metric)
            self._tripletops_metric = metric

        def batch_hard_triplet_soft_margin_loss(self, labels: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
            labels, embeddings = _checked(self, labels, embeddings)
            d_pos, d_neg = _hardest(self, labels, embeddings)
            return F.softplus(d_pos - d_neg).mean()

    class BatchAllTripletLoss(st.BatchAllTripletLoss):
        __doc__ = st.BatchAllTripletLoss.__doc__

        def __init__(self, model, distance_metric=default, margin: float = 5) -> None:
            metric = _metric_of(distance_metric)
            super().__init__(model, distance_metric=distance_metric, margin=margin)
            self._tripletops_metric = metric

        def batch_all_triplet_loss(self, labels: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
            labels, embeddings = _checked(self, labels, embeddings)
            # The mean over the triplets whose loss is positive (0 if none): mean_nonzero.
            return tripletops.batch_all_loss(embeddings, labels, margin=self.triplet_margin,
                                             metric=self._tripletops_metric, reduction="mean_nonzero")

    class BatchSemiHardTripletLoss(st.BatchSemiHardTripletLoss):
        __doc__ = st.BatchSemiHardTripletLoss.__doc__

        def __init__(self, model, distance_metric=default, margin: float = 5) -> None:
            metric = _metric_of(distance_metric)
            super().__init__(model, distance_metric=distance_metric, margin=margin)
            self._tripletops_metric = metric

        def batch_semi_hard_triplet_loss(self, labels: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
            labels, embeddings = _checked(self, labels, embeddings)
            metric = self._tripletops_metric
            # One class (no negative anywhere; reads the labels: a sync on CUDA): every pair
            # a != p counts max(0, d(a, p) + margin), as the original's masked maximum gives.
            if labels.numel() > 1 and bool((labels == labels[0]).all()):
                d = tripletops.pairwise_distance(embeddings, metric=metric)
                off = ~torch.eye(labels.numel(), dtype=torch.bool, device=labels.device)
                return (d[off] + self.margin).clamp(min=0).mean()
            return tripletops.semi_hard_loss(embeddings, labels, margin=self.margin, metric=metric)

    for cls in (BatchHardTripletLoss, BatchHardSoftMarginTripletLoss, BatchAllTripletLoss, BatchSemiHardTripletLoss):
        cls.__module__ = __name__
        _built[cls.__name__] = cls
    return _built[name]


def __getattr__(name: str) -> type:
    """The classes are made on first use, as subclasses of the installed
    sentence-transformers' own (PEP 562)."""
    if name in __all__:
        return _built.get(name) or _build(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
