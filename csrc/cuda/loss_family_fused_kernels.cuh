// Device code of batch_all_loss, semi_hard_loss and contrastive_loss for small batches
// (B <= kFusedMaxB; launchers: loss_family_cuda.cu): the whole loss in three launches each
// way, where the general path (loss_family_kernels.cuh) makes ~50 with its ATen glue.
//
//   forward:  [cosine: family_unit_rows_kernel] family_distance_kernel, then
//             triplet_family_fused_kernel (batch-all's hinge: batch_all_stream_kernel) /
//             contrastive_fused_kernel (+ the counter's fill)
//   backward: [cosine: family_unit_rows_kernel] the fused kernel again (the scale, and for
//             batch-all / semi-hard each anchor's row of d loss / d dist, unscaled), then
//             family_embedding_grad_kernel (the gradient to the rows, in their dtype)
//
// The distances are computed directly from the rows in double (no Gram form: nothing
// cancels), so identical rows, and rows of one direction under cosine, meet at exactly 0
// and have bitwise-identical rows and columns of distances without a settling pass, and
// the matrix is symmetric bitwise. Each anchor's negatives (and positives) are sorted in
// shared memory (a bitonic network on (distance, column): the stable order), so the
// per-anchor statistics are those of the general path; the last block reduces them to the
// loss or the backward's scale (is_last_block). Every sum runs in a fixed order: the same
// bits on every run.
#pragma once

#include "loss_family_kernels.cuh"
#include "pairwise_distance_kernels.cuh"
#include "reduce.cuh"

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>

