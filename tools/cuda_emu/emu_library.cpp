// The test-only `tripletops_emu` library: the same schemas as `tripletops`
// (csrc/schema.h). Its CPU kernels are csrc/cuda/*.cu compiled by g++ against simt.h,
// so `torch.ops.tripletops_emu.<op>` on CPU tensors runs the CUDA device code emulated.
#include <torch/library.h>

#include "schema.h"

TORCH_LIBRARY(tripletops_emu, m) { tripletops::define_ops(m); }
