"""Loading the compiled kernels, and the fallback to `tripletops.reference`."""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

try:
    from . import _C  # noqa: F401  (loading the library registers the ops)

    _LOAD_ERROR: Optional[str] = None
except ImportError as exc:  # not built, or built against another torch
    _LOAD_ERROR = f"{type(exc).__name__}: {exc}"


class ReferenceFallbackWarning(UserWarning):
    """The compiled kernels are unavailable, so the pure-PyTorch reference runs instead."""


def _covered_devices() -> Tuple[str, ...]:
    if _LOAD_ERROR is not None:
        return ()
    has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key
    return tuple(d for d in ("cpu", "cuda") if has_kernel("tripletops::batch_hard_loss", d.upper()))


_DEVICES = _covered_devices()


@dataclass(frozen=True)
class ExtensionInfo:
    """What `extension_available()` reports. Truthy when the compiled kernels are loaded."""

    loaded: bool
    devices: Tuple[str, ...]
    error: Optional[str] = None

    def __bool__(self) -> bool:
        return self.loaded


def extension_available() -> ExtensionInfo:
    """Whether `tripletops._C` is loaded, and which device types its kernels cover.

    Example::

        >>> info = tripletops.extension_available()
        >>> bool(info), info.devices
        (True, ('cpu',))
    """
    return ExtensionInfo(loaded=_LOAD_ERROR is None, devices=_DEVICES, error=_LOAD_ERROR)


_warned: set = set()


def use_extension(op: str, tensor: torch.Tensor) -> bool:
    """True when the compiled kernel of `op` covers `tensor`'s device.

    Otherwise warns once per (op, device) and returns False so the caller runs the
    reference, or raises under TRIPLETOPS_STRICT=1.
    """
    device = tensor.device.type
    if device in _DEVICES:
        return True
    reason = _LOAD_ERROR or f"the compiled kernels cover {list(_DEVICES)}, not {device!r}"
    message = f"tripletops.{op}: compiled kernels unavailable ({reason}); running tripletops.reference instead"
    if os.environ.get("TRIPLETOPS_STRICT", "0") == "1":
        raise RuntimeError(message + " is forbidden by TRIPLETOPS_STRICT=1")
    if (op, device) not in _warned:
        _warned.add((op, device))
        warnings.warn(message, ReferenceFallbackWarning, stacklevel=3)
    return False