namespace tripletops {
namespace cuda {

// The paths by B (the launcher's choice, never the data's):
//  - B <= kFusedMaxB: everything here. Beyond it the direct distances (O(B^2 D) in double)
//    and the per-row gradient kernel (each block reads every row) cost more than GEMMs.
//  - B <= kSharedSortMaxB, when the device's shared memory holds the row: the GEMM-based
//    distances and gradient of pairwise_distance, with triplet_family_fused_kernel for the
//    statistics (each anchor's row sorted in shared memory: no at::sort, no (B, B) sort
//    buffers).
//  - beyond: the general path of loss_family_kernels.cuh (at::sort per row).
// Under the emulator the bounds are small, so that the tests (B = 1 ... 130) drive all three.
#ifdef TRIPLETOPS_EMU
constexpr int64_t kFusedMaxB = 64;
constexpr int64_t kSharedSortMaxB = 128;
#else
constexpr int64_t kFusedMaxB = 1024;
constexpr int64_t kSharedSortMaxB = 8192;
#endif

C10_HOST_DEVICE inline int64_t next_pow2(int64_t n) {
  int64_t p = 1;
  while (p < n) p *= 2;
  return p;
}

// triplet_family_fused_kernel's dynamic shared memory: per entry of the padded row, a
// double key, a double of aux and an int column: 20 KiB at B = 1024, 160 KiB at 8192.
inline size_t sorted_row_bytes(int64_t B) { return size_t(next_pow2(B)) * (2 * sizeof(double) + sizeof(int)); }
constexpr size_t kFusedStaticShared = 10 * 1024;  // the kernel's static shared memory (~8.4 KiB), rounded up

// triplet_family_fused_kernel's threads: 8 entries of the padded row each, 128 to 1024 (a
// long row's sort needs the threads: one block per SM at 160 KiB of shared memory). Under
// the emulator two threads per entry, so that its rows of 65 to 128 take 256 threads.
inline unsigned sorted_row_threads(int64_t B) {
#ifdef TRIPLETOPS_EMU
  const int64_t want = next_pow2(B) * 2;
#else
  const int64_t want = next_pow2(B) / 8;
#endif
  return unsigned(std::min<int64_t>(1024, std::max<int64_t>(kFamilyThreads, want)));
}

// ---- rows and distances ----------------------------------------------------------------

// Cosine: each row's unit row in double, as csrc/cpu's canonical_unit_row: a finite row of
// norm > eps gets (x / max|x_k|) / |x / max|x_k|| (the same bits for x and c·x, c > 0),
// another x / max(|x|, eps) (F.normalize). unit_ok marks the first kind, sq_norm is
// sum x_k^2 in double (the backward's |x|). One warp per row. Expected on the H200:
// ~3 us at 1024 x 512 fp32 (2 MiB read, 4 MiB written).
template <typename T>
__global__ void family_unit_rows_kernel(const T* __restrict__ x, int64_t B, int64_t D, double* __restrict__ unit,
                                        uint8_t* __restrict__ unit_ok, double* __restrict__ sq_norm) {
  const int64_t r = int64_t(blockIdx.x) * kFamilyWarps + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (r >= B) return;  // (warp-uniform)
  const T* row = x + r * D;
  double m = 0, sq = 0;
  bool finite = true;
  for (int64_t k = lane; k < D; k += kWarp) {
    const double v = double(row[k]);
    finite = finite && v - v == 0.0;
    m = fabs(v) > m ? fabs(v) : m;
    sq += v * v;
  }
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    const double o = __shfl_xor_sync(kFullMask, m, offset);
    m = o > m ? o : m;
    finite = __shfl_xor_sync(kFullMask, int(finite), offset) && finite;
  }
  sq = warp_sum(sq);
  double sp = 0;
  if (finite && m > 0)
    for (int64_t k = lane; k < D; k += kWarp) {
      const double p = double(row[k]) / m;
      sp += p * p;
    }
  sp = warp_sum(sp);
  const bool canonical = finite && m > 0 && m * sqrt(sp) > kNormEps;
  const double norm = canonical ? sqrt(sp) : (sqrt(sq) > kNormEps ? sqrt(sq) : kNormEps);
  for (int64_t k = lane; k < D; k += kWarp)
    unit[r * D + k] = canonical ? double(row[k]) / m / norm : double(row[k]) / norm;
  if (lane == 0) unit_ok[r] = canonical, sq_norm[r] = sq;
}

constexpr int kDistTile = 32;  // a block's (32 x 32) tile of distances, 2 x 2 per thread
constexpr int kDistK = 16;     // columns of the rows staged in shared memory at a time

// The (B, B) distances from the rows (`rows`: the input rows, or the unit rows for cosine),
// in double: euclidean sqrt(sum (a - b)^2), sqeuclidean sum (a - b)^2, cosine
// |u - v|^2 / 2 between unit rows (= 1 - u.v, exactly 0 for one direction), 1 - u.v
// where a row is not one. Sums over k in ascending order, so d(i, j) and d(j, i) have the
// same bits. Double rows whose sums leave the range: rescaled (scaled_distance). Expected on the
// H200 (shared-memory bound, 2 x 2 per thread): B = 512, D = 128 ~5 us; B = 1024, D = 512
// ~70 us (2^29 differences).
template <typename S, typename OutT>
__global__ void __launch_bounds__(256) family_distance_kernel(const S* __restrict__ rows,
                                                              const uint8_t* __restrict__ unit_ok, int64_t B,
                                                              int64_t D, Metric metric, OutT* __restrict__ dist) {
  __shared__ double ti[kDistTile][kDistK + 1], tj[kDistTile][kDistK + 1];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t i0 = int64_t(blockIdx.y) * kDistTile, j0 = int64_t(blockIdx.x) * kDistTile;
  double sq[2][2] = {{0, 0}, {0, 0}}, dot[2][2] = {{0, 0}, {0, 0}};
  for (int64_t k0 = 0; k0 < D; k0 += kDistK) {
    for (int e = threadIdx.x; e < kDistTile * kDistK; e += blockDim.x) {
      const int r = e / kDistK, c = e % kDistK;
      const int64_t k = k0 + c;
      ti[r][c] = i0 + r < B && k < D ? double(rows[(i0 + r) * D + k]) : 0.0;
      tj[r][c] = j0 + r < B && k < D ? double(rows[(j0 + r) * D + k]) : 0.0;
    }
    __syncthreads();
    for (int c = 0; c < kDistK; ++c)
      for (int u = 0; u < 2; ++u)
        for (int v = 0; v < 2; ++v) {
          const double a = ti[ty + 16 * u][c], b = tj[tx + 16 * v][c], e = a - b;
          sq[u][v] += e * e;
          dot[u][v] += a * b;
        }
    __syncthreads();
  }
  for (int u = 0; u < 2; ++u)
    for (int v = 0; v < 2; ++v) {
      const int64_t i = i0 + ty + 16 * u, j = j0 + tx + 16 * v;
      if (i >= B || j >= B) continue;
      double d;
      if (metric == Metric::Cosine) {
        d = unit_ok[i] && unit_ok[j] ? 0.5 * sq[u][v] : 1.0 - dot[u][v];
      } else {
        d = sq[u][v];
        const bool euclidean = metric == Metric::Euclidean;
        if (!(sizeof(S) == 8 && out_of_double_range(d)) ||
            !scaled_distance(rows + i * D, rows + j * D, D, euclidean, &d))
          d = euclidean ? sqrt(d) : d;
      }
      dist[i * B + j] = OutT(d);
    }
}

// ---- per-anchor statistics ------------------------------------------------------------

// Sorts key[0, n) ascending in shared memory, n a power of two, with the whole block: a
// bitonic network, ties by col[] (distinct, so the order is total: the stable order of the
// general path's at::sort), or by nothing when col is null (equal keys are then
// interchangeable). NaN keys are moved somewhere; their anchor's loss is NaN anyway.
__device__ __forceinline__ void bitonic_sort(double* key, int* col, int n) {
  __syncthreads();
  for (int k = 2; k <= n; k *= 2)
    for (int j = k / 2; j > 0; j /= 2) {
      for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const int l = i ^ j;
        if (l <= i) continue;
        const bool after = key[i] > key[l] || (col && key[i] == key[l] && col[i] > col[l]);  // i after l
        const bool before = key[i] < key[l] || (col && key[i] == key[l] && col[i] < col[l]);
        if ((i & k) == 0 ? after : before) {
          const double t = key[i];
          key[i] = key[l], key[l] = t;
          if (col) {
            const int c = col[i];
            col[i] = col[l], col[l] = c;
          }
        }
      }
      __syncthreads();
    }
}

