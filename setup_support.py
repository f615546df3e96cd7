"""Build helpers for setup.py, kept apart so that the tests can check them without a build.

- Which GPU architectures to compile the CUDA kernels for (`resolve_cuda_archs`), in the
  order PyTorch's own extensions use: an explicit list, else the GPUs this machine has,
  else a documented list that ends in PTX.
- Whether a built shared library carries a copy of libstdc++'s own code
  (`libstdcxx_code_in`): such a copy has locale state of its own, and formatting a number
  in an error message then crashed the process on the first GPU machine.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from typing import Iterable, List, Optional, Sequence, Tuple

# Built when no list is given and no GPU is visible: Turing (T4), Ampere (A100, A10 /
# RTX 30xx), Ada (L4, RTX 40xx), Hopper (H100, H200), Blackwell (B200, RTX 50xx), and PTX
# of the newest, which the driver compiles for any later GPU. Entries the installed nvcc
# cannot build are dropped (CUDA 13 dropped sm_70 and older, CUDA 11 has no sm_90).
DEFAULT_CUDA_ARCHS = "7.5;8.0;8.6;8.9;9.0;10.0;12.0+PTX"

Arch = Tuple[str, bool]  # ("90", with_ptx)


def parse_arch_list(text: str) -> List[Arch]:
    """'8.0;8.6 9.0+PTX' or '80;90' -> [('80', False), ('86', False), ('90', True)].
    Accepts PyTorch's TORCH_CUDA_ARCH_LIST spelling and plain sm numbers; an 'a' suffix
    (9.0a) is kept."""
    archs: List[Arch] = []
    for entry in re.split(r"[;,\s]+", text.strip()):
        if not entry:
            continue
        ptx = entry.upper().endswith("+PTX")
        core = entry[: -len("+PTX")] if ptx else entry
        m = re.fullmatch(r"(\d+)\.(\d+)([af]?)|(\d{2,3})([af]?)", core)
        if m is None:
            raise ValueError(f"CUDA architecture {entry!r}: expected forms like 8.6, 9.0+PTX or 90")
        number = m.group(1) + m.group(2) + m.group(3) if m.group(1) else m.group(4) + m.group(5)
        archs.append((number, ptx))
    if not archs:
        raise ValueError(f"empty CUDA architecture list {text!r}")
    return archs


def resolve_cuda_archs(env: dict, visible: Sequence[Tuple[int, int]],
                       nvcc_codes: Optional[Iterable[str]] = None) -> Tuple[List[Arch], str]:
    """The architectures to build and where the choice came from.

    env: TRIPLETOPS_CUDA_ARCHS, then PyTorch's TORCH_CUDA_ARCH_LIST; visible: the compute
    capabilities of the GPUs this machine has (PTX is added for the newest, as PyTorch
    does); nvcc_codes: what `nvcc --list-gpu-code` prints (sm_75, ...), used to trim the
    default list only: a list that is asked for goes to nvcc as it is.
    """
    for var in ("TRIPLETOPS_CUDA_ARCHS", "TORCH_CUDA_ARCH_LIST"):
        if env.get(var, "").strip():
            return parse_arch_list(env[var]), var
    if visible:
        numbers = sorted({f"{major}{minor}" for major, minor in visible}, key=int)
        return [(n, n == numbers[-1]) for n in numbers], "the visible GPUs"
    archs = parse_arch_list(DEFAULT_CUDA_ARCHS)
    if nvcc_codes is not None:
        supported = {c.strip()[len("sm_"):] for c in nvcc_codes if c.strip().startswith("sm_")}
        if supported:
            archs = [a for a in archs if a[0] in supported]
            if archs and not any(ptx for _, ptx in archs):
                archs[-1] = (archs[-1][0], True)
    return archs, "the default list (no GPU visible)"


def gencode_flags(archs: Sequence[Arch]) -> List[str]:
    flags = []
    for number, ptx in archs:
        flags += ["-gencode", f"arch=compute_{number},code=sm_{number}"]
        if ptx:
            flags += ["-gencode", f"arch=compute_{number},code=compute_{number}"]
    return flags


def arch_record(archs: Sequence[Arch]) -> str:
    """The line written beside the extension (_C.cuda_archs): 'sm_80 sm_90 compute_90'."""
    return " ".join([f"sm_{n}" for n, _ in archs] + [f"compute_{n}" for n, ptx in archs if ptx])


def nvcc_gpu_codes(nvcc: str) -> Optional[List[str]]:
    try:
        out = subprocess.run([nvcc, "--list-gpu-code"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.split() if out.returncode == 0 else None


# Mangled-name prefixes of functions that live in libstdc++ itself: std::ostream's
# numeric insertion, std::locale, std::ios_base, the num_put and codecvt facets. A shared
# library that defines any of them carries its own copy of libstdc++ code.
LIBSTDCXX_OWN = re.compile(r"^_ZN(K)?(So9_M_insert|St6locale|St8ios_base|St7num_put|St7codecvt|St7__cxx1110moneypunct)")


def libstdcxx_code_in(path: str) -> List[str]:
    """The libstdc++ functions that the shared library at `path` defines itself (empty
    when it takes them all from libstdc++.so.6, as it must)."""
    nm = shutil.which("nm")
    if nm is None:
        raise RuntimeError("nm (binutils) is needed to inspect the built extension")
    found = set()
    for args in (["--defined-only"], ["-D", "--defined-only"]):  # the full table, else the dynamic one (stripped)
        out = subprocess.run([nm, *args, path], capture_output=True, text=True)
        for line in out.stdout.splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[1] in "TtWw" and LIBSTDCXX_OWN.match(parts[2].split("@")[0]):
                found.add(parts[2])
    return sorted(found)
