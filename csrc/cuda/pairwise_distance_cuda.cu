// Pairwise distances on CUDA, the twin of csrc/cpu/pairwise_distance_cpu.cpp: the Gram
// matrix by one GEMM (ATen's, cuBLAS underneath), then an elementwise kernel that
// turns it into distances and recomputes exactly, from the rows, every entry whose
// Gram form would cancel (d^2 < (|x|^2 + |y|^2) / 8: near pairs, the diagonal), then
// identical rows are settled to identical distances. The backward is two GEMMs on
// mean-centered rows, as on CPU. Indexing is 64-bit.
// Device code: pairwise_distance_kernels.cuh; host code on device-agnostic ATen (device.h).
#include "pairwise_distance_cuda.h"

#include "device.h"
#include "pairwise_distance_kernels.cuh"

#include <ATen/Dispatch.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/isfinite.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros_like.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <tuple>

namespace tripletops {
namespace cuda {
namespace {

// Rows in the compute dtype (fp32 for halves, fp64 for fp64), their squared norms, and
// unit rows x / max(|x|, eps) for cosine: device-agnostic ATen, as csrc/cpu's prepare_rows.
// A finite row of norm > eps gets the canonical unit row of csrc/cpu/rows_cpu.h
// (canonical_unit_row): p = x / max|x_k| (a division: the same bits for x and c·x, c > 0),
// then p / |p|, so rows of one direction meet at exactly 0 and no square overflows.
// About 6 elementwise passes over N x D: O(N·D) bytes, small beside the GEMM.
struct Rows {
  at::Tensor rows, sq_norm;
};
Rows prepare(const at::Tensor& x, Metric metric) {
  const auto ct = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor src = x.to(ct).contiguous();
  const at::Tensor sq = src.square().sum(1);
  if (metric != Metric::Cosine) return {src, sq};
  const at::Tensor plain = src / sq.sqrt().clamp_min(kNormEps).unsqueeze(1);
  const at::Tensor m = src.abs().amax(1, /*keepdim=*/true);
  const at::Tensor p = src / m;                 // NaN rows for a zero row: not taken below
  const at::Tensor sp = p.square().sum(1, /*keepdim=*/true);
  const at::Tensor canonical = (m.to(at::kDouble) * sp.to(at::kDouble).sqrt() > kNormEps) &
                               src.isfinite().all(1, /*keepdim=*/true);
  return {at::where(canonical, p / sp.sqrt(), plain).contiguous(), sq};
}

void check_xy(const at::Tensor& x, const c10::optional<at::Tensor>& y) {
  TRIPLETOPS_CHECK_2D(x, "x");
  TRIPLETOPS_CHECK_FLOAT(x, "x");
  TORCH_CHECK(on_kernel_device(x), "tripletops: x must be a ", kDeviceType, " tensor here, got ", x.device());
  TORCH_CHECK_VALUE(x.size(0) > 0 && x.size(1) > 0, "tripletops: x must be non-empty, got shape ", x.sizes());
  if (y.has_value()) {
    TRIPLETOPS_CHECK_2D(*y, "y");
    TRIPLETOPS_CHECK_SAME_DEVICE(x, *y, "x", "y");
    TORCH_CHECK_VALUE(y->size(0) > 0 && y->size(1) == x.size(1), "tripletops: y must be (M > 0, ", x.size(1),
                      "), got ", y->sizes());
    TORCH_CHECK_TYPE(y->scalar_type() == x.scalar_type(), "tripletops: y must have x's dtype ", x.scalar_type(),
                     ", got ", y->scalar_type());
  }
}

constexpr int kThreads = 256;

int64_t blocks_for(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  TORCH_CHECK(blocks <= int64_t(0x7fffffff), "tripletops: distance matrix too large for one launch");
  return blocks;
}

// Each row's group: the smallest index of the rows with its bytes (x's rows, then y's),
// by hash, stable sort and byte comparison on the device (no host sync). Bytes, so
// -0.0 and 0.0 differ, as in csrc/cpu's comparison.
at::Tensor identical_row_groups(const at::Tensor& rows) {
  const int64_t n = rows.size(0), row_bytes = rows.size(1) * rows.element_size();
  const auto* bytes = static_cast<const unsigned char*>(rows.data_ptr());
  at::Tensor hash = at::empty({n}, rows.options().dtype(at::kLong));
  TRIPLETOPS_LAUNCH(row_hash_kernel, unsigned(blocks_for(n)), kThreads, 0, current_stream(), bytes, n, row_bytes,
                    hash.data_ptr<int64_t>());
  const auto sorted = at::sort(hash, c10::optional<bool>(true), /*dim=*/0, /*descending=*/false);
  at::Tensor group = at::empty_like(hash);
  TRIPLETOPS_LAUNCH(group_by_bytes_kernel, unsigned(blocks_for(n)), kThreads, 0, current_stream(), bytes, n,
                    row_bytes, std::get<0>(sorted).data_ptr<int64_t>(), std::get<1>(sorted).data_ptr<int64_t>(),
                    group.data_ptr<int64_t>());
  return group;
}

// The first index of each group (groups numbered 0 .. n_groups - 1), by group.
at::Tensor first_of_groups(const at::Tensor& group, int64_t n_groups) {
  const int64_t n = group.numel();
  at::Tensor first = at::full({n_groups}, n, group.options());
  TRIPLETOPS_LAUNCH(first_of_group_kernel, unsigned(blocks_for(n)), kThreads, 0, current_stream(),
                    group.data_ptr<int64_t>(), n, reinterpret_cast<long long*>(first.data_ptr<int64_t>()));
  return first;
}

// What csrc/cpu's settle_identical does, on the device: bitwise-identical rows (the input
// rows, or for cosine the unit rows, between x and y too) get bitwise-identical rows and
// columns of distances, and 0 between them (the diagonal included) unless a row is not
// finite or, for cosine, has norm <= eps (F.normalize leaves it at 0: distance 1). The
// groups are numbered by their smallest row index (identical_row_groups).
void settle_identical(at::Tensor& dist, const at::Tensor& x, const c10::optional<at::Tensor>& y, const Rows& X,
                      const Rows& Y, Metric metric) {
  const int64_t N = dist.size(0), M = dist.size(1);
  const bool cosine = metric == Metric::Cosine;
  const at::Tensor rx = cosine ? X.rows : x, ry = cosine ? Y.rows : (y.has_value() ? *y : x);
  const at::Tensor group = identical_row_groups(y.has_value() ? at::cat({rx, ry}).contiguous() : rx.contiguous());
  const int64_t n_groups = group.size(0);
  const at::Tensor group_x = group.narrow(0, 0, N), group_y = y.has_value() ? group.narrow(0, N, M) : group_x;
  const at::Tensor first_x = first_of_groups(group_x, n_groups);
  const at::Tensor first_y = y.has_value() ? first_of_groups(group_y, n_groups) : first_x;
  at::Tensor zero_ok = at::isfinite(x).all(1);
  if (cosine) zero_ok = zero_ok.logical_and(X.sq_norm.to(at::kDouble) > kNormEps * kNormEps);
  zero_ok = zero_ok.contiguous();
  const auto first = [](const at::Tensor& t) { return reinterpret_cast<const long long*>(t.data_ptr<int64_t>()); };
  AT_DISPATCH_FLOATING_TYPES(dist.scalar_type(), "tripletops_settle_identical", [&] {
    TRIPLETOPS_LAUNCH((settle_identical_kernel<scalar_t>), unsigned(blocks_for(N * M)), kThreads, 0,
                      current_stream(), dist.data_ptr<scalar_t>(), group_x.data_ptr<int64_t>(),
                      group_y.data_ptr<int64_t>(), first(first_x), first(first_y), zero_ok.data_ptr<bool>(), N, M);
  });
}

}  // namespace

at::Tensor pairwise_distance_cuda(const at::Tensor& x, const c10::optional<at::Tensor>& y,
                                  c10::string_view metric_name) {
  check_xy(x, y);
  const DeviceGuard guard(x.device());
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);  // GEMM in the compute dtype
  const Metric metric = parse_metric(metric_name);
  const Rows X = prepare(x, metric);
  const Rows Y = y.has_value() ? prepare(*y, metric) : X;
  at::Tensor dist = at::mm(X.rows, Y.rows.t());
  const int64_t N = dist.size(0), M = dist.size(1), D = X.rows.size(1);
  AT_DISPATCH_FLOATING_TYPES(dist.scalar_type(), "pairwise_distance_cuda", [&] {
    TRIPLETOPS_LAUNCH((gram_to_distance_kernel<scalar_t>), unsigned(blocks_for(N * M)), kThreads, 0,
                      current_stream(), dist.data_ptr<scalar_t>(), X.rows.data_ptr<scalar_t>(),
                      Y.rows.data_ptr<scalar_t>(), X.sq_norm.data_ptr<scalar_t>(), Y.sq_norm.data_ptr<scalar_t>(), N,
                      M, D, metric);
  });
  settle_identical(dist, x, y, X, Y, metric);
  return dist.to(x.scalar_type());
}

namespace {

// F.normalize's Jacobian applied to g (rows of d/d unit-row): (g - r (r.g)) / |x| when
// |x| > eps, else g / eps. ATen ops on the device.
at::Tensor through_normalize(const at::Tensor& g, const Rows& R) {
  const at::Tensor norm = R.sq_norm.sqrt().unsqueeze(1);
  const at::Tensor proj = norm > kNormEps;
  const at::Tensor c = (R.rows * g).sum(1, /*keepdim=*/true);
  return at::where(proj, (g - R.rows * c) / norm, g / kNormEps);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> pairwise_distance_backward_cuda(const at::Tensor& grad, const at::Tensor& x,
                                                                   const c10::optional<at::Tensor>& y,
                                                                   const at::Tensor& dist,
                                                                   c10::string_view metric_name) {
  check_xy(x, y);
  const DeviceGuard guard(x.device());
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const Metric metric = parse_metric(metric_name);
  const Rows X = prepare(x, metric);
  const Rows Y = y.has_value() ? prepare(*y, metric) : X;
  const auto ct = X.rows.scalar_type();
  at::Tensor W = grad.to(ct);
  const at::Tensor d = dist.to(ct);
  at::Tensor gx, gy;
  if (metric == Metric::Cosine) {
    gx = through_normalize(-W.mm(Y.rows), X);
    gy = through_normalize(-W.t().mm(X.rows), Y);
  } else {
    if (metric == Metric::SqEuclidean) {
      W = W * 2.0;
    } else {  // d/d(x - y) of |x - y| is (x - y) / d, and 0 at zero distance; NaN stays NaN
      W = at::where(d > 0, W / d, at::where(d == 0, at::zeros_like(d), d));
    }
    const at::Tensor mu = X.rows.mean(0);
    const at::Tensor Xc = X.rows - mu, Yc = y.has_value() ? Y.rows - mu : Xc;
    gx = Xc * W.sum(1, /*keepdim=*/true) - W.mm(Yc);
    gy = Yc * W.sum(0).unsqueeze(1) - W.t().mm(Xc);
  }
  if (!y.has_value()) return {(gx + gy).to(x.scalar_type()), at::empty({0}, x.options())};
  return {gx.to(x.scalar_type()), gy.to(y->scalar_type())};
}

}  // namespace cuda
}  // namespace tripletops

TORCH_LIBRARY_IMPL(TRIPLETOPS_CUDA_LIBRARY, TRIPLETOPS_CUDA_KEY, m) {
  m.impl("pairwise_distance", &tripletops::cuda::pairwise_distance_cuda);
  m.impl("pairwise_distance_backward", &tripletops::cuda::pairwise_distance_backward_cuda);
}
