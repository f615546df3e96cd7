"""nn.Module wrappers: the functional arguments, fixed at construction."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import _validate
from .batch_hard import batch_hard_loss
from .pair_losses import batch_all_loss, contrastive_loss, semi_hard_loss
from .triplet_margin import triplet_margin_loss


def _outside_inference(t: torch.Tensor) -> torch.Tensor:
    """A buffer made inside ``torch.inference_mode()`` is an inference tensor: outside that
    mode it can be neither updated in place nor saved for backward. The modules make their
    buffers under ``inference_mode(False)``, so that their own calls never leave one; a
    buffer that became one otherwise (``module.to(...)`` inside inference_mode) is
    replaced by an ordinary copy at the next eager call outside inference mode."""
    if not torch.compiler.is_compiling() and t.is_inference() and not torch.is_inference_mode_enabled():
        return t.clone()
    return t


def _load_all_or_nothing(module: nn.Module, state_dict, prefix: str, strict: bool, missing_keys, unexpected_keys,
                         error_msgs, names, validate) -> None:
    """`load_state_dict` for a module whose buffers only make sense together: every buffer
    is validated first (`validate` returns a problem or None), then all are applied, or
    none. The loaded tensors are taken as they are (dtype included: a float64 memory stays
    float64), on the device the module's buffers are on."""
    got = {n: state_dict[prefix + n] for n in names if prefix + n in state_dict}
    if strict:
        missing_keys.extend(prefix + n for n in names if n not in got)
        unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k[len(prefix):] not in names
                               and "." not in k[len(prefix):])
    if not got:
        return
    if len(got) < len(names):
        error_msgs.append(f"{type(module).__name__}: the state must hold all of {', '.join(names)}, got "
                          f"{', '.join(sorted(got))}; nothing was loaded")
        return
    if not all(isinstance(t, torch.Tensor) for t in got.values()):
        error_msgs.append(f"{type(module).__name__}: every entry of the state must be a tensor; nothing was loaded")
        return
    meta = [n for n in names if got[n].is_meta]
    if meta:
        error_msgs.append(f"{type(module).__name__}: {', '.join(meta)} on the meta device hold no values; nothing "
                          "was loaded")
        return
    problem = validate(got)
    if problem is not None:
        error_msgs.append(f"{type(module).__name__}: {problem}; nothing was loaded")
        return
    # Every copy is made before any buffer changes: a copy that fails (another device, no
    # memory) leaves the module as it was.
    staged = {}
    with torch.inference_mode(False):  # ordinary tensors, even when loaded inside inference_mode
        for n in names:
            try:
                staged[n] = got[n].detach().to(getattr(module, n).device).clone()
            except (RuntimeError, ValueError, TypeError) as e:
                error_msgs.append(f"{type(module).__name__}: {n} could not be copied to "
                                  f"{getattr(module, n).device}: {e}; nothing was loaded")
                return
    for n in names:
        setattr(module, n, staged[n])


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
        _validate.flag(soft_margin, "soft_margin")
        _validate.flag(normalize, "normalize")
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
        _validate.flag(swap, "swap")
        _validate.flag(normalize, "normalize")
        self.margin, self.metric, self.swap, self.reduction, self.normalize = margin, metric, swap, reduction, normalize

    def forward(self, anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
        return triplet_margin_loss(anchor, positive, negative, margin=self.margin, metric=self.metric,
                                   swap=self.swap, reduction=self.reduction, normalize=self.normalize)

    def extra_repr(self) -> str:
        return (f"margin={self.margin}, metric={self.metric!r}, swap={self.swap}, "
                f"reduction={self.reduction!r}, normalize={self.normalize}")


class BatchAllTripletLoss(nn.Module):
    """Module form of `tripletops.batch_all_loss` (every valid triplet of the batch).

    Example::

        >>> criterion = tripletops.BatchAllTripletLoss(margin=0.2)
        >>> loss = criterion(embeddings, labels)
    """

    def __init__(self, margin: float = 0.2, metric: str = "euclidean", soft_margin: bool = False,
                 reduction: str = "mean_nonzero", normalize: bool = False) -> None:
        super().__init__()
        _validate.margin(margin)
        _validate.metric(metric)
        _validate.reduction(reduction)
        if reduction == "none":
            raise ValueError("tripletops: BatchAllTripletLoss reduction must be 'mean', 'mean_nonzero' or 'sum', "
                             "got 'none'")
        _validate.flag(soft_margin, "soft_margin")
        _validate.flag(normalize, "normalize")
        self.margin, self.metric, self.soft_margin = margin, metric, soft_margin
        self.reduction, self.normalize = reduction, normalize

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return batch_all_loss(embeddings, labels, margin=self.margin, metric=self.metric,
                              soft_margin=self.soft_margin, reduction=self.reduction, normalize=self.normalize)

    def extra_repr(self) -> str:
        return (f"margin={self.margin}, metric={self.metric!r}, soft_margin={self.soft_margin}, "
                f"reduction={self.reduction!r}, normalize={self.normalize}")


class SemiHardTripletLoss(nn.Module):
    """Module form of `tripletops.semi_hard_loss` (TF-Addons ``TripletSemiHardLoss``).

    Example::

        >>> criterion = tripletops.SemiHardTripletLoss(margin=1.0)
        >>> loss = criterion(embeddings, labels)
    """

    def __init__(self, margin: float = 1.0, metric: str = "euclidean", normalize: bool = False) -> None:
        super().__init__()
        _validate.margin(margin)
        _validate.metric(metric)
        _validate.flag(normalize, "normalize")
        self.margin, self.metric, self.normalize = margin, metric, normalize

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return semi_hard_loss(embeddings, labels, margin=self.margin, metric=self.metric, normalize=self.normalize)

    def extra_repr(self) -> str:
        return f"margin={self.margin}, metric={self.metric!r}, normalize={self.normalize}"


class ContrastiveLoss(nn.Module):
    """Module form of `tripletops.contrastive_loss` (all pairs i < j).

    Example::

        >>> criterion = tripletops.ContrastiveLoss(pos_margin=0.0, neg_margin=1.0)
        >>> loss = criterion(embeddings, labels)
    """

    def __init__(self, pos_margin: float = 0.0, neg_margin: float = 1.0, metric: str = "euclidean",
                 reduction: str = "mean_nonzero", normalize: bool = False) -> None:
        super().__init__()
        _validate.margin(pos_margin, "pos_margin")
        _validate.margin(neg_margin, "neg_margin")
        _validate.metric(metric)
        _validate.reduction(reduction)
        _validate.flag(normalize, "normalize")
        self.pos_margin, self.neg_margin, self.metric = pos_margin, neg_margin, metric
        self.reduction, self.normalize = reduction, normalize

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return contrastive_loss(embeddings, labels, pos_margin=self.pos_margin, neg_margin=self.neg_margin,
                                metric=self.metric, reduction=self.reduction, normalize=self.normalize)

    def extra_repr(self) -> str:
        return (f"pos_margin={self.pos_margin}, neg_margin={self.neg_margin}, metric={self.metric!r}, "
                f"reduction={self.reduction!r}, normalize={self.normalize}")


class CenterLoss(nn.Module):
    """Center loss (Wen et al. 2016): pulls each embedding toward its class center.

    ``loss = mean_i ‖x_i − c_{y_i}‖²`` (``reduction="sum"``: the sum; ``"none"``: per row).
    The centers are a buffer (saved in ``state_dict``), not parameters: in training mode,
    after the loss is computed, each class present in the batch moves its center by an
    exponential moving average, ``c ← momentum·c + (1 − momentum)·mean(x_i of the class)``
    (detached). A class seen for the first time starts at its batch mean. In eval mode
    nothing is updated. Gradients flow to the embeddings only.

    Example::

        >>> center = tripletops.CenterLoss(num_classes=10, dim=64, momentum=0.9)
        >>> loss = triplet_loss + 0.01 * center(embeddings, labels)
    """

    centers: torch.Tensor
    initialized: torch.Tensor

    def __init__(self, num_classes: int, dim: int, momentum: float = 0.9, reduction: str = "mean") -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"tripletops: num_classes must be a positive int, got {num_classes!r}")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"tripletops: dim must be a positive int, got {dim!r}")
        if not (isinstance(momentum, (int, float)) and 0.0 <= momentum < 1.0):
            raise ValueError(f"tripletops: momentum must be in [0, 1), got {momentum!r}")
        _validate.reduction(reduction)
        if reduction == "mean_nonzero":
            raise ValueError("tripletops: CenterLoss reduction must be 'mean', 'sum' or 'none', got 'mean_nonzero'")
        self.num_classes, self.dim, self.momentum, self.reduction = num_classes, dim, float(momentum), reduction
        self.register_buffer("centers", torch.zeros(num_classes, dim))
        self.register_buffer("initialized", torch.zeros(num_classes, dtype=torch.bool))

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        _validate.rows(embeddings, "embeddings")
        _validate.labels(labels, "labels", embeddings.shape[0], "embeddings", embeddings)
        if labels.dim() != 1:
            raise ValueError("tripletops: CenterLoss takes (B,) class ids (one center per class), got labels of "
                             f"shape {tuple(labels.shape)}")
        if embeddings.shape[1] != self.dim:
            raise ValueError(f"tripletops: embeddings must have dim {self.dim}, got {embeddings.shape[1]}")
        # A data-dependent check: eager only. Under torch.compile an out-of-range label
        # still fails, in the index into the centers (an IndexError, or a device assert).
        if not torch.compiler.is_compiling() and bool(((labels < 0) | (labels >= self.num_classes)).any()):
            raise ValueError(f"tripletops: labels must be in [0, {self.num_classes}), got "
                             f"[{int(labels.min())}, {int(labels.max())}]")
        self._leave_inference()
        self._follow(embeddings)
        labels = labels.long()
        compute = embeddings.dtype if embeddings.dtype == torch.float64 else torch.float32
        diff = embeddings.to(compute) - self.centers[labels].to(compute)
        per_row = diff.square().sum(1)
        if self.training:
            rebind = torch.compiler.is_compiling() and torch.is_grad_enabled() and embeddings.requires_grad
            self._update(embeddings.detach(), labels, rebind)
        out = per_row if self.reduction == "none" else per_row.sum() if self.reduction == "sum" else per_row.mean()
        return out.to(embeddings.dtype)

    def _leave_inference(self) -> None:
        self.centers = _outside_inference(self.centers)
        self.initialized = _outside_inference(self.initialized)

    def _follow(self, embeddings: torch.Tensor) -> None:
        """Keep the centers on the embeddings' device (fp32 for halves, fp64 for fp64)."""
        want = torch.float64 if embeddings.dtype == torch.float64 else torch.float32
        if self.centers.device != embeddings.device or self.centers.dtype != want:
            with torch.inference_mode(False):  # ordinary tensors, even when called inside inference_mode
                self.centers = self.centers.to(embeddings.device, want)
                self.initialized = self.initialized.to(embeddings.device)

    @torch.no_grad()
    def _update(self, embeddings: torch.Tensor, labels: torch.Tensor, rebind: bool) -> None:
        # Per class over all num_classes rows (fixed shapes, no torch.unique: a compiled
        # training step has no data-dependent shape); classes absent from the batch keep
        # their centers exactly.
        # index_add, not bincount: bincount's output shape depends on the data, which torch
        # 2.6's compiler refuses.
        count = torch.zeros(self.num_classes, dtype=torch.int64, device=labels.device).index_add_(
            0, labels, torch.ones_like(labels))
        sums = torch.zeros(self.num_classes, self.dim, device=embeddings.device, dtype=self.centers.dtype)
        sums.index_add_(0, labels, embeddings.to(self.centers.dtype))
        present = count > 0
        means = sums / count.clamp(min=1).to(sums.dtype)[:, None]
        moved = torch.where(self.initialized[:, None], self.momentum * self.centers + (1 - self.momentum) * means, means)
        updated = torch.where(present[:, None], moved, self.centers)
        if rebind:
            # New buffers, not writes into the old ones: the compiled backward may recompute
            # centers[labels] from the buffer it was given (the partitioner's choice), which
            # must then still hold the centers this loss was computed with. Without a
            # backward (no_grad, inference_mode) they are written in place: a new buffer
            # made under inference_mode would be an inference tensor, which the next
            # compiled training step could not save for its backward.
            self.centers = updated
            self.initialized = self.initialized | present
        else:
            self.centers.copy_(updated)
            self.initialized.logical_or_(present)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        def validate(got):
            c, init = got["centers"], got["initialized"]
            if tuple(c.shape) != (self.num_classes, self.dim) or c.dtype not in (torch.float32, torch.float64):
                return (f"centers must be a ({self.num_classes}, {self.dim}) float32 or float64 tensor, got "
                        f"{tuple(c.shape)} {c.dtype}")
            if tuple(init.shape) != (self.num_classes,) or init.dtype != torch.bool:
                return f"initialized must be a ({self.num_classes},) bool tensor, got {tuple(init.shape)} {init.dtype}"
            return None
        _load_all_or_nothing(self, state_dict, prefix, strict, missing_keys, unexpected_keys, error_msgs,
                             ("centers", "initialized"), validate)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, dim={self.dim}, momentum={self.momentum}, reduction={self.reduction!r}"


