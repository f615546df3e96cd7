"""Builds tripletops._C from csrc/ with torch.utils.cpp_extension.

CUDAExtension when the installed PyTorch has CUDA and nvcc is found (or FORCE_CUDA=1),
CppExtension otherwise (or with FORCE_ONLY_CPU=1). DEBUG=1 builds with -O0 -g.
Install from source with `pip install --no-build-isolation -e .`: the build uses the
torch that is already installed (an isolated build stops at once and says so).
"""
import glob
import os
import sys
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
        "Install torch and the build tools first, then build without build isolation:\n"
        "    pip install \"setuptools>=77\" wheel ninja numpy\n"
        "    pip install --no-build-isolation .        (or -e . for a development install)\n"
        f"({type(exc).__name__}: {exc})"
    ) from None

# The oldest torch whose headers compile every source (make torch-range checks 2.6 and the
# newest; in 2.5 and older c10::string_view, which the ops take, is not std::string_view).
MIN_TORCH = (2, 6)
if tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) < MIN_TORCH:
    raise SystemExit(f"tripletops needs torch >= {'.'.join(map(str, MIN_TORCH))}; torch {torch.__version__} is installed")

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)
import setup_support  # noqa: E402  (beside this file: the arch choice and the libstdc++ check)

TORCH_VERSION_FILE = "_C.torch_version"  # beside the built extension: tripletops/_ext.py checks it at import
CUDA_ARCHS_FILE = "_C.cuda_archs"  # the GPU code the extension carries: tripletops/_ext.py checks it on first use
CUDA_ARCHS = None  # [(number, with_ptx)] when the CUDA kernels are built


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
        global CUDA_ARCHS
        CUDA_ARCHS, source = setup_support.resolve_cuda_archs(
            dict(os.environ), _visible_capabilities(),
            setup_support.nvcc_gpu_codes(os.path.join(CUDA_HOME, "bin", "nvcc")) if CUDA_HOME else None)
        if not CUDA_ARCHS:
            raise SystemExit("tripletops: the installed nvcc supports none of the default GPU architectures; "
                             "set TRIPLETOPS_CUDA_ARCHS (e.g. 8.0;9.0+PTX)")
        print(f"tripletops: CUDA code for {setup_support.arch_record(CUDA_ARCHS)} (from {source})", flush=True)
        extra_compile_args["nvcc"] = opt + ["--expt-relaxed-constexpr", "-lineinfo"] + setup_support.gencode_flags(
            CUDA_ARCHS)

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


def _visible_capabilities():
    """The compute capabilities of this machine's GPUs (none when torch sees no GPU)."""
    try:
        if not torch.cuda.is_available():
            return []
        return [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
    except Exception:  # a driver problem: build the default list instead
        return []


class BuildExtensionRecordingTorch(BuildExtension):
    """Also writes the torch version the extension was compiled against beside it (so that
    importing tripletops with another torch says so instead of failing on a symbol) and the
    GPU code it carries. Links against the shared libstdc++ only, and verifies it."""

    @staticmethod
    def _record(folder):
        with open(os.path.join(folder, TORCH_VERSION_FILE), "w") as f:
            f.write(torch.__version__ + "\n")
        archs_file = os.path.join(folder, CUDA_ARCHS_FILE)
        if CUDA_ARCHS:
            with open(archs_file, "w") as f:
                f.write(setup_support.arch_record(CUDA_ARCHS) + "\n")
        elif os.path.exists(archs_file):  # a CPU build over an old CUDA one
            os.remove(archs_file)

    def build_extensions(self):
        # A copy of libstdc++ inside _C has locale state of its own: formatting a number in
        # a C++ error message crashed the process on the first GPU machine. Drop any
        # -static-libstdc++ that the environment's link line brings (LDSHARED, LDFLAGS), and
        # log the link line.
        for attr in ("linker_so", "linker_so_cxx"):
            cmd = getattr(self.compiler, attr, None)
            if cmd:
                setattr(self.compiler, attr, [a for a in cmd if a != "-static-libstdc++"])
        run_name = "call" if hasattr(self.compiler, "call") else "spawn"  # setuptools >= 80 links through call()
        run = getattr(self.compiler, run_name)

        def logged_run(cmd, *args, **kwargs):
            if "-shared" in cmd:
                print("tripletops: link line: " + " ".join(cmd), flush=True)
            return run(cmd, *args, **kwargs)

        setattr(self.compiler, run_name, logged_run)
        super().build_extensions()

    def build_extension(self, ext):
        ext.extra_link_args = [a for a in ext.extra_link_args if a != "-static-libstdc++"]
        super().build_extension(ext)
        built = self.get_ext_fullpath(ext.name)
        try:
            found = setup_support.libstdcxx_code_in(built)
        except RuntimeError as exc:  # no nm: say so, do not fail the build on it
            print(f"tripletops: could not check {built} for a copy of libstdc++ ({exc})", flush=True)
            found = []
        if found and os.getenv("TRIPLETOPS_ALLOW_LIBSTDCXX_COPY") == "1":  # make gpu-check's diagnosis only
            print(f"tripletops: WARNING: {built} defines libstdc++'s own functions: {found[:5]}", flush=True)
        elif found:
            raise SystemExit(
                f"tripletops: {built} defines libstdc++'s own functions ({', '.join(found[:5])}, ...): a static "
                "copy of libstdc++ was linked in, and C++ error messages with numbers would crash the process. "
                "Check the link line above (LDFLAGS, LDSHARED, CXX) for -static-libstdc++ or a static archive "
                "that carries libstdc++.")
        self._record(os.path.dirname(built))

    def copy_extensions_to_source(self):  # editable installs: the extension goes into the checkout
        super().copy_extensions_to_source()
        build_py = self.get_finalized_command("build_py")
        for ext in self.extensions:
            self._record(build_py.get_package_dir(ext.name.rpartition(".")[0]))

    def get_outputs(self):  # the files go into the wheel with the extension
        outputs = super().get_outputs()
        extra = [TORCH_VERSION_FILE] + ([CUDA_ARCHS_FILE] if CUDA_ARCHS else [])
        return outputs + [os.path.join(os.path.dirname(o), name) for o in outputs[:1] for name in extra]


setup(
    packages=find_packages(include=["tripletops", "tripletops.*"]),
    ext_modules=get_extensions(),
    cmdclass={"build_ext": BuildExtensionRecordingTorch.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},  # torch defines Py_LIMITED_API=3.10
)
