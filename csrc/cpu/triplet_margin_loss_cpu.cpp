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

void check_triplets(const at::Tensor& a, const at::Tensor& p, const at::Tensor& n) {
  const char* names[] = {"anchor", "positive", "negative"};
  const at::Tensor* ts[] = {&a, &p, &n};
  for (int i = 0; i < 3; ++i) {
    TRIPLETOPS_CHECK_2D(*ts[i], names[i]);
    TRIPLETOPS_CHECK_FLOAT(*ts[i], names[i]);
    TORCH_CHECK(ts[i]->device().is_cpu(), "tripletops: ", names[i], " must be a CPU tensor here");
    TORCH_CHECK_VALUE(ts[i]->sizes() == a.sizes(), "tripletops: ", names[i], " must have the anchor's shape ",
                      a.sizes(), ", got ", ts[i]->sizes());
    TORCH_CHECK_TYPE(ts[i]->scalar_type() == a.scalar_type(), "tripletops: ", names[i],
                     " must have the anchor's dtype ", a.scalar_type(), ", got ", ts[i]->scalar_type());
  }
  TORCH_CHECK_VALUE(a.size(0) > 0 && a.size(1) > 0, "tripletops: anchor must be non-empty, got shape ", a.sizes());
}

// Per-triplet losses and distances; a triplet touching a NaN/Inf row gets a NaN loss.
template <typename T>
void triplet_forward(const PreparedRows& A, const PreparedRows& P, const PreparedRows& N, double margin,
                     Metric metric, bool swap, T* loss, T* d_ap, T* d_an, T* d_pn) {
  const int64_t B = A.rows.size(0), D = A.rows.size(1);
  const T* a = A.rows.data_ptr<T>();
  const T* p = P.rows.data_ptr<T>();
  const T* n = N.rows.data_ptr<T>();
  const uint8_t *fa = A.finite.data_ptr<uint8_t>(), *fp = P.finite.data_ptr<uint8_t>(),
                *fn = N.finite.data_ptr<uint8_t>();
  at::parallel_for(0, B, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      d_ap[i] = row_distance(a + i * D, p + i * D, D, metric);
      d_an[i] = row_distance(a + i * D, n + i * D, D, metric);
      T neg = d_an[i];
      if (swap) {
        d_pn[i] = row_distance(p + i * D, n + i * D, D, metric);
        if (d_pn[i] < neg) neg = d_pn[i];
      }
      const bool finite = fa[i] && fp[i] && fn[i];
      loss[i] = finite ? relu_nan(d_ap[i] - neg + T(margin)) : std::numeric_limits<T>::quiet_NaN();
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> triplet_margin_loss_cpu(
    const at::Tensor& anchor, const at::Tensor& positive, const at::Tensor& negative, double margin,
    c10::string_view metric_name, bool swap, c10::string_view reduction_name) {
  check_triplets(anchor, positive, negative);
  const Metric metric = parse_metric(metric_name);
  const Reduction reduction = parse_reduction(reduction_name);
  const PreparedRows A = prepare_rows(anchor, metric), P = prepare_rows(positive, metric),
                     N = prepare_rows(negative, metric);
  const int64_t B = anchor.size(0);
  const auto opts = A.rows.options();
  at::Tensor loss = at::empty({B}, opts), d_ap = at::empty({B}, opts), d_an = at::empty({B}, opts);
  at::Tensor d_pn = at::empty({swap ? B : 0}, opts);
  AT_DISPATCH_FLOATING_TYPES(A.rows.scalar_type(), "triplet_margin_loss_cpu", [&] {
    triplet_forward<scalar_t>(A, P, N, margin, metric, swap, loss.data_ptr<scalar_t>(), d_ap.data_ptr<scalar_t>(),
                              d_an.data_ptr<scalar_t>(), swap ? d_pn.data_ptr<scalar_t>() : nullptr);
  });
  return {reduce_loss(loss, at::Tensor(), reduction, anchor.scalar_type()), d_ap, d_an, d_pn};
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
  struct Stats { double a_sq, p_sq, n_sq, ap, an, pn; uint8_t finite; };
  std::vector<Stats> st(B);
  at::parallel_for(0, B, std::max<int64_t>(1, 8192 / D), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t *ar = a + i * D, *pr = p + i * D, *nr = n + i * D;
      acc_t asq = 0, psq = 0, nsq = 0, ap = 0, an = 0, pn = 0, z = 0;
      for (int64_t k = 0; k < D; ++k) {
        const acc_t av = ar[k], pv = pr[k], nv = nr[k];
        asq += av * av, psq += pv * pv, nsq += nv * nv, ap += av * pv, an += av * nv, pn += pv * nv;
        z += (av + pv + nv) * acc_t(0);  // NaN when any entry is NaN/Inf
      }
      st[i] = {asq, psq, nsq, ap, an, pn, uint8_t(z == acc_t(0))};
    }
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
      const Stats& t = st[i];
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
  check_triplets(anchor, positive, negative);
  const Metric metric = parse_metric(metric_name);
  const Reduction reduction = parse_reduction(reduction_name);
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