// Anchor a's negatives (positives when `positives`), sorted ascending by (distance,
// column) into key[0, n) (and their columns into col, when given); +inf past them.
__device__ __forceinline__ void sort_row_kind(const double* d, Labels lab, int64_t a, int64_t B, bool positives, int n,
                                     double* key, int* col) {
  __syncthreads();  // key / col may still be read
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const bool take = i < B && i != a && lab.shares(a, lab, i) == positives;
    key[i] = take ? d[i] : double(INFINITY);
    if (col) col[i] = i < B ? i : INT_MAX;
  }
  bitonic_sort(key, col, n);
}

// Inclusive prefix sums of v[0, n) into out, with the whole block (up to 1024 threads) in
// a fixed order: each thread sums a run of consecutive entries, thread 0 scans the runs'
// totals.
__device__ __forceinline__ void block_prefix_sum(const double* v, int n, double* out) {
  __shared__ double offset[1024];
  const int threads = int(blockDim.x);
  const int per = (n + threads - 1) / threads;
  const int lo = threadIdx.x * per, hi = lo + per < n ? lo + per : n;
  double s = 0;
  for (int i = lo; i < hi; ++i) s += v[i];
  offset[threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    double run = 0;
    for (int t = 0; t < threads; ++t) {
      const double c = offset[t];
      offset[t] = run;
      run += c;
    }
  }
  __syncthreads();
  double run = offset[threadIdx.x];
  for (int i = lo; i < hi; ++i) out[i] = run += v[i];
  __syncthreads();
}

// Where the fused kernels put their result: the forward's loss (in the embeddings' dtype),
// or for the backward (grad given) the scale d loss / d (each term), and for batch-all /
// semi-hard each anchor's row of d loss / d dist divided by that scale (w, (B, B)).
template <typename scalar_t>
struct FusedOut {
  scalar_t* loss;
  const scalar_t* grad;
  double* scale;
  double* w;
};

// The last block: the statistics' totals to the loss or the scale.
template <typename scalar_t>
__device__ __forceinline__ void finish_in_last_block(unsigned* counter, const double* stats, int64_t B, Denominator den,
                                     FusedOut<scalar_t> out) {
  if (!is_last_block(counter)) return;
  double loss = 0, scale = 0;
  family_totals(stats, B, den, out.grad ? double(out.grad[0]) : 0.0, &loss, &scale);
  if (threadIdx.x != 0) return;
  if (out.grad) out.scale[0] = scale; else out.loss[0] = scalar_t(loss);
}

