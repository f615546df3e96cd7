// Shared by every kernel file: argument parsing, checks, and the scalar math of
// the losses. The scalar helpers are host/device so CUDA kernels can reuse them.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/zeros.h>
#include <c10/core/DeviceType.h>
#include <c10/util/Optional.h>
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <string_view>

namespace tripletops {

enum class Metric { Euclidean, SqEuclidean, Cosine };
enum class Reduction { None, Sum, Mean, MeanNonzero };

// F.normalize's eps: a row is divided by max(||x||, kNormEps).
constexpr double kNormEps = 1e-12;

inline Metric parse_metric(std::string_view s) {
  if (s == "euclidean") return Metric::Euclidean;
  if (s == "sqeuclidean") return Metric::SqEuclidean;
  if (s == "cosine") return Metric::Cosine;
  TORCH_CHECK_VALUE(false, "tripletops: metric must be 'euclidean', 'sqeuclidean' or 'cosine', got '",
                    std::string(s), "'");
}

inline Reduction parse_reduction(std::string_view s) {
  if (s == "none") return Reduction::None;
  if (s == "sum") return Reduction::Sum;
  if (s == "mean") return Reduction::Mean;
  if (s == "mean_nonzero") return Reduction::MeanNonzero;
  TORCH_CHECK_VALUE(false, "tripletops: reduction must be 'none', 'sum', 'mean' or 'mean_nonzero', got '",
                    std::string(s), "'");
}

#define TRIPLETOPS_CHECK_2D(x, name)                                                        \
  TORCH_CHECK_VALUE((x).dim() == 2, "tripletops: ", name, " must be 2-D (rows, dim), got ", \
                    (x).dim(), "-D tensor of shape ", (x).sizes())
#define TRIPLETOPS_CHECK_FLOAT(x, name)                                                    \
  TORCH_CHECK_TYPE(at::isFloatingType((x).scalar_type()), "tripletops: ", name,            \
                   " must be a floating-point tensor (float32/float64/float16/bfloat16), got ", \
                   (x).scalar_type())
// Labels: (B,) integer class ids, or (B, L) multi-hot bool/uint8 (L >= 1).
#define TRIPLETOPS_CHECK_LABELS(x, name)                                                                    \
  TORCH_CHECK_VALUE((x).dim() == 1 || (x).dim() == 2, "tripletops: ", name,                                 \
                    " must be (B,) class ids or (B, L) multi-hot labels, got shape ", (x).sizes());          \
  TORCH_CHECK_TYPE((x).dim() == 1 ? at::isIntegralType((x).scalar_type(), /*includeBool=*/false)            \
                                  : ((x).scalar_type() == at::kBool || (x).scalar_type() == at::kByte),     \
                   "tripletops: ", name, (x).dim() == 1 ? " (class ids) must be an integer tensor, got "      \
                                                          : " (multi-hot) must be bool or uint8, got ",      \
                   (x).scalar_type());                                                                      \
  TORCH_CHECK_VALUE((x).dim() == 1 || (x).size(1) >= 1, "tripletops: ", name, " must have L >= 1 labels")
#define TRIPLETOPS_CHECK_SAME_DEVICE(x, y, xname, yname)                                   \
  TORCH_CHECK((x).device() == (y).device(), "tripletops: ", xname, " and ", yname,         \
              " must be on the same device, got ", (x).device(), " and ", (y).device())

// The kernels' view of labels: class ids (words == 0, one int64 per row), or multi-hot
// labels packed as bitsets (words 64-bit words per row, label k in bit k % 64 of word
// k / 64). j is a positive of i when they have the same id, or share at least one label:
// an AND per word. A row with no label shares none, so it is everyone's negative.
struct Labels {
  const int64_t* data;
  int64_t words;
  C10_HOST_DEVICE bool shares(int64_t i, const Labels& other, int64_t j) const {
    if (words == 0) return data[i] == other.data[j];
    const int64_t *a = data + i * words, *b = other.data + j * words;
    for (int64_t w = 0; w < words; ++w)
      if (a[w] & b[w]) return true;
    return false;
  }
};

// Labels as the kernels take them (device-agnostic ATen): class ids as contiguous int64,
// or (B, L) multi-hot as (B, ceil(L / 64)) int64 bitsets.
inline at::Tensor pack_labels(const at::Tensor& labels) {
  if (labels.dim() == 1) return labels.to(at::kLong).contiguous();
  const int64_t B = labels.size(0), L = labels.size(1), W = (L + 63) / 64;
#ifndef TRIPLETOPS_EMU  // (the emulated CUDA kernels take CPU tensors: they run the ATen chain, as on a GPU)
  if (labels.device().is_cpu()) {  // one pass over the bytes (the ATen chain below costs ~5 small ops)
    const at::Tensor bytes = labels.contiguous();
    at::Tensor out = at::zeros({B, W}, labels.options().dtype(at::kLong));
    const auto* in = static_cast<const uint8_t*>(bytes.data_ptr());  // bool and uint8: one byte each
    auto* words = reinterpret_cast<uint64_t*>(out.data_ptr<int64_t>());
    // Eight bytes at a time: each nonzero byte to 0x01, then one multiply gathers the
    // eight low bits into the top byte, byte k to bit k (little-endian loads).
    constexpr uint64_t kLow7 = 0x7f7f7f7f7f7f7f7full, kOnes = 0x0101010101010101ull, kGather = 0x0102040810204080ull;
    for (int64_t i = 0; i < B; ++i)
      for (int64_t w = 0; w < W; ++w) {
        const int64_t end = std::min(L, w * 64 + 64);
        uint64_t word = 0;
        int64_t k = w * 64;
        for (; k + 8 <= end; k += 8) {
          uint64_t v;
          std::memcpy(&v, in + i * L + k, 8);
          v = ((((v & kLow7) + kLow7) | v) >> 7) & kOnes;
          word |= ((v * kGather) >> 56) << (k % 64);
        }
        for (; k < end; ++k) word |= uint64_t(in[i * L + k] != 0) << (k % 64);
        words[i * W + w] = word;
      }
    return out;
  }
#endif
  at::Tensor bits = labels.ne(0).to(at::kLong);
  if (W * 64 != L) bits = at::constant_pad_nd(bits, {0, W * 64 - L});
  // Bit k of each word from column k: distinct powers of two, so the sum is the OR (the
  // int64 sum wraps at bit 63 exactly as the OR does).
  const at::Tensor shifts = at::arange(64, labels.options().dtype(at::kLong));
  return bits.view({B, W, 64}).bitwise_left_shift(shifts).sum(2).contiguous();
}
// The view of pack_labels' result (2-D: bitsets).
inline Labels labels_view(const at::Tensor& packed) {
  return {packed.data_ptr<int64_t>(), packed.dim() == 2 ? packed.size(1) : 0};
}

// The explicit-triplet ops' input checks, shared by the CPU and CUDA kernels.
// The shift of a column with this mean and variance before mining: the mean rounded to a
// multiple of a power of two q at most the column's spread. The rows stay as well centered
// (within q/2 more), and rows on a grid of q or coarser (integer-valued data, say) stay on
// it exactly, so their keys stay exact and exact ties still go to the smallest index.
// Where the variance is lost in the mean's rounding, the mean itself.
C10_HOST_DEVICE inline double grid_shift(double mean, double var) {
  if (!(var > mean * mean * 1e-12)) return mean;
  const double q = exp2(floor(log2(sqrt(var))));
  return nearbyint(mean / q) * q;
}

// Worst-case rounding of a Gram-form mining key (|a|^2 + |b|^2 - 2 a.b on shifted rows,
// or 1 - cos) computed in unit roundoff u over D terms, for two rows of norms na and nb
// (unit rows for cosine: na = nb = 1). Each squared norm is off by at most gamma_D |a|^2,
// the Gram entry by gamma_D |a||b| (any summation order: blocked, split-K, FMA), forming
// the key adds three roundings and shifting the rows (rounded) two more: in all at most
// (D + 8) u (na + nb)^2, times 1.02 for gamma_D = D u / (1 - D u) while D u <= 0.01.
// `gemm_input_u`: the GEMM's own rounding of its inputs (TF32 on CUDA: 2^-11, else 0).
// Two keys further apart than twice this bound rank as their exact distances do; closer
// ones are settled on exact distances. Infinite (settle everything) when D u > 0.01.
C10_HOST_DEVICE inline double gram_key_bound(int64_t D, double u, double gemm_input_u, double norm_sum_sq) {
  if (double(D) * u > 0.01) return INFINITY;
  return ((double(D) + 8.0) * u + 4.0 * gemm_input_u) * 1.02 * norm_sum_sq;
}

// A backward op's saved per-row tensor (distances, indices): n entries, on `device`.
// The backward ops are public (torch.ops.tripletops.*_backward): what they index with or
// read must be checked, not trusted.
inline void check_saved_rows(const char* op, const char* name, const at::Tensor& t, int64_t n,
                             const at::Device& device) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == n && t.device() == device, "tripletops.", op, "_backward: ", name,
                    " must be the forward's (", n, ",) tensor on ", device, ", got shape ", t.sizes(), " on ",
                    t.device());
}
// The upstream gradient: one element for a scalar loss, n for reduction "none".
inline void check_saved_grad(const char* op, const at::Tensor& grad, bool per_row, int64_t n) {
  const int64_t want = per_row ? n : 1;
  TORCH_CHECK_VALUE(grad.numel() == want, "tripletops.", op, "_backward: grad must have ", want,
                    " element(s), got shape ", grad.sizes());
}

