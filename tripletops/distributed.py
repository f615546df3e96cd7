"""Batch-hard mining across the processes of a `torch.distributed` group.

Under DDP each rank sees B / world_size embeddings, so mining within the local batch
finds weaker positives and negatives. Here every rank all-gathers the embeddings and
labels of the group (in rank order; batch sizes may differ), mines its *own* anchors
against that global batch with the fused kernels, and returns a loss scaled for DDP:

- the mean over ranks of the returned losses equals the single-process loss on the
  concatenated batch;
- each rank's embedding gradient, divided by the world size, equals the single-process
  gradient of its rows, so after DDP averages the parameter gradients, training equals
  single-process training on the concatenated batch. Do not multiply by world_size
  yourself.

Gradients for gathered rows flow back to the rank that owns them through an
all-reduce in the backward, so every rank of the group must call backward. That is the
normal case under DDP.

    import torch.distributed as dist
    from tripletops import distributed as tdist

    dist.init_process_group("gloo")          # "nccl" for CUDA tensors
    loss = tdist.batch_hard_loss(model(x), y, margin=0.2)
    loss.backward()
    ...
    dist.destroy_process_group()             # before the process exits (docs/integration.md)

Mining is O(B_rank · N · D) per rank for a global batch of N. It runs as two fused
calls, the local batch against itself (an anchor is not its own positive) and against
the other ranks' rows, merged with the tie rule of docs/semantics.md (smallest global index). The
loss of the B_rank selected pairs is then recomputed exactly from the rows, O(B·D).

`batch_all_loss`, `semi_hard_loss` and `contrastive_loss` keep the same contract in a
simpler way: every rank computes the whole group's loss from the gathered batch (the
same fused kernels, O(N²) work on every rank, W times redundant). That makes them
identical to one process on the concatenated batch; per-rank anchor slices for them are
not built yet.
"""
from __future__ import annotations

import time
from typing import Callable

import torch
import torch.distributed as dist

from . import _validate
from .batch_hard import batch_hard_mine as _local_mine
from .reference import Mined, _maybe_normalize, _pairwise_distance_rows, _triplet_term

__all__ = ["all_gather", "batch_hard_mine", "batch_hard_loss", "batch_all_loss", "semi_hard_loss", "contrastive_loss"]


def _group_info(group) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("tripletops.distributed: torch.distributed is not initialized "
                           "(call torch.distributed.init_process_group first)")
    return dist.get_world_size(group), dist.get_rank(group)


# How long a call waits at most for gloo's worker thread to let go of a collective's tensors
# (normally microseconds; a loaded machine can delay that thread by milliseconds).
_LET_GO_TIMEOUT_S = 30.0


def _collective(run: Callable[[], object], tensors: list[torch.Tensor], group) -> None:
    """Runs the collective `run()` on `tensors` and returns once the backend holds none of them.

    gloo runs a collective on its worker thread, which marks the work complete (so `run()`
    returns) and only then destroys it, dropping its references to the tensors. Dropping the
    last C++ reference to a tensor takes the GIL there: PyTorch then decrefs the tensor's
    Python object, which C++ references keep alive. If this process is exiting by then,
    Python ends that thread inside a noexcept C++ frame and the process aborts with SIGABRT
    ("terminate called without an active exception"). On a 2-core CPU machine (torch 2.13),
    about 1 in 4 collectives returned with their tensors still held, and 12 of 30 two-rank
    runs that called a loss and exited at once, without destroy_process_group, aborted.

    So a view of each tensor holds one more C++ reference of ours across the call: the
    worker thread never drops the last one, and needs no GIL. This waits, giving up the GIL,
    until every use count is back to what it was before the call (the worker has let go),
    then drops the views here, under the GIL. Nothing of the call is pending when it returns
    or raises. NCCL keeps its tensors until the stream is done, so this is gloo's only; on a
    torch without `Tensor._use_count` the collective runs as it is.
    """
    use_count = getattr(torch.Tensor, "_use_count", None)
    if use_count is None or dist.get_backend(group) != dist.Backend.GLOO:
        run()
        return
    ours = [t.view(t.shape) for t in tensors]  # a view holds a C++ reference to its base
    before = [use_count(t) for t in tensors]
    run()
    deadline = time.monotonic() + _LET_GO_TIMEOUT_S
    while any(use_count(t) > n for t, n in zip(tensors, before)) and time.monotonic() < deadline:
        time.sleep(0)  # lets the worker thread run
    del ours


def _on_wire(t: torch.Tensor, group) -> torch.Tensor:
    """`t` where the group's backend can move it: NCCL takes CUDA tensors as they are; gloo
    does not all-gather CUDA tensors, so there they travel through host memory."""
    if t.is_cuda and dist.get_backend(group) == dist.Backend.GLOO:
        return t.cpu()
    return t


