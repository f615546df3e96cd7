"""Loading the compiled kernels, and the fallback to `tripletops.reference`."""
from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass
from typing import Iterator, Optional, Tuple

import torch

_TORCH_VERSION_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_C.torch_version")
# The GPU code the extension carries ("sm_80 sm_90 compute_90"), written by setup.py.
_CUDA_ARCHS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_C.cuda_archs")


def _torch_mismatch(version_file: str = _TORCH_VERSION_FILE, running: str = torch.__version__) -> Optional[str]:
    """The extension runs only with the torch it was compiled against (setup.py records
    that version beside it): name both versions rather than fail on a missing symbol."""
    try:
        with open(version_file) as f:
            built = f.read().strip()
    except OSError:
        return None  # not built (the import below says so), or built by an older setup.py
    if built == running:
        return None
    return (f"tripletops._C was built against torch {built} but torch {running} is installed; "
            "rebuild it with this torch: pip install --no-build-isolation --force-reinstall --no-deps tripletops "
            "(or `pip install --no-build-isolation -e .` in a checkout)")


_LOAD_ERROR: Optional[str] = _torch_mismatch()
if _LOAD_ERROR is None:
    try:
        from . import _C  # noqa: F401  (loading the library registers the ops)
    except ImportError as exc:  # not built, or built against another torch
        _LOAD_ERROR = f"{type(exc).__name__}: {exc}"


class ReferenceFallbackWarning(UserWarning):
    """The compiled kernels are unavailable, so the pure-PyTorch reference runs instead."""


# The ops the Python layer calls; each may have kernels for some devices only (the CUDA
# kernels land op by op).
_OPS = ("pairwise_distance", "batch_hard_mine", "batch_hard_loss", "triplet_margin_loss", "batch_all_loss",
        "semi_hard_loss", "contrastive_loss", "knn")
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


def _coverage() -> dict:
    """{(op, device): has a compiled kernel}, read once at import (a plain dict, so
    torch.compile traces `use_extension` without calling into the dispatcher)."""
    if _LOAD_ERROR is not None:
        return {}
    has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key
    return {(op, d): has_kernel(f"tripletops::{op}", key) for op in _OPS for d, key in _DISPATCH_KEYS.items()}


_COVERAGE = _coverage()

# The op library the Python layer calls. Only the test suite swaps it (emulated_cuda).
ops = torch.ops.tripletops


def _op_covers(op: str, device: str) -> bool:
    return _COVERAGE.get((op, device), False)


def _covered_devices() -> Tuple[str, ...]:
    """The devices on which every op has a compiled kernel."""
    return tuple(d for d in _DISPATCH_KEYS if all(_op_covers(op, d) for op in _OPS))


_DEVICES = _covered_devices()


@dataclass(frozen=True)
class ExtensionInfo:
    """What `extension_available()` reports. Truthy when the compiled kernels are loaded."""

    loaded: bool
    devices: Tuple[str, ...]
    error: Optional[str] = None
    cuda_code: Tuple[str, ...] = ()  # the GPU code of a CUDA build: ("sm_90", "compute_90"), ...

    def __bool__(self) -> bool:
        return self.loaded


def extension_available() -> ExtensionInfo:
    """Whether `tripletops._C` is loaded, the device types on which every op has a kernel
    (a device where only some ops do is not listed; those ops still use it), and for a
    CUDA build the GPU architectures it carries code for (`cuda_code`: "sm_XY" machine
    code, "compute_XY" PTX). A GPU that none of them serves gets the reference, with a
    ReferenceFallbackWarning that says so (an error under TRIPLETOPS_STRICT=1).

    Example::

        >>> info = tripletops.extension_available()
        >>> bool(info), info.devices
        (True, ('cpu',))
    """
    return ExtensionInfo(loaded=_LOAD_ERROR is None, devices=_DEVICES, error=_LOAD_ERROR,
                         cuda_code=_CUDA_CODE or ())


