"""Builds tripletops._C from csrc/ with torch.utils.cpp_extension.

CUDAExtension when the installed PyTorch has CUDA and nvcc is found (or FORCE_CUDA=1),
CppExtension otherwise (or with FORCE_ONLY_CPU=1). DEBUG=1 builds with -O0 -g.
Install from source with `pip install --no-build-isolation -e .`: the build uses the
torch that is already installed.
"""
import glob
import os

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.getenv(name, "0") == "1"


def get_extensions():
    debug = _flag("DEBUG")
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    sources += sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    cuda_ok = torch.version.cuda is not None and CUDA_HOME is not None
    # Only a CUDAExtension when there are CUDA kernels to compile (csrc/cuda/*.cu).
    use_cuda = bool(cuda_sources) and not _flag("FORCE_ONLY_CPU") and (_flag("FORCE_CUDA") or cuda_ok)
    if use_cuda:
        sources += cuda_sources

    opt = ["-O0", "-g"] if debug else ["-O3"]
    # at::parallel_for expands to `#pragma omp parallel` in the extension itself, so
    # it must be compiled with OpenMP (the runtime is the libgomp torch already loaded).
    # (py_limited_api=True below makes torch define Py_LIMITED_API for us.)
    cxx = opt + ["-fopenmp"]
    extra_compile_args = {"cxx": cxx}
    extra_link_args = ["-fopenmp"] + (["-O0", "-g"] if debug else [])
    extension = CppExtension
    if use_cuda:
        extension = CUDAExtension
        nvcc = opt + ["--expt-relaxed-constexpr", "-lineinfo"]
        for arch in os.getenv("TRIPLETOPS_CUDA_ARCHS", "80;90").split(";"):
            nvcc += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
        extra_compile_args["nvcc"] = nvcc

    return [
        extension(
            "tripletops._C",
            sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args=extra_compile_args,
            extra_link_args=extra_link_args,
            py_limited_api=True,
        )
    ]


setup(
    packages=find_packages(include=["tripletops", "tripletops.*"]),
    ext_modules=get_extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},  # torch defines Py_LIMITED_API=3.10
)