def _row_counts(x: torch.Tensor, group, world: int) -> list[int]:
    """Every rank's row count; also checks that all ranks agree on the row width."""
    mine = _on_wire(torch.tensor([x.shape[0], x.shape[1] if x.dim() > 1 else 1], dtype=torch.int64, device=x.device),
                    group)
    every = [torch.empty_like(mine) for _ in range(world)]
    _collective(lambda: dist.all_gather(every, mine, group=group), [mine, *every], group)
    widths = {int(t[1]) for t in every}
    if len(widths) != 1:
        raise ValueError(f"tripletops.distributed: every rank must have the same embedding dim, got {sorted(widths)}")
    return [int(t[0]) for t in every]


# Dtypes by code, for the metadata every rank shares before any data moves.
_DTYPE_CODES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.uint8, torch.int8, torch.int16,
                torch.int32, torch.int64, torch.bool)


def _dtype_code(t) -> int:
    dtype = getattr(t, "dtype", None)
    return _DTYPE_CODES.index(dtype) if dtype in _DTYPE_CODES else len(_DTYPE_CODES)


def _agree(embeddings, labels, group, world: int, check) -> list[int]:
    """Validates this rank's inputs (`check()`), then agrees with every rank of the group
    before any collective moves data: a rank that rejected its inputs, or ranks whose
    embedding dims or dtypes differ, make every rank raise a ValueError, instead of one rank
    raising while the others hang in the next collective (or gloo aborting them all on
    buffers of different sizes). Returns every rank's row count."""
    error = None
    try:
        check()
    except (TypeError, ValueError) as exc:
        error = exc
    shape = tuple(embeddings.shape) if isinstance(embeddings, torch.Tensor) else ()
    device = embeddings.device if isinstance(embeddings, torch.Tensor) else torch.device("cpu")
    label_width = labels.shape[1] if isinstance(labels, torch.Tensor) and labels.dim() == 2 else 0  # 0: class ids
    mine = _on_wire(torch.tensor([shape[0] if shape else 0, shape[1] if len(shape) > 1 else 1,
                                  _dtype_code(embeddings), _dtype_code(labels), int(error is not None), label_width],
                                 dtype=torch.int64, device=device), group)
    every = [torch.empty_like(mine) for _ in range(world)]
    _collective(lambda: dist.all_gather(every, mine, group=group), [mine, *every], group)
    if error is not None:
        try:
            raise error
        finally:
            del error  # no cycle (this frame -> error -> traceback -> this frame) keeping the tensors here
    failed = [r for r, t in enumerate(every) if int(t[4])]
    if failed:
        raise ValueError(f"tripletops.distributed: rank(s) {failed} of the group rejected their inputs "
                         "(the error is raised there); every rank stops")

    def names(col):
        return sorted({str(_DTYPE_CODES[int(t[col])]) if int(t[col]) < len(_DTYPE_CODES) else "other"
                       for t in every})

    if len({int(t[1]) for t in every}) != 1:
        raise ValueError("tripletops.distributed: every rank must have the same embedding dim, got "
                         f"{sorted({int(t[1]) for t in every})}")
    if len({int(t[2]) for t in every}) != 1:
        raise ValueError(f"tripletops.distributed: every rank must have the same embeddings dtype, got {names(2)}")
    if len({int(t[3]) for t in every}) != 1:
        raise ValueError(f"tripletops.distributed: every rank must have the same labels dtype, got {names(3)}")
    if len({int(t[5]) for t in every}) != 1:
        widths = sorted({"(B,) class ids" if int(t[5]) == 0 else f"L = {int(t[5])}" for t in every})
        raise ValueError(f"tripletops.distributed: every rank must have labels of the same kind, got {widths}")
    return [int(t[0]) for t in every]


def _gather_padded(x: torch.Tensor, counts: list[int], group) -> torch.Tensor:
    """All ranks' `x` concatenated in rank order (rows padded to the largest for the collective).
    Bool tensors (multi-hot labels) travel as uint8."""
    if x.dtype == torch.bool:
        return _gather_padded(x.to(torch.uint8), counts, group).bool()
    most = max(counts)
    padded = x.new_zeros((most, *x.shape[1:]))
    padded[: x.shape[0]] = x
    padded = _on_wire(padded, group).contiguous()
    parts = [torch.empty_like(padded) for _ in counts]
    _collective(lambda: dist.all_gather(parts, padded, group=group), [padded, *parts], group)
    return torch.cat([p[:n] for p, n in zip(parts, counts)]).to(x.device)


