"""Pairwise distances."""
from __future__ import annotations

from typing import Optional

import torch

from . import _validate, reference
from . import _ext
from ._ext import use_extension


def pairwise_distance(x: torch.Tensor, y: Optional[torch.Tensor] = None, *, metric: str = "euclidean") -> torch.Tensor:
    """All distances between the rows of ``x`` and the rows of ``y`` (``y = x`` when None).

    Args:
        x: ``(N, D)`` float tensor (fp32, fp64, fp16, bf16), any strides.
        y: ``(M, D)`` tensor with x's dtype and device, or None.
        metric: ``"euclidean"`` (‖a−b‖₂), ``"sqeuclidean"`` (‖a−b‖₂²) or ``"cosine"``
            (1 − cos(a, b), with F.normalize's eps of 1e-12).

    Returns:
        ``(N, M)`` tensor in x's dtype, differentiable in x and y. The euclidean
        gradient at zero distance is 0 (the naive ``sqrt(|x|² + |y|² − 2x·y)`` gives NaN
        there). Entries where that GEMM form would cancel badly (d² small against the
        norms, e.g. the diagonal) are recomputed from the difference, so they are exact.

    Example::

        >>> x = torch.randn(5, 3)
        >>> tripletops.pairwise_distance(x).shape
        torch.Size([5, 5])
    """
    _validate.rows(x, "x")
    if y is not None:
        _validate.like(y, "y", x, "x", same_rows=False)
    _validate.metric(metric)
    if use_extension("pairwise_distance", x):
        return _ext.ops.pairwise_distance(x, y, metric)
    return reference._pairwise_distance(x, x if y is None else y, metric)
