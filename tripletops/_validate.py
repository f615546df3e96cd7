"""Input checks shared by the kernels' wrappers and the reference: messages name the
argument, what was expected and what was given."""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

METRICS = ("euclidean", "sqeuclidean", "cosine")
REDUCTIONS = ("none", "sum", "mean", "mean_nonzero")
FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def rows(x: torch.Tensor, name: str) -> None:
    """A float (rows, dim) tensor with rows > 0 and dim > 0."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"tripletops: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"tripletops: {name} must be 2-D (rows, dim), got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"tripletops: {name} must be float32, float64, float16 or bfloat16, got {x.dtype}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"tripletops: {name} must be non-empty (rows > 0, dim > 0), got shape {tuple(x.shape)}")


def like(x: torch.Tensor, name: str, ref: torch.Tensor, ref_name: str, same_rows: bool) -> None:
    """`x` is checked as rows and must match `ref` in dim, dtype, device (and rows)."""
    rows(x, name)
    if same_rows and x.shape != ref.shape:
        raise ValueError(f"tripletops: {name} must have {ref_name}'s shape {tuple(ref.shape)}, got {tuple(x.shape)}")
    if x.shape[1] != ref.shape[1]:
        raise ValueError(f"tripletops: {name} must have dim {ref.shape[1]} like {ref_name}, got {x.shape[1]}")
    if x.dtype != ref.dtype:
        raise TypeError(f"tripletops: {name} must have {ref_name}'s dtype {ref.dtype}, got {x.dtype}")
    device(x, name, ref, ref_name)


def device(x: torch.Tensor, name: str, ref: torch.Tensor, ref_name: str) -> None:
    if x.device != ref.device:
        raise RuntimeError(
            f"tripletops: {name} and {ref_name} must be on the same device, got {x.device} and {ref.device}"
        )


def labels(y: torch.Tensor, name: str, n: int, rows_name: str, x: torch.Tensor) -> None:
    """(n,) integer class ids, or (n, L) multi-hot labels (bool, or uint8 where a nonzero
    entry sets the label, as ``labels.bool()``), on x's device. Only shapes, dtypes and
    devices are checked: nothing reads the labels' values (no device sync on CUDA)."""
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"tripletops: {name} must be a torch.Tensor, got {type(y).__name__}")
    if y.dim() not in (1, 2):
        raise ValueError(f"tripletops: {name} must be (B,) class ids or (B, L) multi-hot labels, got shape "
                         f"{tuple(y.shape)}")
    if y.dim() == 2:
        if y.dtype not in (torch.bool, torch.uint8) and y.shape[1] == 1 and not y.dtype.is_floating_point \
                and not y.dtype.is_complex:
            raise TypeError(f"tripletops: {name} of shape {tuple(y.shape)} and dtype {y.dtype} look like class ids: "
                            f"class ids are (B,), so squeeze the last dimension ({name}.squeeze(1)); (B, L) "
                            "multi-hot labels are bool or uint8")
        if y.dtype not in (torch.bool, torch.uint8):
            raise TypeError(f"tripletops: {name} as (B, L) multi-hot labels must be bool or uint8, got {y.dtype}")
        if y.shape[1] < 1:
            raise ValueError(f"tripletops: {name} as multi-hot labels needs L >= 1 columns, got shape {tuple(y.shape)}")
    elif y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise TypeError(f"tripletops: {name} must be integer class ids of shape (B,) (any integer dtype: int8, "
                        f"int16, int32, int64, uint8), or (B, L) multi-hot bool/uint8 labels, got {y.dtype} of shape "
                        f"{tuple(y.shape)}")
    if y.shape[0] != n:
        raise ValueError(f"tripletops: {name} must have {n} entries, one per row of {rows_name}, got {y.shape[0]}")
    device(y, name, x, rows_name)


def same_kind(y: torch.Tensor, ref: torch.Tensor, name: str, ref_name: str) -> None:
    """Class ids with class ids, multi-hot with multi-hot of the same L."""
    if y.dim() != ref.dim() or (y.dim() == 2 and y.shape[1] != ref.shape[1]):
        kind = lambda t: "(B,) class ids" if t.dim() == 1 else f"multi-hot with L = {t.shape[1]}"  # noqa: E731
        raise ValueError(f"tripletops: {ref_name} must be labels of the same kind as {name}: {name} are "
                         f"{kind(y)}, {ref_name} are {kind(ref)}")


def metric(m: str) -> None:
    if m not in METRICS:
        raise ValueError(f"tripletops: metric must be one of {METRICS}, got {m!r}")


