// Pairwise distances on CUDA, the twin of csrc/cpu/pairwise_distance_cpu.cpp: the Gram
// matrix by one GEMM (ATen's, cuBLAS underneath), then an elementwise kernel that
// turns it into distances and recomputes exactly, from the rows, every entry whose
// Gram form would cancel (d^2 < (|x|^2 + |y|^2) / 8: near pairs, the diagonal), then
// identical rows are settled to identical distances (three small kernels, no sort). The
// backward, as on CPU, is the GEMM form on mean-centered rows: one kernel for the pair
// weights, then one addmm per side (y = x: one in all, on W + W^T), and the close pairs
// (which would cancel there) added in difference form. Indexing is 64-bit.
// Device code: pairwise_distance_kernels.cuh; host code on device-agnostic ATen (device.h).
#include "pairwise_distance_cuda.h"

#include "device.h"
#include "pairwise_distance_kernels.cuh"

#include <ATen/Dispatch.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/where.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <algorithm>
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
  at::Tensor norm;  // cosine: |x| as m |x / m| (m: the largest |entry|), finite where |x|^2 overflows
};
Rows prepare(const at::Tensor& x, Metric metric, bool norms = true) {
  const auto ct = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor src = x.to(ct).contiguous();
  if (!norms && metric != Metric::Cosine) return {src, at::Tensor()};  // (the backward's (sq)euclidean rows)
  const at::Tensor sq = src.square().sum(1);
  if (metric != Metric::Cosine) return {src, sq};
  const at::Tensor plain = src / sq.sqrt().clamp_min(kNormEps).unsqueeze(1);
  const at::Tensor m = src.abs().amax(1, /*keepdim=*/true);
  const at::Tensor p = src / m;                 // NaN rows for a zero row: not taken below
  const at::Tensor sp = p.square().sum(1, /*keepdim=*/true);
  const at::Tensor canonical = (m.to(at::kDouble) * sp.to(at::kDouble).sqrt() > kNormEps) &
                               src.isfinite().all(1, /*keepdim=*/true);
  // The norm for F.normalize's Jacobian (normalize_backward): from the rows over their
  // largest entry, so that an fp32 row of norm 1e20 does not get 1 / inf, a gradient of 0.
  const at::Tensor safe = (m.to(at::kDouble) * sp.to(at::kDouble).sqrt()).squeeze(1);
  const at::Tensor norm = at::where(m.squeeze(1) > 0, safe, sq.to(at::kDouble).sqrt()).to(ct);
  return {at::where(canonical, p / sp.sqrt(), plain).contiguous(), sq, norm.contiguous()};
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

// The 2-D grid of the (N, M) matrix kernels (TRIPLETOPS_FOR_EACH_ENTRY): x over the
// columns, y over the rows, at most 65535 block rows (each then steps over several rows).
dim3 matrix_grid(int64_t N, int64_t M) {
  const int64_t columns = (M + kThreads - 1) / kThreads;
  TORCH_CHECK(columns <= int64_t(0x7fffffff), "tripletops: distance matrix too large for one launch");
  return dim3(unsigned(columns), unsigned(std::min<int64_t>(N, 65535)));
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
    TRIPLETOPS_LAUNCH((settle_identical_kernel<scalar_t>), matrix_grid(N, M), kThreads, 0,
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
    TRIPLETOPS_LAUNCH((gram_to_distance_kernel<scalar_t>), matrix_grid(N, M), kThreads, 0,
                      current_stream(), dist.data_ptr<scalar_t>(), X.rows.data_ptr<scalar_t>(),
                      Y.rows.data_ptr<scalar_t>(), X.sq_norm.data_ptr<scalar_t>(), Y.sq_norm.data_ptr<scalar_t>(), N,
                      M, D, metric);
  });
  settle_identical(dist, x, y, X, Y, metric);
  return dist.to(x.scalar_type());
}