// Semi-hard, or batch-all with the soft margin (semi_hard false; batch-all's hinge takes
// batch_all_stream_kernel, below, which sorts no row), one block per anchor: its statistics, as
// batch_all_stats_kernel / semi_hard_stats_kernel compute them from at::sort's rows, and
// in the backward its row of w = (d loss / d dist) / scale, as batch_all_grad_kernel /
// semi_hard_grad_kernel: every entry written (no fill), semi-hard's shared negatives
// summed in shared memory (integer addends: exact in any order). The row's arrays live in
// dynamic shared memory, sorted_row_bytes(B), with sorted_row_threads(B) threads.
// Expected on the H200: B = 512 ~10 us, B = 1024 ~25 us (a 1024-entry bitonic sort per
// block, many blocks per SM); B = 8192 ~0.8 ms forward, ~1.6 ms backward (8192-entry sorts
// of 91 stages, 4 compare-exchanges per thread and stage, ~12 us a block, one block per
// SM: 62 waves), where at::sort of the (B, B) rows took most of the general path's 15 ms.
template <typename scalar_t>
__global__ void __launch_bounds__(1024)
    triplet_family_fused_kernel(const double* __restrict__ dist, Labels lab, int64_t B, bool semi_hard,
                                double margin, bool soft, Denominator den, double* __restrict__ stats,
                                unsigned* __restrict__ counter, FusedOut<scalar_t> out) {
#ifdef TRIPLETOPS_EMU
  unsigned char* shared = static_cast<unsigned char*>(::simt::dynamic_shared());
#else
  extern __shared__ __align__(16) unsigned char shared[];
#endif
  const int n = int(next_pow2(B));
  double* neg = reinterpret_cast<double*>(shared);
  double* aux = neg + n;  // batch-all: the prefix sums, or the sorted positives; semi-hard: w's row
  int* neg_col = reinterpret_cast<int*>(aux + n);
  const int64_t a = blockIdx.x;
  const double* d = dist + a * B;
  const bool backward = out.grad != nullptr, hinge = !semi_hard && !soft;
  const RowCounts rc = row_counts(d, lab, a, B);
  if (!soft) sort_row_kind(d, lab, a, B, /*positives=*/false, n, neg, neg_col);
  if (hinge && !backward) block_prefix_sum(neg, n, aux);
  if (hinge && backward) sort_row_kind(d, lab, a, B, /*positives=*/true, n, aux, nullptr);
  if (semi_hard && backward) {
    __syncthreads();
    for (int64_t j = threadIdx.x; j < B; j += blockDim.x) aux[j] = 0.0;
    __syncthreads();
  }
  double sum = 0, nonzero = 0;
  if (rc.valid() && !rc.nan) {
    for (int64_t p = threadIdx.x; p < B; p += blockDim.x) {
      if (p == a || !lab.shares(a, lab, p)) continue;
      if (semi_hard) {
        const int64_t k = semi_hard_pick(neg, rc.neg, d[p]);
        const double z = d[p] - neg[k];
        sum += relu_nan(z + margin);
        if (backward && triplet_term_grad(z, margin, /*soft_margin=*/false) != 0.0) {
          aux[p] = 1.0;  // one writer per positive; no positive is a negative
          atomicAdd(aux + neg_col[k], -1.0);
        }
      } else if (soft) {
        for (int64_t m = 0; m < B; ++m) {
          if (m == a || lab.shares(a, lab, m)) continue;
          const double l = softplus(d[p] - d[m]);
          sum += l;
          nonzero += l > 0.0;
        }
      } else {
        const double t = d[p] + margin;
        const int64_t c = count_below(neg, rc.neg, d[p], margin);
        if (c > 0 && !backward) sum += double(c) * t - aux[c - 1];
        nonzero += double(c);
      }
    }
  }
  sum = block_sum(sum);
  nonzero = block_sum(nonzero);
  if (threadIdx.x == 0) {
    double* st = stats + a * kStats;
    st[kSum] = sum;
    st[kCount] = !rc.valid() ? 0.0 : semi_hard ? double(rc.pos) : double(rc.pos) * double(rc.neg);
    st[kNonzero] = semi_hard ? 0.0 : nonzero;
    st[kNan] = rc.valid() && rc.nan ? 1.0 : 0.0;
  }
  if (backward) {
    __syncthreads();  // semi-hard's row of w is complete
    double* wa = out.w + a * B;
    for (int64_t j = threadIdx.x; j < B; j += blockDim.x) {
      double v = 0;
      if (!rc.valid() || j == a) {
        v = 0;
      } else if (rc.nan) {
        v = NAN;  // a NaN anchor keeps its NaN on the way to the embeddings
      } else if (semi_hard) {
        v = aux[j];
      } else {
        const bool positive = lab.shares(a, lab, j);
        if (soft) {  // sum over the other side of sigmoid(d_ap - d_an)
          for (int64_t k = 0; k < B; ++k) {
            if (k == a || lab.shares(a, lab, k) == positive) continue;
            v += positive ? sigmoid(d[j] - d[k]) : sigmoid(d[k] - d[j]);
          }
          v = positive ? v : -v;
        } else if (positive) {
          v = double(count_not_above(neg, rc.neg, d[j], margin));
        } else {  // positives p with d_p + m >= d_j: all from the first such one on
          int64_t lo = 0, hi = rc.pos;
          while (lo < hi) {
            const int64_t mid = lo + (hi - lo) / 2;
            if (not_above_sum(d[j], aux[mid], margin)) hi = mid; else lo = mid + 1;
          }
          v = -double(rc.pos - lo);
        }
      }
      wa[j] = v;
    }
  }
  finish_in_last_block(counter, stats, B, den, out);
}