def reduction(r: str) -> None:
    if r not in REDUCTIONS:
        raise ValueError(f"tripletops: reduction must be one of {REDUCTIONS}, got {r!r}")


def _numpy_bool(v) -> bool:
    return type(v).__module__ == "numpy" and type(v).__name__ in ("bool", "bool_")


def margin(m: float, name: str = "margin") -> None:
    """A finite real >= 0: Python int/float, any numbers.Real such as numpy's float32 and
    float64 scalars, or a 0-d real tensor, as PyTorch's own losses take (the kernels take
    float(m): for a CUDA tensor, a device sync; under torch.compile, a graph break); not a
    bool."""
    if isinstance(m, torch.Tensor):
        if m.dim() != 0 or m.dtype == torch.bool or m.dtype.is_complex:
            raise TypeError(f"tripletops: {name} must be a real number or a 0-d real tensor, got a {m.dtype} tensor "
                            f"of shape {tuple(m.shape)}")
        m = float(m)
    if isinstance(m, bool) or _numpy_bool(m) or not isinstance(m, (int, float, numbers.Real)):
        raise TypeError(f"tripletops: {name} must be a real number, got {type(m).__name__}")
    # Comparisons, not math.isfinite: torch.compile(dynamic=True) traces a symbolic float
    # through them (NaN fails the first, inf the second).
    if not (m >= 0 and m < math.inf):
        raise ValueError(f"tripletops: {name} must be a finite number >= 0, got {m}")


def flag(value, name: str) -> None:
    """A bool (Python's or numpy's), not a truthy string or number."""
    if not (isinstance(value, bool) or _numpy_bool(value)):
        raise TypeError(f"tripletops: {name} must be a bool, got {type(value).__name__} {value!r}")


def reference_set(
    embeddings: torch.Tensor,
    ref_embeddings: Optional[torch.Tensor],
    ref_labels: Optional[torch.Tensor],
) -> None:
    if (ref_embeddings is None) != (ref_labels is None):
        raise ValueError("tripletops: ref_embeddings and ref_labels must be given together (or both None)")
    if ref_embeddings is not None:
        like(ref_embeddings, "ref_embeddings", embeddings, "embeddings", same_rows=False)
        labels(ref_labels, "ref_labels", ref_embeddings.shape[0], "ref_embeddings", ref_embeddings)


def mining(embeddings, labels_, metric_, ref_embeddings, ref_labels) -> None:
    rows(embeddings, "embeddings")
    labels(labels_, "labels", embeddings.shape[0], "embeddings", embeddings)
    metric(metric_)
    reference_set(embeddings, ref_embeddings, ref_labels)
    if ref_labels is not None:
        same_kind(labels_, ref_labels, "labels", "ref_labels")


def family(embeddings, labels_, metric_, reduction_, margin_, batch_all: bool = False) -> None:
    """Checks for batch_all_loss / semi_hard_loss (the batch is the reference set)."""
    rows(embeddings, "embeddings")
    labels(labels_, "labels", embeddings.shape[0], "embeddings", embeddings)
    metric(metric_)
    margin(margin_)
    reduction(reduction_)
    if batch_all and reduction_ == "none":
        raise ValueError("tripletops: batch_all_loss reduction must be 'mean', 'mean_nonzero' or 'sum' "
                         "('none' would be one value per triplet, B^3 of them), got 'none'")


def contrastive(embeddings, labels_, metric_, reduction_, pos_margin, neg_margin) -> None:
    rows(embeddings, "embeddings")
    labels(labels_, "labels", embeddings.shape[0], "embeddings", embeddings)
    metric(metric_)
    reduction(reduction_)
    margin(pos_margin, "pos_margin")
    margin(neg_margin, "neg_margin")


def positive_int(v, name: str, limit: int = 2**31 - 1) -> int:
    """A Python or numpy integer in [1, limit] (not a bool)."""
    if isinstance(v, bool) or _numpy_bool(v) or not isinstance(v, numbers.Integral):
        raise TypeError(f"tripletops: {name} must be a positive integer, got {type(v).__name__} {v!r}")
    if v < 1 or v > limit:
        raise ValueError(f"tripletops: {name} must be a positive integer of at most {limit}, got {v}")
    return int(v)


def search(queries, gallery, k, metric_: str, exclude_self, normalize) -> None:
    """knn's arguments."""
    rows(queries, "queries")
    if gallery is not None:
        like(gallery, "gallery", queries, "queries", same_rows=False)
    positive_int(k, "k")
    metric(metric_)
    if exclude_self is not None:
        flag(exclude_self, "exclude_self")
    flag(normalize, "normalize")
