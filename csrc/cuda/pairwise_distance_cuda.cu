// Pairwise distances on CUDA, the twin of csrc/cpu/pairwise_distance_cpu.cpp: the Gram
// matrix by one GEMM (ATen's, cuBLAS underneath), then an elementwise kernel that
// turns it into distances and recomputes exactly, from the rows, every entry whose
// Gram form would cancel (d^2 < (|x|^2 + |y|^2) / 8: near pairs, the diagonal), then
// identical rows are settled to identical distances (three small kernels, no sort). The
// backward is two GEMMs on mean-centered rows, as on CPU. Indexing is 64-bit.
// Device code: pairwise_distance_kernels.cuh; host code on device-agnostic ATen (device.h).
#include "pairwise_distance_cuda.h"

#include "device.h"
#include "pairwise_distance_kernels.cuh"

#include <ATen/Dispatch.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
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

// What csrc/cpu's settle_identical does, on the device, in three launches (no sort, no
// host sync): bitwise-identical rows (the input rows, or for cosine the unit rows, between
// x and y too) get bitwise-identical rows and columns of distances, and 0 between them
// (the diagonal included) unless a row is not finite or, for cosine, has norm <= eps
// (F.normalize leaves it at 0: distance 1). Expected on the H200 at 4096 x 512 fp32: the
// hashes ~5 us (8 MiB), the first-identical scan ~20 us (8 M hash compares), the settle
// pass ~30 us (N·M entries read, almost none written).
void settle_identical(at::Tensor& dist, const at::Tensor& x, const c10::optional<at::Tensor>& y, const Rows& X,
                      const Rows& Y, Metric metric) {
  const int64_t N = dist.size(0), M = dist.size(1);
  const bool cosine = metric == Metric::Cosine;
  const at::Tensor rx = (cosine ? X.rows : x).contiguous();
  const at::Tensor ry = y.has_value() ? (cosine ? Y.rows : *y).contiguous() : rx;
  const int64_t D = rx.size(1), extra = y.has_value() ? M : 0;  // y's rows, hashed after x's
  const auto opts = x.options().dtype(at::kLong);
  at::Tensor hash = at::empty({N + extra}, opts);
  at::Tensor fx = at::empty({N}, opts);
  at::Tensor fy = y.has_value() ? at::empty({M}, opts) : fx;
  at::Tensor cx = y.has_value() ? at::empty({M}, opts) : fx;
  at::Tensor zero_ok = at::empty({N}, x.options().dtype(at::kBool));
  constexpr int64_t kRowsPerBlock = 8;  // as in the kernels
  const unsigned blocks = unsigned((N + extra + kRowsPerBlock - 1) / kRowsPerBlock);
  auto* h = reinterpret_cast<uint64_t*>(hash.data_ptr<int64_t>());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rx.scalar_type(), "tripletops_identical_rows", [&] {
    const scalar_t* px = rx.data_ptr<scalar_t>();
    const scalar_t* py = ry.data_ptr<scalar_t>();
    const at::Tensor sq = cosine ? X.sq_norm.to(rx.scalar_type()) : at::Tensor();
    TRIPLETOPS_LAUNCH((row_hash_kernel<scalar_t>), blocks, kRowsPerBlock * 32, 0, current_stream(), px, N, py, extra,
                      D, cosine ? sq.data_ptr<scalar_t>() : nullptr, h, zero_ok.data_ptr<bool>());
    TRIPLETOPS_LAUNCH((identical_rows_kernel<scalar_t>), blocks, kRowsPerBlock * 32, 0, current_stream(), px, N, py,
                      extra, D, h, fx.data_ptr<int64_t>(), fy.data_ptr<int64_t>(), cx.data_ptr<int64_t>());
  });
  AT_DISPATCH_FLOATING_TYPES(dist.scalar_type(), "tripletops_settle_identical", [&] {
    TRIPLETOPS_LAUNCH((settle_identical_kernel<scalar_t>), unsigned(blocks_for(N * M)), kThreads, 0,
                      current_stream(), dist.data_ptr<scalar_t>(), fx.data_ptr<int64_t>(), fy.data_ptr<int64_t>(),
                      cx.data_ptr<int64_t>(), zero_ok.data_ptr<bool>(), N, M);
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
