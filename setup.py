"""Builds tripletops._C from csrc/ with torch.utils.cpp_extension.

CUDAExtension when the installed PyTorch has CUDA and nvcc is found (or FORCE_CUDA=1),
CppExtension otherwise (or with FORCE_ONLY_CPU=1). DEBUG=1 builds with -O0 -g.
Install from source with `pip install --no-build-isolation -e .`: the build uses the
torch that is already installed (an isolated build stops at once and says so).
"""
import glob
import os
import warnings

from setuptools import find_packages, setup

try:
    with warnings.catch_warnings():  # torch warns when numpy is missing; the build does not need numpy
        warnings.filterwarnings("ignore", message=".*NumPy.*")
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as exc:  # an isolated build environment (plain `pip install .`), or no torch at all
    raise SystemExit(
        "tripletops compiles against the PyTorch that will run it, so it must see your installed torch.\n"
        "Install torch first, then build without build isolation:\n"
        "    pip install --no-build-isolation .        (or -e . for a development install)\n"
        f"({type(exc).__name__}: {exc})"
    ) from None

ROOT = os.path.dirname(os.path.abspath(__file__))
TORCH_VERSION_FILE = "_C.torch_version"  # beside the built extension: tripletops/_ext.py checks it at import


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


class BuildExtensionRecordingTorch(BuildExtension):
    """Also writes the torch version the extension was compiled against beside it, so that
    importing tripletops with another torch says so instead of failing on a symbol."""

    @staticmethod
    def _record(folder):
        with open(os.path.join(folder, TORCH_VERSION_FILE), "w") as f:
            f.write(torch.__version__ + "\n")

    def build_extension(self, ext):
        super().build_extension(ext)
        self._record(os.path.dirname(self.get_ext_fullpath(ext.name)))

    def copy_extensions_to_source(self):  # editable installs: the extension goes into the checkout
        super().copy_extensions_to_source()
        build_py = self.get_finalized_command("build_py")
        for ext in self.extensions:
            self._record(build_py.get_package_dir(ext.name.rpartition(".")[0]))

    def get_outputs(self):  # the file goes into the wheel with the extension
        outputs = super().get_outputs()
        return outputs + [os.path.join(os.path.dirname(o), TORCH_VERSION_FILE) for o in outputs[:1]]


setup(
    packages=find_packages(include=["tripletops", "tripletops.*"]),
    ext_modules=get_extensions(),
    cmdclass={"build_ext": BuildExtensionRecordingTorch.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},  # torch defines Py_LIMITED_API=3.10
)
