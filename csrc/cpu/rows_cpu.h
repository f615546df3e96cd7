// Helpers shared by the CPU kernels: rows in the accumulation dtype, exact
// row-to-row distances, and the loss reductions (forward and backward).
#pragma once

#include "../common.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace tripletops {
namespace cpu {

// Hot loops are compiled for AVX-512, AVX2 and the baseline, picked at load time
// (GCC function multi-versioning); TRIPLETOPS_INLINE pulls helpers into each clone.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define TRIPLETOPS_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#define TRIPLETOPS_INLINE inline __attribute__((always_inline))
#else
#define TRIPLETOPS_SIMD_CLONES
#define TRIPLETOPS_INLINE inline
#endif

// fp16/bf16 accumulate in fp32; fp32 and fp64 compute in their own precision.
inline at::ScalarType compute_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}
template <typename scalar_t>
using compute_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

struct PreparedRows {
  at::Tensor rows;     // (N, D) contiguous, compute dtype; unit rows x / max(|x|, eps) for cosine
  at::Tensor sq_norm;  // (N,) squared norm of the input row (before any normalization)
  at::Tensor finite;   // (N,) uint8, 1 when the input row holds no NaN/Inf
};

// 64 bytes of T (16 floats, 8 doubles) as two 32-byte GCC vectors: one zmm's worth, held
// in two ymm registers on every clone. A single 64-byte GCC vector has no machine mode
// without AVX-512, so GCC kept it in memory in the AVX2 clone, and each step went through
// the stack (perf on an AVX2 machine: preparing 256 x 128 rows took ~24 us, the B = 256
// exact distances as long); two halves stay in registers there and cost AVX-512 nothing
// that matters. Row reductions keep one partial sum per lane and add the lanes in lane
// order at the end: a fixed order (the same result on every run and every clone), and no
// shuffles in the loop (plain `acc[8]` arrays were compiled to per-chunk horizontal adds,
// which made preparing a 256 x 128 batch cost 27 us).
template <typename T>
struct Vec64 {
  static constexpr int N = 64 / sizeof(T);
  static constexpr int H = N / 2;  // lanes per half
  typedef T Half __attribute__((vector_size(32)));
  typedef typename std::conditional<sizeof(T) == 4, int32_t, int64_t>::type Int;
  typedef Int IntHalf __attribute__((vector_size(32)));
  // A lane mask (all ones or zero per lane), as comparisons of GCC vectors give.
  struct M {
    IntHalf lo, hi;
    TRIPLETOPS_INLINE friend M operator|(const M& a, const M& b) { return {a.lo | b.lo, a.hi | b.hi}; }
    TRIPLETOPS_INLINE friend M operator&(const M& a, const M& b) { return {a.lo & b.lo, a.hi & b.hi}; }
    TRIPLETOPS_INLINE Int get(int l) const { return l < H ? lo[l] : hi[l - H]; }
    TRIPLETOPS_INLINE void set(int l, Int v) {
      if (l < H) lo[l] = v;
      else hi[l - H] = v;
    }
  };
  struct V {
    Half lo, hi;
    TRIPLETOPS_INLINE friend V operator+(const V& a, const V& b) { return {a.lo + b.lo, a.hi + b.hi}; }
    TRIPLETOPS_INLINE friend V operator-(const V& a, const V& b) { return {a.lo - b.lo, a.hi - b.hi}; }
    TRIPLETOPS_INLINE friend V operator*(const V& a, const V& b) { return {a.lo * b.lo, a.hi * b.hi}; }
    TRIPLETOPS_INLINE friend V operator*(const V& a, T s) { return {a.lo * s, a.hi * s}; }
    TRIPLETOPS_INLINE friend V operator*(T s, const V& a) { return {s * a.lo, s * a.hi}; }
    TRIPLETOPS_INLINE friend V operator-(T s, const V& a) { return {s - a.lo, s - a.hi}; }
    TRIPLETOPS_INLINE friend V operator-(const V& a) { return {-a.lo, -a.hi}; }
    TRIPLETOPS_INLINE friend M operator<=(const V& a, const V& b) { return {a.lo <= b.lo, a.hi <= b.hi}; }
    TRIPLETOPS_INLINE friend M operator<=(const V& a, T s) { return {a.lo <= s, a.hi <= s}; }
    TRIPLETOPS_INLINE V& operator+=(const V& b) { return *this = *this + b; }
    TRIPLETOPS_INLINE T get(int l) const { return l < H ? lo[l] : hi[l - H]; }
    TRIPLETOPS_INLINE void add(int l, T x) {  // lane l += x (the loops' tails)
      if (l < H) lo[l] += x;
      else hi[l - H] += x;
    }
  };
  static TRIPLETOPS_INLINE V load(const T* p) {
    V v;
    std::memcpy(&v.lo, p, sizeof(v.lo));
    std::memcpy(&v.hi, p + H, sizeof(v.hi));
    return v;
  }
  // N entries of another type S, converted lane by lane (fp32 rows into double lanes).
  template <typename S>
  static TRIPLETOPS_INLINE V load_as(const S* p) {
    typedef S SHalf __attribute__((vector_size(H * sizeof(S))));
    SHalf a, b;
    std::memcpy(&a, p, sizeof(a));
    std::memcpy(&b, p + H, sizeof(b));
    return {__builtin_convertvector(a, Half), __builtin_convertvector(b, Half)};
  }
  static TRIPLETOPS_INLINE T sum(const V& v) {
    T total = 0;
    for (int l = 0; l < N; ++l) total += v.get(l);
    return total;
  }
};

