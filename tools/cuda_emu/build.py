"""Builds build/cuda_emu/libtripletops_emu.so: csrc/cuda/*.cu compiled by g++ as C++
against the SIMT emulator (simt.h, -DTRIPLETOPS_EMU), with AddressSanitizer and UBSan.

Loaded into a Python whose first library is libasan (LD_PRELOAD; see run.py), it
registers the `tripletops_emu` ops, whose CPU kernels are the emulated CUDA kernels.
Rebuilds only what changed. Prints the library's path on the last line.
"""
from __future__ import annotations

import concurrent.futures
import glob
import os
import subprocess
import sys

import torch
from torch.utils import cpp_extension

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
OUT = os.path.join(ROOT, "build", "cuda_emu")
SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize=vptr", "-fno-sanitize-recover=undefined",
            "-fno-omit-frame-pointer"]


def sources() -> list[tuple[str, bool]]:
    """(path, is_cuda): every CUDA source, the emulator, and the library's schemas."""
    cu = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    return [(p, True) for p in cu] + [(os.path.join(HERE, "simt.cpp"), False),
                                      (os.path.join(HERE, "emu_library.cpp"), False)]


def headers() -> list[str]:
    return (glob.glob(os.path.join(ROOT, "csrc", "**", "*.h"), recursive=True)
            + glob.glob(os.path.join(ROOT, "csrc", "**", "*.cuh"), recursive=True)
            + glob.glob(os.path.join(HERE, "*.h")))


def compile_one(src: str, is_cuda: bool, obj: str) -> tuple[str, int, str]:
    cmd = ["g++", "-std=c++17", "-O1", "-g", "-fPIC", "-c", *SANITIZE, "-DTRIPLETOPS_EMU",
           f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
           f"-I{os.path.join(ROOT, 'csrc')}", f"-I{os.path.join(ROOT, 'csrc', 'cuda')}", f"-I{HERE}",
           *[f"-isystem{p}" for p in cpp_extension.include_paths()]]
    if is_cuda:
        cmd += ["-x", "c++"]
    cmd += [src, "-o", obj]
    res = subprocess.run(cmd, capture_output=True, text=True)
    return src, res.returncode, res.stdout + res.stderr


def main() -> int:
    os.makedirs(OUT, exist_ok=True)
    lib = os.path.join(OUT, "libtripletops_emu.so")
    newest_header = max(os.path.getmtime(h) for h in headers())
    jobs, objs = [], []
    for src, is_cuda in sources():
        obj = os.path.join(OUT, os.path.basename(src) + ".o")
        objs.append(obj)
        if not os.path.exists(obj) or os.path.getmtime(obj) < max(os.path.getmtime(src), newest_header):
            jobs.append((src, is_cuda, obj))
    failed = False
    with concurrent.futures.ThreadPoolExecutor(int(os.getenv("MAX_JOBS", "2"))) as pool:
        for src, rc, log in pool.map(lambda j: compile_one(*j), jobs):
            print(f"cuda-emu build: {os.path.relpath(src, ROOT)}: {'ok' if rc == 0 else 'FAILED'}", flush=True)
            if rc != 0:
                print(log)
                failed = True
    if failed:
        return 1
    if jobs or not os.path.exists(lib):
        torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
        cmd = ["g++", "-shared", *SANITIZE, *objs, "-o", lib, f"-L{torch_lib}", f"-Wl,-rpath,{torch_lib}",
               "-lc10", "-ltorch_cpu", "-ltorch"]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            print(res.stdout + res.stderr)
            return 1
    print(lib)
    return 0


if __name__ == "__main__":
    sys.exit(main())
