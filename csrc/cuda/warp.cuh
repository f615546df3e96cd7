// Warp-level helpers shared by the CUDA kernels (device code: compiled by nvcc, or by
// g++ against tools/cuda_emu/simt.h).
#pragma once

#include <cstdint>

namespace tripletops {
namespace cuda {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// The sum over the warp, on every lane (butterfly: the same order on every lane and run).
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

}  // namespace cuda
}  // namespace tripletops
