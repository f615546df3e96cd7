"""Shared fixtures and helpers: devices, dtypes, tolerances, float64 comparisons."""
from __future__ import annotations

import os

import pytest
import torch

import tripletops

STRICT = os.environ.get("TRIPLETOPS_STRICT", "0") == "1"

# The CUDA kernels under the SIMT emulator (make cuda-emu builds the library and sets
# TRIPLETOPS_EMU_LIB): their cases take CPU tensors routed to the emulated kernels.
EMU_LIB = os.environ.get("TRIPLETOPS_EMU_LIB")
EMU = False
if EMU_LIB:
    torch.ops.load_library(EMU_LIB)
    from tripletops import _ops as _tripletops_ops

    _tripletops_ops._register("tripletops_emu")
    EMU = True


def _emu_covers(op: str) -> bool:
    return EMU and torch._C._dispatch_has_kernel_for_dispatch_key(f"tripletops_emu::{op}", "CPU")


def _cuda_emu_param(op: str | None = None):
    """The "cuda-emu" case: device "cpu", run inside tripletops._ext.emulated_cuda(). For
    one op, or (op None) for every op, as the "cuda" case needs every op's CUDA kernel."""
    from tripletops._ext import _OPS

    covered = all(_emu_covers(o) for o in ([op] if op else _OPS))
    reason = "needs make cuda-emu (TRIPLETOPS_EMU_LIB)" if not EMU else f"no emulated CUDA kernel for {op or 'every op'}"
    return pytest.param("cpu", id="cuda-emu", marks=[pytest.mark.cuda_emu, pytest.mark.skipif(not covered, reason=reason)])


# CUDA cases are listed everywhere and skip visibly where no GPU (or no CUDA kernel) exists;
# cuda-emu cases run the same tests against the emulated CUDA kernels.
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(
            not (torch.cuda.is_available() and "cuda" in tripletops.extension_available().devices),
            reason="needs a CUDA GPU and tripletops' CUDA kernels",
        ),
    ),
    _cuda_emu_param(),
]


def devices_for(op: str):
    """Like DEVICES, for one op: its CUDA cases run where that op has a CUDA kernel
    (the CUDA kernels land op by op)."""
    from tripletops._ext import _op_covers

    return ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
        not (torch.cuda.is_available() and _op_covers(op, "cuda")), reason=f"needs a CUDA GPU and a CUDA {op} kernel")),
        _cuda_emu_param(op)]


@pytest.fixture(autouse=True)
def _cuda_emulation(request):
    """cuda-emu cases run with the ops routed to the emulated CUDA kernels."""
    if request.node.get_closest_marker("cuda_emu") is None:
        yield
        return
    from tripletops._ext import emulated_cuda

    with emulated_cuda():
        yield


DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
METRICS = ["euclidean", "sqeuclidean", "cosine"]
REDUCTIONS = ["mean", "sum", "none", "mean_nonzero"]

# The accuracy of docs/numerics.md: fp32 loss rel 1e-5, gradient rel-norm 1e-4; fp16/bf16 loss 1e-2.
LOSS_RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
GRAD_RTOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def pytest_report_header(config):
    info = tripletops.extension_available()
    return (f"tripletops: extension loaded={info.loaded} devices={info.devices} strict={STRICT} error={info.error}"
            f" cuda-emu={EMU_LIB if EMU else 'off'}")


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


def make_batch(b, d, n_classes, *, dtype=torch.float32, device="cpu", label_dtype=torch.int64, seed=None):
    """Random (B, D) embeddings (made in float64, then cast) and labels in [0, n_classes)."""
    g = torch.Generator().manual_seed(seed if seed is not None else b * 1000 + d)
    x = torch.randn(b, d, dtype=torch.float64, generator=g)  # host tensor
    y = torch.randint(0, max(1, n_classes), (b,), generator=g)  # host tensor
    return x.to(device=device, dtype=dtype), y.to(device=device, dtype=label_dtype)


def assert_close_rel(actual, expected, rtol, what=""):
    """|actual - expected| <= rtol * max(|expected|, 1) elementwise, NaN where NaN."""
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    nan_a, nan_e = torch.isnan(actual), torch.isnan(expected)
    assert torch.equal(nan_a, nan_e), f"{what}: NaN pattern differs"
    a, e = actual[~nan_a], expected[~nan_e]
    err = (a - e).abs()
    bound = rtol * e.abs().clamp(min=1.0)
    assert bool((err <= bound).all()), f"{what}: max abs err {err.max().item():.3e} (rtol {rtol})"


def assert_grad_close(actual, expected, rtol, what="grad"):
    """The gradient metric of docs/numerics.md: ||g - g_ref|| / ||g_ref|| <= rtol, with an absolute floor of
    1e-3 * rtol * sqrt(numel) for gradients that are zero in exact arithmetic (where only
    rounding noise is left to compare)."""
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert torch.isfinite(actual).all(), f"{what}: non-finite entries"
    denom = expected.norm().item()
    err = (actual - expected).norm().item()
    floor = 1e-3 * rtol * max(1, expected.numel()) ** 0.5
    assert err <= rtol * denom + floor, f"{what}: error {err:.3e}, relative {err / max(denom, 1e-300):.3e} > {rtol}"


@pytest.fixture
def poisoned():
    """Deterministic mode with uninitialized memory filled with NaN / max-int: any
    output element a kernel forgets to write shows up in the comparison."""
    prev = torch.are_deterministic_algorithms_enabled()
    prev_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(prev)
    torch.utils.deterministic.fill_uninitialized_memory = prev_fill
