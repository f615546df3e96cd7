// The tripletops library: its ops (schemas in schema.h) and the Python module entry point.
//
// Kernels register themselves per device at the bottom of their own files
// (csrc/cpu/<op>_cpu.cpp with TORCH_LIBRARY_IMPL(tripletops, CPU, m), and
// csrc/cuda/<op>_cuda.cu with TORCH_LIBRARY_IMPL(tripletops, CUDA, m) through device.h).
// Autograd kernels are C++ (autograd.h), registered below; fake (meta) kernels are
// registered from Python, in tripletops/_ops.py.
#include <Python.h>
#include <torch/library.h>

#include "autograd.h"
#include "schema.h"

extern "C" {
// Importing tripletops._C only has to load this shared library: its static
// initializers register the ops with the dispatcher. No pybind11, so the module
// builds against Python's limited API.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(tripletops, m) { tripletops::define_ops(m); }

namespace {
struct TripletopsLibrary {
  static constexpr const char* kName = "tripletops";
};
TRIPLETOPS_AUTOGRAD_NODES(TripletopsLibrary)
}  // namespace

TORCH_LIBRARY_IMPL(tripletops, Autograd, m) {
  tripletops::autograd::register_autograd<TripletopsLibrary, TripletopsLibraryNodes>(m);
}
