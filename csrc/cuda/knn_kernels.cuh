// Device code of the exact k-nearest search (launcher: knn_cuda.cu).
#pragma once

#include "batch_hard_kernels.cuh"

namespace tripletops {
namespace cuda {

constexpr int kKnnWarpsPerBlock = 8;  // one warp per (query, gallery row) pair

// The exact keys of n candidate pairs (query q[t], gallery row j[t]) over the input rows,
// in double, one warp per pair, lanes over D, grid-stride over pairs: |a - b|^2 in
// difference form (inf or NaN as the arithmetic gives them for a row holding Inf or NaN,
// as the CPU's), or for cosine warp_exact_key's |â - b̂|^2 = 2 (1 - cos) (NaN for such rows).
// Work: n * D loads of each row; at Q = 10^5 and ~12 candidates per query, D = 128 fp32,
// ~1.2e6 pairs * 1 KiB from L2 ~ 1.2 GB: expected ~0.5 ms on an H200 (not measured).
template <typename scalar_t>
__global__ void __launch_bounds__(kKnnWarpsPerBlock * kWarp)
    knn_exact_keys_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ y, int64_t D, bool cosine,
                          const int64_t* __restrict__ q, const int64_t* __restrict__ j, int64_t n,
                          double* __restrict__ key) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = int64_t(gridDim.x) * kKnnWarpsPerBlock;
  for (int64_t t = int64_t(blockIdx.x) * kKnnWarpsPerBlock + threadIdx.x / kWarp; t < n; t += warps) {
    const scalar_t* a = x + q[t] * D;
    const scalar_t* b = y + j[t] * D;
    double k;
    if (cosine) {
      k = warp_exact_key(a, warp_exact_norm(a, D, true, lane), b, D, true, lane);
    } else {
      double acc = 0;
      for (int64_t c = lane; c < D; c += kWarp) {
        const double d = double(a[c]) - double(b[c]);
        acc += d * d;
      }
      k = warp_sum(acc);
    }
    if (lane == 0) key[t] = k;
  }
}

}  // namespace cuda
}  // namespace tripletops
