"""Error messages from the C++ side, with numbers in them, raise instead of killing the process.

On the first GPU machine (torch 2.11 + cu130, gcc 13) a raw backward op given a bad saved
tensor died with SIGSEGV while its TORCH_CHECK message formatted a number: the stream
insertion `std::ostream::_M_insert<long>` ran from a copy of libstdc++ inside
tripletops/_C.abi3.so, whose locale state is not the one the process's libstdc++.so.6
set up. So (1) the built extension must carry no libstdc++ code of its own (setup.py
verifies it after linking; this test checks the file that was built), and (2) one raw op
of every family is driven into a numeric message in a child process, so that a crash is
a test failure that names the call, not the end of the test run.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import tripletops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from setup_support import libstdcxx_code_in  # noqa: E402

needs_extension = pytest.mark.skipif(not tripletops.extension_available(), reason="needs the compiled extension")

# One bad call per op family, each failing in C++ with a message that formats an integer
# (and the margin check a double). `d` is the device, `f` a float tensor factory.
CASES = {
    "pairwise_distance": "T.pairwise_distance(f(3, 4), f(5, 6), 'euclidean')",
    "pairwise_distance_backward": "T.pairwise_distance_backward(f(3, 3), f(3, 4), None, f(2, 2), 'euclidean')",
    "batch_hard_loss": "T.batch_hard_loss(f(4, 3), torch.zeros(5, dtype=torch.long, device=d), None, None, "
                       "0.2, 'euclidean', False, 'mean')",
    "batch_hard_loss margin": "T.batch_hard_loss(f(4, 3), torch.zeros(4, dtype=torch.long, device=d), None, None, "
                              "-0.5, 'euclidean', False, 'mean')",
    "batch_hard_loss_backward": "T.batch_hard_loss_backward(f(1), f(4, 3), None, idx(3), idx(4), f(4), f(4), 0.2, "
                                "'euclidean', False, 'mean', False)",
    "triplet_margin_loss": "T.triplet_margin_loss(f(4, 3), f(5, 3), f(4, 3), 0.2, 'euclidean', False, 'mean')",
    "triplet_margin_loss_backward": "T.triplet_margin_loss_backward(f(1), f(4, 3), f(4, 3), f(4, 3), f(1000), f(4), "
                                    "f(0), 0.2, 'euclidean', False, 'mean')",
    "batch_all_loss": "T.batch_all_loss(f(4, 3), torch.zeros(5, dtype=torch.long, device=d), 0.2, 'euclidean', "
                      "False, 'mean')",
    "semi_hard_loss_backward": "T.semi_hard_loss_backward(f(1), f(4, 3), torch.zeros(4, dtype=torch.long, device=d), "
                               "f(3, 3).double(), 0.2, 'euclidean')",
    "contrastive_loss": "T.contrastive_loss(f(4, 3), torch.zeros(7, dtype=torch.long, device=d), 0.0, 1.0, "
                        "'euclidean', 'mean')",
}

CHILD = r"""
import json, sys, torch, tripletops
T = torch.ops.tripletops
d = sys.argv[1]
f = lambda *shape: torch.randn(*shape, device=d)
idx = lambda n: torch.zeros(n, dtype=torch.long, device=d)
for name, call in json.loads(sys.argv[2]).items():
    print(json.dumps({"start": name}), flush=True)
    try:
        eval(call)
        print(json.dumps({"name": name, "raised": None}), flush=True)
    except Exception as exc:
        print(json.dumps({"name": name, "raised": type(exc).__name__, "message": str(exc).splitlines()[0]}),
              flush=True)
"""


@needs_extension
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not (torch.cuda.is_available() and "cuda" in tripletops.extension_available().devices),
    reason="needs a CUDA GPU and tripletops' CUDA kernels"))])
def test_numeric_error_messages_raise_in_every_op_family(device):
    res = subprocess.run([sys.executable, "-c", CHILD, device, json.dumps(CASES)], capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    lines = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    started = [line["start"] for line in lines if "start" in line]
    assert res.returncode == 0, (f"the process died (exit {res.returncode}) in {started[-1] if started else '?'}:\n"
                                 f"{res.stderr[-3000:]}")
    results = {line["name"]: line for line in lines if "name" in line}
    assert set(results) == set(CASES)
    for name, result in results.items():
        assert result["raised"] in ("ValueError", "RuntimeError", "TypeError"), (name, result)
        assert result["message"].startswith("tripletops"), (name, result)
        assert re.search(r"\d", result["message"]), (name, result)  # the message carries its number


@needs_extension
@pytest.mark.skipif(shutil.which("nm") is None, reason="needs binutils' nm")
def test_the_built_extension_carries_no_copy_of_libstdcxx():
    from tripletops import _C

    found = libstdcxx_code_in(_C.__file__)
    assert not found, f"{_C.__file__} defines libstdc++'s own functions (statically linked?): {found[:10]}"


def test_the_libstdcxx_check_sees_a_static_copy(tmp_path):
    """The check itself: a shared library linked with -static-libstdc++ is caught, a normal one is not."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None or shutil.which("nm") is None:
        pytest.skip("needs g++ and nm")
    src = tmp_path / "t.cpp"
    src.write_text('#include <sstream>\n#include <string>\n'
                   'std::string f(long n) { std::ostringstream s; s << "n = " << n; return s.str(); }\n')
    for flags, expect in (([], False), (["-static-libstdc++"], True)):
        out = tmp_path / f"lib{len(flags)}.so"
        subprocess.run([cxx, "-shared", "-fPIC", "-O2", str(src), "-o", str(out), *flags], check=True)
        assert bool(libstdcxx_code_in(str(out))) is expect, flags
