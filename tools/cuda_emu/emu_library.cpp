// The test-only `tripletops_emu` library: the same schemas as `tripletops`
// (csrc/schema.h). Its CPU kernels are csrc/cuda/*.cu compiled by g++ against simt.h,
// so `torch.ops.tripletops_emu.<op>` on CPU tensors runs the CUDA device code emulated.
#include <torch/library.h>

#include "autograd.h"
#include "schema.h"

TORCH_LIBRARY(tripletops_emu, m) { tripletops::define_ops(m); }

namespace {
struct EmuLibrary {
  static constexpr const char* kName = "tripletops_emu";
};
TRIPLETOPS_AUTOGRAD_NODES(EmuLibrary)
}  // namespace

TORCH_LIBRARY_IMPL(tripletops_emu, Autograd, m) {
  tripletops::autograd::register_autograd<EmuLibrary, EmuLibraryNodes>(m);
}