// Sum of squares of a row, and whether every entry is finite (x * 0 is 0 for a finite x
// and NaN otherwise).
template <typename T>
TRIPLETOPS_INLINE T row_sumsq(const T* r, int64_t D, bool& finite) {
  using W = Vec64<T>;
  typename W::V ss = {}, zero = {};
  int64_t k = 0;
  for (; k + W::N <= D; k += W::N) {
    const typename W::V v = W::load(r + k);
    ss += v * v;
    zero += v * T(0);
  }
  for (int l = 0; k < D; ++k, ++l) {
    ss.add(l, r[k] * r[k]);
    zero.add(l, r[k] * T(0));
  }
  finite = W::sum(zero) == T(0);
  return W::sum(ss);
}

// Cosine's unit row of a finite row r of norm > eps, the same bits for every row of one
// direction: p = r / max|r_k| first (a correctly rounded quotient of the exact value
// r_k / max|r_k|, which is the same for r and c·r, c > 0), then p / |p|. Rows of one
// direction therefore meet at exactly 0 (settle_identical_rows compares unit rows), and
// no square overflows or underflows on the way (|p| is in [1, sqrt(D)]). Returns false
// (nothing written) for a zero row or a norm <= eps, which F.normalize leaves as r / eps.
template <typename T>
TRIPLETOPS_INLINE bool canonical_unit_row(const T* r, int64_t D, T* o) {
  T m = 0;
  for (int64_t k = 0; k < D; ++k) m = std::max(m, std::abs(r[k]));
  if (!(m > T(0))) return false;
  for (int64_t k = 0; k < D; ++k) o[k] = r[k] / m;  // a division, not a multiply by 1/m: see above
  bool ok = true;
  const T sp = row_sumsq(o, D, ok);
  if (!(double(m) * std::sqrt(double(sp)) > kNormEps)) return false;
  const T inv = T(1) / std::sqrt(sp);
  for (int64_t k = 0; k < D; ++k) o[k] *= inv;
  return true;
}

