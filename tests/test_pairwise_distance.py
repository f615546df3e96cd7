"""pairwise_distance against the float64 reference."""
from __future__ import annotations

import pytest
import torch

import tripletops
from tripletops import reference

from conftest import DTYPES, METRICS, assert_close_rel, assert_grad_close, devices_for

DEVICES = devices_for("pairwise_distance")

SHAPES = [(1, 1, 1), (1, 5, 3), (2, 3, 1), (7, 9, 5), (65, 33, 17), (130, 70, 64)]
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("n,m,d", SHAPES)
@pytest.mark.parametrize("with_y", [True, False])
def test_forward_backward_match_reference(device, dtype, metric, n, m, d, with_y, poisoned):
    x = torch.randn(n, d, dtype=torch.float64).to(device=device, dtype=dtype).requires_grad_(True)
    y = torch.randn(m, d, dtype=torch.float64).to(device=device, dtype=dtype).requires_grad_(True) if with_y else None
    x64 = x.detach().double().requires_grad_(True)
    y64 = y.detach().double().requires_grad_(True) if with_y else None
    out = tripletops.pairwise_distance(x, y, metric=metric)
    ref = reference.pairwise_distance(x64, y64, metric=metric)
    assert out.dtype == dtype and out.shape == (n, m if with_y else n)
    assert_close_rel(out, ref, TOL[dtype], "distances")
    w = torch.randn(ref.shape, dtype=torch.float64, device=device)
    (out * w.to(out)).sum().backward()
    (ref * w).sum().backward()
    if dtype in (torch.float16, torch.bfloat16):
        assert torch.isfinite(x.grad).all()
        return
    assert_grad_close(x.grad, x64.grad, 1e-4 if dtype == torch.float32 else 1e-9, "grad x")
    if with_y:
        assert_grad_close(y.grad, y64.grad, 1e-4 if dtype == torch.float32 else 1e-9, "grad y")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("with_y", [True, False])
@pytest.mark.parametrize("layout", ["expanded", "transposed", "sliced"])
def test_backward_takes_the_incoming_gradient_with_its_strides(device, metric, with_y, layout):
    """d loss / d dist as autograd hands it is often not contiguous: dist.sum()'s is one
    value expanded (stride 0), a transposed use gives a transposed view. The backward reads
    it with its strides (the CUDA kernels no longer copy it) and must equal the reference
    given the same values."""
    n, m, d = 37, 21 if with_y else 37, 9
    x = torch.randn(n, d, dtype=torch.float64).to(device=device, dtype=torch.float32).requires_grad_(True)
    y = torch.randn(m, d, dtype=torch.float64).to(device=device, dtype=torch.float32).requires_grad_(True) \
        if with_y else None
    if layout == "expanded":
        g = torch.full((1, 1), 0.75, dtype=torch.float32, device=device).expand(n, m)
    elif layout == "transposed":
        g = torch.randn(m, n, dtype=torch.float32, device=device).t()
    else:
        g = torch.randn(n, 2 * m, dtype=torch.float32, device=device)[:, ::2]
    assert not g.is_contiguous()
    inputs = (x, y) if with_y else (x,)
    out = tripletops.pairwise_distance(x, y, metric=metric)
    got = torch.autograd.grad(out, inputs, grad_outputs=g)
    refs = tuple(t.detach().double().requires_grad_(True) for t in inputs)
    ref = reference.pairwise_distance(*refs, metric=metric) if with_y else \
        reference.pairwise_distance(refs[0], None, metric=metric)
    want = torch.autograd.grad(ref, refs, grad_outputs=g.double())
    for a, b, name in zip(got, want, ("grad x", "grad y")):
        assert_grad_close(a, b, 1e-4, name)


@pytest.mark.parametrize("metric", METRICS)
def test_self_distance_diagonal_is_zero_with_zero_gradient(metric):
    x = (torch.randn(20, 8) * 0.01 + 50).requires_grad_(True)  # far from the origin: worst cancellation
    d = tripletops.pairwise_distance(x, metric=metric)
    if metric != "cosine":
        assert torch.equal(torch.diagonal(d), torch.zeros(20))
    assert_close_rel(d, reference.pairwise_distance(x.detach().double(), metric=metric), 1e-5)
    d.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_euclidean_gradient_zero_at_zero_distance():
    x = torch.zeros(3, 4, requires_grad=True)
    tripletops.pairwise_distance(x).sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_non_contiguous_inputs():
    base = torch.randn(30, 20, dtype=torch.float64)
    x, y = base[::2, :7], base[:9, 5:12]
    assert not x.is_contiguous() and not y.is_contiguous()
    assert torch.equal(tripletops.pairwise_distance(x, y), tripletops.pairwise_distance(x.contiguous(), y.contiguous()))
    xt = base[:6, :10].t()
    assert_close_rel(tripletops.pairwise_distance(xt), reference.pairwise_distance(xt), 1e-10)


def test_nan_propagates():
    x = torch.randn(5, 3)
    x[2, 0] = float("nan")
    d = tripletops.pairwise_distance(x)
    assert torch.isnan(d[2]).all() and torch.isnan(d[:, 2]).all()
    assert torch.isfinite(d[[0, 1, 3, 4]][:, [0, 1, 3, 4]]).all()


@pytest.mark.parametrize("metric", METRICS)
def test_gradcheck(metric):
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    y = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: tripletops.pairwise_distance(a, b, metric=metric), (x, y))
    assert torch.autograd.gradcheck(lambda a: tripletops.pairwise_distance(a, metric=metric) * (1 - torch.eye(5,
                                    dtype=torch.float64)), (x,))


@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean"])
@pytest.mark.parametrize("with_y", [True, False])
def test_far_from_origin_fp32_gradients(metric, with_y):
    """sum_j w_ij (x_i - y_j) must not be formed as rowsum(w) x_i - w y when |x| >> |x - y|."""
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(20, 6, dtype=torch.float64, generator=g) * 0.01 + 300).float().double()
    y = (torch.randn(15, 6, dtype=torch.float64, generator=g) * 0.01 + 300).float().double() if with_y else None
    x32 = x.float().requires_grad_(True)
    y32 = y.float().requires_grad_(True) if with_y else None
    x64 = x.clone().requires_grad_(True)
    y64 = y.clone().requires_grad_(True) if with_y else None
    w = torch.randn(20, 15 if with_y else 20, dtype=torch.float64, generator=g)
    (tripletops.pairwise_distance(x32, y32, metric=metric) * w.float()).sum().backward()
    (reference.pairwise_distance(x64, y64, metric=metric) * w).sum().backward()
    assert_grad_close(x32.grad, x64.grad, 1e-4, "grad x")
    if with_y:
        assert_grad_close(y32.grad, y64.grad, 1e-4, "grad y")