inline void check_triplets(const at::Tensor& a, const at::Tensor& p, const at::Tensor& n, c10::DeviceType device) {
  const char* names[] = {"anchor", "positive", "negative"};
  const at::Tensor* ts[] = {&a, &p, &n};
  for (int i = 0; i < 3; ++i) {
    TRIPLETOPS_CHECK_2D(*ts[i], names[i]);
    TRIPLETOPS_CHECK_FLOAT(*ts[i], names[i]);
    TORCH_CHECK(ts[i]->device().type() == device, "tripletops: ", names[i], " must be a ", device,
                " tensor here, got ", ts[i]->device());
    TRIPLETOPS_CHECK_SAME_DEVICE(*ts[i], a, names[i], "anchor");
    TORCH_CHECK_VALUE(ts[i]->sizes() == a.sizes(), "tripletops: ", names[i], " must have the anchor's shape ",
                      a.sizes(), ", got ", ts[i]->sizes());
    TORCH_CHECK_TYPE(ts[i]->scalar_type() == a.scalar_type(), "tripletops: ", names[i],
                     " must have the anchor's dtype ", a.scalar_type(), ", got ", ts[i]->scalar_type());
  }
  TORCH_CHECK_VALUE(a.size(0) > 0 && a.size(1) > 0, "tripletops: anchor must be non-empty, got shape ", a.sizes());
}

