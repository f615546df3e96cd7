"""pytorch-metric-learning's batch-hard miner, triplet margin loss and AccuracyCalculator on
tripletops' kernels: change one import.

    # from pytorch_metric_learning import losses, miners
    from tripletops.integrations import pml as miners, pml as losses

    miner = miners.BatchHardMiner()
    loss_fn = losses.TripletMarginLoss(margin=0.2)
    loss = loss_fn(embeddings, labels, miner(embeddings, labels))

Both classes are subclasses of PML's own (built when first used, so importing this module
does not import PML), with PML's constructors and calls:

- ``BatchHardMiner(distance=...)``: ``miner(embeddings, labels, ref_emb=None,
  ref_labels=None)`` returns PML's ``(anchor_idx, positive_idx, negative_idx)``, every
  anchor that has both a positive and a negative with its farthest positive and closest
  negative, found by tripletops' exact miner (ties to the smallest index).
- ``TripletMarginLoss(margin=0.05, swap=False, smooth_loss=False,
  triplets_per_anchor="all", distance=..., reducer=...)``, called as ``loss(embeddings,
  labels, indices_tuple=None, ref_emb=None, ref_labels=None)``. With the tuple this
  module's miner returned for the same tensors it runs the fused batch-hard kernel; with
  other explicit triplets (or pairs, which PML turns into triplets) the fused triplet
  kernel; without a miner the batch-all kernel. The value is PML's.

- ``AccuracyCalculator(...)``: PML's metric code and keys, its neighbours from
  ``tripletops.knn`` (exact, no FAISS); NMI and AMI (k-means) delegated to PML, refused by
  name when faiss is missing; ``knn_func`` is refused.

Accepted: ``LpDistance`` with p=2 and power 1 (euclidean) or 2 (squared), normalized or
not, and ``CosineSimilarity``; ``MeanReducer`` and ``AvgNonZeroReducer`` (exact types:
``SumReducer`` subclasses ``MeanReducer``). Anything else raises ValueError at
construction; so do ``smooth_loss=True`` and ``triplets_per_anchor`` other than "all"
(no fused kernel: use PML's own loss). ``swap=True`` runs on explicit triplets (a miner's
included) without ``ref_emb``; without a miner it raises.
"""
from __future__ import annotations

import importlib
from typing import Any, Dict, Tuple

import torch

import tripletops

__all__ = ["BatchHardMiner", "TripletMarginLoss", "AccuracyCalculator"]

_built: Dict[str, type] = {}


def _pml(name: str):
    try:
        return importlib.import_module(f"pytorch_metric_learning.{name}")
    except ImportError as e:
        raise ImportError("tripletops.integrations.pml needs pytorch-metric-learning "
                          "(pip install pytorch-metric-learning)") from e


def _metric_of(distance: Any) -> Tuple[str, bool]:
    """(tripletops metric, normalize) for a PML distance; ValueError for any other."""
    d = _pml("distances")
    if type(distance) is d.LpDistance and distance.p == 2 and distance.power in (1, 2):
        return ("euclidean" if distance.power == 1 else "sqeuclidean"), bool(distance.normalize_embeddings)
    if type(distance) is d.CosineSimilarity and distance.power == 1:
        return "cosine", False
    desc = type(distance).__name__ + (f"(p={distance.p}, power={distance.power})" if hasattr(distance, "p") else "")
    raise ValueError("tripletops: distance must be pytorch-metric-learning's LpDistance(p=2, power=1 or 2, "
                     f"normalize_embeddings=True or False) or CosineSimilarity(), got {desc}; other distances "
                     "have no fused kernel (use pytorch-metric-learning's own class)")


def _reduction_of(reducer: Any) -> str:
    r = _pml("reducers")
    if type(reducer) is r.AvgNonZeroReducer:
        return "mean_nonzero"
    if type(reducer) is r.MeanReducer:
        return "mean"
    raise ValueError("tripletops: reducer must be pytorch-metric-learning's MeanReducer or AvgNonZeroReducer "
                     f"(exactly those types), got {type(reducer).__name__}")


