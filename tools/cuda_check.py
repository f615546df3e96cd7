"""Compile every csrc/cuda/*.cu with nvcc for sm_80 and sm_90 against the installed
torch's headers, and print ptxas' register / spill report. No GPU and no CUDA build of
torch needed: this is the check CI runs whenever nvcc exists (`make cuda-check`).

The CPU wheel of torch ships the CUDA headers but not the generated
c10/cuda/impl/cuda_cmake_macros.h; it is written into a temporary include folder.
Exit status 1 on any compile error.
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHS = os.getenv("TRIPLETOPS_CUDA_ARCHS", "80;90").split(";")


def main() -> int:
    nvcc = shutil.which("nvcc") or os.path.join(os.getenv("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    if not os.path.exists(nvcc):
        print("cuda-check: nvcc not found; nothing to check")
        return 0
    sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    if not sources:
        print("cuda-check: no csrc/cuda/*.cu")
        return 0
    print(subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1])
    failed = []
    with tempfile.TemporaryDirectory() as tmp:
        macros = os.path.join(tmp, "c10", "cuda", "impl")
        os.makedirs(macros)
        with open(os.path.join(macros, "cuda_cmake_macros.h"), "w") as f:
            f.write("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        includes = [os.path.join(ROOT, "csrc"), tmp] + cpp_extension.include_paths()
        flags = ["-std=c++17", "-O3", "-c", "-Xcompiler", "-fPIC", "-Xptxas", "-v", "-lineinfo",
                 f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
                 *cpp_extension.COMMON_NVCC_FLAGS]
        for arch in ARCHS:
            flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
        for src in sources:
            rel = os.path.relpath(src, ROOT)
            cmd = [nvcc, src, "-o", os.path.join(tmp, os.path.basename(src) + ".o"), *flags]
            cmd += [f"-I{i}" for i in includes]
            start = time.time()
            res = subprocess.run(cmd, capture_output=True, text=True)
            report = [line for line in (res.stdout + res.stderr).splitlines()
                      if "registers" in line or "spill" in line or "Compiling entry" in line]
            status = "ok" if res.returncode == 0 else "FAILED"
            print(f"== {rel}: {status} ({time.time() - start:.0f} s, sm_{', sm_'.join(ARCHS)})")
            if res.returncode != 0:
                print(res.stdout + res.stderr)
                failed.append(rel)
            else:
                print("\n".join(report))
    if failed:
        print(f"cuda-check: {len(failed)} of {len(sources)} failed: {failed}")
        return 1
    print(f"cuda-check: all {len(sources)} CUDA sources compile for sm_{', sm_'.join(ARCHS)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