// knn's input checks, shared by the CPU and CUDA kernels (no gallery: the queries are
// searched against themselves).
inline void check_knn_inputs(const at::Tensor& queries, const c10::optional<at::Tensor>& gallery, int64_t k,
                             c10::DeviceType device) {
  TRIPLETOPS_CHECK_2D(queries, "queries");
  TRIPLETOPS_CHECK_FLOAT(queries, "queries");
  TORCH_CHECK(queries.device().type() == device, "tripletops: queries must be a ", device, " tensor here, got ",
              queries.device());
  TORCH_CHECK_VALUE(queries.size(0) > 0 && queries.size(1) > 0,
                    "tripletops: queries must be non-empty (Q > 0, D > 0), got shape ", queries.sizes());
  TORCH_CHECK_VALUE(k > 0, "tripletops: k must be a positive integer, got ", k);
  if (!gallery.has_value()) return;
  const at::Tensor& g = *gallery;
  TRIPLETOPS_CHECK_2D(g, "gallery");
  TRIPLETOPS_CHECK_FLOAT(g, "gallery");
  TORCH_CHECK_VALUE(g.size(0) > 0, "tripletops: gallery must have at least one row");
  TORCH_CHECK_VALUE(g.size(1) == queries.size(1), "tripletops: gallery must have D = ", queries.size(1),
                    " columns like queries, got ", g.size(1));
  TORCH_CHECK_TYPE(g.scalar_type() == queries.scalar_type(), "tripletops: gallery must have dtype ",
                   queries.scalar_type(), " like queries, got ", g.scalar_type());
  TRIPLETOPS_CHECK_SAME_DEVICE(queries, g, "queries", "gallery");
}

