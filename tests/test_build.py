"""The build's choices, checked without a GPU: which GPU code a CUDA build carries
(setup_support.resolve_cuda_archs) and what the import does on a GPU that code cannot
serve (tripletops._ext.cuda_code_runs_on)."""
from __future__ import annotations

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import setup_support as ss  # noqa: E402
from tripletops._ext import cuda_code_runs_on  # noqa: E402

NVCC13 = "sm_75 sm_80 sm_86 sm_87 sm_88 sm_89 sm_90 sm_100 sm_103 sm_110 sm_120 sm_121".split()


def test_arch_lists_parse_in_both_spellings():
    assert ss.parse_arch_list("8.0;8.6 9.0+PTX") == [("80", False), ("86", False), ("90", True)]
    assert ss.parse_arch_list("80;90") == [("80", False), ("90", False)]
    assert ss.parse_arch_list("9.0a,10.0+PTX") == [("90a", False), ("100", True)]
    for bad in ("", "Hopper", "9", "8.x"):
        with pytest.raises(ValueError):
            ss.parse_arch_list(bad)


def test_an_explicit_list_wins_then_torchs_then_the_visible_gpus():
    assert ss.resolve_cuda_archs({"TRIPLETOPS_CUDA_ARCHS": "90", "TORCH_CUDA_ARCH_LIST": "8.0"}, [(8, 9)]) == (
        [("90", False)], "TRIPLETOPS_CUDA_ARCHS")
    assert ss.resolve_cuda_archs({"TORCH_CUDA_ARCH_LIST": "8.0 8.6+PTX"}, [(8, 9)]) == (
        [("80", False), ("86", True)], "TORCH_CUDA_ARCH_LIST")
    # The machine's GPUs, PTX for the newest (as PyTorch's extensions do).
    archs, source = ss.resolve_cuda_archs({}, [(8, 9), (9, 0), (8, 9)])
    assert archs == [("89", False), ("90", True)] and source == "the visible GPUs"


def test_with_no_gpu_the_default_list_ends_in_ptx_and_fits_nvcc():
    archs, source = ss.resolve_cuda_archs({}, [], NVCC13)
    assert source.startswith("the default list")
    assert [n for n, _ in archs] == ["75", "80", "86", "89", "90", "100", "120"] and archs[-1] == ("120", True)
    # An older nvcc (CUDA 12.4: no Blackwell) keeps what it can build, PTX moved to the newest kept.
    archs, _ = ss.resolve_cuda_archs({}, [], "sm_50 sm_75 sm_80 sm_86 sm_89 sm_90".split())
    assert archs[-1] == ("90", True) and "100" not in [n for n, _ in archs]
    flags = ss.gencode_flags(archs)
    assert flags[-2:] == ["-gencode", "arch=compute_90,code=compute_90"]
    assert ss.arch_record([("80", False), ("90", True)]) == "sm_80 sm_90 compute_90"


@pytest.mark.parametrize("codes, capability, runs", [
    (("sm_80", "sm_90"), (8, 0), True),
    (("sm_80", "sm_90"), (8, 6), True),    # A10, RTX 30xx: sm_80 machine code runs on 8.x
    (("sm_80", "sm_90"), (8, 9), True),    # L4, RTX 40xx
    (("sm_80", "sm_90"), (7, 5), False),   # T4: no code at or below 7.5
    (("sm_80", "sm_90"), (10, 0), False),  # Blackwell: machine code does not cross majors, no PTX
    (("sm_80", "sm_90", "compute_90"), (12, 0), True),  # PTX: the driver compiles it
    (("sm_90a",), (9, 0), True),
    (("sm_90a",), (9, 1), False),
    (("sm_86",), (8, 0), False),
])
def test_which_gpus_a_build_serves(codes, capability, runs):
    assert cuda_code_runs_on(codes, capability) is runs
