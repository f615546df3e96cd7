"""The modules' state under torch.compile, inference_mode, load_state_dict and bad flags:
compiled gradients equal eager ones step after step while the state changes, one call
under inference_mode breaks nothing, a failed load changes nothing, and flags are
refused where they are given."""
from __future__ import annotations

import copy

import pytest
import torch

import tripletops

from conftest import DTYPES, GRAD_RTOL, LOSS_RTOL, assert_close_rel, assert_grad_close


def _batches(steps, b, d, dtype, classes, seed):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, d, generator=g, dtype=torch.float64).to(dtype),  # host tensor
             torch.randint(0, classes, (b,), generator=g)) for _ in range(steps)]  # host tensor


def _compiler_traces_int_of_a_tensor() -> bool:
    """CrossBatchMemory slices its memory to `int(count)` rows: torch 2.13's compiler traces
    that (an unbacked size), torch 2.6's graph-breaks on it."""
    try:
        torch._dynamo.reset()
        return bool(torch.compile(lambda m, n: m[:int(n)].sum(), fullgraph=True)(torch.ones(4), torch.tensor(2)) == 2)
    except Exception:
        return False


needs_traced_int = pytest.mark.skipif(not _compiler_traces_int_of_a_tensor(),
                                      reason=f"torch {torch.__version__}'s compiler does not trace int() of a tensor, "
                                             "which CrossBatchMemory needs under fullgraph=True")


def _stateful(name):
    if name == "CrossBatchMemory":
        m = tripletops.CrossBatchMemory(10, 3)
        m.enqueue(torch.randn(10, 3, dtype=torch.float64), torch.arange(10) % 3)  # full: every step overwrites rows
        return m, (lambda mod, e, y: mod(e, y, margin=0.5))
    return tripletops.CenterLoss(4, 3, momentum=0.5), (lambda mod, e, y: mod(e, y))


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", [pytest.param("CrossBatchMemory", marks=needs_traced_int), "CenterLoss"])
def test_compiled_gradients_equal_eager_step_after_step(name, dtype, dynamic):
    """Three steps in a row, the state changing between them (the memory overwritten, the
    centers moved): the compiled loss, gradient and state equal eager's at every step.
    The compiled backward used to read the rows the enqueue had overwritten / the centers
    after their update."""
    torch._dynamo.reset()
    eager_mod, call = _stateful(name)
    compiled_mod = copy.deepcopy(eager_mod)
    step = torch.compile(call, fullgraph=True, dynamic=dynamic)
    for i, (e, y) in enumerate(_batches(3, 6, 3, dtype, 3, seed=11)):
        leaves = [e.clone().requires_grad_(True) for _ in range(2)]
        want = call(eager_mod, leaves[0], y)
        got = step(compiled_mod, leaves[1], y)
        want.backward()
        got.backward()
        assert_close_rel(got, want, LOSS_RTOL[dtype], f"loss, step {i}")
        assert_grad_close(leaves[1].grad, leaves[0].grad, GRAD_RTOL[dtype], f"grad, step {i}")
        for (key, a), b in zip(eager_mod.state_dict().items(), compiled_mod.state_dict().values()):
            assert_close_rel(b.double(), a.double(), LOSS_RTOL[dtype], f"{key}, step {i}")


@pytest.mark.parametrize("name", ["BatchHardTripletLoss", "BatchAllTripletLoss", "SemiHardTripletLoss",
                                  "ContrastiveLoss"])
def test_compiled_gradients_of_the_stateless_modules(name):
    torch._dynamo.reset()
    module = getattr(tripletops, name)()
    step = torch.compile(lambda e, y: module(e, y), fullgraph=True)
    for i, (e, y) in enumerate(_batches(2, 12, 5, torch.float64, 3, seed=5)):
        a, b = e.clone().requires_grad_(True), e.clone().requires_grad_(True)
        module(a, y).backward()
        step(b, y).backward()
        assert_grad_close(b.grad, a.grad, 1e-9, f"grad, step {i}")


