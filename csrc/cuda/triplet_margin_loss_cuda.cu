// Explicit (anchor, positive, negative) triplet margin loss on CUDA, the twin of
// csrc/cpu/triplet_margin_loss_cpu.cpp: one warp per triplet, sums in the opmath type
// (fp32 for halves, fp64 for fp64) reduced with shuffles in a fixed order, and a
// row-aligned backward (every triplet owns its three gradient rows: no atomics, so it
// is deterministic). UNVERIFIED: compiled by `make cuda-check`, never run on a GPU.
#include "../common.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/minimum.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

namespace tripletops {
namespace cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 4;

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;  // lane 0 holds the sum
}

// One triplet's sums: |a-p|^2, |a-n|^2, |p-n|^2 (difference form: exact), the six dot
// products (cosine and the cosine gradient), and sum (a+p+n)*0 (NaN when a row is not finite).
struct Sums {
  double ap2, an2, pn2, aa, pp, nn, ap, an, pn, zero;
};

template <typename scalar_t, typename acc_t>
__device__ Sums triplet_sums(const scalar_t* a, const scalar_t* p, const scalar_t* n, int64_t D, int lane) {
  acc_t s[10] = {};
  for (int64_t k = lane; k < D; k += kWarp) {
    const acc_t av = a[k], pv = p[k], nv = n[k];
    const acc_t dap = av - pv, dan = av - nv, dpn = pv - nv;
    s[0] += dap * dap, s[1] += dan * dan, s[2] += dpn * dpn;
    s[3] += av * av, s[4] += pv * pv, s[5] += nv * nv;
    s[6] += av * pv, s[7] += av * nv, s[8] += pv * nv;
    s[9] += (av + pv + nv) * acc_t(0);
  }
  for (int j = 0; j < 10; ++j) s[j] = warp_sum(s[j]);
  return {double(s[0]), double(s[1]), double(s[2]), double(s[3]), double(s[4]),
          double(s[5]), double(s[6]), double(s[7]), double(s[8]), double(s[9])};
}

__device__ __forceinline__ double distance_of(Metric metric, double diff_sq, double dot, double x_sq, double y_sq) {
  if (metric == Metric::SqEuclidean) return diff_sq;
  if (metric == Metric::Euclidean) return sqrt(diff_sq);
  const double eps = kNormEps, nx = fmax(sqrt(x_sq), eps), ny = fmax(sqrt(y_sq), eps);
  return 1.0 - dot / (nx * ny);
}

template <typename scalar_t, typename acc_t>
__global__ void triplet_forward_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ p,
                                       const scalar_t* __restrict__ n, int64_t N, int64_t D, Metric metric, bool swap,
                                       double margin, acc_t* loss, acc_t* d_ap, acc_t* d_an, acc_t* d_pn) {
  const int64_t i = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (i >= N) return;  // whole warps leave together: the shuffles below stay full-warp
  const Sums s = triplet_sums<scalar_t, acc_t>(a + i * D, p + i * D, n + i * D, D, lane);
  if (lane != 0) return;
  const acc_t dap = acc_t(distance_of(metric, s.ap2, s.ap, s.aa, s.pp));
  const acc_t dan = acc_t(distance_of(metric, s.an2, s.an, s.aa, s.nn));
  acc_t neg = dan;
  d_ap[i] = dap, d_an[i] = dan;
  if (swap) {
    const acc_t dpn = acc_t(distance_of(metric, s.pn2, s.pn, s.pp, s.nn));
    d_pn[i] = dpn;
    if (dpn < neg) neg = dpn;
  }
  loss[i] = s.zero == 0.0 ? relu_nan(dap - neg + acc_t(margin)) : acc_t(NAN);
}

// d(loss)/d(per-triplet loss i), times the upstream gradient: the backward of the
// reduction, as csrc/cpu/rows_cpu.h's reduction_scale (per-triplet losses recomputed
// from the forward's distances, so hinge and mean_nonzero decisions match).
at::Tensor reduction_scale_cuda(const at::Tensor& grad, const at::Tensor& loss, Reduction reduction) {
  const auto dbl = loss.options().dtype(at::kDouble);
  const int64_t N = loss.numel();
  if (reduction == Reduction::None) return grad.to(dbl).reshape({N});
  const at::Tensor g = grad.to(dbl).reshape({});
  if (reduction == Reduction::Sum) return g.expand({N}).contiguous();
  if (reduction == Reduction::Mean) return (g / double(N)).expand({N}).contiguous();
  const at::Tensor nonzero = loss > 0;
  const at::Tensor count = nonzero.sum().to(at::kDouble).clamp_min(1.0);
  return at::where(nonzero, g / count, at::zeros_like(g)).contiguous();
}