class CrossBatchMemory(nn.Module):
    """A FIFO memory of past embeddings and labels (XBM, Wang et al. 2020) used as the
    reference set of `batch_hard_loss`: anchors of the current batch are mined against
    up to ``size`` embeddings of earlier batches, with no B×M matrix.

    - ``forward(embeddings, labels, **loss_kwargs)`` computes
      ``batch_hard_loss(embeddings, labels, ref_embeddings=memory, ref_labels=...)``
      against the memory *as it was before this batch* (the batch's own rows are not in
      it, so no anchor meets itself), then enqueues the batch (detached) when
      ``enqueue=True`` and the module is in training mode. While the memory is empty,
      the batch mines within itself. Gradients flow to the current batch only.
      Because the backward still reads the memory rows that the enqueue overwrites,
      that path copies the filled memory once per call (O(M·D)). To avoid the copy, call
      ``forward(..., enqueue=False)``, then ``backward()``, then ``enqueue(...)``.
    - ``enqueue(embeddings, labels)`` adds rows, overwriting the oldest once full;
      ``reset()`` empties it. ``embeddings`` / ``labels`` give the filled part, oldest
      first.
    - Labels: ``(B,)`` class ids, or with ``num_labels=L`` ``(B, L)`` multi-hot labels
      (bool/uint8; positives share a label, as in `batch_hard_loss`).
    - Memory: ``size × dim`` floats and ``size`` int64 labels, or ``size × L`` bools
      (buffers, so ``state_dict`` saves them), on the embeddings' device. An empty memory takes the batch's dtype; a
      filled one only widens, never narrows. A call that raises changes nothing.

    Example::

        >>> xbm = tripletops.CrossBatchMemory(size=65536, dim=128)
        >>> loss = xbm(model(x), y, margin=0.2)
    """

    memory: torch.Tensor
    memory_labels: torch.Tensor
    count: torch.Tensor
    head: torch.Tensor

    def __init__(self, size: int, dim: int, num_labels: Optional[int] = None) -> None:
        super().__init__()
        checked = (("size", size), ("dim", dim)) + ((("num_labels", num_labels),) if num_labels is not None else ())
        for name, v in checked:
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"tripletops: {name} must be a positive int, got {v!r}")
        self.size, self.dim, self.num_labels = size, dim, num_labels
        self.register_buffer("memory", torch.zeros(size, dim))
        labels_shape, labels_dtype = ((size,), torch.int64) if num_labels is None else ((size, num_labels), torch.bool)
        self.register_buffer("memory_labels", torch.zeros(labels_shape, dtype=labels_dtype))
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))  # filled rows
        self.register_buffer("head", torch.zeros((), dtype=torch.int64))   # next row to write

    def __len__(self) -> int:
        return int(self.count)

    @property
    def embeddings(self) -> torch.Tensor:
        """The stored embeddings, oldest first."""
        n = int(self.count)
        return self.memory[:n] if n < self.size else torch.roll(self.memory, -int(self.head), 0)

    @property
    def labels(self) -> torch.Tensor:
        n = int(self.count)
        return self.memory_labels[:n] if n < self.size else torch.roll(self.memory_labels, -int(self.head), 0)

    def reset(self) -> None:
        self._leave_inference()
        self.count.zero_()
        self.head.zero_()

    def _leave_inference(self) -> None:
        for name in ("memory", "memory_labels", "count", "head"):
            setattr(self, name, _outside_inference(getattr(self, name)))

    def _check(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        _validate.rows(embeddings, "embeddings")
        _validate.labels(labels, "labels", embeddings.shape[0], "embeddings", embeddings)
        if embeddings.shape[1] != self.dim:
            raise ValueError(f"tripletops: embeddings must have dim {self.dim}, got {embeddings.shape[1]}")
        if self.num_labels is None and labels.dim() != 1:
            raise ValueError("tripletops: this CrossBatchMemory stores (B,) class ids; for (B, L) multi-hot labels "
                             f"create it with num_labels=L, got labels of shape {tuple(labels.shape)}")
        if self.num_labels is not None and (labels.dim() != 2 or labels.shape[1] != self.num_labels):
            raise ValueError(f"tripletops: this CrossBatchMemory stores (B, {self.num_labels}) multi-hot labels, "
                             f"got labels of shape {tuple(labels.shape)}")

    def _storage_for(self, embeddings: torch.Tensor) -> tuple:
        """The memory on the batch's device, in the dtype it keeps after this batch: an empty
        memory takes the batch's dtype; a filled one only widens (fp16 into fp32 stays fp32;
        fp64 into fp32 widens losslessly), never narrows. No state changes here."""
        dtype = embeddings.dtype if int(self.count) == 0 else torch.promote_types(self.memory.dtype, embeddings.dtype)
        if (torch.compiler.is_compiling() and not torch.is_grad_enabled()
                and (dtype != self.memory.dtype or embeddings.device != self.memory.device)):
            # Compiled under inference_mode, new buffers are inference tensors whatever
            # inference_mode(False) says, and the next compiled training step could not save
            # them for backward; a compiled call can ask neither is_inference() nor whether
            # inference_mode is on, so every compiled call without grad mode is refused here.
            raise RuntimeError(
                f"tripletops: CrossBatchMemory would change its memory from {self.memory.dtype} on "
                f"{self.memory.device} to {dtype} on {embeddings.device} inside a compiled call without grad "
                "mode (under torch.inference_mode the new buffers would be inference tensors, which the next "
                "compiled training step cannot use); convert it first with .to(dtype=..., device=...), or make "
                "one call outside torch.compile")
        with torch.inference_mode(False):  # ordinary tensors, even when called inside inference_mode
            return self.memory.to(embeddings.device, dtype), self.memory_labels.to(embeddings.device)

    def _adopt(self, memory: torch.Tensor, memory_labels: torch.Tensor) -> None:
        if memory is not self.memory:
            self.memory = memory
        if memory_labels is not self.memory_labels:
            self.memory_labels = memory_labels
            with torch.inference_mode(False):
                self.count, self.head = self.count.to(memory.device), self.head.to(memory.device)

    @torch.no_grad()
    def enqueue(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        """Add rows (detached), overwriting the oldest once the memory is full."""
        self._check(embeddings, labels)  # before any state change: a rejected call changes nothing
        self._leave_inference()
        self._adopt(*self._storage_for(embeddings))
        self._write(embeddings, labels, rebind=False)

    @torch.no_grad()
    def _write(self, embeddings: torch.Tensor, labels: torch.Tensor, rebind: bool) -> None:
        embeddings, labels = embeddings[-self.size:], labels[-self.size:]  # more rows than fit: keep the newest
        b = embeddings.shape[0]
        # Tensor arithmetic on head / count, no int(): nothing data-dependent for torch.compile.
        idx = (self.head + torch.arange(b, device=embeddings.device)) % self.size
        rows = embeddings.detach().to(self.memory.dtype)
        # Class ids are stored as int64 (no wrap-around), multi-hot labels as bool.
        row_labels = labels.long() if self.num_labels is None else labels.bool()
        if rebind:  # new buffers: the old ones stay as the pending backward saw them
            self.memory = self.memory.index_put((idx,), rows)
            self.memory_labels = self.memory_labels.index_put((idx,), row_labels)
        else:
            self.memory[idx] = rows
            self.memory_labels[idx] = row_labels
        self.head.copy_((self.head + b) % self.size)
        self.count.copy_((self.count + b).clamp(max=self.size))

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, *, enqueue: bool = True,
                **loss_kwargs) -> torch.Tensor:
        """`batch_hard_loss` of the batch against the memory as it was before it, then (in
        training mode, with ``enqueue=True``) the batch is enqueued. ``loss_kwargs`` are
        `batch_hard_loss`'s (margin, metric, soft_margin, reduction, normalize); the
        reference set is the memory, so ``ref_embeddings`` / ``ref_labels`` are refused."""
        _validate.flag(enqueue, "enqueue")
        taken = sorted(k for k in ("ref_embeddings", "ref_labels") if k in loss_kwargs)
        if taken:
            raise TypeError(f"tripletops: CrossBatchMemory's reference set is its memory; it takes no {', '.join(taken)}"
                            " (call tripletops.batch_hard_loss for another reference set)")
        self._check(embeddings, labels)
        self._leave_inference()
        memory, memory_labels = self._storage_for(embeddings)
        n = int(self.count)
        will_enqueue = enqueue and self.training
        # The backward reads the memory rows that the enqueue below overwrites. Eager: they
        # are copied for it. Compiled: the copy would not survive (the compiled backward may
        # read the buffer it was given), so the enqueue writes new buffers instead.
        protect = will_enqueue and n > 0 and torch.is_grad_enabled() and embeddings.requires_grad
        rebind = protect and torch.compiler.is_compiling()
        x = embeddings.to(memory.dtype)  # differentiable; a no-op unless the memory is wider
        if n == 0:
            loss = batch_hard_loss(x, labels, **loss_kwargs)
        else:
            ref = memory[:n]
            if protect and not rebind:
                ref = ref.clone()
            # The stored labels as they are (int64): the kernels compare labels of any
            # integer dtypes exactly, with no cast to the batch's dtype.
            loss = batch_hard_loss(x, labels, ref_embeddings=ref, ref_labels=memory_labels[:n], **loss_kwargs)
        # The loss succeeded (every argument is valid): only now does the state change.
        self._adopt(memory, memory_labels)
        if will_enqueue:
            self._write(embeddings.detach(), labels, rebind=rebind)
        return loss.to(embeddings.dtype)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        def validate(got):
            m, lab, count, head = got["memory"], got["memory_labels"], got["count"], got["head"]
            if tuple(m.shape) != (self.size, self.dim) or m.dtype not in _validate.FLOAT_DTYPES:
                return (f"memory must be a ({self.size}, {self.dim}) float32, float64, float16 or bfloat16 tensor "
                        f"(the dtypes the kernels take), got {tuple(m.shape)} {m.dtype}")
            want = ((self.size,), torch.int64) if self.num_labels is None else ((self.size, self.num_labels), torch.bool)
            if tuple(lab.shape) != want[0] or lab.dtype != want[1]:
                return f"memory_labels must be a {want[0]} {want[1]} tensor, got {tuple(lab.shape)} {lab.dtype}"
            if count.dim() != 0 or head.dim() != 0 or count.dtype != torch.int64 or head.dtype != torch.int64:
                return "count and head must be int64 scalars"
            n, h = int(count), int(head)
            if not (0 <= n <= self.size and 0 <= h < self.size and (n == self.size or h == n)):
                return f"count {n} and head {h} do not describe a memory of size {self.size}"
            return None
        _load_all_or_nothing(self, state_dict, prefix, strict, missing_keys, unexpected_keys, error_msgs,
                             ("memory", "memory_labels", "count", "head"), validate)

    def extra_repr(self) -> str:
        labels = "" if self.num_labels is None else f", num_labels={self.num_labels}"
        return f"size={self.size}, dim={self.dim}{labels}, filled={int(self.count)}"
