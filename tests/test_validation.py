"""Every bad input listed in docs/errors.md raises a clear error naming the argument."""
from __future__ import annotations

import pytest
import torch

import tripletops
from tripletops import reference

X = torch.randn(6, 4)
Y = torch.tensor([0, 0, 1, 1, 2, 2])
BANK, BANK_Y = torch.randn(9, 4), torch.arange(9) % 3

# (description, kwargs for batch_hard_loss, exception type, text the message must contain)
BATCH_HARD_CASES = [
    ("1-D embeddings", dict(embeddings=torch.randn(6)), ValueError, "embeddings must be 2-D"),
    ("3-D embeddings", dict(embeddings=torch.randn(6, 4, 1)), ValueError, "embeddings must be 2-D"),
    ("B = 0", dict(embeddings=torch.randn(0, 4), labels=torch.zeros(0, dtype=torch.long)), ValueError, "non-empty"),
    ("D = 0", dict(embeddings=torch.randn(6, 0)), ValueError, "non-empty"),
    ("label count", dict(labels=torch.tensor([0, 1, 2])), ValueError, "labels must have 6 entries"),
    ("float labels", dict(labels=Y.float()), TypeError, "labels must be integer class ids"),
    ("bool labels", dict(labels=Y > 0), TypeError, "labels must be integer class ids"),
    ("2-D int labels", dict(labels=Y[:, None]), TypeError, "look like class ids.*squeeze the last dimension"),
    ("(B, 2) int labels", dict(labels=Y[:, None].repeat(1, 2)), TypeError, "multi-hot labels must be bool or uint8"),
    ("3-D labels", dict(labels=Y[:, None, None]), ValueError, r"\(B,\) class ids or \(B, L\) multi-hot"),
    ("int embeddings", dict(embeddings=torch.ones(6, 4, dtype=torch.long)), TypeError, "embeddings must be float32"),
    ("not a tensor", dict(embeddings=[[1.0, 2.0]]), TypeError, "embeddings must be a torch.Tensor"),
    ("devices differ", dict(labels=Y.to("meta")), RuntimeError, "same device"),
    ("unknown metric", dict(metric="manhattan"), ValueError, "metric must be one of"),
    ("unknown reduction", dict(reduction="avg"), ValueError, "reduction must be one of"),
    ("negative margin", dict(margin=-0.1), ValueError, "margin must be a finite number >= 0"),
    ("nan margin", dict(margin=float("nan")), ValueError, "margin"),
    ("ref without labels", dict(ref_embeddings=BANK), ValueError, "given together"),
    ("ref dim", dict(ref_embeddings=torch.randn(9, 3), ref_labels=BANK_Y), ValueError, "ref_embeddings must have dim 4"),
    ("ref dtype", dict(ref_embeddings=BANK.double(), ref_labels=BANK_Y), TypeError, "ref_embeddings must have"),
    ("ref label count", dict(ref_embeddings=BANK, ref_labels=BANK_Y[:4]), ValueError, "ref_labels must have 9"),
    ("ref empty", dict(ref_embeddings=torch.randn(0, 4), ref_labels=BANK_Y[:0]), ValueError, "ref_embeddings must be non-empty"),
]


@pytest.mark.parametrize("impl", [tripletops, reference], ids=["tripletops", "reference"])
@pytest.mark.parametrize("desc,kwargs,exc,text", BATCH_HARD_CASES, ids=[c[0] for c in BATCH_HARD_CASES])
def test_batch_hard_loss_bad_input(impl, desc, kwargs, exc, text):
    args = dict(embeddings=X, labels=Y)
    args.update(kwargs)
    with pytest.raises(exc, match=text):
        impl.batch_hard_loss(args.pop("embeddings"), args.pop("labels"), **args)


@pytest.mark.parametrize("desc,kwargs,exc,text",
                         [c for c in BATCH_HARD_CASES if "margin" not in c[1] and "reduction" not in c[1]],
                         ids=[c[0] for c in BATCH_HARD_CASES if "margin" not in c[1] and "reduction" not in c[1]])
