"""Compile every csrc/cuda/*.cu with nvcc for sm_80 and sm_90 against the installed
torch's headers, and print ptxas' register / spill report. No GPU and no CUDA build of
torch needed: this is the check CI runs whenever nvcc exists (`make cuda-check`).

With --torch VERSION (repeatable), also compile every source, csrc/**/*.cpp with g++ and
csrc/cuda/*.cu with nvcc (PTX for sm_90 only: the headers are what is checked), against
the headers of that torch release, fetched by tools/torch_headers.py without installing
it: the oldest and newest torch that pyproject.toml admits (`make torch-range`).

The CPU wheel of torch ships the CUDA headers but not the generated
c10/cuda/impl/cuda_cmake_macros.h; it is written into a temporary include folder.
Exit status 1 on any compile error.
"""
from __future__ import annotations

import argparse
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


def compile_against(version: str, nvcc: str) -> list:
    """Every C++ and CUDA source against torch `version`'s headers; the failed sources."""
    import sysconfig

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import torch_headers

    include = torch_headers.headers(version)
    std = "-std=c++20" if tuple(int(p) for p in version.split(".")[:2]) >= (2, 10) else "-std=c++17"
    failed = []
    with tempfile.TemporaryDirectory() as tmp:
        macros = os.path.join(tmp, "c10", "cuda", "impl")
        os.makedirs(macros)
        if not os.path.exists(os.path.join(include, "c10", "cuda", "impl", "cuda_cmake_macros.h")):
            with open(os.path.join(macros, "cuda_cmake_macros.h"), "w") as f:
                f.write("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        incs = [os.path.join(ROOT, "csrc"), include, os.path.join(include, "torch", "csrc", "api", "include"), tmp,
                sysconfig.get_paths()["include"]]
        defs = ["-DTORCH_API_INCLUDE_EXTENSION_H", "-DPy_LIMITED_API=0x030A0000", "-DTORCH_EXTENSION_NAME=_C"]
        cpp = sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")) + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
        cu = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
        jobs = []
        for src in cpp:
            jobs.append((src, ["g++", std, "-O0", "-fopenmp", "-fPIC", "-c", src, "-o",
                               os.path.join(tmp, os.path.basename(src) + ".o"), *defs, *[f"-I{i}" for i in incs]]))
        for src in cu:
            jobs.append((src, [nvcc, std, "-c", src, "-o", os.path.join(tmp, os.path.basename(src) + ".o"),
                               "-Xcompiler", "-fPIC", "-gencode", "arch=compute_90,code=compute_90",
                               *cpp_extension.COMMON_NVCC_FLAGS, *defs, *[f"-I{i}" for i in incs]]))
        procs = []
        for src, cmd in jobs:  # two at a time: CI has two cores
            procs.append((src, time.time(), subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                             text=True)))
            if len(procs) >= 2:
                failed += _finish(procs.pop(0), version)
        while procs:
            failed += _finish(procs.pop(0), version)
    return failed


def _finish(job, version: str) -> list:
    src, start, proc = job
    out, _ = proc.communicate()
    rel = os.path.relpath(src, ROOT)
    status = "ok" if proc.returncode == 0 else "FAILED"
    print(f"== torch {version}: {rel}: {status} ({time.time() - start:.0f} s)", flush=True)
    if proc.returncode != 0:
        print(out[-6000:])
        return [f"{rel} (torch {version})"]
    return []


def main() -> int:
    ap = argparse.ArgumentParser(description="make cuda-check")
    ap.add_argument("--torch", action="append", default=[], metavar="VERSION",
                    help="also compile every source against this torch release's headers")
    args = ap.parse_args()
    nvcc = shutil.which("nvcc") or os.path.join(os.getenv("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    if not os.path.exists(nvcc):
        print("cuda-check: nvcc not found; nothing to check")
        return 0
    if args.torch:
        failed = [f for version in args.torch for f in compile_against(version, nvcc)]
        if failed:
            print(f"torch-range: {len(failed)} failed: {failed}")
            return 1
        print(f"torch-range: every C++ and CUDA source compiles against torch {', '.join(args.torch)}")
        return 0
    sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    if not sources:
        print("cuda-check: no csrc/cuda/*.cu")
        return 0
    print(subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1])
    failed = []
    # The whole ptxas report is kept for tools/cuda_perf.py (make cuda-perf reads it).
    saved = []
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
                saved += report
    if not failed:
        os.makedirs(os.path.join(ROOT, "build", "cuda-check"), exist_ok=True)
        with open(os.path.join(ROOT, "build", "cuda-check", "report.txt"), "w") as f:
            f.write("\n".join(saved) + "\n")
    if failed:
        print(f"cuda-check: {len(failed)} of {len(sources)} failed: {failed}")
        return 1
    print(f"cuda-check: all {len(sources)} CUDA sources compile for sm_{', sm_'.join(ARCHS)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