// As csrc/cpu/rows_cpu.h's reduce_loss, with ATen reductions on the device.
at::Tensor reduce_loss_cuda(const at::Tensor& loss, Reduction reduction, at::ScalarType out_dtype) {
  if (reduction == Reduction::None) return loss.to(out_dtype);
  const at::Tensor total = loss.to(at::kDouble).sum();
  if (reduction == Reduction::Sum) return total.to(out_dtype);
  const at::Tensor count =
      reduction == Reduction::Mean ? at::full({}, double(loss.numel()), total.options()) : (loss > 0).sum().to(at::kDouble);
  // An empty denominator gives exactly 0, but a NaN among the items still shows.
  const at::Tensor value = at::where(count > 0, total / count.clamp_min(1.0),
                                     at::where(total.isnan(), total, at::zeros_like(total)));
  return value.to(out_dtype);
}

template <typename scalar_t, typename acc_t>
__global__ void triplet_backward_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ p,
                                        const scalar_t* __restrict__ n, int64_t N, int64_t D, Metric metric, bool swap,
                                        double margin, const acc_t* d_ap, const acc_t* d_an, const acc_t* d_pn,
                                        const double* scale, acc_t* ga, acc_t* gp, acc_t* gn) {
  const int64_t i = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (i >= N) return;
  const Sums s = triplet_sums<scalar_t, acc_t>(a + i * D, p + i * D, n + i * D, D, lane);
  // Every lane needs the coefficients: broadcast lane 0's sums.
  const double aa = __shfl_sync(0xffffffffu, s.aa, 0), pp = __shfl_sync(0xffffffffu, s.pp, 0);
  const double nn = __shfl_sync(0xffffffffu, s.nn, 0), ap = __shfl_sync(0xffffffffu, s.ap, 0);
  const double an = __shfl_sync(0xffffffffu, s.an, 0), pn = __shfl_sync(0xffffffffu, s.pn, 0);
  const bool use_pn = swap && d_pn[i] < d_an[i];
  const acc_t neg = use_pn ? d_pn[i] : d_an[i];
  const double w = scale[i] * double(triplet_term_grad(d_ap[i] - neg, acc_t(margin), /*soft_margin=*/false));
  const PairGrad g1 = pair_grad(metric, double(d_ap[i]), ap, aa, pp).scaled(w);
  const PairGrad g2 = (use_pn ? pair_grad(metric, double(d_pn[i]), pn, pp, nn)
                              : pair_grad(metric, double(d_an[i]), an, aa, nn)).scaled(-w);
  const scalar_t *ar = a + i * D, *pr = p + i * D, *nr = n + i * D;
  acc_t *gar = ga + i * D, *gpr = gp + i * D, *gnr = gn + i * D;
  for (int64_t k = lane; k < D; k += kWarp) {
    const acc_t av = ar[k], pv = pr[k], nv = nr[k];
    const acc_t d1 = av - pv;
    acc_t g_a = acc_t(g1.da) * d1 + acc_t(g1.ea) * pv;
    acc_t g_p = acc_t(g1.db) * d1 + acc_t(g1.eb) * av;
    acc_t g_n;
    if (use_pn) {
      const acc_t d2 = pv - nv;
      g_p += acc_t(g2.da) * d2 + acc_t(g2.ea) * nv;
      g_n = acc_t(g2.db) * d2 + acc_t(g2.eb) * pv;
    } else {
      const acc_t d2 = av - nv;
      g_a += acc_t(g2.da) * d2 + acc_t(g2.ea) * nv;
      g_n = acc_t(g2.db) * d2 + acc_t(g2.eb) * av;
    }
    gar[k] = g_a, gpr[k] = g_p, gnr[k] = g_n;
  }
}