// Rows [begin, end) of an (N, D) block: squared norms, finiteness, and for cosine the
// unit rows x / max(|x|, eps) written to `unit` (canonical_unit_row for finite rows).
template <typename T>
TRIPLETOPS_INLINE void prepare_block(const T* in, int64_t D, int64_t begin, int64_t end, bool cosine, T* unit, T* sq,
                                     uint8_t* finite) {
  for (int64_t i = begin; i < end; ++i) {
    const T* r = in + i * D;
    bool ok = true;
    const T ss = row_sumsq(r, D, ok);
    finite[i] = ok;
    sq[i] = ss;
    if (cosine) {
      T* o = unit + i * D;
      if (ok && canonical_unit_row(r, D, o)) continue;
      const T inv = T(1) / std::max(std::sqrt(ss), T(kNormEps));
      for (int64_t k = 0; k < D; ++k) o[k] = r[k] * inv;
    }
  }
}
TRIPLETOPS_SIMD_CLONES inline void prepare_block_f(const float* in, int64_t D, int64_t b, int64_t e, bool cosine,
                                                   float* unit, float* sq, uint8_t* finite) {
  prepare_block(in, D, b, e, cosine, unit, sq, finite);
}
TRIPLETOPS_SIMD_CLONES inline void prepare_block_d(const double* in, int64_t D, int64_t b, int64_t e, bool cosine,
                                                   double* unit, double* sq, uint8_t* finite) {
  prepare_block(in, D, b, e, cosine, unit, sq, finite);
}
inline void prepare_block_any(const float* in, int64_t D, int64_t b, int64_t e, bool c, float* u, float* s, uint8_t* f) {
  prepare_block_f(in, D, b, e, c, u, s, f);
}
inline void prepare_block_any(const double* in, int64_t D, int64_t b, int64_t e, bool c, double* u, double* s,
                              uint8_t* f) {
  prepare_block_d(in, D, b, e, c, u, s, f);
}

// One O(N*D) pass: converts, normalizes (cosine), and records norms and finiteness.
inline PreparedRows prepare_rows(const at::Tensor& x, Metric metric) {
  const at::Tensor src = x.to(compute_dtype(x.scalar_type())).contiguous();
  const int64_t N = src.size(0), D = src.size(1);
  PreparedRows out;
  out.rows = metric == Metric::Cosine ? at::empty_like(src) : src;
  out.sq_norm = at::empty({N}, src.options());
  out.finite = at::empty({N}, src.options().dtype(at::kByte));
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "tripletops_prepare_rows", [&] {
    const scalar_t* in = src.data_ptr<scalar_t>();
    scalar_t* unit = out.rows.data_ptr<scalar_t>();
    scalar_t* sq = out.sq_norm.data_ptr<scalar_t>();
    uint8_t* finite = out.finite.data_ptr<uint8_t>();
    // Grain 2^16 elements: a batch-sized block stays on this thread (a fork costs more).
    at::parallel_for(0, N, (int64_t(1) << 16) / D + 1, [&](int64_t begin, int64_t end) {
      prepare_block_any(in, D, begin, end, metric == Metric::Cosine, unit, sq, finite);
    });
  });
  return out;
}

// Rows whose squares leave the compute dtype's range are measured on the rows times 2^-e
// (an exact scaling of normal numbers), with 2^e just above their largest finite entry:
// every (sq)euclidean distance scales by 2^e (2^2e), the order of the distances is kept,
// and the result times 2^e is exact unless it over- or underflows itself (then inf / 0,
// the honest values). Needed when a finite row's squared norm overflows (fp32 norms above
// ~1.8e19) or when every squared norm is below min / eps^2, where squares of differences
// lose bits or vanish (fp32 entries below ~1e-12, e.g. rows of norm 1e-30).
// Returns e, or 0 when the rows are safe as they are. X, Y: the rows as prepared.
// `underflow`: false for cosine, where a row of norm <= eps keeps F.normalize's x / eps
// (scaling it up would make it a unit row).
inline int safe_scale_exponent(const at::Tensor& x, const c10::optional<at::Tensor>& y, const PreparedRows& X,
                               const PreparedRows* Y, bool underflow_too = true) {
  bool overflow = false;
  double max_sq = 0;
  int e = 0;
  AT_DISPATCH_FLOATING_TYPES(X.sq_norm.scalar_type(), "tripletops_safe_scale", [&] {
    using T = scalar_t;
    const T limit = std::numeric_limits<T>::max() / T(8);
    for (const PreparedRows* P : {&X, Y}) {
      if (P == nullptr) continue;
      const T* sq = P->sq_norm.data_ptr<T>();
      const uint8_t* f = P->finite.data_ptr<uint8_t>();
      for (int64_t i = 0; i < P->sq_norm.numel(); ++i) {
        if (!f[i]) continue;
        if (!(sq[i] < limit)) overflow = true;
        else max_sq = std::max(max_sq, double(sq[i]));
      }
    }
    const double eps = std::numeric_limits<T>::epsilon();
    const bool underflow =
        underflow_too && max_sq < double(std::numeric_limits<T>::min()) / (eps * eps);  // 0 included
    if (!(overflow || underflow)) return;
    double amax = 0;  // the largest finite entry of both sets
    for (const at::Tensor* t : {&x, y.has_value() ? &*y : nullptr}) {
      if (t == nullptr) continue;
      const at::Tensor a = t->to(compute_dtype(t->scalar_type())).abs().contiguous();
      const T* v = a.data_ptr<T>();
      for (int64_t k = 0; k < a.numel(); ++k)
        if (v[k] - v[k] == T(0)) amax = std::max(amax, double(v[k]));
    }
    if (amax > 0) std::frexp(amax, &e);  // all-zero rows (amax 0) need no scaling: e stays 0
  });
  return e;
}