class _AllGather(torch.autograd.Function):
    """Forward: concatenate every rank's rows. Backward: sum the gradient of the whole
    concatenation over ranks (all-reduce), and keep this rank's slice."""

    @staticmethod
    def forward(ctx, x, counts, rank, group):
        ctx.counts, ctx.rank, ctx.group = counts, rank, group
        return _gather_padded(x, counts, group)

    @staticmethod
    def backward(ctx, grad):
        device = grad.device
        grad = _on_wire(grad.contiguous(), ctx.group).clone()
        _collective(lambda: dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group), [grad], ctx.group)
        grad = grad.to(device)
        start = sum(ctx.counts[: ctx.rank])
        return grad[start:start + ctx.counts[ctx.rank]], None, None, None


def all_gather(x: torch.Tensor, group=None) -> torch.Tensor:
    """Every rank's ``x`` (rows may differ in number) concatenated in rank order.

    Differentiable: the gradient of each row goes back to the rank that owns it,
    summed over the ranks whose outputs used it. Every rank must call backward.
    """
    world, rank = _group_info(group)
    counts = _row_counts(x, group, world)
    if not x.requires_grad:
        return _gather_padded(x, counts, group)
    return _AllGather.apply(x, counts, rank, group)


def _merge(idx_a, dist_a, idx_b, dist_b, farthest: bool):
    """Per anchor, the better of two candidates (global indices, -1 for none): larger
    (farthest) or smaller distance, ties to the smaller index; NaN wins."""
    has_a, has_b = idx_a >= 0, idx_b >= 0
    better = dist_b > dist_a if farthest else dist_b < dist_a
    tie = (dist_b == dist_a) & (idx_b < idx_a)
    nan_b = torch.isnan(dist_b) & ~torch.isnan(dist_a)
    take_b = has_b & (~has_a | better | tie | nan_b)
    return torch.where(take_b, idx_b, idx_a), torch.where(take_b, dist_b, dist_a)


def _mine_global(emb, labels, all_emb, all_labels, offset: int, metric: str) -> Mined:
    """Mine this rank's anchors (rows offset..offset+B of the global batch) against it."""
    b = emb.shape[0]
    own = _local_mine(emb, labels, metric=metric)
    shift = lambda idx, by: torch.where(idx >= 0, idx + by, idx)
    pos_idx, pos_dist = shift(own.pos_idx, offset), own.pos_dist
    neg_idx, neg_dist = shift(own.neg_idx, offset), own.neg_dist
    if all_emb.shape[0] > b:
        others = torch.cat([all_emb[:offset], all_emb[offset + b:]])
        others_labels = torch.cat([all_labels[:offset], all_labels[offset + b:]])
        m = _local_mine(emb, labels, metric=metric, ref_embeddings=others, ref_labels=others_labels)
        to_global = lambda idx: torch.where(idx >= offset, idx + b, idx)  # skip over this rank's rows (-1 stays)
        pos_idx, pos_dist = _merge(pos_idx, pos_dist, to_global(m.pos_idx), m.pos_dist, farthest=True)
        neg_idx, neg_dist = _merge(neg_idx, neg_dist, to_global(m.neg_idx), m.neg_dist, farthest=False)
    return Mined(pos_idx, neg_idx, pos_dist, neg_dist, (pos_idx >= 0) & (neg_idx >= 0))


def _setup(embeddings, labels, metric, normalize, group):
    _validate.flag(normalize, "normalize")  # a Python argument, the same on every rank: checked before any collective
    world, rank = _group_info(group)
    counts = _agree(embeddings, labels, group, world, lambda: _validate.mining(embeddings, labels, metric, None, None))
    embeddings, _ = _maybe_normalize(normalize, embeddings, None)
    offset = sum(counts[:rank])
    gathered = all_gather(embeddings, group)
    with torch.no_grad():
        all_labels = _gather_padded(labels, counts, group)
        mined = _mine_global(embeddings.detach(), labels, gathered.detach(), all_labels, offset, metric)
    return embeddings, gathered, mined, world


def batch_hard_mine(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    *,
    group=None,
    metric: str = "euclidean",
    normalize: bool = False,
) -> Mined:
    """This rank's anchors mined against the whole group's batch.

    Returns ``Mined`` like `tripletops.batch_hard_mine`, with ``pos_idx`` / ``neg_idx``
    indexing the concatenation of every rank's batch in rank order (what
    `all_gather` returns), so they equal single-process mining on that concatenation.
    """
    _, _, mined, _ = _setup(embeddings.detach(), labels, metric, normalize, group)
    return mined