// ---- batch-all without a sorted row --------------------------------------------------

// batch_all_stream_kernel's block (threads) and how many positives it sorts at once.
// Under the emulator, 2 warps and chunks of 8 positives, so that the tests' batches (6 to
// 20 positives per anchor) take several chunks.
#ifdef TRIPLETOPS_EMU
constexpr int kStreamThreads = 64;
constexpr int kStreamChunk = 8;
#else
constexpr int kStreamThreads = 256;
constexpr int kStreamChunk = 1024;
#endif

// Inclusive scan of v[q] + add over q in [0, n) (suffix: from n - 1 down to q instead),
// into out, with the whole block in a fixed order: each thread sums a run of consecutive
// entries, the runs' totals are scanned by warp shuffles and the warps' totals by every
// thread in turn. n <= kStreamChunk; v and out may not alias.
__device__ __forceinline__ void block_scan(const double* v, double add, int n, double* out, bool suffix) {
  __shared__ double warp_total[kStreamThreads / kWarp];
  const int threads = int(blockDim.x), lane = int(threadIdx.x) % kWarp, warp = int(threadIdx.x) / kWarp;
  const int per = (n + threads - 1) / threads;
  const int lo = int(threadIdx.x) * per < n ? int(threadIdx.x) * per : n, hi = lo + per < n ? lo + per : n;
  auto at = [&](int q) { return suffix ? n - 1 - q : q; };
  double run = 0;
  for (int q = lo; q < hi; ++q) run += v[at(q)] + add;
  double inclusive = run;
  for (int o = 1; o < kWarp; o *= 2) {
    const double u = __shfl_up_sync(kFullMask, inclusive, o);
    if (lane >= o) inclusive += u;
  }
  double before = __shfl_up_sync(kFullMask, inclusive, 1);
  if (lane == 0) before = 0;
  __syncthreads();  // warp_total may still be read by a previous call
  if (lane == kWarp - 1) warp_total[warp] = inclusive;
  __syncthreads();
  double base = 0;
  for (int w = 0; w < warp; ++w) base += warp_total[w];
  run = base + before;
  for (int q = lo; q < hi; ++q) out[at(q)] = run += v[at(q)] + add;
  __syncthreads();
}

// Anchor a's positives with column-order ranks [r0, r0 + kStreamChunk) into key / col
// (by rank - r0), read in rounds of one column per thread (ballots rank them within a
// round). Returns how many positives the row has; `bad` (per thread) counts the row's
// non-finite distances, and `neg` its negatives. Block-uniform.
__device__ __forceinline__ int64_t gather_positives(const double* d, Labels lab, int64_t a, int64_t B, int64_t r0,
                                                    double* key, int* col, long long& bad, long long& neg) {
  __shared__ int round_count[kStreamThreads / kWarp];
  const int lane = int(threadIdx.x) % kWarp, warp = int(threadIdx.x) / kWarp, warps = int(blockDim.x) / kWarp;
  int64_t base = 0;
  for (int64_t j0 = 0; j0 < B; j0 += blockDim.x) {
    const int64_t j = j0 + threadIdx.x;
    const bool in_row = j < B && j != a;
    const bool positive = in_row && lab.shares(a, lab, j);
    if (in_row) bad += !(d[j] - d[j] == 0.0), neg += !positive;
    const unsigned ballot = __ballot_sync(kFullMask, positive);
    __syncthreads();  // round_count may still be read by the previous round
    if (lane == 0) round_count[warp] = __popc(ballot);
    __syncthreads();
    int64_t rank = base + __popc(ballot & ((1u << lane) - 1u));
    for (int w = 0; w < warps; ++w) {
      if (w < warp) rank += round_count[w];
      base += round_count[w];
    }
    if (positive && rank >= r0 && rank < r0 + kStreamChunk) key[rank - r0] = d[j], col[rank - r0] = int(j);
  }
  __syncthreads();
  return base;
}