// The mining ops' input checks (batch_hard_mine / batch_hard_loss), shared by the CPU and
// CUDA kernels; `device` is the device type the calling kernel takes.
inline void check_mining_inputs(const at::Tensor& embeddings, const at::Tensor& labels,
                                const c10::optional<at::Tensor>& ref_embeddings,
                                const c10::optional<at::Tensor>& ref_labels, c10::DeviceType device) {
  TRIPLETOPS_CHECK_2D(embeddings, "embeddings");
  TRIPLETOPS_CHECK_FLOAT(embeddings, "embeddings");
  TORCH_CHECK_VALUE(embeddings.size(0) > 0 && embeddings.size(1) > 0,
                    "tripletops: embeddings must be non-empty (B > 0, D > 0), got shape ", embeddings.sizes());
  TRIPLETOPS_CHECK_LABELS(labels, "labels");
  TRIPLETOPS_CHECK_SAME_DEVICE(embeddings, labels, "embeddings", "labels");
  TORCH_CHECK_VALUE(labels.size(0) == embeddings.size(0), "tripletops: labels must have B = ", embeddings.size(0),
                    " entries (one per embedding), got ", labels.size(0));
  TORCH_CHECK_VALUE(ref_embeddings.has_value() == ref_labels.has_value(),
                    "tripletops: ref_embeddings and ref_labels must be given together");
  if (ref_embeddings.has_value()) {
    const at::Tensor& ref = *ref_embeddings;
    TRIPLETOPS_CHECK_2D(ref, "ref_embeddings");
    TRIPLETOPS_CHECK_FLOAT(ref, "ref_embeddings");
    TORCH_CHECK_VALUE(ref.size(0) > 0, "tripletops: ref_embeddings must have at least one row");
    TORCH_CHECK_VALUE(ref.size(1) == embeddings.size(1), "tripletops: ref_embeddings must have D = ",
                      embeddings.size(1), " columns like embeddings, got ", ref.size(1));
    TORCH_CHECK_TYPE(ref.scalar_type() == embeddings.scalar_type(), "tripletops: ref_embeddings must have dtype ",
                     embeddings.scalar_type(), " like embeddings, got ", ref.scalar_type());
    TRIPLETOPS_CHECK_SAME_DEVICE(embeddings, ref, "embeddings", "ref_embeddings");
    TRIPLETOPS_CHECK_LABELS(*ref_labels, "ref_labels");
    TORCH_CHECK_VALUE(ref_labels->dim() == labels.dim() && (labels.dim() == 1 || ref_labels->size(1) == labels.size(1)),
                      "tripletops: ref_labels must be labels of the same kind as labels (", labels.dim() == 1
                          ? std::string("(M,) class ids") : "(M, " + std::to_string(labels.size(1)) + ") multi-hot",
                      "), got shape ", ref_labels->sizes());
    TRIPLETOPS_CHECK_SAME_DEVICE(embeddings, *ref_labels, "embeddings", "ref_labels");
    TORCH_CHECK_VALUE(ref_labels->size(0) == ref.size(0), "tripletops: ref_labels must have M = ", ref.size(0),
                      " entries (one per ref_embeddings row), got ", ref_labels->size(0));
  }
  TORCH_CHECK(embeddings.device().type() == device, "tripletops: this kernel takes ", device, " tensors, got ",
              embeddings.device());
}

