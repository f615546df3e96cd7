// Device code of pairwise_distance (launchers: pairwise_distance_cuda.cu).
#pragma once

#include "../common.h"

#include <cstdint>

namespace tripletops {
namespace cuda {

// Below this ratio of d^2 to |x|^2 + |y|^2 the Gram form cancels: recompute from the rows.
constexpr double kCancellationRatio = 0.125;  // as on CPU

// Gram entries -> distances, in place; one thread per entry.
template <typename T>
__global__ void gram_to_distance_kernel(T* g, const T* __restrict__ x, const T* __restrict__ y,
                                        const T* __restrict__ sx, const T* __restrict__ sy, int64_t N, int64_t M,
                                        int64_t D, Metric metric) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= N * M) return;
  const int64_t i = idx / M, j = idx % M;
  if (metric == Metric::Cosine) {
    g[idx] = T(1) - g[idx];
    return;
  }
  T d2 = sx[i] + sy[j] - T(2) * g[idx];
  if (!(d2 >= T(kCancellationRatio) * (sx[i] + sy[j]))) {  // cancels (or NaN): from the difference
    d2 = T(0);
    const T *xr = x + i * D, *yr = y + j * D;
    for (int64_t k = 0; k < D; ++k) {
      const T d = xr[k] - yr[k];
      d2 += d * d;
    }
  }
  g[idx] = metric == Metric::Euclidean ? sqrt(d2) : d2;
}

}  // namespace cuda
}  // namespace tripletops