class _MinedTriplets(tuple):
    """The miner's (anchor_idx, positive_idx, negative_idx), and what it was mined from,
    so that the loss can run the fused batch-hard kernel on the same tensors."""

    source: tuple

    def matches(self, embeddings, labels, ref_emb, ref_labels, metric_key) -> bool:
        e, y, r, ry, version, key = self.source
        return (e is embeddings and y is labels and r is ref_emb and ry is ref_labels
                and version == embeddings._version and key == metric_key)


def _build(name: str) -> type:
    miners, losses, lmu = _pml("miners"), _pml("losses"), _pml("utils.loss_and_miner_utils")

    class BatchHardMiner(miners.BatchHardMiner):
        __doc__ = miners.BatchHardMiner.__doc__

        def __init__(self, **kwargs) -> None:
            super().__init__(**kwargs)
            self._tripletops_metric = _metric_of(self.distance)

        def mine(self, embeddings, labels, ref_emb, ref_labels):
            metric, normalize = self._tripletops_metric
            # PML excludes an anchor's own row exactly when the reference labels are the
            # labels themselves (the same object), as when ref_emb is not given.
            if ref_labels is labels:
                m = tripletops.batch_hard_mine(embeddings, labels, metric=metric, normalize=normalize)
            else:
                m = tripletops.batch_hard_mine(embeddings, labels, metric=metric, normalize=normalize,
                                               ref_embeddings=ref_emb, ref_labels=ref_labels)
            a = torch.nonzero(m.valid).squeeze(1)  # anchors with both (a host read, as PML's torch.where)
            if self.collect_stats:  # PML's stats, in the distance's own units
                to_units = (lambda d: 1 - d) if metric == "cosine" else (lambda d: d)
                self.set_stats(to_units(m.pos_dist[a]), to_units(m.neg_dist[a]))
            out = _MinedTriplets((a, m.pos_idx[a], m.neg_idx[a]))
            out.source = (embeddings, labels, ref_emb, ref_labels, embeddings._version, self._tripletops_metric)
            return out

    class TripletMarginLoss(losses.TripletMarginLoss):
        __doc__ = losses.TripletMarginLoss.__doc__

        def __init__(self, margin=0.05, swap=False, smooth_loss=False, triplets_per_anchor="all", **kwargs) -> None:
            super().__init__(margin=margin, swap=swap, smooth_loss=smooth_loss,
                             triplets_per_anchor=triplets_per_anchor, **kwargs)
            if smooth_loss:
                raise ValueError("tripletops: smooth_loss=True has no fused kernel (softplus of the margin's "
                                 "violation); use pytorch-metric-learning's own TripletMarginLoss")
            if triplets_per_anchor != "all":
                raise ValueError(f"tripletops: triplets_per_anchor must be 'all', got {triplets_per_anchor!r} "
                                 "(random triplets per anchor have no fused kernel)")
            if getattr(self, "embedding_regularizer", None) is not None:
                raise ValueError("tripletops: embedding_regularizer is not supported by the fused loss")
            self._tripletops_metric = _metric_of(self.distance)
            self._tripletops_reduction = _reduction_of(self.reducer)

        def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
            self.reset_stats()
            c_f = _pml("utils.common_functions")
            c_f.check_shapes(embeddings, labels)
            if labels is not None:
                labels = c_f.to_device(labels, embeddings)
            c_f.labels_or_indices_tuple_required(labels, indices_tuple)
            own = ref_emb is None
            ref_emb, ref_labels = c_f.set_ref_emb(embeddings, labels, ref_emb, ref_labels)
            metric, normalize = self._tripletops_metric
            kw = dict(margin=self.margin, metric=metric, normalize=normalize, reduction=self._tripletops_reduction)
            if self.swap and not own:
                raise ValueError("tripletops: swap=True with ref_emb has no fused kernel (pytorch-metric-learning "
                                 "then indexes the batch with reference indices); use its own TripletMarginLoss")
            if (isinstance(indices_tuple, _MinedTriplets) and not self.swap
                    and indices_tuple.matches(embeddings, labels, ref_emb, ref_labels, self._tripletops_metric)):
                if ref_labels is labels:  # the batch against itself, each anchor's own row excluded
                    return tripletops.batch_hard_loss(embeddings, labels, **kw)
                return tripletops.batch_hard_loss(embeddings, labels, ref_embeddings=ref_emb, ref_labels=ref_labels,
                                                  **kw)
            if indices_tuple is None:
                if self.swap or not own:
                    raise ValueError("tripletops: without a miner, the fused batch-all kernel takes neither swap=True "
                                     "nor ref_emb; pass a miner's indices_tuple")
                return tripletops.batch_all_loss(embeddings, labels, **kw)
            a, p, n = lmu.convert_to_triplets(indices_tuple, labels, ref_labels, t_per_anchor=self.triplets_per_anchor)
            if len(a) == 0:  # PML's zero loss: 0, connected to the graph
                return torch.sum(embeddings * 0)
            return tripletops.triplet_margin_loss(embeddings[a], ref_emb[p], ref_emb[n], swap=self.swap, **kw)

    acc = _pml("utils.accuracy_calculator")

    class _ExactKNN:
        """PML's knn_func interface on tripletops.knn: exact, no FAISS. With
        ref_includes_query (the first len(query) reference rows are the queries), each
        query's own row is excluded by index (FaissKNN drops the first neighbour, which
        among duplicates may be another row)."""

        def __call__(self, query, k, reference=None, ref_includes_query=False):
            reference = query if reference is None else reference
            nb = tripletops.knn(query, reference, k=int(k), metric="sqeuclidean", exclude_self=bool(ref_includes_query))
            return nb.dist, nb.idx

    class AccuracyCalculator(acc.AccuracyCalculator):
        __doc__ = acc.AccuracyCalculator.__doc__

        def __init__(self, include=(), exclude=(), avg_of_avgs=False, return_per_class=False, k=None,
                     label_comparison_fn=None, device=None, knn_func=None, kmeans_func=None) -> None:
            if knn_func is not None:
                raise ValueError("tripletops: AccuracyCalculator's neighbours come from tripletops.knn (exact); "
                                 "knn_func is not taken (use pytorch-metric-learning's own class for another)")
            super().__init__(include=include, exclude=exclude, avg_of_avgs=avg_of_avgs,
                             return_per_class=return_per_class, k=k, label_comparison_fn=label_comparison_fn,
                             device=device, knn_func=_ExactKNN(), kmeans_func=kmeans_func)
            self._own_kmeans = kmeans_func is None

        def get_accuracy(self, query, query_labels, reference=None, reference_labels=None, ref_includes_query=False,
                         include=(), exclude=()):
            # NMI and AMI need k-means: PML's own (FAISS k-means) computes them; without
            # faiss, refuse by name before anything runs.
            import importlib.util

            wanted = set(self.get_function_dict(include, exclude))
            clustering = sorted(wanted & set(self.requires_clustering()))
            if clustering and self._own_kmeans and importlib.util.find_spec("faiss") is None:
                raise ValueError(f"tripletops: {', '.join(clustering)} need k-means, which pytorch-metric-learning "
                                 "runs with FAISS, and faiss is not installed; exclude them "
                                 f"(exclude={tuple(clustering)!r}) or install faiss-cpu")
            return super().get_accuracy(query, query_labels, reference, reference_labels, ref_includes_query,
                                        include, exclude)

    for cls in (BatchHardMiner, TripletMarginLoss, AccuracyCalculator):
        cls.__module__ = __name__
        _built[cls.__name__] = cls
    return _built[name]


def __getattr__(name: str) -> type:
    """The classes are made on first use, as subclasses of the installed
    pytorch-metric-learning's own (PEP 562)."""
    if name in __all__:
        return _built.get(name) or _build(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