// Batch-all with the hinge (no soft margin), one block per anchor: its statistics, and in
// the backward its row of w = (d loss / d dist) / scale, as triplet_family_fused_kernel
// and the general path compute them, without sorting the row. Only the anchor's
// positives are sorted (by (distance, column), up to kStreamChunk at a time, in static
// shared memory); the row is then streamed once per chunk, and each negative n finds by
// binary search the first sorted positive p with d_n < d_p + m exactly (below_sum): the
// positives from there on are its active triplets, so
//   loss terms of n = suffix(d_p + m) - count * d_n,   nonzero += count,
// and in the backward (not_above_sum, the subgradient's convention) w[n] = -count, while
// a histogram of those first positives, scanned, gives each positive its count of
// negatives. Counts are exact (integers), so w is bitwise that of the sorted-row kernels;
// the loss terms are the same sums in another order (double). Every sum runs in a fixed
// order. Work per anchor: two reads of its row, a sort of its positives, B log P compares.
// Expected on the H200 (not measured): B = 8192 with 7 positives per anchor, 8 blocks
// per SM: about two reads of the 512 MiB (B, B) matrix, ~0.25 ms, where the 8192-entry
// bitonic sort of every row was modelled at ~5.8 ms.
template <typename scalar_t>
__global__ void __launch_bounds__(kStreamThreads)
    batch_all_stream_kernel(const double* __restrict__ dist, Labels lab, int64_t B, double margin, Denominator den,
                            double* __restrict__ stats, unsigned* __restrict__ counter, FusedOut<scalar_t> out) {
  __shared__ double key[kStreamChunk];
  __shared__ int col[kStreamChunk];
  __shared__ double scan[kStreamChunk + 1];  // forward: suffix sums of d_p + m; backward: the histogram's scan
  __shared__ double hist[kStreamChunk + 1];
  const int64_t a = blockIdx.x;
  const double* d = dist + a * B;
  const bool backward = out.grad != nullptr;
  double* wa = backward ? out.w + a * B : nullptr;
  long long bad = 0, neg_count = 0;
  const int64_t pos = gather_positives(d, lab, a, B, 0, key, col, bad, neg_count);
  const int64_t neg = block_sum(neg_count);
  const bool nan = block_sum(bad) > 0, valid = pos > 0 && neg > 0;
  double sum = 0, nonzero = 0;
  if (!valid || nan) {  // block-uniform
    if (backward)
      for (int64_t j = threadIdx.x; j < B; j += blockDim.x) wa[j] = !valid || j == a ? 0.0 : NAN;
  } else {
    for (int64_t r0 = 0; r0 < pos; r0 += kStreamChunk) {  // block-uniform
      if (r0 > 0) gather_positives(d, lab, a, B, r0, key, col, bad, neg_count);
      const int n = int(pos - r0 < kStreamChunk ? pos - r0 : kStreamChunk), n2 = int(next_pow2(n));
      for (int q = n + int(threadIdx.x); q < n2; q += blockDim.x) key[q] = double(INFINITY), col[q] = INT_MAX;
      bitonic_sort(key, col, n2);
      if (backward) {
        for (int q = threadIdx.x; q <= n; q += blockDim.x) hist[q] = 0.0;
      } else {
        block_scan(key, margin, n, scan, /*suffix=*/true);
        if (threadIdx.x == 0) scan[n] = 0.0;
      }
      __syncthreads();
      for (int64_t j = threadIdx.x; j < B; j += blockDim.x) {
        if (j == a || lab.shares(a, lab, j)) continue;
        const double dn = d[j];
        int lo = 0, hi = n;  // the first positive with dn < d_p + m
        while (lo < hi) {
          const int mid = (lo + hi) / 2;
          if (below_sum(dn, key[mid], margin)) hi = mid; else lo = mid + 1;
        }
        nonzero += double(n - lo);
        if (!backward) {
          if (lo < n) sum += scan[lo] - double(n - lo) * dn;
          continue;
        }
        int lo2 = 0, hi2 = n;  // the first positive with dn <= d_p + m
        while (lo2 < hi2) {
          const int mid = (lo2 + hi2) / 2;
          if (not_above_sum(dn, key[mid], margin)) hi2 = mid; else lo2 = mid + 1;
        }
        atomicAdd(hist + lo2, 1.0);  // integer addends: exact in any order
        wa[j] = (r0 == 0 ? 0.0 : wa[j]) - double(n - lo2);
      }
      if (backward) {
        __syncthreads();
        block_scan(hist, 0.0, n, scan, /*suffix=*/false);
        for (int q = threadIdx.x; q < n; q += blockDim.x) wa[col[q]] = scan[q];
        __syncthreads();  // key, col and scan are refilled by the next chunk
      }
    }
    if (backward && threadIdx.x == 0) wa[a] = 0.0;
  }
  sum = block_sum(sum);
  nonzero = block_sum(nonzero);
  if (threadIdx.x == 0) {
    double* st = stats + a * kStats;
    st[kSum] = sum;
    st[kCount] = valid ? double(pos) * double(neg) : 0.0;
    st[kNonzero] = nonzero;
    st[kNan] = valid && nan ? 1.0 : 0.0;
  }
  finish_in_last_block(counter, stats, B, den, out);
}