// t times 2^k in place, element by element (std::ldexp in double, then rounded to t's
// dtype): exact where the result is representable, inf or 0 where it over- or
// underflows, and 0 stays 0 (a tensor-times-scalar would round 2^k itself to inf first).
inline void scale_by_power_of_two(at::Tensor& t, int k) {
  AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "tripletops_scale_by_power_of_two", [&] {
    scalar_t* v = t.data_ptr<scalar_t>();
    for (int64_t i = 0; i < t.numel(); ++i) v[i] = scalar_t(std::ldexp(double(v[i]), k));
  });
}

// A new contiguous copy of x in the compute dtype, times 2^k entry by entry
// (scale_by_power_of_two). Never `x * 2^k` as a tensor times a scalar: for all-subnormal
// rows 2^k itself is beyond the dtype's range (fp32: 2^130 rounds to inf, and 0 * inf is NaN).
inline at::Tensor times_power_of_two(const at::Tensor& x, int k) {
  at::Tensor t = at::empty(x.sizes(), x.options().dtype(compute_dtype(x.scalar_type())));
  t.copy_(x);
  scale_by_power_of_two(t, k);
  return t;
}

// |a - b|^2 of two finite rows as sum * 2^(2e), in double, on the rows divided by 2^e (e
// from their largest |entry|): no square over- or underflows, for fp64 rows too. For the
// pairs whose plain sum of squares left T's range (fp32 rows of norm ~1e-30 or ~1e20).
template <typename T>
inline double scaled_sq_distance(const T* a, const T* b, int64_t D, int& e) {
  double m = 0;
  for (int64_t k = 0; k < D; ++k) m = std::max(m, std::max(std::fabs(double(a[k])), std::fabs(double(b[k]))));
  e = 0;
  if (!(m > 0)) return 0.0;
  std::frexp(m, &e);
  double s = 0;
  for (int64_t k = 0; k < D; ++k) {
    const double d = std::ldexp(double(a[k]), -e) - std::ldexp(double(b[k]), -e);
    s += d * d;
  }
  return s;
}
// Whether a sum of squares in T may have lost its value: below min / eps^2 (the squares
// lose bits or vanish; 0 included) or above max / 8 (overflow, or close to it).
template <typename T>
inline bool sum_sq_out_of_range(T s) {
  const T eps = std::numeric_limits<T>::epsilon();
  return !(s >= std::numeric_limits<T>::min() / (eps * eps) && s <= std::numeric_limits<T>::max() / T(8));
}

// The exact distance between two prepared rows, from their difference (no
// cancellation from |a|^2 + |b|^2 - 2ab). Cosine rows are already unit rows.
// Per-lane partial sums as in row_sumsq; the metric is a template argument so that the
// loop has no select in it.
template <bool Cosine, typename T>
TRIPLETOPS_INLINE T row_lanes(const T* a, const T* b, int64_t D) {
  using W = Vec64<T>;
  typename W::V acc = {};
  int64_t k = 0;
  for (; k + W::N <= D; k += W::N) {
    const typename W::V va = W::load(a + k), vb = W::load(b + k), d = va - vb;
    acc += Cosine ? va * vb : d * d;
  }
  for (int l = 0; k < D; ++k, ++l) {
    const T d = a[k] - b[k];
    acc.add(l, Cosine ? a[k] * b[k] : d * d);
  }
  return W::sum(acc);
}

