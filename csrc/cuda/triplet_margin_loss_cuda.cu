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
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <tuple>

namespace tripletops {
namespace cuda {
namespace {

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
  // With a reduction: the loss (input dtype) from the kernel's last block, whose ticket
  // counter starts at 0. Forward: 2 launches (the counter's fill and the kernel).
  const bool reduce = reduction != Reduction::None;
  at::Tensor out = reduce ? at::empty({}, A.options()) : at::Tensor();
  at::Tensor counter = reduce ? at::zeros({1}, A.options().dtype(at::kInt)) : at::Tensor();
  const Stream stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, A.scalar_type(), "triplet_margin_loss_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    TRIPLETOPS_LAUNCH((triplet_forward_kernel<scalar_t, acc_t>), blocks_for(N), kWarp * kTripletWarpsPerBlock, 0, stream,
        A.data_ptr<scalar_t>(), P.data_ptr<scalar_t>(), N_.data_ptr<scalar_t>(), N, D, metric, swap, margin,
        loss.data_ptr<acc_t>(), d_ap.data_ptr<acc_t>(), d_an.data_ptr<acc_t>(), swap ? d_pn.data_ptr<acc_t>() : nullptr,
        reduction, reduce ? reinterpret_cast<unsigned*>(counter.data_ptr<int32_t>()) : nullptr,
        reduce ? out.data_ptr<scalar_t>() : nullptr);
  });
  return {reduce ? out : loss.to(anchor.scalar_type()), d_ap, d_an, d_pn};
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
  // The upstream gradient in the loss's dtype: (N,) for "none", else one value; any stride.
  const at::Tensor g = reduction == Reduction::None ? grad.to(A.scalar_type()).reshape({N})
                                                    : grad.to(A.scalar_type()).reshape({});
  // Backward: 1 launch ("mean_nonzero": 2, its denominator counted first), plus the
  // gradients' conversion for halves.
  at::Tensor count = reduction == Reduction::MeanNonzero ? at::empty({1}, A.options().dtype(at::kLong)) : at::Tensor();
  const auto acc_opts = A.options().dtype(comp);
  at::Tensor ga = at::empty({N, D}, acc_opts), gp = at::empty({N, D}, acc_opts), gn = at::empty({N, D}, acc_opts);
  const Stream stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, A.scalar_type(), "triplet_margin_loss_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* pn = swap ? dpn.data_ptr<acc_t>() : nullptr;
    if (count.defined())
      TRIPLETOPS_LAUNCH((triplet_count_kernel<acc_t>), 1u, unsigned(kReduceThreads), 0, stream, dap.data_ptr<acc_t>(),
                        dan.data_ptr<acc_t>(), pn, swap, margin, N, count.data_ptr<int64_t>());
    TRIPLETOPS_LAUNCH((triplet_backward_kernel<scalar_t, acc_t>), blocks_for(N), kWarp * kTripletWarpsPerBlock, 0, stream,
        A.data_ptr<scalar_t>(), P.data_ptr<scalar_t>(), N_.data_ptr<scalar_t>(), N, D, metric, swap, margin,
        dap.data_ptr<acc_t>(), dan.data_ptr<acc_t>(), pn, g.data_ptr<scalar_t>(), g.dim() == 0 ? 0 : g.stride(0),
        reduction, count.defined() ? count.data_ptr<int64_t>() : nullptr, ga.data_ptr<acc_t>(), gp.data_ptr<acc_t>(),
        gn.data_ptr<acc_t>());
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
