"""Fake kernels and autograd for the ops declared in csrc/tripletops.cpp.

Fake kernels give torch.compile shapes/dtypes without running anything; each
backward is itself a registered op with its own fake kernel, so a compiled
training step has no graph break.
"""
from __future__ import annotations

import torch

from ._ext import _LOAD_ERROR


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp16/bf16 accumulate in fp32; the kernels return mined distances in this dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _register(namespace: str = "tripletops") -> None:
    """Fake kernels and autograd for every op of `namespace`: the `tripletops` library, or
    the test-only `tripletops_emu` one (the CUDA kernels under the SIMT emulator), which
    declares the same schemas."""
    _ops = getattr(torch.ops, namespace)

    # ---- pairwise_distance ------------------------------------------------------------
    @torch.library.register_fake(f"{namespace}::pairwise_distance")
    def _(x, y, metric):
        torch._check(x.dim() == 2, lambda: "x must be 2-D")
        m = x.shape[0] if y is None else y.shape[0]
        return x.new_empty((x.shape[0], m))

    @torch.library.register_fake(f"{namespace}::pairwise_distance_backward")
    def _(grad, x, y, dist, metric):
        return torch.empty_like(x), (x.new_empty((0,)) if y is None else torch.empty_like(y))

    def _pd_setup(ctx, inputs, output):
        x, y, metric = inputs
        ctx.save_for_backward(x, y, output)
        ctx.metric = metric

    def _pd_backward(ctx, grad):
        x, y, dist = ctx.saved_tensors
        gx, gy = _ops.pairwise_distance_backward(grad, x, y, dist, ctx.metric)
        return gx, (gy if y is not None else None), None

    torch.library.register_autograd(f"{namespace}::pairwise_distance", _pd_backward, setup_context=_pd_setup)

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

    @torch.library.register_fake(f"{namespace}::batch_hard_loss_backward")
    def _(grad, embeddings, ref_embeddings, pos_idx, neg_idx, pos_dist, neg_dist, margin, metric, soft_margin,
          reduction, compute_ref_grad):
        if ref_embeddings is not None and compute_ref_grad:
            grad_ref = torch.empty_like(ref_embeddings)
        else:
            grad_ref = embeddings.new_empty((0,))
        return torch.empty_like(embeddings), grad_ref

    def _bh_setup(ctx, inputs, output):
        embeddings, labels, ref_embeddings, ref_labels, margin, metric, soft_margin, reduction = inputs
        _, pos_idx, neg_idx, pos_dist, neg_dist = output
        ctx.save_for_backward(embeddings, ref_embeddings, pos_idx, neg_idx, pos_dist, neg_dist)
        ctx.args = (margin, metric, soft_margin, reduction)

    def _bh_backward(ctx, grad, *_unused_grads):
        embeddings, ref_embeddings, pos_idx, neg_idx, pos_dist, neg_dist = ctx.saved_tensors
        want_ref = ref_embeddings is not None and ctx.needs_input_grad[2]
        if not (ctx.needs_input_grad[0] or want_ref):
            return (None,) * 8
        grad_emb, grad_ref = _ops.batch_hard_loss_backward(
            grad, embeddings, ref_embeddings, pos_idx, neg_idx, pos_dist, neg_dist, *ctx.args, want_ref
        )
        return grad_emb, None, (grad_ref if want_ref else None), None, None, None, None, None

    torch.library.register_autograd(f"{namespace}::batch_hard_loss", _bh_backward, setup_context=_bh_setup)

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

    def _tm_setup(ctx, inputs, output):
        anchor, positive, negative, margin, metric, swap, reduction = inputs
        _, d_ap, d_an, d_pn = output
        ctx.save_for_backward(anchor, positive, negative, d_ap, d_an, d_pn)
        ctx.args = (margin, metric, swap, reduction)

    def _tm_backward(ctx, grad, *_unused_grads):
        anchor, positive, negative, d_ap, d_an, d_pn = ctx.saved_tensors
        ga, gp, gn = _ops.triplet_margin_loss_backward(grad, anchor, positive, negative, d_ap, d_an, d_pn, *ctx.args)
        need = ctx.needs_input_grad
        return (ga if need[0] else None), (gp if need[1] else None), (gn if need[2] else None), None, None, None, None

    torch.library.register_autograd(f"{namespace}::triplet_margin_loss", _tm_backward, setup_context=_tm_setup)

    # ---- batch_all_loss / semi_hard_loss: from the (B, B) distance matrix --------------
    @torch.library.register_fake(f"{namespace}::batch_all_loss")
    def _(dist, labels, margin, soft_margin, reduction):
        return dist.new_empty(())

    @torch.library.register_fake(f"{namespace}::batch_all_loss_backward")
    def _(grad, dist, labels, margin, soft_margin, reduction):
        return torch.empty_like(dist)

    def _ba_setup(ctx, inputs, output):
        dist, labels, margin, soft_margin, reduction = inputs
        ctx.save_for_backward(dist, labels)
        ctx.args = (margin, soft_margin, reduction)

    def _ba_backward(ctx, grad):
        dist, labels = ctx.saved_tensors
        return _ops.batch_all_loss_backward(grad, dist, labels, *ctx.args), None, None, None, None

    torch.library.register_autograd(f"{namespace}::batch_all_loss", _ba_backward, setup_context=_ba_setup)

    @torch.library.register_fake(f"{namespace}::semi_hard_loss")
    def _(dist, labels, margin):
        return dist.new_empty(())

    @torch.library.register_fake(f"{namespace}::semi_hard_loss_backward")
    def _(grad, dist, labels, margin):
        return torch.empty_like(dist)

    def _sh_setup(ctx, inputs, output):
        dist, labels, margin = inputs
        ctx.save_for_backward(dist, labels)
        ctx.margin = margin

    def _sh_backward(ctx, grad):
        dist, labels = ctx.saved_tensors
        return _ops.semi_hard_loss_backward(grad, dist, labels, ctx.margin), None, None

    torch.library.register_autograd(f"{namespace}::semi_hard_loss", _sh_backward, setup_context=_sh_setup)

    # ---- second derivatives: refused, never silently wrong ---------------------------
    # Each backward op is differentiable only in the sense that differentiating it raises:
    # with create_graph=True the first backward is recorded, and the second one stops here.
    def _refuse(op: str):
        def backward(ctx, *grads):
            raise RuntimeError(f"tripletops.{op}: second derivatives are not implemented (a backward through "
                               f"the gradient of {op}, as with create_graph=True, cannot be computed)")

        torch.library.register_autograd(f"{namespace}::{op}_backward", backward,
                                        setup_context=lambda ctx, inputs, output: None)

    for op in ("pairwise_distance", "batch_hard_loss", "triplet_margin_loss", "batch_all_loss", "semi_hard_loss"):
        _refuse(op)


if _LOAD_ERROR is None:
    _register()