// Whether row i's entries are finite, read from the distances' diagonal: a row with an
// Inf or NaN has d(i, i) NaN (inf - inf), a finite row 0 (cosine: 0, or 1 for a row that
// is not a unit row).
template <typename DT>
__device__ __forceinline__ bool row_finite(const DT* dist, int64_t i, int64_t B) {
  const double v = double(dist[i * B + i]);
  return v - v == 0.0;
}

// Contrastive, one block per row i: its pairs (i, j > i), as contrastive_stats_kernel.
// Expected on the H200: ~3 us at B = 1024 (4 MiB of distances).
template <typename DT, typename scalar_t>
__global__ void contrastive_fused_kernel(const DT* __restrict__ dist, Labels lab, int64_t B, double pos_margin,
                                         double neg_margin, Denominator den, double* __restrict__ stats,
                                         unsigned* __restrict__ counter, FusedOut<scalar_t> out) {
  const int64_t i = blockIdx.x;
  const bool fi = row_finite(dist, i, B);
  double sum = 0, nonzero = 0;
  for (int64_t j = i + 1 + threadIdx.x; j < B; j += blockDim.x) {
    const DT v = contrastive_term(dist[i * B + j], lab.shares(i, lab, j), fi && row_finite(dist, j, B), pos_margin,
                                  neg_margin).value;
    sum += double(v);
    nonzero += v > DT(0);
  }
  sum = block_sum(sum);
  nonzero = block_sum(nonzero);
  if (threadIdx.x == 0) {
    double* st = stats + i * kStats;
    st[kSum] = sum;
    st[kCount] = double(B - 1 - i);
    st[kNonzero] = nonzero;
    st[kNan] = 0.0;  // a NaN term reaches the sum itself
  }
  finish_in_last_block(counter, stats, B, den, out);
}

// Contrastive with reduction "none": each pair's term (i < j) at its torch.triu_indices
// position, in the embeddings' dtype (as contrastive_pairs_kernel). Block row i, columns
// j > i. Expected on the H200: ~3 us at B = 1024.
template <typename DT, typename scalar_t>
__global__ void contrastive_terms_kernel(const DT* __restrict__ dist, Labels lab, int64_t B, double pos_margin,
                                         double neg_margin, scalar_t* __restrict__ terms) {
  const int64_t i = blockIdx.y, j = i + 1 + int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= B) return;
  const bool finite = row_finite(dist, i, B) && row_finite(dist, j, B);
  terms[pair_index(i, j, B)] =
      scalar_t(contrastive_term(dist[i * B + j], lab.shares(i, lab, j), finite, pos_margin, neg_margin).value);
}

// ---- the gradient to the rows -----------------------------------------------------------

// What the gradient kernel weighs pair (i, j) by: W = d loss / d d(i, j) + d loss / d d(j, i),
// from batch-all / semi-hard's w (times the scale), or contrastive's slope of pair
// (min, max) times the scale, or for reduction "none" times the pair's upstream gradient.
template <typename DT>
struct PairWeights {
  const DT* dist;
  const double* w;  // (B, B), or null for contrastive
  Labels lab;
  double pos_margin, neg_margin;
  const double* pair_grad;  // contrastive "none": the upstream gradient of each pair term, else null
};