namespace {

// The backward's inputs: d loss / d dist and the distances (N, M), in x's dtype, and for
// (sq)euclidean the squared norms of the shifted rows, which decide the close pairs.
struct BackwardInputs {
  at::Tensor grad, dist, nx, ny;  // grad: any strides (GradView)
  Metric metric;
  bool symmetric;
  template <typename T>
  const T* norms(const at::Tensor& t) const { return t.defined() ? t.data_ptr<T>() : nullptr; }
  template <typename G>
  GradView<G> grad_view() const { return {grad.data_ptr<G>(), grad.stride(0), grad.stride(1)}; }
};

// The GEMM form's weights W and, when asked, their sums along rows (W.sum(1), (N, 1)) and
// columns (W.sum(0) as (M, 1)).
struct Weights {
  at::Tensor w, row_sum, col_sum;
};

// d loss / d dist -> the GEMM form's weights W, (N, M) in the compute dtype, close pairs
// out; with `symmetric` (y is x) W + W^T (pair_weights_kernel). With `rows` / `cols`, also
// W's row / column sums, from the kernel's per-tile sums (a 32nd of W, summed by ATen).
Weights pair_weights(const BackwardInputs& in, const at::Tensor& like, bool rows = false, bool cols = false) {
  const int64_t N = in.grad.size(0), M = in.grad.size(1);
  Weights out{at::empty({N, M}, like.options()), {}, {}};
  const dim3 grid(unsigned((M + kWeightTile - 1) / kWeightTile), unsigned((N + kWeightTile - 1) / kWeightTile));
  TORCH_CHECK(grid.y <= 65535u, "tripletops: distance matrix too large for one launch");
  const at::Tensor row_part = rows ? at::empty({N, int64_t(grid.x)}, like.options()) : at::Tensor();
  const at::Tensor col_part = cols ? at::empty({M, int64_t(grid.y)}, like.options()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.grad.scalar_type(), "pairwise_distance_weights", [&] {
    using G = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(out.w.scalar_type(), "pairwise_distance_weights", [&] {
      TRIPLETOPS_LAUNCH((pair_weights_kernel<G, scalar_t>), grid, dim3(kWeightTile, 8), 0, current_stream(),
                        in.grad_view<G>(), in.dist.data_ptr<G>(), in.norms<scalar_t>(in.nx),
                        in.norms<scalar_t>(in.ny), N, M, in.metric, in.symmetric, out.w.data_ptr<scalar_t>(),
                        rows ? row_part.data_ptr<scalar_t>() : nullptr, cols ? col_part.data_ptr<scalar_t>() : nullptr);
    });
  });
  if (rows) out.row_sum = row_part.sum(1, /*keepdim=*/true);
  if (cols) out.col_sum = col_part.sum(1, /*keepdim=*/true);
  return out;
}

// Adds the close pairs' terms to g (the gradient of x's rows, or with `columns` of y's) in
// difference form (close_pairs_kernel), on the rows as they are.
void add_close_pairs(const BackwardInputs& in, const at::Tensor& x, const at::Tensor& y, bool columns, at::Tensor& g) {
  const int64_t N = in.grad.size(0), M = in.grad.size(1), D = x.size(1);
  constexpr int64_t kRowsPerBlock = 8;  // as in the kernel
  const int64_t rows = columns ? M : N;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.grad.scalar_type(), "pairwise_distance_close", [&] {
    using G = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "pairwise_distance_close", [&] {
      TRIPLETOPS_LAUNCH((close_pairs_kernel<G, scalar_t>), unsigned((rows + kRowsPerBlock - 1) / kRowsPerBlock),
                        kRowsPerBlock * 32, 0, current_stream(), in.grad_view<G>(), in.dist.data_ptr<G>(),
                        in.norms<scalar_t>(in.nx), in.norms<scalar_t>(in.ny), x.data_ptr<scalar_t>(),
                        y.data_ptr<scalar_t>(), N, M, D, in.metric, in.symmetric, columns, g.data_ptr<scalar_t>());
    });
  });
}

// F.normalize's Jacobian applied to -g row by row, in `dtype` (normalize_backward_kernel).
at::Tensor normalize_backward(const at::Tensor& g, const Rows& R, at::ScalarType dtype) {
  const int64_t N = g.size(0), D = g.size(1);
  at::Tensor out = at::empty({N, D}, g.options().dtype(dtype));
  constexpr int64_t kRowsPerBlock = 8;  // as in the kernel
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "pairwise_distance_normalize_backward", [&] {
    using T = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "pairwise_distance_normalize_backward", [&] {
      TRIPLETOPS_LAUNCH((normalize_backward_kernel<T, scalar_t>), unsigned((N + kRowsPerBlock - 1) / kRowsPerBlock),
                        kRowsPerBlock * 32, 0, current_stream(), g.data_ptr<T>(), R.rows.data_ptr<T>(),
                        R.norm.data_ptr<T>(), N, D, out.data_ptr<scalar_t>());
    });
  });
  return out;
}

