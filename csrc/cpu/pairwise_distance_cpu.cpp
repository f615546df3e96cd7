// Pairwise distances on CPU: one GEMM (x y^T) for the bulk, and the exact
// difference form wherever |x|^2 + |y|^2 - 2 x.y would cancel badly.
#include "rows_cpu.h"

#include <ATen/ops/mm.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <tuple>

namespace tripletops {
namespace cpu {
namespace {

// Entries with d^2 below this fraction of |x|^2 + |y|^2 are recomputed from the
// difference: there the GEMM form's rounding error (~eps * (|x|^2 + |y|^2)) would
// exceed ~8 * eps relative (the diagonal of pairwise_distance(x) is exactly 0).
constexpr double kCancellationRatio = 0.125;

void check_xy(const at::Tensor& x, const c10::optional<at::Tensor>& y) {
  TRIPLETOPS_CHECK_2D(x, "x");
  TRIPLETOPS_CHECK_FLOAT(x, "x");
  TORCH_CHECK_VALUE(x.size(0) > 0 && x.size(1) > 0, "tripletops: x must be non-empty, got shape ", x.sizes());
  if (y.has_value()) {
    TRIPLETOPS_CHECK_2D(*y, "y");
    TRIPLETOPS_CHECK_FLOAT(*y, "y");
    TRIPLETOPS_CHECK_SAME_DEVICE(x, *y, "x", "y");
    TORCH_CHECK_VALUE(y->size(0) > 0, "tripletops: y must be non-empty, got shape ", y->sizes());
    TORCH_CHECK_VALUE(y->size(1) == x.size(1), "tripletops: y must have x's feature dim ", x.size(1), ", got ",
                      y->size(1));
    TORCH_CHECK_TYPE(y->scalar_type() == x.scalar_type(), "tripletops: y must have x's dtype ", x.scalar_type(),
                     ", got ", y->scalar_type());
  }
}

at::Tensor pairwise_distance_cpu(const at::Tensor& x, const c10::optional<at::Tensor>& y,
                                 c10::string_view metric_name) {
  check_xy(x, y);
  // The GEMMs below must stay in the compute dtype: under torch.autocast the mm calls
  // would otherwise be cast to bf16/fp16 by the AutocastCPU key still in the TLS.
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const Metric metric = parse_metric(metric_name);
  const PreparedRows X = prepare_rows(x, metric);
  const PreparedRows Y = y.has_value() ? prepare_rows(*y, metric) : X;
  at::Tensor dist = at::mm(X.rows, Y.rows.t());  // (N, M) Gram matrix, overwritten in place
  const int64_t N = dist.size(0), M = dist.size(1), D = x.size(1);
  AT_DISPATCH_FLOATING_TYPES(dist.scalar_type(), "pairwise_distance_cpu", [&] {
    using T = scalar_t;
    T* g = dist.data_ptr<T>();
    const T *xr = X.rows.data_ptr<T>(), *yr = Y.rows.data_ptr<T>();
    const T *sx = X.sq_norm.data_ptr<T>(), *sy = Y.sq_norm.data_ptr<T>();
    at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        T* row = g + i * M;
        for (int64_t j = 0; j < M; ++j) {
          if (metric == Metric::Cosine) {
            row[j] = T(1) - row[j];
            continue;
          }
          T d2 = sx[i] + sy[j] - T(2) * row[j];
          if (!(d2 >= T(kCancellationRatio) * (sx[i] + sy[j]))) d2 = row_distance(xr + i * D, yr + j * D, D, Metric::SqEuclidean);
          row[j] = metric == Metric::Euclidean ? std::sqrt(d2) : d2;
        }
      }
    });
  });
  return dist.to(x.scalar_type());
}

