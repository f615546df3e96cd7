// Device code of the exact k-nearest search (launcher: knn_cuda.cu).
#pragma once

#include "batch_hard_kernels.cuh"

namespace tripletops {
namespace cuda {

constexpr int kKnnWarpsPerBlock = 8;  // one warp per (query, gallery row) pair

// The exact keys of n candidate pairs (query q[t], gallery row j[t]) over the input rows,
// in double (+inf for a dropped pair, q[t] = Q), one warp per pair, lanes over D, grid-stride over pairs: |a - b|^2 in
// difference form (inf or NaN as the arithmetic gives them for a row holding Inf or NaN,
// as the CPU's), or for cosine warp_exact_key's |â - b̂|^2 = 2 (1 - cos) (NaN for such rows).
// Work: n * D loads of each row; at Q = 10^5 and ~12 candidates per query, D = 128 fp32,
// ~1.2e6 pairs * 1 KiB from L2 ~ 1.2 GB: expected ~0.5 ms on an H200 (not measured).
template <typename scalar_t>
__global__ void __launch_bounds__(kKnnWarpsPerBlock * kWarp)
    knn_exact_keys_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ y, int64_t D, bool cosine,
                          const int64_t* __restrict__ q, const int64_t* __restrict__ j, int64_t n, int64_t Q,
                          double* __restrict__ key) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = int64_t(gridDim.x) * kKnnWarpsPerBlock;
  for (int64_t t = int64_t(blockIdx.x) * kKnnWarpsPerBlock + threadIdx.x / kWarp; t < n; t += warps) {
    if (q[t] >= Q) {  // a dropped pair (knn_cuda: query Q)
      if (lane == 0) key[t] = INFINITY;
      continue;
    }
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

// (Sq)euclidean near ties: the keys of the pairs flagged in `refine` formed again, rounded
// once from their exact value (common.h: correctly_rounded_sq_distance), so that rows at
// mathematically equal distance get equal keys whatever the order of their entries, and
// tie to the smallest index. One thread per pair (a serial sum of 6 D exact terms over a
// few partials, about 20x a warp's double sum per pair); knn_cuda flags only the keys that
// sit within the sums' rounding bound of a neighbour near each query's k-th, a few per
// query. Not measured on a GPU.
template <typename scalar_t>
__global__ void __launch_bounds__(kKnnWarpsPerBlock * kWarp)
    knn_refine_keys_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ y, int64_t D,
                           const int64_t* __restrict__ q, const int64_t* __restrict__ j,
                           const bool* __restrict__ refine, int64_t n, double* __restrict__ key) {
  const int64_t threads = int64_t(gridDim.x) * blockDim.x;
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < n; t += threads)
    if (refine[t]) key[t] = correctly_rounded_sq_distance(x + q[t] * D, y + j[t] * D, D);
}

// The register path of the tile selection: k <= 32 * kKnnMaxKeysPerLane (256) nearest
// held in registers, kKnnChunkPerLane keys per lane and chunk (a chunk: 256 keys of a row).
constexpr int kKnnMaxKeysPerLane = 8;
constexpr int kKnnChunkPerLane = 8;

__device__ __forceinline__ float next_up(float x) { return nextafterf(x, INFINITY); }
__device__ __forceinline__ double next_up(double x) { return nextafter(x, INFINITY); }

// A query's k smallest keys so far, KPL slots per lane (slot s of lane l: entry 32 s + l;
// entries past k hold -inf and are never the largest), and where the largest is: `kth`
// on every lane, the lane `owner` that holds it, and that lane's slot `slot`.
template <typename T, int KPL>
struct WarpBest {
  T key[KPL];
  T kth;
  int owner, slot;

  // The largest of the warp's entries (butterfly on (key, lane): every lane agrees).
  __device__ __forceinline__ void find_largest(int lane) {
    T m = key[0];
    int s = 0;
#pragma unroll
    for (int i = 1; i < KPL; ++i)
      if (key[i] > m) m = key[i], s = i;
    int who = lane;
    for (int offset = kWarp / 2; offset > 0; offset /= 2) {
      const T om = __shfl_xor_sync(kFullMask, m, offset);
      const int ow = __shfl_xor_sync(kFullMask, who, offset);
      if (om > m || (om == m && ow < who)) m = om, who = ow;
    }
    kth = m, owner = who, slot = s;  // `slot` is meaningful on the owner lane
  }

  // x < kth (on every lane) takes the largest entry's place.
  __device__ __forceinline__ void replace_largest(T x, int lane) {
#pragma unroll
    for (int i = 0; i < KPL; ++i)
      if (lane == owner && i == slot) key[i] = x;  // unrolled: the slots stay in registers
    find_largest(lane);
  }
};