void check_backward_input(const at::Tensor& t, const char* name, const at::Tensor& x, int64_t N, int64_t M) {
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == N && t.size(1) == M && t.device() == x.device() &&
                        at::isFloatingType(t.scalar_type()),
                    "tripletops.pairwise_distance_backward: ", name, " must be a floating (", N, ", ", M,
                    ") tensor on ", x.device(), ", got shape ", t.sizes(), ", dtype ", t.scalar_type(), " on ",
                    t.device());
}

}  // namespace

// The gradients by the GEMM form, as on CPU, in few launches: one kernel for the weights
// W (for y = x, W + W^T, so that one GEMM covers both sides), then
// (d loss / d dist read with its strides: an expanded gradient is not copied), then
//   (sq)euclidean: g_x = X_c * rowsum(W) - W Y_c (one addmm; rowsum(W) from the weights
//     kernel's per-tile sums, a 32nd of W, not two more passes over it), on rows shifted by x's mean
//     (the sum is translation invariant; far from the origin it would cancel otherwise),
//     and the close pairs, left out of W, added in difference form (one kernel per side);
//   cosine: F.normalize's Jacobian applied to -W U, one kernel per side.
std::tuple<at::Tensor, at::Tensor> pairwise_distance_backward_cuda(const at::Tensor& grad, const at::Tensor& x,
                                                                   const c10::optional<at::Tensor>& y,
                                                                   const at::Tensor& dist,
                                                                   c10::string_view metric_name) {
  check_xy(x, y);
  const int64_t N = x.size(0), M = y.has_value() ? y->size(0) : N;
  check_backward_input(grad, "grad", x, N, M);
  check_backward_input(dist, "dist", x, N, M);
  const DeviceGuard guard(x.device());
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const Metric metric = parse_metric(metric_name);
  const bool self = !y.has_value(), cosine = metric == Metric::Cosine;
  const Rows X = prepare(x, metric, /*norms=*/cosine);
  const Rows Y = self ? X : prepare(*y, metric, /*norms=*/cosine);
  BackwardInputs in{grad.to(x.scalar_type()), dist.to(x.scalar_type()).contiguous(), {}, {}, metric, self};
  if (cosine) {
    const at::Tensor W = pair_weights(in, X.rows).w;
    const at::Tensor gx = normalize_backward(W.mm(Y.rows), X, x.scalar_type());
    if (self) return {gx, at::empty({0}, x.options())};
    return {gx, normalize_backward(W.t().mm(X.rows), Y, y->scalar_type())};
  }
  const at::Tensor mu = X.rows.mean(0);
  const at::Tensor Xc = X.rows - mu, Yc = self ? Xc : Y.rows - mu;
  in.nx = Xc.square().sum(1);
  in.ny = self ? in.nx : Yc.square().sum(1);
  const Weights W = pair_weights(in, X.rows, /*rows=*/true, /*cols=*/!self);
  at::Tensor gx = at::addmm(Xc * W.row_sum, W.w, Yc, /*beta=*/1, /*alpha=*/-1);
  add_close_pairs(in, X.rows, Y.rows, /*columns=*/false, gx);
  if (self) return {gx.to(x.scalar_type()), at::empty({0}, x.options())};
  at::Tensor gy = at::addmm(Yc * W.col_sum, W.w.t(), Xc, /*beta=*/1, /*alpha=*/-1);
  add_close_pairs(in, X.rows, Y.rows, /*columns=*/true, gy);
  return {gx.to(x.scalar_type()), gy.to(y->scalar_type())};
}

}  // namespace cuda
}  // namespace tripletops

TORCH_LIBRARY_IMPL(TRIPLETOPS_CUDA_LIBRARY, TRIPLETOPS_CUDA_KEY, m) {
  m.impl("pairwise_distance", &tripletops::cuda::pairwise_distance_cuda);
  m.impl("pairwise_distance_backward", &tripletops::cuda::pairwise_distance_backward_cuda);
}
