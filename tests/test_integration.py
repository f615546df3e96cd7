"""Dispatcher integration: opcheck, gradcheck, torch.compile, extension_available, fallback."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch

import tripletops
from tripletops import reference

from conftest import EMU, STRICT, devices_for

ops = torch.ops.tripletops


def test_another_torch_is_named_not_a_missing_symbol(tmp_path):
    """An extension built against another torch is not loaded: the error names both versions."""
    from tripletops._ext import _torch_mismatch

    f = tmp_path / "_C.torch_version"
    f.write_text("2.4.0+cu121\n")
    message = _torch_mismatch(str(f), running="2.13.0+cpu")
    assert "torch 2.4.0+cu121" in message and "torch 2.13.0+cpu" in message and "--no-build-isolation" in message
    f.write_text("2.13.0+cpu\n")
    assert _torch_mismatch(str(f), running="2.13.0+cpu") is None
    assert _torch_mismatch(str(tmp_path / "missing"), running="2.13.0+cpu") is None


def test_extension_loaded_in_strict_mode():
    info = tripletops.extension_available()
    if STRICT:
        assert info.loaded and "cpu" in info.devices, info
    assert bool(info) == info.loaded


@pytest.mark.cuda_emu
@pytest.mark.skipif(not EMU, reason="needs make cuda-emu (TRIPLETOPS_EMU_LIB)")
def test_every_op_and_backward_has_a_cuda_kernel():
    """The CUDA sources register every op of csrc/schema.h (the emulated build registers
    the same TORCH_LIBRARY_IMPL blocks), so a CUDA build's extension_available().devices
    lists "cuda"; on a GPU machine that is checked directly."""
    registered = torch._C._dispatch_get_registrations_for_dispatch_key("CPU")
    cpu = {n.split("::")[1] for n in registered if n.startswith("tripletops::")}
    emulated_cuda = {n.split("::")[1] for n in registered if n.startswith("tripletops_emu::")}
    assert len(cpu) == 15 and cpu == emulated_cuda, cpu ^ emulated_cuda
    if torch._C._dispatch_has_kernel_for_dispatch_key("tripletops::pairwise_distance", "CUDA"):  # a CUDA build
        assert "cuda" in tripletops.extension_available().devices


def _opcheck_samples(ops=torch.ops.tripletops):
    x = torch.randn(9, 5, dtype=torch.float64)
    xg = x.clone().requires_grad_(True)
    y = torch.tensor([0, 0, 1, 1, 1, 2, 2, 3, 0])
    bank = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    bank_y = torch.tensor([0, 1, 2, 3, 0, 1, 2])
    yield ops.pairwise_distance.default, (xg, None, "euclidean")
    yield ops.pairwise_distance.default, (xg, bank, "cosine")
    d = ops.pairwise_distance(x, bank.detach(), "sqeuclidean")
    yield ops.pairwise_distance_backward.default, (torch.randn_like(d), x, bank.detach(), d, "sqeuclidean")
    yield ops.batch_hard_mine.default, (x, y, None, None, "euclidean")
    yield ops.batch_hard_mine.default, (x, y, bank.detach(), bank_y, "cosine")
    for red in ("mean", "none"):
        yield ops.batch_hard_loss.default, (xg, y, None, None, 0.2, "euclidean", False, red)
        yield ops.batch_hard_loss.default, (xg, y, bank, bank_y, 0.2, "sqeuclidean", True, red)
    out = ops.batch_hard_loss(x, y, None, None, 0.2, "euclidean", False, "sum")
    yield ops.batch_hard_loss_backward.default, (torch.ones(()), x, None, *out[1:], 0.2, "euclidean", False, "sum", False)
    out = ops.batch_hard_loss(x, y, bank.detach(), bank_y, 0.2, "euclidean", False, "none")
    yield ops.batch_hard_loss_backward.default, (torch.ones(9), x, bank.detach(), *out[1:], 0.2, "euclidean", False,
                                                 "none", True)
    for red in ("mean", "mean_nonzero"):
        yield ops.batch_all_loss.default, (xg, y, 0.2, "euclidean", False, red)
    yield ops.batch_all_loss.default, (xg, y, 0.2, "cosine", True, "sum")
    _, d64 = ops.batch_all_loss(x, y, 0.2, "euclidean", False, "mean")
    yield ops.batch_all_loss_backward.default, (torch.ones((), dtype=torch.float64), x, y, d64, 0.2, "euclidean",
                                                False, "mean")
    yield ops.semi_hard_loss.default, (xg, y, 0.5, "sqeuclidean")
    yield ops.semi_hard_loss_backward.default, (torch.ones((), dtype=torch.float64), x, y, d64, 0.5, "euclidean")
    for red in ("mean", "none"):
        yield ops.contrastive_loss.default, (xg, y, 0.1, 1.2, "euclidean", red)
    _, dc = ops.contrastive_loss(x, y, 0.1, 1.2, "cosine", "none")
    yield ops.contrastive_loss_backward.default, (torch.randn(36, dtype=torch.float64), x, y, dc, 0.1, 1.2, "cosine",
                                                  "none")
    yield ops.knn.default, (x, None, 3, "euclidean", True)
    yield ops.knn.default, (x.float(), bank.detach().float(), 4, "cosine", False)
    a, p, n = (torch.randn(6, 3, dtype=torch.float64, requires_grad=True) for _ in range(3))
    for swap in (False, True):
        yield ops.triplet_margin_loss.default, (a, p, n, 1.0, "euclidean", swap, "mean")
        out = ops.triplet_margin_loss(a.detach(), p.detach(), n.detach(), 1.0, "cosine", swap, "none")
        yield ops.triplet_margin_loss_backward.default, (torch.ones(6), a.detach(), p.detach(), n.detach(), *out[1:],
                                                         1.0, "cosine", swap, "none")


@pytest.mark.parametrize("op,args", list(_opcheck_samples()), ids=lambda v: getattr(v, "__name__", None) or str(type(v)))
def test_opcheck(op, args):
    torch.library.opcheck(op, args)


@pytest.mark.cuda_emu
@pytest.mark.skipif(not EMU, reason="needs make cuda-emu (TRIPLETOPS_EMU_LIB)")
def test_opcheck_emulated_cuda_kernels():
    """opcheck of every CUDA op, its kernel emulated (schemas, fake kernels, autograd)."""
    for op, args in _opcheck_samples(torch.ops.tripletops_emu):
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("device", devices_for("batch_hard_loss"))
@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean", "cosine"])
@pytest.mark.parametrize("soft_margin", [False, True])
@pytest.mark.parametrize("with_bank", [False, True])
def test_gradcheck_batch_hard(device, metric, soft_margin, with_bank):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(10, 4, dtype=torch.float64, generator=g).to(device).requires_grad_(True)
    y = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 3, 3], device=device)
    if with_bank:
        bank = torch.randn(8, 4, dtype=torch.float64, generator=g).to(device).requires_grad_(True)
        bank_y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3], device=device)
        fn = lambda a, b: tripletops.batch_hard_loss(a, y, metric=metric, soft_margin=soft_margin, margin=1.0,
                                                     ref_embeddings=b, ref_labels=bank_y, reduction="none")
        assert torch.autograd.gradcheck(fn, (x, bank))
    else:
        fn = lambda a: tripletops.batch_hard_loss(a, y, metric=metric, soft_margin=soft_margin, margin=1.0,
                                                  reduction="none")
        assert torch.autograd.gradcheck(fn, (x,))


def test_compile_fullgraph_training_step():
    """A compiled loss (model + fused op, fullgraph=True: any graph break raises) trains
    exactly like the eager one."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    x, y = torch.randn(48, 16), torch.arange(12).repeat_interleave(4)
    bank, bank_y = torch.randn(64, 8), torch.arange(64) % 12

    def make():
        torch.manual_seed(1)
        return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))

    def loss_fn(model, x, y):
        e = model(x)
        return (tripletops.batch_hard_loss(e, y, margin=0.3)
                + tripletops.batch_hard_loss(e, y, metric="cosine", ref_embeddings=bank, ref_labels=bank_y)
                + tripletops.triplet_margin_loss(e[:16], e[16:32], e[32:])
                + tripletops.pairwise_distance(e[:4], e[4:8]).mean())

    losses = {}
    for mode in ("eager", "compiled"):
        model = make()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        fn = torch.compile(loss_fn, fullgraph=True) if mode == "compiled" else loss_fn
        trace = []
        for _ in range(3):
            opt.zero_grad()
            loss = fn(model, x, y)
            loss.backward()
            opt.step()
            trace.append(loss.item())
        losses[mode] = (trace, [p.detach().clone() for p in model.parameters()])
    assert losses["eager"][0] == pytest.approx(losses["compiled"][0], rel=1e-5)
    for a, b in zip(losses["eager"][1], losses["compiled"][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_fallback_on_uncovered_device_warns_once(monkeypatch):
    """Tensors on a device the kernels don't cover (here 'meta') go to the reference, with
    one ReferenceFallbackWarning; TRIPLETOPS_STRICT=1 turns that into an error."""
    x, y = torch.randn(6, 3, device="meta"), torch.zeros(6, dtype=torch.long, device="meta")
    monkeypatch.setenv("TRIPLETOPS_STRICT", "1")
    with pytest.raises(RuntimeError, match="TRIPLETOPS_STRICT=1"):
        tripletops.batch_hard_loss(x, y)
    monkeypatch.setenv("TRIPLETOPS_STRICT", "0")
    tripletops._ext._warned.discard(("pairwise_distance", "meta"))
    with pytest.warns(tripletops.ReferenceFallbackWarning, match="running tripletops.reference"):
        out = tripletops.pairwise_distance(x)
    assert out.shape == (6, 6) and out.device.type == "meta"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tripletops.pairwise_distance(x)  # warned once already: silent now


FALLBACK_SCRIPT = r"""
import sys, warnings
sys.modules["tripletops._C"] = None  # as if the extension had not been built
import torch, tripletops
assert not tripletops.extension_available(), tripletops.extension_available()
x = torch.randn(12, 5, dtype=torch.float64); y = torch.arange(12) % 3
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    a = tripletops.batch_hard_loss(x, y)
    b = tripletops.batch_hard_loss(x, y)
n = sum(issubclass(i.category, tripletops.ReferenceFallbackWarning) for i in w)
assert n == 1, n
assert torch.equal(a, tripletops.reference.batch_hard_loss(x, y))
print("ok")
"""


def test_missing_extension_falls_back_or_fails_in_strict_mode():
    env = {k: v for k, v in os.environ.items() if k != "TRIPLETOPS_STRICT"}
    run = lambda e: subprocess.run([sys.executable, "-c", FALLBACK_SCRIPT], env=e, capture_output=True, text=True,
                                   timeout=120)
    res = run(env)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr
    res = run({**env, "TRIPLETOPS_STRICT": "1"})
    assert res.returncode != 0 and "TRIPLETOPS_STRICT=1" in res.stderr


def test_reference_same_signatures():
    import inspect
    for name in ("pairwise_distance", "batch_hard_mine", "batch_hard_loss", "triplet_margin_loss"):
        assert inspect.signature(getattr(tripletops, name)) == inspect.signature(getattr(reference, name)), name

@pytest.mark.parametrize("name", ["BatchHardTripletLoss", "BatchAllTripletLoss", "SemiHardTripletLoss",
                                  "ContrastiveLoss", "TripletMarginLoss"])
def test_compile_dynamic_training_step_with_default_arguments(name):
    """torch.compile(fullgraph=True, dynamic=True) of a step with each loss module at its
    default arguments: no graph break (the margin checks trace symbolic floats), and the
    same loss and gradients as eager."""
    torch._dynamo.reset()
    crit = getattr(tripletops, name)()
    lin = torch.nn.Linear(8, 4)
    x, y = torch.randn(24, 8), torch.arange(6).repeat_interleave(4)

    def step(x, y):
        e = lin(x)
        return crit(e[:8], e[8:16], e[16:]) if name == "TripletMarginLoss" else crit(e, y)

    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    for b in (24, 36):  # a second batch size: the graph stays dynamic
        xb, yb = torch.randn(b, 8), torch.arange(b // 4).repeat_interleave(4)
        if name == "TripletMarginLoss":
            xb = xb[:24]
        lin.zero_grad()
        got = compiled(xb, yb)
        got.backward()
        grad = lin.weight.grad.clone()
        lin.zero_grad()
        want = step(xb, yb)
        want.backward()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad, lin.weight.grad, rtol=1e-4, atol=1e-6)


SECOND_ORDER = {
    "batch_hard_loss": lambda x, y: tripletops.batch_hard_loss(x, y),
    "batch_all_loss": lambda x, y: tripletops.batch_all_loss(x, y),
    "semi_hard_loss": lambda x, y: tripletops.semi_hard_loss(x, y),
    "triplet_margin_loss": lambda x, y: tripletops.triplet_margin_loss(x[:4], x[4:8], x[8:]),
    "pairwise_distance": lambda x, y: tripletops.pairwise_distance(x).sum(),
}


@pytest.mark.parametrize("op", list(SECOND_ORDER))
def test_second_derivatives_are_refused_naming_the_op(op):
    """create_graph=True then a second backward: an error that names the op, never a silently
    wrong (zero or partial) second derivative."""
    x = torch.randn(12, 5, dtype=torch.float64, requires_grad=True)
    y = torch.arange(3).repeat_interleave(4)
    loss = SECOND_ORDER[op](x, y)
    (g,) = torch.autograd.grad(loss, x, create_graph=True)
    assert g.requires_grad
    # batch-all and semi-hard are computed from pairwise_distance's (B, B) matrix, whose
    # backward is the first to be differentiated again: either name is the op's
    names = f"({op}|pairwise_distance)" if op in ("batch_all_loss", "semi_hard_loss") else op
    with pytest.raises(RuntimeError, match=f"tripletops.{names}: second derivatives are not implemented"):
        torch.autograd.grad((g * g).sum(), x)
    # first derivatives are unaffected
    (g2,) = torch.autograd.grad(SECOND_ORDER[op](x, y), x)
    torch.testing.assert_close(g.detach(), g2)


def test_autograd_nodes_are_named_after_their_op():
    """A loss prints grad_fn=<BatchHardLossBackward>> (it printed <TripletopsLibrary> >>)."""
    x = torch.randn(8, 4, requires_grad=True)
    y = torch.arange(8) // 2
    for loss, name in ((tripletops.batch_hard_loss(x, y), "BatchHardLossBackward"),
                       (tripletops.batch_all_loss(x, y), "BatchAllLossBackward"),
                       (tripletops.semi_hard_loss(x, y), "SemiHardLossBackward"),
                       (tripletops.contrastive_loss(x, y), "ContrastiveLossBackward"),
                       (tripletops.triplet_margin_loss(x, x.flip(0), x.roll(1, 0)), "TripletMarginLossBackward"),
                       (tripletops.pairwise_distance(x).sum(), "SumBackward0")):
        assert f"grad_fn=<{name}" in repr(loss), repr(loss)
    assert tripletops.pairwise_distance(x).grad_fn.name().endswith("::PairwiseDistanceBackward>")