def _read_cuda_code(path: str = _CUDA_ARCHS_FILE) -> Optional[Tuple[str, ...]]:
    try:
        with open(path) as f:
            return tuple(f.read().split())
    except OSError:
        return None  # a CPU build, or one made by an older setup.py: nothing to check


_CUDA_CODE = _read_cuda_code()


def cuda_code_runs_on(codes: Tuple[str, ...], capability: Tuple[int, int]) -> bool:
    """Whether GPU code built as `codes` ("sm_86", "compute_90", "sm_90a") runs on a GPU of
    compute capability `capability`: machine code runs on its own major version at an equal
    or higher minor (an "a"/"f" variant on its exact version only), PTX on any GPU at or
    above its version (the driver compiles it)."""
    for code in codes:
        kind, _, number = code.partition("_")
        digits = number.rstrip("af")
        if not digits.isdigit():
            continue
        arch = divmod(int(digits), 10)
        specific = digits != number
        if kind == "sm" and arch[0] == capability[0] and (
                arch[1] == capability[1] if specific else arch[1] <= capability[1]):
            return True
        if kind == "compute" and not specific and arch <= tuple(capability):
            return True
    return False


_cuda_problems: dict = {}


def _cuda_device_problem(device: torch.device) -> Optional[str]:
    """Why the compiled CUDA kernels cannot run on `device` (None when they can): checked
    before the first launch on each GPU, so that a build without code for it says so
    instead of failing with "no kernel image is available"."""
    if _CUDA_CODE is None or torch.compiler.is_compiling():
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _cuda_problems:
        capability = torch.cuda.get_device_capability(index)
        problem = None
        if not cuda_code_runs_on(_CUDA_CODE, capability):
            number = f"{capability[0]}{capability[1]}"
            problem = (f"tripletops._C has no GPU code for {torch.cuda.get_device_name(index)} (sm_{number}): it was "
                       f"built for {' '.join(_CUDA_CODE)}; rebuild it on this machine (it builds for the visible GPUs "
                       f"by default) or with TRIPLETOPS_CUDA_ARCHS={capability[0]}.{capability[1]}")
        _cuda_problems[index] = problem
    return _cuda_problems[index]


_warned: set = set()


def use_extension(op: str, tensor: torch.Tensor) -> bool:
    """True when the compiled kernel of `op` covers `tensor`'s device.

    Otherwise warns once per (op, device) and returns False so the caller runs the
    reference, or raises under TRIPLETOPS_STRICT=1.
    """
    device = tensor.device.type
    problem = _cuda_device_problem(tensor.device) if device == "cuda" and _op_covers(op, device) else None
    if _op_covers(op, device) and problem is None:
        return True
    reason = _LOAD_ERROR or problem or f"no compiled {op} kernel for {device!r}"
    message = f"tripletops.{op}: compiled kernels unavailable ({reason}); running tripletops.reference instead"
    if os.environ.get("TRIPLETOPS_STRICT", "0") == "1":
        raise RuntimeError(message + " is forbidden by TRIPLETOPS_STRICT=1")
    if (op, device) not in _warned:
        _warned.add((op, device))
        warnings.warn(message, ReferenceFallbackWarning, stacklevel=3)
    return False


@contextlib.contextmanager
def emulated_cuda(namespace: str = "tripletops_emu") -> Iterator[None]:
    """Test hook, not API: inside the block, CPU tensors go to the ops of `namespace`, the
    test-only library that `make cuda-emu` builds from csrc/cuda/*.cu (the CUDA kernels
    run by the SIMT emulator in tools/cuda_emu). Ops it has no kernel for fall back to
    the reference exactly as on a GPU. The library must be loaded first
    (torch.ops.load_library) and its fake kernels and autograd registered
    (tripletops._ops._register(namespace))."""
    global ops, _COVERAGE
    has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key
    saved = ops, _COVERAGE
    ops = getattr(torch.ops, namespace)
    _COVERAGE = dict(_COVERAGE)
    _COVERAGE.update({(op, "cpu"): has_kernel(f"{namespace}::{op}", "CPU") for op in _OPS})
    try:
        yield
    finally:
        ops, _COVERAGE = saved