// row_lanes compiled per SIMD clone (Vec64's halves are 32-byte vectors, which only the
// AVX clones hold in registers): the sum of a * b (cosine) or of (a - b)^2.
TRIPLETOPS_SIMD_CLONES inline float row_lanes_f(const float* a, const float* b, int64_t D, bool cosine) {
  return cosine ? row_lanes<true>(a, b, D) : row_lanes<false>(a, b, D);
}
TRIPLETOPS_SIMD_CLONES inline double row_lanes_d(const double* a, const double* b, int64_t D, bool cosine) {
  return cosine ? row_lanes<true>(a, b, D) : row_lanes<false>(a, b, D);
}
inline float row_lanes_any(const float* a, const float* b, int64_t D, bool c) { return row_lanes_f(a, b, D, c); }
inline double row_lanes_any(const double* a, const double* b, int64_t D, bool c) { return row_lanes_d(a, b, D, c); }

template <typename T>
inline T row_distance(const T* a, const T* b, int64_t D, Metric metric) {
  if (metric == Metric::Cosine) return T(1) - row_lanes_any(a, b, D, true);
  const T total = row_lanes_any(a, b, D, false);
  return metric == Metric::Euclidean ? std::sqrt(total) : total;
}

// Reduces per-item losses (compute dtype) into the op's loss. `valid` (uint8,
// may be undefined = all valid) marks the items that count for "mean". Sums run
// serially in double: deterministic and free of fp32 drift at large N.
inline at::Tensor reduce_loss(const at::Tensor& per_item, const at::Tensor& valid, Reduction reduction,
                              at::ScalarType out_dtype) {
  if (reduction == Reduction::None) return per_item.to(out_dtype);
  const int64_t N = per_item.numel();
  double total = 0;
  int64_t count = 0;
  AT_DISPATCH_FLOATING_TYPES(per_item.scalar_type(), "tripletops_reduce_loss", [&] {
    const scalar_t* l = per_item.data_ptr<scalar_t>();
    const uint8_t* v = valid.defined() ? valid.data_ptr<uint8_t>() : nullptr;
    for (int64_t i = 0; i < N; ++i) {
      total += static_cast<double>(l[i]);
      if (reduction == Reduction::Mean) count += v ? v[i] : 1;
      if (reduction == Reduction::MeanNonzero) count += l[i] > scalar_t(0);
    }
  });
  double value = total;
  if (reduction != Reduction::Sum) value = count > 0 ? total / static_cast<double>(count) : 0.0;
  // An empty denominator gives exactly 0, but a NaN among the items still shows.
  if (reduction != Reduction::Sum && count == 0 && total != total) value = total;
  return at::empty({}, per_item.options().dtype(out_dtype)).fill_(value);
}

// d(reduced loss)/d(item i), times the upstream gradient: the backward of reduce_loss.
inline std::vector<double> reduction_scale(const at::Tensor& grad, const at::Tensor& per_item,
                                           const at::Tensor& valid, Reduction reduction) {
  const int64_t N = per_item.numel();
  std::vector<double> scale(N, 0.0);
  AT_DISPATCH_FLOATING_TYPES(per_item.scalar_type(), "tripletops_reduction_scale", [&] {
    const scalar_t* l = per_item.data_ptr<scalar_t>();
    const uint8_t* v = valid.defined() ? valid.data_ptr<uint8_t>() : nullptr;
    if (reduction == Reduction::None) {
      const at::Tensor g = grad.to(at::kDouble).contiguous();
      const double* gp = g.data_ptr<double>();
      for (int64_t i = 0; i < N; ++i) scale[i] = gp[i];
      return;
    }
    const double g = grad.item<double>();
    int64_t count = 0;
    for (int64_t i = 0; i < N; ++i) {
      if (reduction == Reduction::Mean) count += v ? v[i] : 1;
      if (reduction == Reduction::MeanNonzero) count += l[i] > scalar_t(0);
    }
    for (int64_t i = 0; i < N; ++i) {
      // mean_nonzero counts the losses > 0, but every item gets g / count and its own
      // hinge gradient decides (1 at the kink, where the loss is 0: clamp's convention).
      const bool in_denominator = reduction == Reduction::MeanNonzero ? true : (v ? v[i] != 0 : true);
      if (reduction == Reduction::Sum) scale[i] = g;
      else if (count > 0 && in_denominator) scale[i] = g / static_cast<double>(count);
    }
  });
  return scale;
}

}  // namespace cpu
}  // namespace tripletops
