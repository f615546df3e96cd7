"""`make cuda-emu`: the CUDA kernels executed on the CPU, under ASan and UBSan.

1. Builds the emulator's self-test and runs it (every primitive; ASan catching
   out-of-bounds accesses to global, shared and stack memory).
2. Builds build/cuda_emu/libtripletops_emu.so (build.py).
3. Runs the test suite's cuda-emu cases (pytest -m cuda_emu) in a Python whose first
   library is libasan, with TRIPLETOPS_STRICT=1: the same tests, references and poisoned
   outputs as the CPU and CUDA cases; then the batch-hard ones again with another thread
   interleaving (TRIPLETOPS_EMU_SEED=0).
4. Ends with `cuda-emu: N of M __global__ kernels launched`, where M counts every
   __global__ in csrc/cuda, and fails unless N == M and every step passed.
Extra arguments go to pytest.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
import build  # noqa: E402


def kernels_in_sources() -> set[str]:
    names = set()
    for folder, _, files in os.walk(os.path.join(ROOT, "csrc", "cuda")):
        for f in files:
            if f.endswith((".cu", ".cuh", ".h")):
                text = open(os.path.join(folder, f)).read()
                names |= set(re.findall(r"__global__\s+void\s+(?:__launch_bounds__\s*\((?:[^()]|\([^()]*\))*\)\s*)?(\w+)\s*\(", text))
    return names


def main() -> int:
    out = os.path.join(ROOT, "build", "cuda_emu")
    os.makedirs(out, exist_ok=True)
    selftest = os.path.join(out, "simt_selftest")
    cmd = ["g++", "-std=c++17", "-O1", "-g", *build.SANITIZE, f"-I{HERE}", os.path.join(HERE, "selftest.cpp"),
           os.path.join(HERE, "simt.cpp"), "-o", selftest]
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=0")
    ok = subprocess.run(cmd).returncode == 0 and subprocess.run([selftest], env=env).returncode == 0
    if not ok:
        print("cuda-emu: the emulator's self-test failed")
        return 1
    if build.main() != 0:
        print("cuda-emu: build failed")
        return 1
    lib = os.path.join(out, "libtripletops_emu.so")
    asan = subprocess.run(["g++", "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        log = os.path.join(tmp, "launched.txt")
        env = dict(os.environ, LD_PRELOAD=asan, ASAN_OPTIONS="detect_leaks=0", UBSAN_OPTIONS="print_stacktrace=1",
                   TRIPLETOPS_EMU_LIB=lib, TRIPLETOPS_EMU_LAUNCH_LOG=log, TRIPLETOPS_STRICT="1")
        pytest = [sys.executable, "-m", "pytest", "-m", "cuda_emu", "-q", "-p", "no:cacheprovider", *sys.argv[1:]]
        rc = subprocess.run([*pytest, "tests"], cwd=ROOT, env=env).returncode
        # The batch-hard kernels once more with the threads in first-come order (seed 0):
        # another interleaving, which a missing barrier or a lane-order assumption would fail.
        if rc == 0:
            rc = subprocess.run([*pytest, "tests/test_batch_hard.py"], cwd=ROOT,
                                env=dict(env, TRIPLETOPS_EMU_SEED="0")).returncode
        launched = set(open(log).read().split()) if os.path.exists(log) else set()
    kernels = kernels_in_sources()
    missing = sorted(kernels - launched)
    if missing:
        print("cuda-emu: never launched:", ", ".join(missing))
    print(f"cuda-emu: {len(kernels & launched)} of {len(kernels)} __global__ kernels launched")
    return 0 if rc == 0 and not missing else 1


if __name__ == "__main__":
    sys.exit(main())