// The loss family's margins: finite and >= 0.
inline void check_margin(double margin, const char* name) {
  TORCH_CHECK_VALUE(margin >= 0 && margin < std::numeric_limits<double>::infinity(), "tripletops: ", name,
                    " must be a finite number >= 0, got ", margin);
}

// A loss-family backward op's saved (B, B) distances and its upstream gradient, on the
// device type of the kernel.
inline void check_saved(const char* op, const at::Tensor& grad, int64_t grad_numel, const at::Tensor& dist,
                        const at::Tensor& embeddings, at::ScalarType dist_dtype, c10::DeviceType device) {
  const int64_t B = embeddings.size(0);
  TORCH_CHECK_VALUE(dist.dim() == 2 && dist.size(0) == B && dist.size(1) == B && dist.scalar_type() == dist_dtype &&
                        dist.device() == embeddings.device(),
                    "tripletops.", op, "_backward: dist must be the forward's (", B, ", ", B, ") ", dist_dtype,
                    " distances on ", embeddings.device(), ", got shape ", dist.sizes(), ", dtype ",
                    dist.scalar_type(), " on ", dist.device());
  TORCH_CHECK_VALUE(grad.numel() == grad_numel && grad.device() == embeddings.device(), "tripletops.", op,
                    "_backward: grad must have ", grad_numel, " element(s) on ", embeddings.device(), ", got shape ",
                    grad.sizes(), " on ", grad.device());
  TORCH_CHECK(embeddings.device().type() == device, "tripletops: this kernel takes ", device, " tensors, got ",
              embeddings.device());
}

// max(0, z) that keeps NaN (std::max(0, NaN) would return 0 and hide it).
template <typename T>
C10_HOST_DEVICE inline T relu_nan(T z) {
  return z < T(0) ? T(0) : z;
}

// log(1 + exp(z)) without overflow.
template <typename T>
C10_HOST_DEVICE inline T softplus(T z) {
  return z > T(0) ? z + std::log1p(std::exp(-z)) : std::log1p(std::exp(z));
}

template <typename T>
C10_HOST_DEVICE inline T sigmoid(T z) {
  return z >= T(0) ? T(1) / (T(1) + std::exp(-z)) : std::exp(z) / (T(1) + std::exp(z));
}

// The per-triplet loss from d(a,p) - d(a,n): hinge with margin, or soft margin.
template <typename T>
C10_HOST_DEVICE inline T triplet_term(T diff, T margin, bool soft_margin) {
  return soft_margin ? softplus(diff) : relu_nan(diff + margin);
}

// d(loss)/d(diff) for triplet_term; a NaN loss keeps a NaN-producing path open.
// The hinge convention, in every kernel and reference: at the kink (diff + margin == 0)
// the gradient passes, as torch.clamp(min=0) and F.triplet_margin_loss do.
template <typename T>
C10_HOST_DEVICE inline T triplet_term_grad(T diff, T margin, bool soft_margin) {
  if (soft_margin) return sigmoid(diff);
  const T z = diff + margin;
  return (z >= T(0) || z != z) ? T(1) : T(0);
}

// Whether x < a + b (below_sum) or x <= a + b (not_above_sum) holds for the exact sum,
// not only for a + b rounded to double: batch-all's hinge compares d_an with d_ap + m, and
// one ulp from the kink the rounded sum would decide otherwise than (d_ap - d_an) + m > 0
// in exact arithmetic (x = [0, 1, 1.2], m = 0.2: 1 + 0.2 rounds to 1.2). TwoSum gives
// a + b = s + err exactly, and near s (x within a factor 2) x - s is exact (Sterbenz), so
// the comparison with err is exact; far from s the rounding cannot change the answer.
// NaN compares false, as a plain x < a + b does.
C10_HOST_DEVICE inline double two_sum_error(double a, double b, double s) {
  const double bb = s - a;
  return (a - (s - bb)) + (b - bb);
}
C10_HOST_DEVICE inline bool below_sum(double x, double a, double b) {
  const double s = a + b;
  if (!(x > 0.5 * s && x < 2.0 * s)) return x < s;
  return x - s < two_sum_error(a, b, s);
}
C10_HOST_DEVICE inline bool not_above_sum(double x, double a, double b) {
  const double s = a + b;
  if (!(x > 0.5 * s && x < 2.0 * s)) return x <= s;
  return x - s <= two_sum_error(a, b, s);
}

