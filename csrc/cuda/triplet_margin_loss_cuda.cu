// Explicit (anchor, positive, negative) triplet margin loss on CUDA, the twin of
// csrc/cpu/triplet_margin_loss_cpu.cpp. Device code: triplet_margin_loss_kernels.cuh.
// Host code written against device-agnostic ATen, so that `make cuda-emu` compiles this
// file with g++ and runs the kernels on the CPU (device.h).
#include "device.h"
#include "triplet_margin_loss_kernels.cuh"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/TensorOperators.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/minimum.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <tuple>

namespace tripletops {
namespace cuda {
namespace {

// d(loss)/d(per-triplet loss i), times the upstream gradient: the backward of the
// reduction, as csrc/cpu/rows_cpu.h's reduction_scale (per-triplet losses recomputed
// from the forward's distances, so hinge and mean_nonzero decisions match).
at::Tensor reduction_scale(const at::Tensor& grad, const at::Tensor& loss, Reduction reduction) {
  const auto dbl = loss.options().dtype(at::kDouble);
  const int64_t N = loss.numel();
  // contiguous(): the upstream gradient of loss.sum() is an expanded (stride-0) tensor,
  // and the kernel reads scale[i] for every i (found by the kink test under the emulator).
  if (reduction == Reduction::None) return grad.to(dbl).reshape({N}).contiguous();
  const at::Tensor g = grad.to(dbl).reshape({});
  if (reduction == Reduction::Sum) return g.expand({N}).contiguous();
  if (reduction == Reduction::Mean) return (g / double(N)).expand({N}).contiguous();
  // mean_nonzero: the denominator counts losses > 0, but every triplet gets g / count and
  // its own hinge gradient decides (1 at the kink, where the loss is 0: clamp's convention);
  // an empty denominator gives zero gradients.
  const at::Tensor count = (loss > 0).sum().to(at::kDouble);
  return at::where(count > 0, g / count.clamp_min(1.0), at::zeros_like(g)).expand({N}).contiguous();
}

// As csrc/cpu/rows_cpu.h's reduce_loss, with ATen reductions on the device.
at::Tensor reduce_loss(const at::Tensor& loss, Reduction reduction, at::ScalarType out_dtype) {
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

inline unsigned blocks_for(int64_t N) {
  const int64_t blocks = (N + kTripletWarpsPerBlock - 1) / kTripletWarpsPerBlock;
  TORCH_CHECK(blocks <= int64_t(0x7fffffff), "tripletops: too many triplets for one launch: ", N);
  return unsigned(blocks);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> triplet_margin_loss_cuda(
    const at::Tensor& anchor, const at::Tensor& positive, const at::Tensor& negative, double margin,
    c10::string_view metric_name, bool swap, c10::string_view reduction_name) {
  check_triplets(anchor, positive, negative, kDeviceType);
  const Metric metric = parse_metric(metric_name);
  const Reduction reduction = parse_reduction(reduction_name);
  const DeviceGuard guard(anchor.device());
  const at::Tensor A = anchor.contiguous(), P = positive.contiguous(), N_ = negative.contiguous();
  const int64_t N = A.size(0), D = A.size(1);
  const auto comp = A.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = A.options().dtype(comp);
  at::Tensor loss = at::empty({N}, opts), d_ap = at::empty({N}, opts), d_an = at::empty({N}, opts);
  at::Tensor d_pn = at::empty({swap ? N : 0}, opts);
  const Stream stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, A.scalar_type(), "triplet_margin_loss_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    TRIPLETOPS_LAUNCH((triplet_forward_kernel<scalar_t, acc_t>), blocks_for(N), kWarp * kTripletWarpsPerBlock, 0, stream,
        A.data_ptr<scalar_t>(), P.data_ptr<scalar_t>(), N_.data_ptr<scalar_t>(), N, D, metric, swap, margin,
        loss.data_ptr<acc_t>(), d_ap.data_ptr<acc_t>(), d_an.data_ptr<acc_t>(), swap ? d_pn.data_ptr<acc_t>() : nullptr);
  });
  return {reduce_loss(loss, reduction, anchor.scalar_type()), d_ap, d_an, d_pn};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> triplet_margin_loss_backward_cuda(
    const at::Tensor& grad, const at::Tensor& anchor, const at::Tensor& positive, const at::Tensor& negative,
    const at::Tensor& d_ap, const at::Tensor& d_an, const at::Tensor& d_pn, double margin,
    c10::string_view metric_name, bool swap, c10::string_view reduction_name) {
  check_triplets(anchor, positive, negative, kDeviceType);
  const Metric metric = parse_metric(metric_name);
  const Reduction reduction = parse_reduction(reduction_name);
  const DeviceGuard guard(anchor.device());
  const at::Tensor A = anchor.contiguous(), P = positive.contiguous(), N_ = negative.contiguous();
  const int64_t N = A.size(0), D = A.size(1);
  const char* op = "triplet_margin_loss";
  check_saved_grad(op, grad, reduction == Reduction::None, N);
  check_saved_rows(op, "d_ap", d_ap, N, A.device());
  check_saved_rows(op, "d_an", d_an, N, A.device());
  check_saved_rows(op, "d_pn", d_pn, swap ? N : 0, A.device());
  const auto comp = A.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor dap = d_ap.to(comp).contiguous(), dan = d_an.to(comp).contiguous();
  const at::Tensor dpn = swap ? d_pn.to(comp).contiguous() : at::Tensor();
  // The per-triplet losses, as the forward formed them (NaN rows only matter through
  // their distances, which are NaN too).
  const at::Tensor neg = swap ? at::minimum(dan, dpn) : dan;
  const at::Tensor loss = (dap - neg + margin).clamp_min(0.0);
  const at::Tensor scale = reduction_scale(grad, loss, reduction);
  const auto acc_opts = A.options().dtype(comp);
  at::Tensor ga = at::empty({N, D}, acc_opts), gp = at::empty({N, D}, acc_opts), gn = at::empty({N, D}, acc_opts);
  const Stream stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, A.scalar_type(), "triplet_margin_loss_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    TRIPLETOPS_LAUNCH((triplet_backward_kernel<scalar_t, acc_t>), blocks_for(N), kWarp * kTripletWarpsPerBlock, 0, stream,
        A.data_ptr<scalar_t>(), P.data_ptr<scalar_t>(), N_.data_ptr<scalar_t>(), N, D, metric, swap, margin,
        dap.data_ptr<acc_t>(), dan.data_ptr<acc_t>(), swap ? dpn.data_ptr<acc_t>() : nullptr,
        scale.data_ptr<double>(), ga.data_ptr<acc_t>(), gp.data_ptr<acc_t>(), gn.data_ptr<acc_t>());
  });
  const auto dtype = anchor.scalar_type();
  return {ga.to(dtype), gp.to(dtype), gn.to(dtype)};
}

}  // namespace
}  // namespace cuda
}  // namespace tripletops

TORCH_LIBRARY_IMPL(TRIPLETOPS_CUDA_LIBRARY, TRIPLETOPS_CUDA_KEY, m) {
  m.impl("triplet_margin_loss", &tripletops::cuda::triplet_margin_loss_cuda);
  m.impl("triplet_margin_loss_backward", &tripletops::cuda::triplet_margin_loss_backward_cuda);
}
