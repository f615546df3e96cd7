"""Fake kernels for the ops declared in csrc/schema.h.

Fake kernels give torch.compile shapes/dtypes without running anything. Autograd is C++
(csrc/autograd.h, at the Autograd dispatch key): each backward is itself a registered op
with its own fake kernel here, so a compiled training step has no graph break.
"""
from __future__ import annotations

import torch

from ._ext import _LOAD_ERROR


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp16/bf16 accumulate in fp32; the kernels return mined distances in this dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _register(namespace: str = "tripletops") -> None:
    """Fake kernels for every op of `namespace`: the `tripletops` library, or
    the test-only `tripletops_emu` one (the CUDA kernels under the SIMT emulator), which
    declares the same schemas."""
    # ---- pairwise_distance ------------------------------------------------------------
    @torch.library.register_fake(f"{namespace}::pairwise_distance")
    def _(x, y, metric):
        torch._check(x.dim() == 2, lambda: "x must be 2-D")
        m = x.shape[0] if y is None else y.shape[0]
        return x.new_empty((x.shape[0], m))

    @torch.library.register_fake(f"{namespace}::pairwise_distance_backward")
    def _(grad, x, y, dist, metric):
        return torch.empty_like(x), (x.new_empty((0,)) if y is None else torch.empty_like(y))

    # ---- knn --------------------------------------------------------------------------
    @torch.library.register_fake(f"{namespace}::knn")
    def _(queries, gallery, k, metric, exclude_self):
        dist = queries.new_empty((queries.shape[0], k), dtype=_compute_dtype(queries.dtype))
        return dist, queries.new_empty((queries.shape[0], k), dtype=torch.int64)

    # ---- batch_hard_mine / batch_hard_loss --------------------------------------------
    def _mined_fake(embeddings):
        b = embeddings.shape[0]
        idx = embeddings.new_empty((b,), dtype=torch.int64)
        dist = embeddings.new_empty((b,), dtype=_compute_dtype(embeddings.dtype))
        return idx, torch.empty_like(idx), dist, torch.empty_like(dist)

    @torch.library.register_fake(f"{namespace}::batch_hard_mine")
    def _(embeddings, labels, ref_embeddings, ref_labels, metric):
        return _mined_fake(embeddings)

    @torch.library.register_fake(f"{namespace}::batch_hard_loss")
    def _(embeddings, labels, ref_embeddings, ref_labels, margin, metric, soft_margin, reduction):
        shape = (embeddings.shape[0],) if reduction == "none" else ()
        return (embeddings.new_empty(shape), *_mined_fake(embeddings))

    @torch.library.register_fake(f"{namespace}::batch_hard_settle_stats")
    def _(embeddings, labels, ref_embeddings, ref_labels, metric):
        return embeddings.new_empty((2,), dtype=torch.int64)

    @torch.library.register_fake(f"{namespace}::batch_hard_loss_backward")
    def _(grad, embeddings, ref_embeddings, pos_idx, neg_idx, pos_dist, neg_dist, margin, metric, soft_margin,
          reduction, compute_ref_grad):
        if ref_embeddings is not None and compute_ref_grad:
            grad_ref = torch.empty_like(ref_embeddings)
        else:
            grad_ref = embeddings.new_empty((0,))
        return torch.empty_like(embeddings), grad_ref

    # ---- triplet_margin_loss ----------------------------------------------------------
    @torch.library.register_fake(f"{namespace}::triplet_margin_loss")
    def _(anchor, positive, negative, margin, metric, swap, reduction):
        n = anchor.shape[0]
        dist = anchor.new_empty((n,), dtype=_compute_dtype(anchor.dtype))
        shape = (n,) if reduction == "none" else ()
        return anchor.new_empty(shape), dist, torch.empty_like(dist), dist.new_empty((n if swap else 0,))

    @torch.library.register_fake(f"{namespace}::triplet_margin_loss_backward")
    def _(grad, anchor, positive, negative, d_ap, d_an, d_pn, margin, metric, swap, reduction):
        return torch.empty_like(anchor), torch.empty_like(positive), torch.empty_like(negative)

    # ---- batch_all_loss / semi_hard_loss / contrastive_loss: -> (loss, dist) ------------
    def _dist_fake(embeddings, dtype):
        return embeddings.new_empty((embeddings.shape[0], embeddings.shape[0]), dtype=dtype)

    @torch.library.register_fake(f"{namespace}::batch_all_loss")
    def _(embeddings, labels, margin, metric, soft_margin, reduction):
        return embeddings.new_empty(()), _dist_fake(embeddings, torch.float64)

    @torch.library.register_fake(f"{namespace}::batch_all_loss_backward")
    def _(grad, embeddings, labels, dist, margin, metric, soft_margin, reduction):
        return torch.empty_like(embeddings)

    @torch.library.register_fake(f"{namespace}::semi_hard_loss")
    def _(embeddings, labels, margin, metric):
        return embeddings.new_empty(()), _dist_fake(embeddings, torch.float64)

    @torch.library.register_fake(f"{namespace}::semi_hard_loss_backward")
    def _(grad, embeddings, labels, dist, margin, metric):
        return torch.empty_like(embeddings)

    @torch.library.register_fake(f"{namespace}::contrastive_loss")
    def _(embeddings, labels, pos_margin, neg_margin, metric, reduction):
        b = embeddings.shape[0]
        shape = (b * (b - 1) // 2,) if reduction == "none" else ()
        return embeddings.new_empty(shape), _dist_fake(embeddings, _compute_dtype(embeddings.dtype))

    @torch.library.register_fake(f"{namespace}::contrastive_loss_backward")
    def _(grad, embeddings, labels, dist, pos_margin, neg_margin, metric, reduction):
        return torch.empty_like(embeddings)

if _LOAD_ERROR is None:
    _register()