// A sum of doubles rounded once, correctly (Shewchuk's partials, as Python's math.fsum):
// the result depends only on the exact value of the sum, not on the order of the terms.
// Host and device: the partials are non-overlapping doubles, so at most ~40 of them for
// finite terms (2^-1074 .. 2^1024 in steps of 53 bits); a fixed array of kMax, and past it
// (only reachable with inf/NaN terms, whose sum is inf/NaN anyway) the last one absorbs.
struct CorrectlyRoundedSum {
  static constexpr int kMax = 48;
  double p[kMax];  // non-overlapping partials, increasing magnitude
  int n = 0;
  C10_HOST_DEVICE void add(double x) {
    int i = 0;
    for (int j = 0; j < n; ++j) {
      double y = p[j];
      if (::fabs(x) < ::fabs(y)) {
        const double t = x;
        x = y, y = t;
      }
      const double hi = x + y, lo = y - (hi - x);
      if (lo != 0.0) p[i++] = lo;
      x = hi;
    }
    if (i < kMax) p[i++] = x;
    else p[kMax - 1] += x;
    n = i;
  }
  C10_HOST_DEVICE double value() const {
    if (n == 0) return 0.0;
    int m = n;
    double hi = p[--m], lo = 0.0;
    while (m > 0) {
      const double x = hi, y = p[--m];
      hi = x + y;
      lo = y - (hi - x);
      if (lo != 0.0) break;
    }
    // Half-way cases: round half to even on the exact value (math.fsum's last step).
    if (m > 0 && ((lo < 0 && p[m - 1] < 0) || (lo > 0 && p[m - 1] > 0))) {
      const double y = lo * 2, x = hi + y;
      if (y == x - hi) hi = x;
    }
    return hi;
  }
};

// |a - b|^2 rounded once from its exact value: each difference split exactly into
// s + e (TwoSum), each square s^2 + 2se + e^2 into exact products (fma), all summed by
// CorrectlyRoundedSum. Rows at mathematically equal distance (say, one row's entries
// permuted) get the same key, whatever the order of their entries: what breaks exact
// ties by index. About 20x the cost of a plain double sum: only for near ties (knn on
// CPU and CUDA).
template <typename T>
C10_HOST_DEVICE inline double correctly_rounded_sq_distance(const T* a, const T* b, int64_t D) {
  CorrectlyRoundedSum sum;
  for (int64_t k = 0; k < D; ++k) {
    const double u = double(a[k]), v = -double(b[k]);
    const double s = u + v, bb = s - u, e = (u - (s - bb)) + (v - bb);
    const double ss = s * s, se = s * e, ee = e * e;
    sum.add(ss), sum.add(::fma(s, s, -ss));
    sum.add(2 * se), sum.add(2 * ::fma(s, e, -se));
    sum.add(ee), sum.add(::fma(e, e, -ee));
  }
  return sum.value();
}

// d loss / d (x_i - y_j) per entry of a distance matrix, from d loss / d dist: 2 g for
// sqeuclidean, g / d for euclidean (0 at zero distance, NaN kept), and g itself for cosine
// (on the unit rows). pairwise_distance's backward, CPU and CUDA.
template <typename T>
C10_HOST_DEVICE inline T pair_weight(T g, T d, Metric metric) {
  if (metric == Metric::SqEuclidean) return T(2) * g;
  if (metric == Metric::Euclidean) return d > T(0) ? g / d : (d == T(0) ? T(0) : d);
  return g;
}

