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

// The identical-rows groups, without a host sync: each row's 64-bit hash of its bytes (the
// hash of csrc/cpu's settle_identical_rows), then, after a stable sort by hash, each row's
// group is the smallest index among the rows of its hash run with identical bytes.
__global__ void row_hash_kernel(const unsigned char* __restrict__ rows, int64_t n, int64_t row_bytes,
                                int64_t* __restrict__ hash) {
  const int64_t r = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= n) return;
  const unsigned char* row = rows + r * row_bytes;
  uint64_t h = 1469598103934665603ull;
  int64_t b = 0;
  for (; b + 8 <= row_bytes; b += 8) {
    uint64_t word = 0;
    for (int k = 7; k >= 0; --k) word = (word << 8) | row[b + k];  // little-endian, as memcpy on x86
    h = (h ^ word) * 1099511628211ull;
    h ^= h >> 29;
  }
  for (; b < row_bytes; ++b) h = (h ^ row[b]) * 1099511628211ull;
  hash[r] = static_cast<int64_t>(h);
}

// One thread per position p of the rows sorted by (hash, index): the first row of p's
// hash run with p's bytes is the smallest such index (the sort is stable). O(run * D).
__global__ void group_by_bytes_kernel(const unsigned char* __restrict__ rows, int64_t n, int64_t row_bytes,
                                      const int64_t* __restrict__ sorted_hash, const int64_t* __restrict__ order,
                                      int64_t* __restrict__ group) {
  const int64_t p = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p >= n) return;
  int64_t start = p;
  while (start > 0 && sorted_hash[start - 1] == sorted_hash[p]) --start;
  const unsigned char* mine = rows + order[p] * row_bytes;
  for (int64_t q = start; q <= p; ++q) {
    const unsigned char* other = rows + order[q] * row_bytes;
    int64_t b = 0;
    while (b < row_bytes && other[b] == mine[b]) ++b;
    if (b == row_bytes) {
      group[order[p]] = order[q];
      return;
    }
  }
}

// first[group[i]] = the smallest i of each group; `first` starts at n. Integer atomicMin:
// the result does not depend on the order the threads run in.
__global__ void first_of_group_kernel(const int64_t* __restrict__ group, int64_t n, long long* first) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) atomicMin(first + group[i], (long long)i);
}

// Identical inputs, identical distances (as csrc/cpu's settle_identical_rows): rows of x
// (and columns of y) in one group of bitwise-identical rows take their group's first row
// (column) bitwise, and members of one group meet at exactly 0 where `zero_ok` (a finite
// row; for cosine, a unit row). In place without a race: an entry is only read as the
// source of others when its row and column are both their group's first and the two
// groups differ, and such an entry is never written.
template <typename T>
__global__ void settle_identical_kernel(T* d, const int64_t* __restrict__ group_x,
                                        const int64_t* __restrict__ group_y, const long long* __restrict__ first_x,
                                        const long long* __restrict__ first_y, const bool* __restrict__ zero_ok,
                                        int64_t N, int64_t M) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= N * M) return;
  const int64_t i = idx / M, j = idx % M;
  const int64_t gx = group_x[i], gy = group_y[j];
  if (gx == gy) {
    if (zero_ok[i]) d[idx] = T(0);
    return;
  }
  const int64_t r = first_x[gx], c = first_y[gy];
  if (r != i || c != j) d[idx] = d[r * M + c];
}

}  // namespace cuda
}  // namespace tripletops
