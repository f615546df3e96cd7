// The reduction of a kernel's per-item losses to the op's loss inside the same launch
// (batch-hard, explicit triplets): the last block to finish reduces them, in double and in
// a fixed order. Device code, shared by the kernels' headers.
#pragma once

#include "../common.h"
#include "warp.cuh"

#include <cstdint>

namespace tripletops {
namespace cuda {

constexpr int kReduceThreads = 256;  // the most threads of a block that reduces the losses

// The reduction of per-item losses to the op's loss, by one whole block, in double and
// in a fixed order: "sum", "mean" over valid items (every item when `valid` is null),
// "mean_nonzero" over loss > 0. An empty denominator gives exactly 0, unless a NaN is
// among the losses.
// (Volatile reads: the losses were written by other blocks, on other SMs.)
template <typename T, typename scalar_t>
__device__ void block_reduce_loss(const volatile T* loss, const volatile uint8_t* valid, int64_t B,
                                  Reduction reduction, scalar_t* out) {
  __shared__ double sums[kReduceThreads];
  __shared__ int64_t counts[kReduceThreads];
  const int t = threadIdx.x, nt = blockDim.x;
  double s = 0;
  int64_t c = 0;
  for (int64_t i = t; i < B; i += nt) {
    s += double(loss[i]);
    c += reduction == Reduction::MeanNonzero ? int64_t(loss[i] > T(0)) : valid == nullptr ? 1 : int64_t(valid[i]);
  }
  sums[t] = s, counts[t] = c;
  __syncthreads();
  for (int width = kReduceThreads / 2; width > 0; width /= 2) {  // nt is a power of two <= kReduceThreads
    if (t < width && t + width < nt) sums[t] += sums[t + width], counts[t] += counts[t + width];
    __syncthreads();
  }
  if (t == 0) {
    const double total = sums[0];
    const int64_t count = counts[0];
    double value = total;
    if (reduction != Reduction::Sum) value = count > 0 ? total / double(count) : (total != total ? total : 0.0);
    out[0] = scalar_t(value);
  }
}

// Whether this block is the last of the grid to get here: a ticket from `counter` (zeroed
// by the launcher earlier in the stream). Every write the other blocks made before their
// ticket is visible to the last block afterwards (read it through volatile pointers).
// Block-uniform: every thread of every block calls it.
__device__ __forceinline__ bool is_last_block(unsigned* counter) {
  __shared__ bool last;
  __threadfence();  // this thread's writes are visible to the whole device ...
  __syncthreads();  // ... for every thread of the block, before the ticket is taken
  if (threadIdx.x == 0) last = atomicAdd(counter, 1u) == gridDim.x - 1;
  __syncthreads();
  if (last) __threadfence();
  return last;
}

// Called by every block of a grid after it wrote its anchors' losses: the last block to
// finish reduces all B losses, in a fixed order, so the result does not depend on which
// block came last (CUDA's threadFenceReduction pattern).
template <typename T, typename scalar_t>
__device__ void reduce_in_last_block(unsigned* counter, const T* loss, const uint8_t* valid, int64_t B,
                                     Reduction reduction, scalar_t* out) {
  if (is_last_block(counter)) block_reduce_loss(loss, valid, B, reduction, out);
}

}  // namespace cuda
}  // namespace tripletops