// Contrastive loss: a pair's term and its slope in d, max(0, d - pos_margin) for a
// positive pair, max(0, neg_margin - d) for a negative one. At the kink the slope is the
// active side's, as torch.clamp(min=0) passes the gradient at 0. NaN for a pair with a
// non-finite row.
template <typename T>
struct PairTerm {
  T value, slope;
};
template <typename T>
C10_HOST_DEVICE inline PairTerm<T> contrastive_term(T d, bool same, bool finite, double pos_margin,
                                                   double neg_margin) {
  if (!finite) return {std::numeric_limits<T>::quiet_NaN(), std::numeric_limits<T>::quiet_NaN()};
  const T z = same ? d - T(pos_margin) : T(neg_margin) - d;
  return {z > T(0) ? z : T(0) * z, z >= T(0) ? T(same ? 1 : -1) : T(0)};  // 0 * NaN keeps a NaN distance
}

// A pair's gradient in difference form, for raw rows a, b:
//   d dist / da = da * (a - b) + ea * b,   d dist / db = db * (a - b) + eb * a.
// For (sq)euclidean ea = eb = 0 exactly, so only a - b is ever formed (a/d - b/d would
// cancel catastrophically when |a| >> |a - b|). Cosine goes through F.normalize's
// Jacobian: d/da = -(b_hat - a_hat c) / na when |a| > eps, else -b_hat / eps.
// Cosine's exact mining key (csrc/cpu and csrc/cuda settling) is |â - b̂|², accurate for
// nearly parallel rows, but 2 (1 - cos) only when both are unit rows. A row of norm <= eps
// is no unit row: F.normalize leaves â = a / eps (0 for a zero row), so a pair with such
// a row is keyed 2 (1 - (a·b) / (max(|a|, eps) max(|b|, eps))) instead: exactly 2 for a
// zero row (distance 1, ties exact), as everywhere else. `sq_norm`: |a|² in double.
C10_HOST_DEVICE inline bool is_unit_row(double sq_norm) { return std::sqrt(sq_norm) > kNormEps; }

// Cosine's pair gradient in its plain form: d(1 - cos)/da = alpha_a a + beta b, d/db =
// alpha_b b + beta a (F.normalize's eps as in pair_grad), for pairs whose norms differ by
// many orders of magnitude, where pair_grad's form around a - b cancels.
struct CosinePairGrad {
  double alpha_a, alpha_b, beta;
};
C10_HOST_DEVICE inline CosinePairGrad cosine_pair_grad(double dot, double a_sq, double b_sq) {
  const double eps = kNormEps, ra = std::sqrt(a_sq), rb = std::sqrt(b_sq);
  const double na = ra > eps ? ra : eps, nb = rb > eps ? rb : eps;
  const double c = dot / (na * nb);
  return {ra > eps ? c / (na * na) : 0.0, rb > eps ? c / (nb * nb) : 0.0, -1.0 / (na * nb)};
}

struct PairGrad {
  double da, ea, db, eb;
  C10_HOST_DEVICE PairGrad scaled(double s) const { return {s * da, s * ea, s * db, s * eb}; }
};

C10_HOST_DEVICE inline PairGrad pair_grad(Metric metric, double dist, double dot, double a_sq, double b_sq) {
  if (metric == Metric::SqEuclidean) return {2.0, 0.0, -2.0, 0.0};
  if (metric == Metric::Euclidean) {
    const double w = dist > 0 ? 1.0 / dist : (dist == 0 ? 0.0 : dist);  // 0 at d = 0; NaN stays NaN
    return {w, 0.0, -w, 0.0};
  }
  // As alpha_a * a + beta * b and alpha_b * b + beta * a, then rewritten around a - b.
  const double eps = kNormEps, ra = std::sqrt(a_sq), rb = std::sqrt(b_sq);
  const double na = ra > eps ? ra : eps, nb = rb > eps ? rb : eps;
  const double c = dot / (na * nb);
  const double alpha_a = ra > eps ? c / (na * na) : 0.0, alpha_b = rb > eps ? c / (nb * nb) : 0.0;
  const double beta = -1.0 / (na * nb);
  return {alpha_a, alpha_a + beta, -alpha_b, alpha_b + beta};
}

}  // namespace tripletops
