// What certified mining (batch_hard_cpu.cpp) and the exact k-nearest search (knn_cpu.cpp)
// share: exact pair keys in double, and the centering of rows before Gram-form keys.
#pragma once

#include "rows_cpu.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace tripletops {
namespace cpu {

// True when no mining key can be NaN or inf: all rows finite, norms far from overflow.
template <typename T>
bool keys_all_finite(const PreparedRows& R) {
  const int64_t n = R.rows.size(0);
  const uint8_t* f = R.finite.data_ptr<uint8_t>();
  const T* sq = R.sq_norm.data_ptr<T>();
  const T limit = std::numeric_limits<T>::max() / T(8);
  for (int64_t i = 0; i < n; ++i)
    if (!f[i] || !(sq[i] < limit)) return false;
  return true;
}

// The exact mining key of two input rows, accumulated in double from their difference
// (no cancellation): |a - b|^2 for (sq)euclidean; for cosine |a/|a| - b/|b||^2, which is
// 2 (1 - cos) (inverse norms ia, ib in double, F.normalize's eps) and keeps its relative
// accuracy for nearly parallel rows where 1 - a.b of rounded unit rows cannot. fp32 rows'
// differences and products are exact in double, so only the D additions round.
template <typename T>
TRIPLETOPS_INLINE double exact_key(const T* a, const T* b, int64_t D, double ia, double ib) {
  using W = Vec64<double>;
  typename W::V acc = {};
  int64_t k = 0;
  for (; k + W::N <= D; k += W::N) {
    const typename W::V d = W::load_as(a + k) * ia - W::load_as(b + k) * ib;
    acc += d * d;
  }
  for (int l = 0; k < D; ++k, ++l) {
    const double d = a[k] * ia - b[k] * ib;
    acc.add(l, d * d);
  }
  return W::sum(acc);
}
// exact_key compiled per SIMD clone for the row types it is used with.
TRIPLETOPS_SIMD_CLONES inline double exact_key_f(const float* a, const float* b, int64_t D, double ia, double ib) {
  return exact_key(a, b, D, ia, ib);
}
TRIPLETOPS_SIMD_CLONES inline double exact_key_d(const double* a, const double* b, int64_t D, double ia, double ib) {
  return exact_key(a, b, D, ia, ib);
}
template <typename T>
inline double exact_key_any(const T* a, const T* b, int64_t D, double ia, double ib) {
  if constexpr (std::is_same_v<T, float>) return exact_key_f(a, b, D, ia, ib);
  else if constexpr (std::is_same_v<T, double>) return exact_key_d(a, b, D, ia, ib);
  else return exact_key(a, b, D, ia, ib);
}
template <typename T>
inline double inverse_norm(const T* a, int64_t D) {
  double s = 0;
  for (int64_t k = 0; k < D; ++k) s += double(a[k]) * double(a[k]);
  return 1.0 / std::max(std::sqrt(s), kNormEps);
}
// The canonical unit row of a in double, as rows_cpu.h's canonical_unit_row: (a_k / m) / q
// with m = max |a_k| and q = |a / m| (serial order), bitwise the same for a and c·a (c > 0:
// each quotient a_k / m is correctly rounded from an exact value that c cancels from), so
// rows of one direction meet at exactly 0 when settling and tie to the smallest index.
template <typename T>
inline void canonical_unit_double(const T* a, int64_t D, std::vector<double>& out) {
  double m = 0;
  for (int64_t k = 0; k < D; ++k) m = std::max(m, std::fabs(double(a[k])));
  out.resize(D);
  double q = 0;
  for (int64_t k = 0; k < D; ++k) {
    out[k] = double(a[k]) / m;
    q += out[k] * out[k];
  }
  q = std::sqrt(q);
  for (int64_t k = 0; k < D; ++k) out[k] /= q;
}
// Whether a row is a unit row under F.normalize (common.h's is_unit_row), and a·b in
// double, for cosine's key of a pair with a row that is not.
template <typename T>
inline bool unit_row(const T* a, int64_t D) {
  double s = 0;
  for (int64_t k = 0; k < D; ++k) s += double(a[k]) * double(a[k]);
  return is_unit_row(s);
}
template <typename T>
inline double dot_double(const T* a, const T* b, int64_t D) {
  double s = 0;
  for (int64_t k = 0; k < D; ++k) s += double(a[k]) * double(b[k]);
  return s;
}

// The exact key of (x_a, y_b) over the input rows: |a - b|^2 for (sq)euclidean; for cosine
// |â - b̂|^2 = 2 (1 - cos) between canonical unit rows in double, or 2 (1 - a.b/(|a||b|))
// when either row is not a unit row under F.normalize (a zero row: distance 1 to all).
// Holds the anchor's state; `key(b)` is one candidate's key.
template <typename T>
struct ExactKeys {
  const T* a;
  int64_t D;
  bool cosine;
  double ia = 1.0;
  bool unit_a = true;
  std::vector<double> ua, ub;  // cosine: canonical unit rows in double
  ExactKeys(const T* a_, int64_t D_, bool cosine_) : a(a_), D(D_), cosine(cosine_) {
    if (!cosine) return;
    ia = inverse_norm(a, D);
    unit_a = unit_row(a, D);
    if (unit_a) canonical_unit_double(a, D, ua);
  }
  double key(const T* b) {
    if (!cosine) return exact_key_any(a, b, D, 1.0, 1.0);
    // |cos| <= 1 up to rounding: clamped, so that no key is below 0 (knn_cpu.cpp's settled
    // windows rely on 0 being the smallest key).
    if (!unit_a || !unit_row(b, D))
      return std::max(0.0, 2.0 * (1.0 - dot_double(a, b, D) * ia * inverse_norm(b, D)));
    canonical_unit_double(b, D, ub);
    return exact_key_any(ua.data(), ub.data(), D, 1.0, 1.0);
  }
};

// |a|^2 + |b|^2 - 2ab loses precision relative to the norms, so data far from the
// origin (d^2 << |x|^2, e.g. post-ReLU embeddings) would be mined on rounding noise.
// (Sq)euclidean distances are translation invariant: mine on rows shifted by an
// estimate of the reference set's mean. The estimate only has to be near the data,
// so it averages about 64 evenly spaced finite rows, serially: deterministic.
// Returns false (and leaves the outputs alone) when the data is already centered.
template <typename T>
bool center_for_mining(const PreparedRows& E, const PreparedRows& R, bool self, PreparedRows& Em, PreparedRows& Rm) {
  const int64_t M = R.rows.size(0), D = R.rows.size(1);
  const int64_t stride = std::max<int64_t>(1, M / 64);
  const T* r = R.rows.data_ptr<T>();
  const uint8_t* fr = R.finite.data_ptr<uint8_t>();
  const T* sq = R.sq_norm.data_ptr<T>();
  std::vector<double> mean(D, 0.0), col_sq(D, 0.0);
  double mean_sq = 0;
  int64_t count = 0;
  for (int64_t i = 0; i < M; i += stride) {
    if (!fr[i]) continue;
    for (int64_t k = 0; k < D; ++k) mean[k] += r[i * D + k], col_sq[k] += double(r[i * D + k]) * r[i * D + k];
    mean_sq += sq[i];
    ++count;
  }
  if (count == 0) return false;
  double mu_sq = 0;
  for (int64_t k = 0; k < D; ++k) mean[k] /= double(count), mu_sq += mean[k] * mean[k];
  // Centering pays when the mean holds a sizeable share of the norms (|mu|^2 > E|x|^2 / 16).
  if (!(mu_sq * 16 > mean_sq / double(count))) return false;
  // Each column's shift keeps grids exact (grid_shift).
  at::Tensor mu = at::empty({D}, R.rows.options());
  for (int64_t k = 0; k < D; ++k) {
    const double var = std::max(0.0, col_sq[k] / double(count) - mean[k] * mean[k]);
    mu.data_ptr<T>()[k] = T(grid_shift(mean[k], var));
  }
  auto shifted = [&](const PreparedRows& X) {
    PreparedRows out;
    out.rows = X.rows.sub(mu);
    out.finite = X.finite;
    out.sq_norm = at::empty_like(X.sq_norm);
    const int64_t N = X.rows.size(0);
    const T* x = out.rows.data_ptr<T>();
    T* s = out.sq_norm.data_ptr<T>();
    at::parallel_for(0, N, std::max<int64_t>(1, 32768 / D), [&](int64_t begin, int64_t end) {
      bool ok;
      for (int64_t i = begin; i < end; ++i) s[i] = row_sumsq(x + i * D, D, ok);
    });
    return out;
  };
  Em = shifted(E);
  Rm = self ? Em : shifted(R);
  return true;
}

// The rows an op measures on. For (sq)euclidean, rows whose squares leave the compute
// dtype's range (rows_cpu.h: safe_scale_exponent) are replaced by the rows times
// 2^-scale_e (entry by entry: times_power_of_two), and the distances scaled back at the
// end (exact, unless they over- or underflow themselves). Cosine is never scaled as a
// whole: it is scale-free per row, and canonical_unit_row already divides each row by its
// own largest entry, so one exploding row leaves every other row's unit row alone (a
// global 2^-e would push the ordinary rows below F.normalize's eps). x, y: the input rows
// in the compute dtype (scaled likewise) for exact keys: E's and R's rows unless those are
// unit rows (cosine). Without a reference set, R and y are E and x.
struct ScaledRows {
  PreparedRows E, R;
  at::Tensor x, y;
  int scale_e = 0;
};
inline ScaledRows prepare_scaled(const at::Tensor& x, const c10::optional<at::Tensor>& y, Metric metric) {
  const bool self = !y.has_value();
  ScaledRows S;
  S.E = prepare_rows(x, metric);
  S.R = self ? S.E : prepare_rows(*y, metric);
  S.scale_e = metric == Metric::Cosine ? 0 : safe_scale_exponent(x, y, S.E, self ? nullptr : &S.R);
  const auto ct = compute_dtype(x.scalar_type());
  at::Tensor xs = x, ys = self ? x : *y;
  if (S.scale_e != 0) {
    xs = times_power_of_two(x, -S.scale_e);
    ys = self ? xs : times_power_of_two(*y, -S.scale_e);
    S.E = prepare_rows(xs, metric);
    S.R = self ? S.E : prepare_rows(ys, metric);
  }
  const bool cosine = metric == Metric::Cosine;
  S.x = cosine ? xs.to(ct).contiguous() : S.E.rows;
  S.y = self ? S.x : cosine ? ys.to(ct).contiguous() : S.R.rows;
  return S;
}

}  // namespace cpu
}  // namespace tripletops