// The coefficient of row j in row i's gradient: W / d for euclidean (0 at d = 0, NaN for a
// NaN distance, as pairwise_distance's backward), 2 W for sqeuclidean, -W for cosine
// (times the unit row u_j, then through F.normalize's Jacobian).
template <typename DT>
__device__ __forceinline__ double pair_coefficient(const PairWeights<DT>& pw, int64_t i, int64_t j, int64_t B,
                                                   Metric metric, double s) {
  if (i == j) return 0.0;
  const double d = double(pw.dist[i * B + j]);
  double W;
  if (pw.w) {
    W = s * (pw.w[i * B + j] + pw.w[j * B + i]);
  } else {
    const bool finite = row_finite(pw.dist, i, B) && row_finite(pw.dist, j, B);
    const double g = pw.pair_grad ? pw.pair_grad[pair_index(i < j ? i : j, i < j ? j : i, B)] : s;
    W = double(contrastive_term(pw.dist[i * B + j], pw.lab.shares(i, pw.lab, j), finite, pw.pos_margin,
                                pw.neg_margin).slope) * g;
  }
  if (metric == Metric::SqEuclidean) return 2.0 * W;
  if (metric == Metric::Cosine) return -W;
  return d > 0 ? W / d : d == 0 ? 0.0 : d;
}

// Row i's gradient, one block per row, threads over the columns k:
//   euclidean / sqeuclidean: sum_j c_ij (x_i - x_j), from the rows themselves (no centering
//   needed: the differences are exact in double);
//   cosine: g = sum_j c_ij u_j, then (g - u_i (u_i . g)) / |x_i|, or g / eps for a row of
//   norm <= eps (F.normalize's Jacobian), g held in `scratch` (B, D) between the passes.
// Rows j are read 128 at a time with their coefficients in shared memory. Expected on the
// H200: each block reads all B rows (from L2): B = 512, D = 128 fp32 ~15 us; B = 1024,
// D = 512 ~0.2 ms (2 GiB of L2 reads).
template <typename T, typename S, typename DT>
__global__ void family_embedding_grad_kernel(const S* __restrict__ rows, const double* __restrict__ sq_norm,
                                             PairWeights<DT> pw, int64_t B, int64_t D, Metric metric,
                                             const double* __restrict__ scale, double* __restrict__ scratch,
                                             T* __restrict__ grad) {
  __shared__ double coef[kFamilyThreads];
  const int64_t i = blockIdx.x;
  const double s = scale ? scale[0] : 1.0;
  const bool cosine = metric == Metric::Cosine;
  double dot = 0;  // cosine: u_i . g, this thread's part
  for (int64_t k0 = 0; k0 < D; k0 += kFamilyThreads) {
    const int64_t k = k0 + threadIdx.x;
    const double xi = k < D ? double(rows[i * D + k]) : 0.0;
    double acc = 0;
    for (int64_t j0 = 0; j0 < B; j0 += kFamilyThreads) {
      __syncthreads();  // coef[] may still be read
      if (j0 + threadIdx.x < B) coef[threadIdx.x] = pair_coefficient(pw, i, j0 + threadIdx.x, B, metric, s);
      __syncthreads();
      const int64_t n = B - j0 < kFamilyThreads ? B - j0 : kFamilyThreads;
      if (k < D)
        for (int64_t jj = 0; jj < n; ++jj) {
          const double xj = double(rows[(j0 + jj) * D + k]);
          acc += coef[jj] * (cosine ? xj : xi - xj);
        }
    }
    if (k >= D) continue;
    if (cosine) {
      scratch[i * D + k] = acc;
      dot += xi * acc;
    } else {
      grad[i * D + k] = T(acc);
    }
  }
  if (!cosine) return;
  dot = block_sum(dot);
  const double norm = sqrt(sq_norm[i]);
  for (int64_t k = threadIdx.x; k < D; k += kFamilyThreads) {  // the same k per thread as above
    const double g = scratch[i * D + k];
    grad[i * D + k] = T(norm > kNormEps ? (g - double(rows[i * D + k]) * dot) / norm : g / kNormEps);
  }
}

}  // namespace cuda
}  // namespace tripletops