def batch_hard_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    *,
    group=None,
    margin: float = 0.2,
    metric: str = "euclidean",
    soft_margin: bool = False,
    reduction: str = "mean",
    normalize: bool = False,
) -> torch.Tensor:
    """Batch-hard triplet loss of this rank's anchors against the whole group's batch.

    Arguments are those of `tripletops.batch_hard_loss` (no reference set: the group's
    batch is the reference set), plus ``group`` (default: the world). Collective: every
    rank of the group must call it, and later call backward.

    Returns, with W the world size and N the group's batch:

    - ``"mean"`` / ``"mean_nonzero"``: W × (sum of this rank's anchor losses) / (the
      group's count of valid / nonzero anchors); 0 if that count is 0;
    - ``"sum"``: W × (sum of this rank's anchor losses);
    - ``"none"``: this rank's ``(B,)`` per-anchor losses, *unscaled*: equal to those
      anchors' entries of the single-process ``"none"`` result; scale them yourself.

    So the mean over ranks of the scalar losses equals the single-process loss, and
    DDP's gradient averaging reproduces single-process training.
    """
    _validate.margin(margin)
    _validate.reduction(reduction)
    _validate.flag(soft_margin, "soft_margin")
    embeddings, gathered, mined, world = _setup(embeddings, labels, metric, normalize, group)
    dtype = embeddings.dtype
    compute = torch.float64 if dtype == torch.float64 else torch.float32  # halves accumulate in fp32
    anchor = embeddings.to(compute)
    pos = gathered[mined.pos_idx.clamp(min=0)].to(compute)
    neg = gathered[mined.neg_idx.clamp(min=0)].to(compute)
    loss = _triplet_term(_pairwise_distance_rows(anchor, pos, metric) - _pairwise_distance_rows(anchor, neg, metric),
                         margin, soft_margin)
    finite = torch.isfinite(anchor).all(1) & torch.isfinite(pos).all(1) & torch.isfinite(neg).all(1)
    loss = torch.where(finite, loss, torch.full_like(loss, float("nan")))
    loss = torch.where(mined.valid, loss, torch.zeros_like(loss))
    if reduction == "none":
        return loss.to(dtype)
    total = loss.sum() * world
    if reduction == "sum":
        return total.to(dtype)
    with torch.no_grad():
        count = (mined.valid if reduction == "mean" else loss > 0).sum().to(torch.int64)
        _collective(lambda: dist.all_reduce(count, op=dist.ReduceOp.SUM, group=group), [count], group)
    return (total / count.clamp(min=1).to(compute)).to(dtype)


def _whole_group_loss(loss_fn, embeddings, labels, group, kwargs):
    """The group's loss on the gathered batch, on every rank. Each rank's backward sends
    W × d(loss)/d(rows) home through the gather, which is the DDP scaling of the module
    docstring."""
    if kwargs.get("reduction") == "none":
        raise ValueError("tripletops.distributed: reduction 'none' is not supported for this loss "
                         "(every rank would hold the whole group's terms); use 'mean', 'mean_nonzero' or 'sum'")
    world, _ = _group_info(group)

    def check():
        _validate.rows(embeddings, "embeddings")
        _validate.labels(labels, "labels", embeddings.shape[0], "embeddings", embeddings)

    counts = _agree(embeddings, labels, group, world, check)
    gathered = all_gather(embeddings, group)
    with torch.no_grad():
        all_labels = _gather_padded(labels, counts, group)
    return loss_fn(gathered, all_labels, **kwargs)


def batch_all_loss(embeddings: torch.Tensor, labels: torch.Tensor, *, group=None, **kwargs) -> torch.Tensor:
    """`tripletops.batch_all_loss` over the whole group's batch (see the module docstring).

    Keyword arguments are those of `tripletops.batch_all_loss`. Collective.
    """
    from .pair_losses import batch_all_loss as loss_fn

    return _whole_group_loss(loss_fn, embeddings, labels, group, kwargs)


def semi_hard_loss(embeddings: torch.Tensor, labels: torch.Tensor, *, group=None, **kwargs) -> torch.Tensor:
    """`tripletops.semi_hard_loss` over the whole group's batch (see the module docstring). Collective."""
    from .pair_losses import semi_hard_loss as loss_fn

    return _whole_group_loss(loss_fn, embeddings, labels, group, kwargs)


def contrastive_loss(embeddings: torch.Tensor, labels: torch.Tensor, *, group=None, **kwargs) -> torch.Tensor:
    """`tripletops.contrastive_loss` over the whole group's batch (see the module docstring).
    Scalar reductions only. Collective."""
    from .pair_losses import contrastive_loss as loss_fn

    return _whole_group_loss(loss_fn, embeddings, labels, group, kwargs)
