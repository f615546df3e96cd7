// Device code of pairwise_distance (launchers: pairwise_distance_cuda.cu).
#pragma once

#include "../common.h"

#include <cstdint>

namespace tripletops {
namespace cuda {

// Below this ratio of d^2 to |x|^2 + |y|^2 the Gram form cancels: recompute from the rows.
constexpr double kCancellationRatio = 0.125;  // as on CPU

// Below this sum of squared norms (min / eps^2: fp32 ~8e-25) the squares of the rows'
// differences lose bits or vanish in T: such pairs are recomputed in double too.
template <typename T>
__device__ __forceinline__ T tiny_square_sum() {
  return sizeof(T) == 4 ? T(0x1p-80) : T(0x1p-916);
}

// Whether a sum of squares in double overflowed or may have underflowed (only double rows
// get there: the squares of floats never leave the double range).
__device__ __forceinline__ bool out_of_double_range(double sum_sq) {
  return !(sum_sq <= 0x1p1000) || sum_sq < 0x1p-900;
}

// |a - b|^2 (or |a - b| when `euclidean`) of two finite rows, on the rows scaled by a
// power of two: for the pairs out_of_double_range flags (double rows of norm ~1e155 or
// ~1e-155). False, with nothing written, when a row is not finite. One thread, fixed order.
template <typename S>
__device__ __forceinline__ bool scaled_distance(const S* a, const S* b, int64_t D, bool euclidean, double* out) {
  double m = 0;
  for (int64_t k = 0; k < D; ++k) {
    const double u = double(a[k]), v = double(b[k]);
    if (!(u - u == 0.0) || !(v - v == 0.0)) return false;
    m = fabs(u) > m ? fabs(u) : m;
    m = fabs(v) > m ? fabs(v) : m;
  }
  if (m == 0) return *out = 0.0, true;
  const int e = ilogb(m);
  double s = 0;
  for (int64_t k = 0; k < D; ++k) {
    const double t = ldexp(double(a[k]), -e) - ldexp(double(b[k]), -e);
    s += t * t;
  }
  *out = euclidean ? ldexp(sqrt(s), e) : ldexp(s, 2 * e);
  return true;
}

// The (N, M) matrix kernels run on a 2-D grid, x over the columns j, y over the rows i
// (each block row steps by gridDim.y): no 64-bit division per entry (matrix_grid).
#define TRIPLETOPS_FOR_EACH_ENTRY(N, M)                              \
  const int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; \
  if (j < (M))                                                       \
    for (int64_t i = blockIdx.y; i < (N); i += gridDim.y)

// Gram entry (i, j) -> its distance, in place. A pair whose Gram form cancels, whose
// squared norms are not finite (an overflow, or a NaN/Inf row) or tiny is recomputed from
// the rows' difference in double (fixed order), then rounded to T: fp32 rows of norm 1e20
// or 1e-30 get their distances, where the Gram form gave inf or 0. Expected on the H200 at
// 4096 x 4096 fp32: ~35 us (64 MiB read and written; the diagonal's recomputes, D each).
template <typename T>
__device__ __forceinline__ void gram_to_distance(T* g, const T* __restrict__ x, const T* __restrict__ y,
                                                 const T* __restrict__ sx, const T* __restrict__ sy, int64_t i,
                                                 int64_t j, int64_t M, int64_t D, Metric metric) {
  const int64_t idx = i * M + j;
  if (metric == Metric::Cosine) {
    g[idx] = T(1) - g[idx];
    return;
  }
  const T norms = sx[i] + sy[j];
  T d2 = norms - T(2) * g[idx];
  if (!(d2 >= T(kCancellationRatio) * norms) || !(norms >= tiny_square_sum<T>()) || !(norms - norms == T(0))) {
    double e2 = 0;
    const T *xr = x + i * D, *yr = y + j * D;
    for (int64_t k = 0; k < D; ++k) {
      const double d = double(xr[k]) - double(yr[k]);
      e2 += d * d;
    }
    const bool euclidean = metric == Metric::Euclidean;
    double scaled;
    if (sizeof(T) == 8 && out_of_double_range(e2) && scaled_distance(xr, yr, D, euclidean, &scaled)) {
      g[idx] = T(scaled);  // double rows of norm ~1e155 or ~1e-155
      return;
    }
    g[idx] = T(euclidean ? sqrt(e2) : e2);
    return;
  }
  g[idx] = metric == Metric::Euclidean ? sqrt(d2) : d2;
}
template <typename T>
__global__ void gram_to_distance_kernel(T* g, const T* __restrict__ x, const T* __restrict__ y,
                                        const T* __restrict__ sx, const T* __restrict__ sy, int64_t N, int64_t M,
                                        int64_t D, Metric metric) {
  TRIPLETOPS_FOR_EACH_ENTRY(N, M) gram_to_distance(g, x, y, sx, sy, i, j, M, D, metric);
}

// Identical rows, without a host sync and without a sort, in two kernels: a hash of each
// row's bits (row_hash_kernel), then for each row the smallest index of a row with the
// same bits (identical_rows_kernel: the hashes filter, the bits decide). Bits, so -0.0 and
// 0.0 differ, as in csrc/cpu's comparison.

// The raw bits of one element, widened.
template <typename T>
__device__ __forceinline__ uint64_t element_bits(const T* p) {
  if constexpr (sizeof(T) == 8) {
    return *reinterpret_cast<const uint64_t*>(p);
  } else if constexpr (sizeof(T) == 4) {
    return *reinterpret_cast<const uint32_t*>(p);
  } else {
    return *reinterpret_cast<const uint16_t*>(p);
  }
}

// A 64-bit mix of an element's bits and position (splitmix64's finalizer).
__device__ __forceinline__ uint64_t mix_element(uint64_t bits, int64_t k) {
  uint64_t z = bits + 0x9e3779b97f4a7c15ull * uint64_t(k + 1);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// Row r of the rows of x (r < N) then y: its hash (the sum of its elements' mixes, so the
// lanes' order does not matter), and for an x row, zero_ok: every element finite and,
// with `sq_norm` (cosine), a squared norm above eps^2 (a unit row: F.normalize leaves a
// smaller one at distance 1 from everything). One warp per row, lanes over D: coalesced.
template <typename T>
__global__ void row_hash_kernel(const T* __restrict__ x, int64_t N, const T* __restrict__ y, int64_t M, int64_t D,
                                const T* __restrict__ sq_norm, uint64_t* __restrict__ hash,
                                bool* __restrict__ zero_ok) {
  constexpr int kRows = 8;  // warps per block
  const int64_t r = int64_t(blockIdx.x) * kRows + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (r >= N + M) return;
  const T* row = r < N ? x + r * D : y + (r - N) * D;
  uint64_t h = 0;
  bool finite = true;
  for (int64_t k = lane; k < D; k += 32) {
    h += mix_element(element_bits(row + k), k);
    const double v = double(row[k]);
    finite = finite && v - v == 0.0;
  }
  for (int offset = 16; offset > 0; offset /= 2) {
    h += __shfl_xor_sync(0xffffffffu, h, offset);
    finite = __shfl_xor_sync(0xffffffffu, int(finite), offset) && finite;
  }
  if (lane != 0) return;
  hash[r] = h;
  if (r < N) zero_ok[r] = finite && (sq_norm == nullptr || double(sq_norm[r]) > kNormEps * kNormEps);
}

// The smallest index s in [0, n) of `rows` (hashes `hashes`) with the bits of `mine` (hash
// h), or -1; whole warp, ascending chunks of 32, a bitwise comparison per hash match.
template <typename T>
__device__ __forceinline__ int64_t first_identical(const T* rows, const uint64_t* hashes, int64_t n, const T* mine,
                                                   uint64_t h, int64_t D, int lane) {
  for (int64_t s0 = 0; s0 < n; s0 += 32) {
    const int64_t s = s0 + lane;
    for (unsigned m = __ballot_sync(0xffffffffu, s < n && hashes[s] == h); m != 0; m &= m - 1) {
      const int64_t c = s0 + (__ffs(int(m)) - 1);
      const T* other = rows + c * D;
      bool same = true;
      for (int64_t k = lane; k < D; k += 32) same = same && element_bits(other + k) == element_bits(mine + k);
      if (__all_sync(0xffffffffu, same)) return c;
    }
  }
  return -1;
}

// For each x row i: fx[i], the smallest x index with its bits (i itself when none is
// smaller). For each y row j (not when y is x): fy[j], the same among y's rows, and cx[j],
// the smallest x index with its bits, or -1. One warp per row; O((N + M)^2) hash compares
// (cheap beside the N x M distances), a bitwise comparison only where hashes match.
template <typename T>
__global__ void identical_rows_kernel(const T* __restrict__ x, int64_t N, const T* __restrict__ y, int64_t M,
                                      int64_t D, const uint64_t* __restrict__ hash, int64_t* __restrict__ fx,
                                      int64_t* __restrict__ fy, int64_t* __restrict__ cx) {
  constexpr int kRows = 8;
  const int64_t r = int64_t(blockIdx.x) * kRows + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (r >= N + M) return;
  if (r < N) {
    const int64_t f = first_identical(x, hash, r + 1, x + r * D, hash[r], D, lane);
    if (lane == 0) fx[r] = f;
    return;
  }
  const int64_t j = r - N;
  const T* mine = y + j * D;
  const int64_t f = first_identical(y, hash + N, j + 1, mine, hash[r], D, lane);
  const int64_t c = first_identical(x, hash, N, mine, hash[r], D, lane);
  if (lane == 0) fy[j] = f, cx[j] = c;
}

// Identical inputs, identical distances (as csrc/cpu's settle_identical_rows): a row of x
// (column of y) takes the row (column) of the first x row (y row) with its bits, bitwise,
// and an x row and a y row with the same bits meet at exactly 0 where `zero_ok` (a finite
// row; for cosine, a unit row). In place without a race: an entry is only read as the
// source of others when its row and column are both the first of their bits and the two
// rows differ, and such an entry is never written. When y is x, fy = cx = fx.
template <typename T>
__global__ void settle_identical_kernel(T* d, const int64_t* __restrict__ fx, const int64_t* __restrict__ fy,
                                        const int64_t* __restrict__ cx, const bool* __restrict__ zero_ok,
                                        int64_t N, int64_t M) {
  TRIPLETOPS_FOR_EACH_ENTRY(N, M) {
    const int64_t r = fx[i], c = fy[j];
    if (cx[j] == r) {  // x row i and y row j have the same bits
      if (zero_ok[i]) d[i * M + j] = T(0);
    } else if (r != i || c != j) {
      d[i * M + j] = d[r * M + c];
    }
  }
}

// ---- backward -------------------------------------------------------------------------

constexpr int kWeightTile = 32;  // pair_weights_kernel: (32 x 32) tiles, blocks of 32 x 8 threads

// Entry (i, j)'s weight in the GEMM form of the gradient (pair_weight), and whether the
// pair is close: so much closer than its rows' norms after the shift (nx, ny; null for
// cosine) that its term w (x_i - y_j) would cancel in the GEMM (d^2 < ratio max(nx_i, ny_j),
// as csrc/cpu's gemm_backward). A close pair leaves the GEMM and is added in difference
// form (close_pairs_kernel).
template <typename T>
struct EntryWeight {
  T w;
  bool close;
};
// d loss / d dist as autograd hands it, with its strides: an expanded gradient (that of
// dist.sum(), stride 0) is read in place, not copied into an (N, M) buffer first.
template <typename G>
struct GradView {
  const G* data;
  int64_t s0, s1;
  __device__ __forceinline__ G operator()(int64_t i, int64_t j) const { return data[i * s0 + j * s1]; }
};
template <typename G, typename T>
__device__ __forceinline__ EntryWeight<T> entry_weight(GradView<G> grad, const G* dist, const T* nx, const T* ny,
                                                          int64_t i, int64_t j, int64_t M, Metric metric) {
  const T d = T(dist[i * M + j]);
  const T w = pair_weight(T(grad(i, j)), d, metric);
  const T d2 = metric == Metric::Euclidean ? d * d : d;
  return {w, nx != nullptr && w != T(0) && d2 < T(kCancellationRatio) * (nx[i] > ny[j] ? nx[i] : ny[j])};
}

// d loss / d dist -> W, each entry's weight in the GEMM form of the gradient, in the
// compute dtype T, 0 for a close pair. With `symmetric` (y is x) the entry (i, j) gets the
// weights of (i, j) and (j, i) summed, so that one GEMM takes both sides of every pair; the
// transposed tile goes through shared memory, so both reads are coalesced. With row_part /
// col_part (nullable), each tile's sums of W along its rows / columns, in a fixed order:
// row_part[i * gridDim.x + blockIdx.x], col_part[j * gridDim.y + blockIdx.y], a 32nd of W
// that the launcher sums, where W.sum(1) and W.sum(0) read all of W twice more. Expected on
// the H200 at 4096 x 4096 fp32: ~25 us (64 MiB read twice when symmetric, 64 MiB written).
template <typename G, typename T>
__global__ void pair_weights_kernel(GradView<G> grad, const G* __restrict__ dist, const T* __restrict__ nx,
                                    const T* __restrict__ ny, int64_t N, int64_t M, Metric metric, bool symmetric,
                                    T* __restrict__ w, T* __restrict__ row_part, T* __restrict__ col_part) {
  __shared__ T mirrored[kWeightTile][kWeightTile + 1];
  __shared__ T tile[kWeightTile][kWeightTile + 1];
  const int64_t i0 = int64_t(blockIdx.y) * kWeightTile, j0 = int64_t(blockIdx.x) * kWeightTile;
  const int tx = threadIdx.x, ty = threadIdx.y;
  auto far_weight = [&](int64_t i, int64_t j) {
    const EntryWeight<T> e = entry_weight(grad, dist, nx, ny, i, j, M, metric);
    return e.close ? T(0) : e.w;
  };
  if (symmetric) {  // mirrored[r][c]: the weight of (j0 + r, i0 + c)
    for (int r = ty; r < kWeightTile; r += blockDim.y) {
      const int64_t i = j0 + r, j = i0 + tx;
      mirrored[r][tx] = i < N && j < M ? far_weight(i, j) : T(0);
    }
    __syncthreads();
  }
  for (int r = ty; r < kWeightTile; r += blockDim.y) {
    const int64_t i = i0 + r, j = j0 + tx;
    T v = T(0);
    if (i < N && j < M) {
      v = far_weight(i, j);
      if (symmetric) v += mirrored[tx][r];
      w[i * M + j] = v;
    }
    tile[r][tx] = v;
  }
  if (row_part == nullptr && col_part == nullptr) return;  // (uniform over the grid)
  __syncthreads();
  T sum = T(0);
  if (ty == 0 && row_part != nullptr && i0 + tx < N) {
    for (int c = 0; c < kWeightTile; ++c) sum += tile[tx][c];
    row_part[(i0 + tx) * gridDim.x + blockIdx.x] = sum;
  } else if (ty == 1 && col_part != nullptr && j0 + tx < M) {
    for (int r = 0; r < kWeightTile; ++r) sum += tile[r][tx];
    col_part[(j0 + tx) * gridDim.y + blockIdx.y] = sum;
  }
}

// The close pairs' terms, added in difference form to the GEMM's gradient, in a fixed
// order: one warp per row i of x (columns: false) adds sum_j w_ij (x_i - y_j) to g[i]
// (with `symmetric`, also w_ji's terms, entry (j, i)'s share of row i), or per row j of y
// (columns: true) subtracts sum_i w_ij (x_i - y_j) from g[j]. The warp tests 32 entries
// at a time and walks the close ones (a ballot), lanes over D. Expected on the H200 at
// 4096 x 4096: ~40 us (the weights read again; a close pair costs D more).
template <typename G, typename T>
__global__ void close_pairs_kernel(GradView<G> grad, const G* __restrict__ dist, const T* __restrict__ nx,
                                   const T* __restrict__ ny, const T* __restrict__ x, const T* __restrict__ y,
                                   int64_t N, int64_t M, int64_t D, Metric metric, bool symmetric, bool columns,
                                   T* __restrict__ g) {
  constexpr int kRows = 8;  // warps per block
  const int64_t r = int64_t(blockIdx.x) * kRows + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t rows = columns ? M : N, others = columns ? N : M;
  if (r >= rows) return;  // (warp-uniform)
  const T* mine = (columns ? y : x) + r * D;
  for (int64_t o0 = 0; o0 < others; o0 += 32) {
    const int64_t o = o0 + lane;
    T c = T(0);
    if (o < others) {
      const int64_t i = columns ? o : r, j = columns ? r : o;
      const EntryWeight<T> e = entry_weight(grad, dist, nx, ny, i, j, M, metric);
      if (e.close) c = columns ? -e.w : e.w;  // d/d y_j of w (x_i - y_j): -w
      if (symmetric) {
        const EntryWeight<T> t = entry_weight(grad, dist, nx, ny, j, i, M, metric);
        if (t.close) c += t.w;
      }
    }
    for (unsigned m = __ballot_sync(0xffffffffu, c != T(0)); m != 0; m &= m - 1) {
      const int src = __ffs(int(m)) - 1;
      const T cs = __shfl_sync(0xffffffffu, c, src);
      const T* other = (columns ? x : y) + (o0 + src) * D;
      for (int64_t k = lane; k < D; k += 32) g[r * D + k] += cs * (columns ? other[k] - mine[k] : mine[k] - other[k]);
    }
  }
}

// F.normalize's Jacobian, row by row, applied to -g (g = W u: d loss / d unit row, negated
// because the cosine distance is 1 - u.v): (h - u (u.h)) / |x| for a row of norm > eps,
// h / eps otherwise, with h = -g; written in the input's dtype. One warp per row, u.h in
// double (butterfly: a fixed order). Expected on the H200 at 4096 x 512: ~10 us.
template <typename T, typename OutT>
__global__ void normalize_backward_kernel(const T* __restrict__ g, const T* __restrict__ unit,
                                          const T* __restrict__ norms, int64_t N, int64_t D, OutT* __restrict__ out) {
  constexpr int kRows = 8;  // warps per block
  const int64_t r = int64_t(blockIdx.x) * kRows + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (r >= N) return;  // (warp-uniform)
  double dot = 0;
  for (int64_t k = lane; k < D; k += 32) dot += double(unit[r * D + k]) * -double(g[r * D + k]);
  for (int offset = 16; offset > 0; offset /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, offset);
  const T norm = norms[r];  // |x|, formed without squaring x (Rows::norm)
  const T c = T(dot);
  for (int64_t k = lane; k < D; k += 32) {
    const T h = -g[r * D + k];
    out[r * D + k] = OutT(norm > T(kNormEps) ? (h - unit[r * D + k] * c) / norm : h / T(kNormEps));
  }
}

}  // namespace cuda
}  // namespace tripletops