// Backward of rows -> distances. With W the per-entry weight of (x_i - y_j):
//   grad_x = rowsum(W) * x - W y,   grad_y = colsum(W) * y - W^T x   (two GEMMs),
// on rows shifted by their common mean: the sum is translation invariant, and far
// from the origin the unshifted form would cancel catastrophically.
// Cosine goes through the unit rows and then F.normalize's Jacobian.
std::tuple<at::Tensor, at::Tensor> pairwise_distance_backward_cpu(const at::Tensor& grad, const at::Tensor& x,
                                                                  const c10::optional<at::Tensor>& y,
                                                                  const at::Tensor& dist,
                                                                  c10::string_view metric_name) {
  check_xy(x, y);
  // The GEMMs below must stay in the compute dtype: under torch.autocast the mm calls
  // would otherwise be cast to bf16/fp16 by the AutocastCPU key still in the TLS.
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const Metric metric = parse_metric(metric_name);
  const PreparedRows X = prepare_rows(x, metric);
  const PreparedRows Y = y.has_value() ? prepare_rows(*y, metric) : X;
  const auto ct = X.rows.scalar_type();
  at::Tensor W = grad.to(ct).contiguous().clone();
  const at::Tensor d = dist.to(ct).contiguous();
  at::Tensor gx, gy;
  if (metric == Metric::Cosine) {
    gx = W.mm(Y.rows).neg_();      // d/d x_hat
    gy = W.t().mm(X.rows).neg_();  // d/d y_hat
  } else {
    AT_DISPATCH_FLOATING_TYPES(ct, "pairwise_distance_backward_cpu", [&] {
      using T = scalar_t;
      T* w = W.data_ptr<T>();
      const T* dp = d.data_ptr<T>();
      const int64_t n = W.numel();
      at::parallel_for(0, n, 4096, [&](int64_t begin, int64_t end) {
        for (int64_t k = begin; k < end; ++k) {
          if (metric == Metric::SqEuclidean) w[k] *= T(2);
          else w[k] = dp[k] > T(0) ? w[k] / dp[k] : (dp[k] == T(0) ? T(0) : dp[k]);  // 0 at zero distance
        }
      });
    });
    const at::Tensor mu = X.rows.mean(0);
    const at::Tensor Xc = X.rows.sub(mu), Yc = y.has_value() ? Y.rows.sub(mu) : Xc;
    gx = Xc.mul(W.sum(1, true)).sub_(W.mm(Yc));
    gy = Yc.mul(W.sum(0).unsqueeze(1)).sub_(W.t().mm(Xc));
  }
  if (metric == Metric::Cosine) {
    auto through_normalize = [](at::Tensor& g, const PreparedRows& R) {
      AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "pairwise_cosine_normalize_backward", [&] {
        using T = scalar_t;
        const int64_t N = g.size(0), D = g.size(1);
        T* gp = g.data_ptr<T>();
        const T *r = R.rows.data_ptr<T>(), *sq = R.sq_norm.data_ptr<T>();
        at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
          for (int64_t i = begin; i < end; ++i) {
            const T norm = std::sqrt(sq[i]);
            const bool proj = norm > T(kNormEps);
            T c = 0;
            for (int64_t k = 0; k < D; ++k) c += r[i * D + k] * gp[i * D + k];
            const T inv = T(1) / (proj ? norm : T(kNormEps));
            for (int64_t k = 0; k < D; ++k) gp[i * D + k] = (gp[i * D + k] - (proj ? r[i * D + k] * c : T(0))) * inv;
          }
        });
      });
    };
    gx = gx.contiguous();
    gy = gy.contiguous();
    through_normalize(gx, X);
    through_normalize(gy, Y);
  }
  if (!y.has_value()) return {gx.add_(gy).to(x.scalar_type()), at::empty({0}, x.options())};
  return {gx.to(x.scalar_type()), gy.to(y->scalar_type())};
}

}  // namespace
}  // namespace cpu
}  // namespace tripletops

TORCH_LIBRARY_IMPL(tripletops, CPU, m) {
  m.impl("pairwise_distance", &tripletops::cpu::pairwise_distance_cpu);
  m.impl("pairwise_distance_backward", &tripletops::cpu::pairwise_distance_backward_cpu);
}
