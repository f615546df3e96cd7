// The CUDA pairwise_distance kernels, callable from the other CUDA ops (the loss family
// builds its (B, B) distance matrix and its gradient with them), as csrc/cpu's
// pairwise_distance_cpu.h is for the CPU ones.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>
#include <c10/util/string_view.h>

#include <tuple>

namespace tripletops {
namespace cuda {

// (N, D), (M, D) or None (y = x) -> (N, M) distances in x's dtype.
at::Tensor pairwise_distance_cuda(const at::Tensor& x, const c10::optional<at::Tensor>& y,
                                  c10::string_view metric);

// -> (grad_x, grad_y); grad_y is empty when y is None (its part is folded into grad_x).
std::tuple<at::Tensor, at::Tensor> pairwise_distance_backward_cuda(const at::Tensor& grad, const at::Tensor& x,
                                                                   const c10::optional<at::Tensor>& y,
                                                                   const at::Tensor& dist, c10::string_view metric);

}  // namespace cuda
}  // namespace tripletops
