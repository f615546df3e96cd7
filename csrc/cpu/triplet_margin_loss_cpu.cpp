// Explicit (anchor, positive, negative) triplet margin loss on CPU: one pass over
// the rows, parallel over triplets; no scatter, so the backward is deterministic.
#include "rows_cpu.h"

#include <torch/library.h>

#include <tuple>

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

std::tuple<at::Tensor, at::Tensor, at::Tensor> triplet_margin_loss_backward_cpu(
    const at::Tensor& grad, const at::Tensor& anchor, const at::Tensor& positive, const at::Tensor& negative,
    const at::Tensor& d_ap, const at::Tensor& d_an, const at::Tensor& d_pn, double margin,
    c10::string_view metric_name, bool swap, c10::string_view reduction_name) {
  check_triplets(anchor, positive, negative);
  const Metric metric = parse_metric(metric_name);
  const Reduction reduction = parse_reduction(reduction_name);
  const PreparedRows A = prepare_rows(anchor, metric), P = prepare_rows(positive, metric),
                     N = prepare_rows(negative, metric);
  const int64_t B = anchor.size(0), D = anchor.size(1);
  const auto opts = A.rows.options();
  at::Tensor ga = at::zeros({B, D}, opts), gp = at::zeros({B, D}, opts), gn = at::zeros({B, D}, opts);
  AT_DISPATCH_FLOATING_TYPES(A.rows.scalar_type(), "triplet_margin_loss_backward_cpu", [&] {
    using T = scalar_t;
    const T *dap = d_ap.data_ptr<T>(), *dan = d_an.data_ptr<T>(), *dpn = swap ? d_pn.data_ptr<T>() : nullptr;
    // Recompute the per-triplet losses exactly as the forward did (same inputs, same order).
    at::Tensor loss = at::empty({B}, opts);
    T* l = loss.data_ptr<T>();
    const uint8_t *fa = A.finite.data_ptr<uint8_t>(), *fp = P.finite.data_ptr<uint8_t>(),
                  *fn = N.finite.data_ptr<uint8_t>();
    for (int64_t i = 0; i < B; ++i) {
      const T neg = (swap && dpn[i] < dan[i]) ? dpn[i] : dan[i];
      l[i] = (fa[i] && fp[i] && fn[i]) ? relu_nan(dap[i] - neg + T(margin)) : std::numeric_limits<T>::quiet_NaN();
    }
    const std::vector<double> scale = reduction_scale(grad, loss, at::Tensor(), reduction);
    const T *a = A.rows.data_ptr<T>(), *p = P.rows.data_ptr<T>(), *n = N.rows.data_ptr<T>();
    const T *sa = A.sq_norm.data_ptr<T>(), *sp = P.sq_norm.data_ptr<T>(), *sn = N.sq_norm.data_ptr<T>();
    T *gap = ga.data_ptr<T>(), *gpp = gp.data_ptr<T>(), *gnp = gn.data_ptr<T>();
    at::parallel_for(0, B, 64, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const bool use_pn = swap && dpn[i] < dan[i];
        const T neg = use_pn ? dpn[i] : dan[i];
        const T s = T(scale[i]) * triplet_term_grad(dap[i] - neg, T(margin), /*soft_margin=*/false);
        if (s == T(0)) continue;
        const int64_t o = i * D;
        add_distance_grad(s, a + o, p + o, dap[i], sa[i], sp[i], D, metric, gap + o, gpp + o);
        if (use_pn) add_distance_grad(-s, p + o, n + o, dpn[i], sp[i], sn[i], D, metric, gpp + o, gnp + o);
        else add_distance_grad(-s, a + o, n + o, dan[i], sa[i], sn[i], D, metric, gap + o, gnp + o);
      }
    });
  });
  const auto dtype = anchor.scalar_type();
  return {ga.to(dtype), gp.to(dtype), gn.to(dtype)};
}

}  // namespace
}  // namespace cpu
}  // namespace tripletops

TORCH_LIBRARY_IMPL(tripletops, CPU, m) {
  m.impl("triplet_margin_loss", &tripletops::cpu::triplet_margin_loss_cpu);
  m.impl("triplet_margin_loss_backward", &tripletops::cpu::triplet_margin_loss_backward_cpu);
}
