// Explicit (anchor, positive, negative) triplet margin loss on CPU: one pass over
// the rows, parallel over triplets; no scatter, so the backward is deterministic.
#include "rows_cpu.h"

#include <ATen/OpMathType.h>
#include <ATen/ops/from_blob.h>
#include <torch/library.h>

#include <tuple>
#include <type_traits>

namespace tripletops {
namespace cpu {
namespace {

// Sum over k of (a[k] - b[k])^2, or of a[k] * b[k] for cosine (unit rows), in eight
// partial sums in a fixed order (vectorizable, repeatable; the order of row_distance).
// `zero` gathers (a[k] + b[k]) * 0: 0 when both rows are finite, NaN otherwise.
template <typename T, bool kCosine>
TRIPLETOPS_INLINE T pair_sum(const T* a, const T* b, int64_t D, T& zero) {
  constexpr int kParts = 8;
  T acc[kParts] = {}, z[kParts] = {};
  int64_t k = 0;
  for (; k + kParts <= D; k += kParts)
    for (int l = 0; l < kParts; ++l) {
      const T d = a[k + l] - b[k + l];
      acc[l] += kCosine ? a[k + l] * b[k + l] : d * d;
      z[l] += (a[k + l] + b[k + l]) * T(0);
    }
  for (int l = 0; k < D; ++k, ++l) {
    const T d = a[k] - b[k];
    acc[l] += kCosine ? a[k] * b[k] : d * d;
    z[l] += (a[k] + b[k]) * T(0);
  }
  T total = 0, zt = 0;
  for (int l = 0; l < kParts; ++l) total += acc[l], zt += z[l];
  zero = zt;
  return total;
}

template <typename T, bool kCosine>
TRIPLETOPS_INLINE T pair_dist(const T* a, const T* b, int64_t D, Metric metric, T& zero) {
  const T s = pair_sum<T, kCosine>(a, b, D, zero);
  if (kCosine) return T(1) - s;
  if (sum_sq_out_of_range(s) && zero == T(0)) {
    // The squares under- or overflowed in T (rows of norm 1e-30 or 1e20 in fp32 gave 0 or
    // inf): formed again on the rows scaled by a power of two, in double.
    int e = 0;
    const double r = scaled_sq_distance(a, b, D, e);
    return T(metric == Metric::Euclidean ? std::ldexp(std::sqrt(r), e) : std::ldexp(r, 2 * e));
  }
  return metric == Metric::Euclidean ? std::sqrt(s) : s;
}

// Triplets [begin, end): distances and losses; a triplet touching a NaN/Inf row gets
// a NaN loss. Rows are in the compute dtype (unit rows for cosine).
template <typename T, bool kCosine>
TRIPLETOPS_INLINE void triplet_block(const T* a, const T* p, const T* n, int64_t D, int64_t begin, int64_t end,
                                     Metric metric, bool swap, T margin, T* loss, T* d_ap, T* d_an, T* d_pn) {
  for (int64_t i = begin; i < end; ++i) {
    const T *ar = a + i * D, *pr = p + i * D, *nr = n + i * D;
    T z1, z2;
    d_ap[i] = pair_dist<T, kCosine>(ar, pr, D, metric, z1);
    d_an[i] = pair_dist<T, kCosine>(ar, nr, D, metric, z2);
    T neg = d_an[i];
    if (swap) {
      T z3;
      d_pn[i] = pair_dist<T, kCosine>(pr, nr, D, metric, z3);
      if (d_pn[i] < neg) neg = d_pn[i];
    }
    loss[i] = (z1 == T(0) && z2 == T(0)) ? relu_nan(d_ap[i] - neg + margin) : std::numeric_limits<T>::quiet_NaN();
  }
}

#define TRIPLETOPS_TRIPLET_BLOCK(T, name)                                                                        \
  TRIPLETOPS_SIMD_CLONES void name(const T* a, const T* p, const T* n, int64_t D, int64_t b, int64_t e, Metric m, \
                                   bool swap, T margin, T* loss, T* d_ap, T* d_an, T* d_pn) {                    \
    if (m == Metric::Cosine)                                                                                     \
      triplet_block<T, true>(a, p, n, D, b, e, m, swap, margin, loss, d_ap, d_an, d_pn);                         \
    else                                                                                                         \
      triplet_block<T, false>(a, p, n, D, b, e, m, swap, margin, loss, d_ap, d_an, d_pn);                        \
  }                                                                                                              \
  inline void triplet_block_any(const T* a, const T* p, const T* n, int64_t D, int64_t b, int64_t e, Metric m,   \
                                bool swap, T margin, T* loss, T* d_ap, T* d_an, T* d_pn) {                       \
    name(a, p, n, D, b, e, m, swap, margin, loss, d_ap, d_an, d_pn);                                             \
  }
TRIPLETOPS_TRIPLET_BLOCK(float, triplet_block_f)
TRIPLETOPS_TRIPLET_BLOCK(double, triplet_block_d)
#undef TRIPLETOPS_TRIPLET_BLOCK

// The rows the forward reads: unit rows for cosine, else the input in the compute dtype.
inline at::Tensor forward_rows(const at::Tensor& x, Metric metric) {
  if (metric == Metric::Cosine) return prepare_rows(x, metric).rows;
  return x.to(compute_dtype(x.scalar_type())).contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> triplet_margin_loss_cpu(
    const at::Tensor& anchor, const at::Tensor& positive, const at::Tensor& negative, double margin,
    c10::string_view metric_name, bool swap, c10::string_view reduction_name) {
  check_triplets(anchor, positive, negative, c10::DeviceType::CPU);
  const Metric metric = parse_metric(metric_name);
  const Reduction reduction = parse_reduction(reduction_name);
  const at::Tensor A = forward_rows(anchor, metric), P = forward_rows(positive, metric),
                   N = forward_rows(negative, metric);
  const int64_t B = A.size(0), D = A.size(1);
  const auto opts = A.options();
  at::Tensor loss = at::empty({B}, opts), d_ap = at::empty({B}, opts), d_an = at::empty({B}, opts);
  at::Tensor d_pn = at::empty({swap ? B : 0}, opts);
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "triplet_margin_loss_cpu", [&] {
    const scalar_t *a = A.data_ptr<scalar_t>(), *p = P.data_ptr<scalar_t>(), *n = N.data_ptr<scalar_t>();
    scalar_t *l = loss.data_ptr<scalar_t>(), *dap = d_ap.data_ptr<scalar_t>(), *dan = d_an.data_ptr<scalar_t>();
    scalar_t* dpn = swap ? d_pn.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, B, std::max<int64_t>(1, 16384 / D), [&](int64_t begin, int64_t end) {
      triplet_block_any(a, p, n, D, begin, end, metric, swap, scalar_t(margin), l, dap, dan, dpn);
    });
  });
  return {reduce_loss(loss, at::Tensor(), reduction, anchor.scalar_type()), d_ap, d_an, d_pn};
}

// One triplet's squared norms and dot products (for pair_grad), and whether its
// rows are finite.
struct TripletStats {
  double a_sq, p_sq, n_sq, ap, an, pn;
  uint8_t finite;
};

// Triplets [begin, end) of raw rows (any float dtype, read into opmath): eight partial
// sums per product in a fixed order, so the loop vectorizes and repeats exactly.
template <typename S>
TRIPLETOPS_INLINE void triplet_stats(const S* a, const S* p, const S* n, int64_t D, int64_t begin, int64_t end,
                                     TripletStats* out) {
  using A = at::opmath_type<S>;
  constexpr int kParts = 8;
  for (int64_t i = begin; i < end; ++i) {
    const S *ar = a + i * D, *pr = p + i * D, *nr = n + i * D;
    A s[7][kParts] = {};
    int64_t k = 0;
    auto add = [&](int l, A av, A pv, A nv) {
      s[0][l] += av * av, s[1][l] += pv * pv, s[2][l] += nv * nv;
      s[3][l] += av * pv, s[4][l] += av * nv, s[5][l] += pv * nv;
      s[6][l] += (av + pv + nv) * A(0);  // NaN when any entry is NaN/Inf
    };
    for (; k + kParts <= D; k += kParts)
      for (int l = 0; l < kParts; ++l) add(l, A(ar[k + l]), A(pr[k + l]), A(nr[k + l]));
    for (int l = 0; k < D; ++k, ++l) add(l, A(ar[k]), A(pr[k]), A(nr[k]));
    A t[7];
    for (int j = 0; j < 7; ++j) {
      t[j] = 0;
      for (int l = 0; l < kParts; ++l) t[j] += s[j][l];
    }
    out[i] = {double(t[0]), double(t[1]), double(t[2]), double(t[3]), double(t[4]), double(t[5]),
              uint8_t(t[6] == A(0))};
  }
}
TRIPLETOPS_SIMD_CLONES void triplet_stats_f(const float* a, const float* p, const float* n, int64_t D, int64_t b,
                                            int64_t e, TripletStats* out) {
  triplet_stats(a, p, n, D, b, e, out);
}
TRIPLETOPS_SIMD_CLONES void triplet_stats_d(const double* a, const double* p, const double* n, int64_t D, int64_t b,
                                            int64_t e, TripletStats* out) {
  triplet_stats(a, p, n, D, b, e, out);
}
inline void triplet_stats_any(const float* a, const float* p, const float* n, int64_t D, int64_t b, int64_t e,
                              TripletStats* out) {
  triplet_stats_f(a, p, n, D, b, e, out);
}
inline void triplet_stats_any(const double* a, const double* p, const double* n, int64_t D, int64_t b, int64_t e,
                              TripletStats* out) {
  triplet_stats_d(a, p, n, D, b, e, out);
}
template <typename S>  // fp16 / bf16: not cloned
inline void triplet_stats_any(const S* a, const S* p, const S* n, int64_t D, int64_t b, int64_t e,
                              TripletStats* out) {
  triplet_stats(a, p, n, D, b, e, out);
}

// Row-aligned backward: every triplet owns its three gradient rows, so no scatter.
// Gradients are scalar combinations of the raw rows (pair_grad), read in their own
// dtype and accumulated in opmath (fp32 for halves).
template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor> triplet_backward_impl(
    const at::Tensor& grad, const at::Tensor& A, const at::Tensor& P, const at::Tensor& N, const at::Tensor& d_ap,
    const at::Tensor& d_an, const at::Tensor& d_pn, double margin, Metric metric, bool swap, Reduction reduction) {
  using acc_t = at::opmath_type<scalar_t>;
  // The forward formed its losses in the compute dtype: redo them in it, so hinge and
  // mean_nonzero decisions match the forward's.
  using comp_t = compute_t<scalar_t>;
  const auto comp_dtype = c10::CppTypeToScalarType<comp_t>::value;
  const int64_t B = A.size(0), D = A.size(1);
  const scalar_t *a = A.data_ptr<scalar_t>(), *p = P.data_ptr<scalar_t>(), *n = N.data_ptr<scalar_t>();
  const at::Tensor dap_t = d_ap.to(comp_dtype).contiguous(), dan_t = d_an.to(comp_dtype).contiguous();
  const at::Tensor dpn_t = swap ? d_pn.to(comp_dtype).contiguous() : at::Tensor();
  const comp_t *dap = dap_t.data_ptr<comp_t>(), *dan = dan_t.data_ptr<comp_t>();
  const comp_t* dpn = swap ? dpn_t.data_ptr<comp_t>() : nullptr;

  // Pass 1, per triplet: squared norms, dot products, finiteness.
  std::vector<TripletStats> st(B);
  at::parallel_for(0, B, std::max<int64_t>(1, 16384 / D), [&](int64_t begin, int64_t end) {
    triplet_stats_any(a, p, n, D, begin, end, st.data());
  });
  std::vector<comp_t> loss_v(B);
  for (int64_t i = 0; i < B; ++i) {
    const comp_t neg = (swap && dpn[i] < dan[i]) ? dpn[i] : dan[i];
    loss_v[i] = st[i].finite ? relu_nan(dap[i] - neg + comp_t(margin)) : std::numeric_limits<comp_t>::quiet_NaN();
  }
  const at::Tensor loss_t = at::from_blob(loss_v.data(), {B}, at::TensorOptions().dtype(comp_dtype));
  const std::vector<double> scale = reduction_scale(grad, loss_t, at::Tensor(), reduction);

  const auto acc_opts = A.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  at::Tensor ga = at::zeros({B, D}, acc_opts), gp = at::zeros({B, D}, acc_opts), gn = at::zeros({B, D}, acc_opts);
  acc_t *gap = ga.data_ptr<acc_t>(), *gpp = gp.data_ptr<acc_t>(), *gnp = gn.data_ptr<acc_t>();
  at::parallel_for(0, B, std::max<int64_t>(1, 8192 / D), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const bool use_pn = swap && dpn[i] < dan[i];
      const comp_t neg = use_pn ? dpn[i] : dan[i];
      const double s = scale[i] * double(triplet_term_grad(dap[i] - neg, comp_t(margin), /*soft_margin=*/false));
      if (s == 0) continue;
      const TripletStats& t = st[i];
      const PairGrad g1 = pair_grad(metric, dap[i], t.ap, t.a_sq, t.p_sq).scaled(s);  // (a, p), weight +s
      // Weight -s on (a, n), or with swap on (p, n) when that one is closer.
      const PairGrad g2 = (use_pn ? pair_grad(metric, dpn[i], t.pn, t.p_sq, t.n_sq)
                                  : pair_grad(metric, dan[i], t.an, t.a_sq, t.n_sq)).scaled(-s);
      const acc_t c1da = g1.da, c1ea = g1.ea, c1db = g1.db, c1eb = g1.eb;
      const acc_t c2da = g2.da, c2ea = g2.ea, c2db = g2.db, c2eb = g2.eb;
      const scalar_t *ar = a + i * D, *pr = p + i * D, *nr = n + i * D;
      acc_t *gai = gap + i * D, *gpi = gpp + i * D, *gni = gnp + i * D;
      for (int64_t k = 0; k < D; ++k) {
        const acc_t av = ar[k], pv = pr[k], nv = nr[k];
        const acc_t d1 = av - pv;
        gai[k] = c1da * d1 + c1ea * pv;
        gpi[k] = c1db * d1 + c1eb * av;
        if (use_pn) {
          const acc_t d2 = pv - nv;
          gpi[k] += c2da * d2 + c2ea * nv;
          gni[k] = c2db * d2 + c2eb * pv;
        } else {
          const acc_t d2 = av - nv;
          gai[k] += c2da * d2 + c2ea * nv;
          gni[k] = c2db * d2 + c2eb * av;
        }
      }
    }
  });
  const auto dtype = A.scalar_type();
  return {ga.to(dtype), gp.to(dtype), gn.to(dtype)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> triplet_margin_loss_backward_cpu(
    const at::Tensor& grad, const at::Tensor& anchor, const at::Tensor& positive, const at::Tensor& negative,
    const at::Tensor& d_ap, const at::Tensor& d_an, const at::Tensor& d_pn, double margin,
    c10::string_view metric_name, bool swap, c10::string_view reduction_name) {
  check_triplets(anchor, positive, negative, c10::DeviceType::CPU);
  const Metric metric = parse_metric(metric_name);
  const Reduction reduction = parse_reduction(reduction_name);
  const int64_t B = anchor.size(0);
  const char* op = "triplet_margin_loss";
  check_saved_grad(op, grad, reduction == Reduction::None, B);
  check_saved_rows(op, "d_ap", d_ap, B, anchor.device());
  check_saved_rows(op, "d_an", d_an, B, anchor.device());
  check_saved_rows(op, "d_pn", d_pn, swap ? B : 0, anchor.device());
  const at::Tensor A = anchor.contiguous(), P = positive.contiguous(), N = negative.contiguous();
  std::tuple<at::Tensor, at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, A.scalar_type(), "triplet_margin_loss_backward_cpu", [&] {
    out = triplet_backward_impl<scalar_t>(grad, A, P, N, d_ap, d_an, d_pn, margin, metric, swap, reduction);
  });
  return out;
}

}  // namespace
}  // namespace cpu
}  // namespace tripletops

TORCH_LIBRARY_IMPL(tripletops, CPU, m) {
  m.impl("triplet_margin_loss", &tripletops::cpu::triplet_margin_loss_cpu);
  m.impl("triplet_margin_loss_backward", &tripletops::cpu::triplet_margin_loss_backward_cpu);
}
