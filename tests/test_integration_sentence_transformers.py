"""tripletops.integrations.sentence_transformers against sentence-transformers' own losses:
the same values and gradients on the same embeddings, the original's rules included
(anchors without a positive or a negative, one-class batches), the same constructor,
config and citation, and clear errors."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import DEVICES

st_losses = pytest.importorskip("sentence_transformers.sentence_transformer.losses")
T = pytest.importorskip("tripletops.integrations.sentence_transformers")

NAMES = ["BatchHardTripletLoss", "BatchSemiHardTripletLoss", "BatchAllTripletLoss", "BatchHardSoftMarginTripletLoss"]
FNS = st_losses.BatchHardTripletLossDistanceFunction
LABELS = {
    "classes of 4": lambda n: torch.arange(n) // 4,
    "uneven": lambda n: torch.arange(n) % 5,
    "one class": lambda n: torch.zeros(n, dtype=torch.long),
    "all singletons": lambda n: torch.arange(n),
    # pairs in the first half, singletons (no positive) in the second
    "pairs and singletons": lambda n: torch.where(torch.arange(n) < n // 2, torch.arange(n) // 2, torch.arange(n) + n),
}


def pair(name, fn, margin=0.7, model=None):
    model = torch.nn.Identity() if model is None else model
    kw = {} if name == "BatchHardSoftMarginTripletLoss" else {"margin": margin}
    return getattr(T, name)(model, distance_metric=fn, **kw), getattr(st_losses, name)(model, distance_metric=fn, **kw)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("fn", ["euclidean_distance", "eucledian_distance", "cosine_distance"])
@pytest.mark.parametrize("labels", list(LABELS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_same_values_and_gradients_as_the_original(device, name, fn, labels, dtype):
    torch.manual_seed(hash((name, fn, labels)) % 1000)
    x = torch.randn(18, 8, dtype=dtype, device=device)
    y = LABELS[labels](18).to(device)
    ours, orig = pair(name, getattr(FNS, fn), margin=0.7 if fn != "cosine_distance" else 0.3)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    a = ours.compute_loss_from_embeddings([xa], y)
    b = orig.compute_loss_from_embeddings([xb], y)
    a.backward(), b.backward()
    # the bar: losses to 1e-6 relative, gradients to 1e-5 (fp64: far tighter)
    tol, gtol = (1e-10, 1e-9) if dtype == torch.float64 else (1e-6, 1e-5)
    assert a.dtype == b.dtype and a.shape == b.shape == ()
    a_, b_ = a.detach().item(), b.detach().item()
    assert abs(a_ - b_) <= tol * max(1.0, abs(b_)), (a_, b_)
    assert torch.allclose(xa.grad, xb.grad, rtol=gtol, atol=gtol * 0.1), (xa.grad - xb.grad).abs().max()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_halves_as_the_original(name, dtype):
    """The original's euclidean distances of halves are fp32; so are the drop-in's."""
    torch.manual_seed(3)
    x, y = torch.randn(16, 8).to(dtype), torch.arange(16) // 4
    for fn in (FNS.euclidean_distance, FNS.cosine_distance):
        ours, orig = pair(name, fn, margin=0.5)
        a, b = ours.compute_loss_from_embeddings([x], y), orig.compute_loss_from_embeddings([x], y)
        assert abs(float(a) - float(b)) <= 2e-2 * max(1.0, abs(float(b))), (name, fn, float(a), float(b))


class Encoder(torch.nn.Module):
    """A stand-in SentenceTransformer: features in, {"sentence_embedding": ...} out."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(6, 4, dtype=torch.float64)

    def forward(self, features):
        return {"sentence_embedding": self.linear(features["x"])}


@pytest.mark.parametrize("name", NAMES)
def test_forward_config_citation_and_subclass(name):
    torch.manual_seed(4)
    model = Encoder()
    ours, orig = pair(name, FNS.euclidean_distance, model=model)
    assert isinstance(ours, getattr(st_losses, name)) and type(ours).__name__ == name
    assert ours.get_config_dict() == orig.get_config_dict()
    assert ours.citation == orig.citation
    assert ours.sentence_embedder is model
    features, y = [{"x": torch.randn(12, 6, dtype=torch.float64)}], torch.arange(12) // 3
    a = ours(features, y)
    a.backward()
    ga = model.linear.weight.grad.clone()
    model.zero_grad()
    b = orig(features, y)
    b.backward()
    assert torch.allclose(a, b) and torch.allclose(ga, model.linear.weight.grad)
    default = getattr(T, name)(model)  # the original's defaults: euclidean, margin 5
    assert default.get_config_dict() == getattr(st_losses, name)(model).get_config_dict()


@pytest.mark.parametrize("name", NAMES)
def test_clear_errors(name):
    with pytest.raises(ValueError, match="euclidean_distance.*cosine_distance"):
        getattr(T, name)(torch.nn.Identity(), distance_metric=lambda e: torch.cdist(e, e))
    loss, _ = pair(name, FNS.euclidean_distance)
    with pytest.raises(ValueError, match="expects 8 labels"):
        loss.compute_loss_from_embeddings([torch.randn(8, 3)], torch.arange(7))
    with pytest.raises(AttributeError):
        T.NotALoss  # noqa: B018


def test_import_does_not_import_sentence_transformers():
    code = ("import sys, tripletops.integrations.sentence_transformers as t; "
            "assert 'sentence_transformers' not in sys.modules, 'imported at import'; "
            "t.BatchHardTripletLoss; assert 'sentence_transformers' in sys.modules")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