@pytest.mark.parametrize("name", ["CrossBatchMemory", "CenterLoss"])
@pytest.mark.parametrize("compiled", [False, True])
def test_a_call_under_inference_mode_breaks_nothing(name, compiled):
    if compiled and name == "CrossBatchMemory" and not _compiler_traces_int_of_a_tensor():
        pytest.skip(f"torch {torch.__version__}'s compiler does not trace int() of a tensor")
    """A sanity evaluation before training (the buffers change dtype, so they are made anew
    inside inference_mode, as inference tensors); then training, reset and state_dict."""
    torch._dynamo.reset()
    module = tripletops.CrossBatchMemory(8, 3) if name == "CrossBatchMemory" else tripletops.CenterLoss(3, 3)
    reference = copy.deepcopy(module)
    x = torch.randn(6, 3, dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    with torch.inference_mode():
        module(x, y)
    reference(x, y)
    call = torch.compile(lambda m, e, t: m(e, t), fullgraph=True) if compiled else (lambda m, e, t: m(e, t))
    for _ in range(2):
        e = x.flip(0).clone().requires_grad_(True)
        e_ref = e.detach().clone().requires_grad_(True)
        call(module, e, y).backward()
        reference(e_ref, y).backward()
        assert_grad_close(e.grad, e_ref.grad, 1e-9)
    for (key, a), b in zip(reference.state_dict().items(), module.state_dict().values()):
        assert torch.equal(a, b), key
        assert not b.is_inference(), key
    if name == "CrossBatchMemory":
        module.reset()
        assert len(module) == 0
        module.enqueue(x, y)
        assert len(module) == 6


def _snapshot(module):
    return {k: (v.clone(), v.dtype, v.device) for k, v in module.state_dict().items()}


def _unchanged(module, snap):
    now = module.state_dict()
    return now.keys() == snap.keys() and all(
        torch.equal(now[k], v) and now[k].dtype == dt and now[k].device == dev for k, (v, dt, dev) in snap.items())


def _filled_memory(size=8, dim=3, rows=6, dtype=torch.float32, num_labels=None):
    m = tripletops.CrossBatchMemory(size, dim, num_labels=num_labels)
    y = torch.arange(rows) % 3 if num_labels is None else torch.eye(num_labels, dtype=torch.bool)[torch.arange(rows)
                                                                                                 % num_labels]
    m.enqueue(torch.randn(rows, dim, dtype=dtype), y)
    return m


@pytest.mark.parametrize("case", ["size", "dim", "label kind", "count past size", "head past count", "missing key",
                                  "float labels", "meta labels", "meta memory", "float8 memory"])
def test_a_failed_load_leaves_the_memory_bit_identical(case):
    target = _filled_memory(size=4, rows=3)
    source = {"size": lambda: _filled_memory(size=8), "dim": lambda: _filled_memory(size=4, dim=5),
              "label kind": lambda: _filled_memory(size=4, rows=3, num_labels=2)}.get(case, lambda: _filled_memory(
                  size=4, rows=3))()
    state = dict(source.state_dict())
    if case == "count past size":
        state["count"] = torch.tensor(6)
    elif case == "head past count":
        state["head"] = torch.tensor(1)
    elif case == "missing key":
        del state["head"]
    elif case == "float labels":
        state["memory_labels"] = state["memory_labels"].float()
    elif case == "meta labels":  # passed validation, then failed to copy after memory was replaced (issue 38)
        state["memory_labels"] = state["memory_labels"].to("meta")
    elif case == "meta memory":
        state["memory"] = state["memory"].to("meta")
    elif case == "float8 memory":  # a dtype no kernel takes: every later call would raise
        if not hasattr(torch, "float8_e4m3fn"):
            pytest.skip("no float8 dtype in this torch")
        state["memory"] = state["memory"].to(torch.float8_e4m3fn)
    snap = _snapshot(target)
    with pytest.raises(RuntimeError, match="Error"):
        target.load_state_dict(state)
    assert _unchanged(target, snap)
    assert len(target) == 3 and int(target.head) == 3


def test_a_load_keeps_the_saved_dtype_and_the_modules_device():
    source = _filled_memory(dtype=torch.float64)
    target = tripletops.CrossBatchMemory(8, 3)
    target.load_state_dict(source.state_dict())
    assert target.memory.dtype == torch.float64  # only widens, never narrows: not cast to the fresh fp32 buffer
    assert torch.equal(target.embeddings, source.embeddings) and torch.equal(target.labels, source.labels)
    assert target.memory.data_ptr() != source.memory.data_ptr()  # a copy, not the source's storage
    centers = tripletops.CenterLoss(3, 2)
    centers(torch.randn(4, 2, dtype=torch.float64), torch.tensor([0, 1, 2, 0]))
    fresh = tripletops.CenterLoss(3, 2)
    fresh.load_state_dict(centers.state_dict())
    assert fresh.centers.dtype == torch.float64 and torch.equal(fresh.centers, centers.centers)


@pytest.mark.parametrize("case", ["num_classes", "dim", "int centers", "initialized dtype"])
def test_a_failed_center_load_changes_nothing(case):
    target = tripletops.CenterLoss(3, 2)
    target(torch.randn(4, 2), torch.tensor([0, 1, 2, 0]))
    source = {"num_classes": tripletops.CenterLoss(4, 2), "dim": tripletops.CenterLoss(3, 5)}.get(
        case, tripletops.CenterLoss(3, 2))
    state = dict(source.state_dict())
    if case == "int centers":
        state["centers"] = state["centers"].long()
    elif case == "initialized dtype":
        state["initialized"] = state["initialized"].long()
    snap = _snapshot(target)
    with pytest.raises(RuntimeError, match="nothing was loaded"):
        target.load_state_dict(state)
    assert _unchanged(target, snap)


@pytest.mark.parametrize("make", [
    lambda: tripletops.BatchHardTripletLoss(normalize="no"),
    lambda: tripletops.BatchHardTripletLoss(soft_margin=1),
    lambda: tripletops.TripletMarginLoss(swap="no"),
    lambda: tripletops.TripletMarginLoss(normalize="yes"),
    lambda: tripletops.BatchAllTripletLoss(normalize="no"),
    lambda: tripletops.SemiHardTripletLoss(normalize=0),
    lambda: tripletops.ContrastiveLoss(normalize="no"),
])
def test_flags_are_refused_at_construction(make):
    with pytest.raises(TypeError, match="must be a bool"):
        make()


def test_flags_and_reference_sets_are_refused_in_every_entry_point():
    x, y = torch.randn(6, 3), torch.tensor([0, 0, 1, 1, 2, 2])
    for xbm in (tripletops.CrossBatchMemory(8, 3), _filled_memory()):  # empty, then filled: one behaviour
        snap = _snapshot(xbm)
        with pytest.raises(TypeError, match="enqueue must be a bool"):
            xbm(x, y, enqueue="no")
        with pytest.raises(TypeError, match="takes no ref_embeddings, ref_labels"):
            xbm(x, y, ref_embeddings=torch.randn(4, 3), ref_labels=torch.arange(4))
        with pytest.raises(TypeError, match="takes no ref_labels"):
            xbm(x, y, ref_labels=torch.arange(4))
        assert _unchanged(xbm, snap)
    from tripletops import distributed
    for fn in (distributed.batch_hard_loss, distributed.batch_hard_mine):  # checked before any collective
        with pytest.raises(TypeError, match="normalize must be a bool"):
            fn(x, y, normalize="no")