inline unsigned blocks_for(int64_t N) {
  const int64_t blocks = (N + kWarpsPerBlock - 1) / kWarpsPerBlock;
  TORCH_CHECK(blocks <= int64_t(0x7fffffff), "tripletops: too many triplets for one launch: ", N);
  return unsigned(blocks);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> triplet_margin_loss_cuda(
    const at::Tensor& anchor, const at::Tensor& positive, const at::Tensor& negative, double margin,
    c10::string_view metric_name, bool swap, c10::string_view reduction_name) {
  check_triplets(anchor, positive, negative, c10::DeviceType::CUDA);
  const Metric metric = parse_metric(metric_name);
  const Reduction reduction = parse_reduction(reduction_name);
  const c10::cuda::CUDAGuard guard(anchor.device());
  const at::Tensor A = anchor.contiguous(), P = positive.contiguous(), N_ = negative.contiguous();
  const int64_t N = A.size(0), D = A.size(1);
  const auto comp = A.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = A.options().dtype(comp);
  at::Tensor loss = at::empty({N}, opts), d_ap = at::empty({N}, opts), d_an = at::empty({N}, opts);
  at::Tensor d_pn = at::empty({swap ? N : 0}, opts);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, A.scalar_type(), "triplet_margin_loss_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    triplet_forward_kernel<scalar_t, acc_t><<<blocks_for(N), kWarp * kWarpsPerBlock, 0, stream>>>(
        A.data_ptr<scalar_t>(), P.data_ptr<scalar_t>(), N_.data_ptr<scalar_t>(), N, D, metric, swap, margin,
        loss.data_ptr<acc_t>(), d_ap.data_ptr<acc_t>(), d_an.data_ptr<acc_t>(), swap ? d_pn.data_ptr<acc_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {reduce_loss_cuda(loss, reduction, anchor.scalar_type()), d_ap, d_an, d_pn};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> triplet_margin_loss_backward_cuda(
    const at::Tensor& grad, const at::Tensor& anchor, const at::Tensor& positive, const at::Tensor& negative,
    const at::Tensor& d_ap, const at::Tensor& d_an, const at::Tensor& d_pn, double margin,
    c10::string_view metric_name, bool swap, c10::string_view reduction_name) {
  check_triplets(anchor, positive, negative, c10::DeviceType::CUDA);
  const Metric metric = parse_metric(metric_name);
  const Reduction reduction = parse_reduction(reduction_name);
  const c10::cuda::CUDAGuard guard(anchor.device());
  const at::Tensor A = anchor.contiguous(), P = positive.contiguous(), N_ = negative.contiguous();
  const int64_t N = A.size(0), D = A.size(1);
  const auto comp = A.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor dap = d_ap.to(comp).contiguous(), dan = d_an.to(comp).contiguous();
  const at::Tensor dpn = swap ? d_pn.to(comp).contiguous() : at::Tensor();
  // The per-triplet losses, as the forward formed them (NaN rows only matter through
  // their distances, which are NaN too).
  const at::Tensor neg = swap ? at::minimum(dan, dpn) : dan;
  const at::Tensor loss = (dap - neg + margin).clamp_min(0.0);
  const at::Tensor scale = reduction_scale_cuda(grad, loss, reduction);
  const auto acc_opts = A.options().dtype(comp);
  at::Tensor ga = at::empty({N, D}, acc_opts), gp = at::empty({N, D}, acc_opts), gn = at::empty({N, D}, acc_opts);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, A.scalar_type(), "triplet_margin_loss_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    triplet_backward_kernel<scalar_t, acc_t><<<blocks_for(N), kWarp * kWarpsPerBlock, 0, stream>>>(
        A.data_ptr<scalar_t>(), P.data_ptr<scalar_t>(), N_.data_ptr<scalar_t>(), N, D, metric, swap, margin,
        dap.data_ptr<acc_t>(), dan.data_ptr<acc_t>(), swap ? dpn.data_ptr<acc_t>() : nullptr,
        scale.data_ptr<double>(), ga.data_ptr<acc_t>(), gp.data_ptr<acc_t>(), gn.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const auto dtype = anchor.scalar_type();
  return {ga.to(dtype), gp.to(dtype), gn.to(dtype)};
}

}  // namespace
}  // namespace cuda
}  // namespace tripletops

TORCH_LIBRARY_IMPL(tripletops, CUDA, m) {
  m.impl("triplet_margin_loss", &tripletops::cuda::triplet_margin_loss_cuda);
  m.impl("triplet_margin_loss_backward", &tripletops::cuda::triplet_margin_loss_backward_cuda);
}