def test_batch_hard_mine_bad_input(desc, kwargs, exc, text):
    args = dict(embeddings=X, labels=Y)
    args.update(kwargs)
    with pytest.raises(exc, match=text):
        tripletops.batch_hard_mine(args.pop("embeddings"), args.pop("labels"), **args)


TRIPLET_CASES = [
    ("positive shape", dict(positive=torch.randn(5, 4)), ValueError, "positive must have anchor's shape"),
    ("negative dtype", dict(negative=torch.randn(6, 4, dtype=torch.float64)), TypeError, "negative must have anchor's dtype"),
    ("anchor 1-D", dict(anchor=torch.randn(6)), ValueError, "anchor must be 2-D"),
    ("empty", dict(anchor=torch.randn(0, 4), positive=torch.randn(0, 4), negative=torch.randn(0, 4)), ValueError, "non-empty"),
    ("int anchor", dict(anchor=torch.ones(6, 4, dtype=torch.int32)), TypeError, "anchor must be float32"),
    ("devices differ", dict(negative=torch.randn(6, 4, device="meta")), RuntimeError, "same device"),
    ("metric", dict(metric="l1"), ValueError, "metric must be one of"),
    ("reduction", dict(reduction="batchmean"), ValueError, "reduction must be one of"),
    ("margin", dict(margin=-1.0), ValueError, "margin"),
]


@pytest.mark.parametrize("impl", [tripletops, reference], ids=["tripletops", "reference"])
@pytest.mark.parametrize("desc,kwargs,exc,text", TRIPLET_CASES, ids=[c[0] for c in TRIPLET_CASES])
def test_triplet_margin_loss_bad_input(impl, desc, kwargs, exc, text):
    args = dict(anchor=X, positive=torch.randn(6, 4), negative=torch.randn(6, 4))
    args.update(kwargs)
    with pytest.raises(exc, match=text):
        impl.triplet_margin_loss(args.pop("anchor"), args.pop("positive"), args.pop("negative"), **args)


@pytest.mark.parametrize("kwargs,exc,text", [
    (dict(x=torch.randn(3)), ValueError, "x must be 2-D"),
    (dict(y=torch.randn(3, 5)), ValueError, "y must have dim 4"),
    (dict(y=torch.randn(3, 4, dtype=torch.float64)), TypeError, "y must have x's dtype"),
    (dict(metric="hamming"), ValueError, "metric must be one of"),
    (dict(x=torch.randn(0, 4)), ValueError, "non-empty"),
])
def test_pairwise_distance_bad_input(kwargs, exc, text):
    args = dict(x=X, y=None)
    args.update(kwargs)
    with pytest.raises(exc, match=text):
        tripletops.pairwise_distance(args.pop("x"), args.pop("y"), **args)


def test_modules_validate_at_construction():
    with pytest.raises(ValueError, match="margin"):
        tripletops.BatchHardTripletLoss(margin=-1)
    with pytest.raises(ValueError, match="metric"):
        tripletops.TripletMarginLoss(metric="l3")


@pytest.mark.parametrize("call", [
    lambda: torch.ops.tripletops.batch_hard_loss(X, Y, None, None, 0.2, "l7", False, "mean"),
    lambda: torch.ops.tripletops.batch_hard_loss(X, Y, None, None, 0.2, "euclidean", False, "avg"),
    lambda: torch.ops.tripletops.batch_hard_loss(X, Y[:3], None, None, 0.2, "euclidean", False, "mean"),
    lambda: torch.ops.tripletops.batch_hard_loss(X, Y, None, None, -1.0, "euclidean", False, "mean"),
    lambda: torch.ops.tripletops.batch_hard_mine(X[0], Y, None, None, "euclidean"),
    lambda: torch.ops.tripletops.pairwise_distance(X, torch.randn(2, 3), "euclidean"),
    lambda: torch.ops.tripletops.triplet_margin_loss(X, X[:2], X, 1.0, "euclidean", False, "mean"),
])
def test_raw_ops_check_their_inputs(call):
    """Calling torch.ops.tripletops.* directly skips the Python checks; the kernels check too."""
    with pytest.raises((RuntimeError, ValueError, TypeError), match="tripletops"):
        call()