// The selection over one tile of Gram keys (knn_cuda: addmm's (rows, n) block, gallery
// columns c0 .. c0 + n - 1, NaN where excluded or not finite), reading each key once: one
// warp per query row and segment (the row's columns in `segments` equal parts: with few
// queries, more warps than rows fill the GPU). With `merge`, the segment's k smallest
// keys (best: (rows, segments, 32 KPL), -inf past k) take in its keys; then every key
// within the threshold, that k-th smallest plus twice the certified bound (twice[r], in
// double) rounded up in T, is appended as a candidate (pair r * G + gallery row, and its
// key), one atomic add per chunk of 256 keys. A segment's k-th smallest is never below the
// row's, and only falls as keys come in, so the threshold is never below the final one:
// the candidates hold the final window whatever the order of tiles, segments and chunks.
// Past `capacity` the counter still counts and nothing is written: knn_cuda then runs the
// tiles from the first that overflowed once more with merge = false (the final best, the
// tightest threshold) into a buffer that size. Rows with direct[r] (searched on every
// gallery row) are skipped.
// Work per tile of 2^26 fp32 keys: 256 MiB read once, coalesced (lane l reads columns
// l, l + 32, ...; eight loads in flight per lane), ~60 us at ~4 TB/s on an H200; merging
// is a compare per key and a warp's butterfly per key that enters the k smallest (about
// k ln(G / k) per row and segment over the whole gallery); one atomic per chunk that has
// candidates. Not measured on a GPU.
template <typename T, int KPL>
__global__ void __launch_bounds__(kKnnWarpsPerBlock * kWarp)
    knn_tile_select_kernel(const T* __restrict__ tile, int64_t rows, int64_t n, int64_t segments, int64_t c0,
                           int64_t G, int64_t k, T* __restrict__ best, const double* __restrict__ twice,
                           const bool* __restrict__ direct, bool merge, unsigned long long* __restrict__ count,
                           int64_t capacity, int64_t* __restrict__ cand_pair, T* __restrict__ cand_key) {
  constexpr int kSlots = KPL * kWarp;
  const int lane = threadIdx.x % kWarp;
  const unsigned below = (1u << lane) - 1u;  // the lanes before mine
  const int64_t warps = int64_t(gridDim.x) * kKnnWarpsPerBlock;
  const int64_t seg_len = (n + segments - 1) / segments;
  for (int64_t w = int64_t(blockIdx.x) * kKnnWarpsPerBlock + threadIdx.x / kWarp; w < rows * segments; w += warps) {
    const int64_t r = w / segments;
    if (direct[r]) continue;
    T* my_best = best + w * kSlots;
    WarpBest<T, KPL> wb;
#pragma unroll
    for (int i = 0; i < KPL; ++i) {
      const int e = i * kWarp + lane;
      wb.key[i] = e < k ? my_best[e] : T(-INFINITY);
    }
    wb.find_largest(lane);
    const T* row = tile + r * n;
    const int64_t stop = (w % segments + 1) * seg_len, end = stop < n ? stop : n;
    for (int64_t c = (w % segments) * seg_len; c < end; c += kKnnChunkPerLane * kWarp) {
      T v[kKnnChunkPerLane];
#pragma unroll
      for (int i = 0; i < kKnnChunkPerLane; ++i) {  // all loads in flight before any use
        const int64_t col = c + i * kWarp + lane;
        v[i] = col < end ? row[col] : quiet_nan<T>();
      }
      if (merge) {
#pragma unroll
        for (int i = 0; i < kKnnChunkPerLane; ++i) {
          // Keys below the k-th at this step, one at a time from the lowest lane: each
          // is compared again with the k-th as it falls (NaN never enters).
          for (unsigned m = __ballot_sync(kFullMask, v[i] < wb.kth); m != 0; m &= m - 1) {
            const T x = __shfl_sync(kFullMask, v[i], __ffs(int(m)) - 1);
            if (x < wb.kth) wb.replace_largest(x, lane);
          }
        }
      }
      const T admit = next_up(T(double(wb.kth) + twice[r]));
      unsigned hits[kKnnChunkPerLane];
      int total = 0;
#pragma unroll
      for (int i = 0; i < kKnnChunkPerLane; ++i) {
        hits[i] = __ballot_sync(kFullMask, v[i] <= admit);
        total += __popc(hits[i]);
      }
      if (total == 0) continue;
      unsigned long long base = 0;
      if (lane == 0) base = atomicAdd(count, (unsigned long long)total);
      base = __shfl_sync(kFullMask, base, 0);
#pragma unroll
      for (int i = 0; i < kKnnChunkPerLane; ++i) {
        const unsigned long long at = base + __popc(hits[i] & below);
        if ((hits[i] >> lane & 1u) && at < (unsigned long long)capacity) {
          cand_pair[at] = r * G + c0 + c + i * kWarp + lane;
          cand_key[at] = v[i];
        }
        base += __popc(hits[i]);
      }
    }
    if (merge) {
#pragma unroll
      for (int i = 0; i < KPL; ++i) my_best[i * kWarp + lane] = wb.key[i];
    }
  }
}

}  // namespace cuda
}  // namespace tripletops
