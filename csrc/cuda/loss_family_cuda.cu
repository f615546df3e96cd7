// Batch-all, semi-hard and contrastive losses on CUDA, the twins of
// csrc/cpu/loss_family_cpu.cpp: the batch's (B, B) distance matrix from the CUDA
// pairwise_distance kernel (float64 for batch-all and semi-hard, as on CPU: they sum small
// differences of distances), each anchor's row reduced by one block, and one block that
// reduces the rows to the loss, on the device (no host sync). The (B, B) distances are
// returned for the backward, which takes the gradient to the distances and then, through
// pairwise_distance's backward, to the embeddings.
//
// Memory is O(B^2), never B^3: batch-all and semi-hard sort each anchor's negatives
// (and, for batch-all's backward, its positives) with at::sort, a segmented sort, into
// (B, B) buffers, plus batch-all's (B, B) prefix sums.
// Device code: loss_family_kernels.cuh; host code on device-agnostic ATen (device.h).
#include "device.h"
#include "loss_family_kernels.cuh"
#include "pairwise_distance_cuda.h"

#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/all.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/isfinite.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <tuple>

namespace tripletops {
namespace cuda {
namespace {

constexpr int kElementThreads = 256;  // one thread per entry of the (B, B) matrix

unsigned entry_blocks(int64_t B) {
  const int64_t blocks = (B * B + kElementThreads - 1) / kElementThreads;
  TORCH_CHECK(blocks <= int64_t(0x7fffffff), "tripletops: batch too large for one launch, B = ", B);
  return unsigned(blocks);
}
unsigned row_blocks(int64_t B) {
  TORCH_CHECK(B <= int64_t(0x7fffffff), "tripletops: batch too large for one launch, B = ", B);
  return unsigned(B);
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() && t.numel() > 0 ? t.data_ptr<T>() : nullptr;
}

void check_batch(const at::Tensor& embeddings, const at::Tensor& labels) {
  check_mining_inputs(embeddings, labels, c10::nullopt, c10::nullopt, kDeviceType);
}

Denominator denominator(Reduction r) {
  return r == Reduction::Sum ? Denominator::One : r == Reduction::Mean ? Denominator::Count : Denominator::Nonzero;
}

// out[0] = the loss, out[1] = d loss / d (each term) when grad is given; (2,) float64.
at::Tensor family_total(const at::Tensor& stats, Denominator den, const at::Tensor& grad) {
  at::Tensor out = at::zeros({2}, stats.options());
  TRIPLETOPS_LAUNCH(family_total_kernel, 1, kFamilyThreads, 0, current_stream(), stats.data_ptr<double>(),
                    stats.size(0), den, ptr_or_null<double>(grad), out.data_ptr<double>());
  return out;
}

// The loss as a 0-dim tensor of the embeddings' dtype (a copy: never a view of `out`).
at::Tensor loss_of(const at::Tensor& out, const at::Tensor& embeddings) {
  return out.select(0, 0).to(embeddings.scalar_type(), /*non_blocking=*/false, /*copy=*/true);
}

// Each anchor's negatives' distances, ascending (ties in column order: a stable sort),
// their columns and prefix sums, and its positives' distances, ascending; each (B, B),
// +inf past the anchor's count. Only what is asked for.
struct LabelSorted {
  at::Tensor neg, neg_column, neg_prefix, pos;
};
LabelSorted sort_by_label(const at::Tensor& dist, const at::Tensor& lab, bool prefix, bool pos, bool column) {
  const int64_t B = dist.size(0);
  at::Tensor neg_key = at::empty_like(dist), pos_key = pos ? at::empty_like(dist) : at::Tensor();
  TRIPLETOPS_LAUNCH(split_by_label_kernel, entry_blocks(B), kElementThreads, 0, current_stream(),
                    dist.data_ptr<double>(), labels_view(lab), B, neg_key.data_ptr<double>(),
                    pos ? pos_key.data_ptr<double>() : nullptr);
  LabelSorted s;
  std::tie(s.neg, s.neg_column) = at::sort(neg_key, c10::optional<bool>(true), /*dim=*/1, /*descending=*/false);
  if (!column) s.neg_column = at::Tensor();  // (B, B) int64 freed now, not at the op's end
  if (pos) s.pos = std::get<0>(at::sort(pos_key, c10::optional<bool>(true), /*dim=*/1, /*descending=*/false));
  if (prefix) {
    s.neg_prefix = at::empty_like(s.neg);
    TRIPLETOPS_LAUNCH(row_prefix_sum_kernel, row_blocks(B), kWarp, 0, current_stream(), s.neg.data_ptr<double>(), B,
                      s.neg_prefix.data_ptr<double>());
  }
  return s;
}

// The (B, B) float64 distances and packed labels the batch-all / semi-hard kernels take.
struct Batch {
  at::Tensor dist, labels;
  int64_t B;
};
Batch batch_of(const at::Tensor& dist, const at::Tensor& labels) {
  return {dist.contiguous(), pack_labels(labels), dist.size(0)};
}

// ---- batch-all ------------------------------------------------------------------------

at::Tensor batch_all_stats(const Batch& b, const LabelSorted& s, double margin, bool soft) {
  at::Tensor stats = at::empty({b.B, kStats}, b.dist.options());
  TRIPLETOPS_LAUNCH(batch_all_stats_kernel, row_blocks(b.B), kFamilyThreads, 0, current_stream(),
                    b.dist.data_ptr<double>(), labels_view(b.labels), ptr_or_null<double>(s.neg),
                    ptr_or_null<double>(s.neg_prefix), b.B, margin, soft, stats.data_ptr<double>());
  return stats;
}

std::tuple<at::Tensor, at::Tensor> batch_all_loss_cuda(const at::Tensor& embeddings, const at::Tensor& labels,
                                                       double margin, c10::string_view metric, bool soft_margin,
                                                       c10::string_view reduction_name) {
  check_batch(embeddings, labels);
  check_margin(margin, "margin");
  const Reduction reduction = parse_reduction(reduction_name);
  TORCH_CHECK_VALUE(reduction != Reduction::None,
                    "tripletops: batch_all_loss has no reduction 'none' (B^3 triplets); use mean, mean_nonzero or sum");
  const DeviceGuard guard(embeddings.device());
  at::Tensor dist = pairwise_distance_cuda(embeddings.to(at::kDouble), c10::nullopt, metric);
  const Batch b = batch_of(dist, labels);
  const LabelSorted s = soft_margin ? LabelSorted() : sort_by_label(b.dist, b.labels, /*prefix=*/true, /*pos=*/false,
                                                                  /*column=*/false);
  const at::Tensor out = family_total(batch_all_stats(b, s, margin, soft_margin), denominator(reduction), {});
  return {loss_of(out, embeddings), dist};
}

at::Tensor batch_all_loss_backward_cuda(const at::Tensor& grad, const at::Tensor& embeddings, const at::Tensor& labels,
                                        const at::Tensor& dist, double margin, c10::string_view metric,
                                        bool soft_margin, c10::string_view reduction_name) {
  check_batch(embeddings, labels);
  check_saved("batch_all_loss", grad, 1, dist, embeddings, at::kDouble, kDeviceType);
  const Reduction reduction = parse_reduction(reduction_name);
  const DeviceGuard guard(embeddings.device());
  const Batch b = batch_of(dist, labels);
  const LabelSorted s = soft_margin ? LabelSorted() : sort_by_label(b.dist, b.labels, /*prefix=*/true, /*pos=*/true,
                                                                  /*column=*/false);
  const at::Tensor g = grad.to(at::kDouble).contiguous();
  const at::Tensor out = family_total(batch_all_stats(b, s, margin, soft_margin), denominator(reduction), g);
  at::Tensor grad_dist = at::zeros({b.B, b.B}, b.dist.options());
  TRIPLETOPS_LAUNCH(batch_all_grad_kernel, row_blocks(b.B), kFamilyThreads, 0, current_stream(),
                    b.dist.data_ptr<double>(), labels_view(b.labels), ptr_or_null<double>(s.neg),
                    ptr_or_null<double>(s.pos), b.B, margin, soft_margin, out.data_ptr<double>() + 1,
                    grad_dist.data_ptr<double>());
  auto [gx, unused] = pairwise_distance_backward_cuda(grad_dist, embeddings.to(at::kDouble), c10::nullopt, b.dist,
                                                      metric);
  return gx.to(embeddings.scalar_type());
}

// ---- semi-hard ------------------------------------------------------------------------

at::Tensor semi_hard_stats(const Batch& b, const LabelSorted& s, double margin) {
  at::Tensor stats = at::empty({b.B, kStats}, b.dist.options());
  TRIPLETOPS_LAUNCH(semi_hard_stats_kernel, row_blocks(b.B), kFamilyThreads, 0, current_stream(),
                    b.dist.data_ptr<double>(), labels_view(b.labels), s.neg.data_ptr<double>(), b.B, margin,
                    stats.data_ptr<double>());
  return stats;
}

std::tuple<at::Tensor, at::Tensor> semi_hard_loss_cuda(const at::Tensor& embeddings, const at::Tensor& labels,
                                                       double margin, c10::string_view metric) {
  check_batch(embeddings, labels);
  check_margin(margin, "margin");
  const DeviceGuard guard(embeddings.device());
  at::Tensor dist = pairwise_distance_cuda(embeddings.to(at::kDouble), c10::nullopt, metric);
  const Batch b = batch_of(dist, labels);
  const LabelSorted s = sort_by_label(b.dist, b.labels, /*prefix=*/false, /*pos=*/false, /*column=*/false);
  const at::Tensor out = family_total(semi_hard_stats(b, s, margin), Denominator::Count, {});
  return {loss_of(out, embeddings), dist};
}

at::Tensor semi_hard_loss_backward_cuda(const at::Tensor& grad, const at::Tensor& embeddings, const at::Tensor& labels,
                                        const at::Tensor& dist, double margin, c10::string_view metric) {
  check_batch(embeddings, labels);
  check_saved("semi_hard_loss", grad, 1, dist, embeddings, at::kDouble, kDeviceType);
  const DeviceGuard guard(embeddings.device());
  const Batch b = batch_of(dist, labels);
  const LabelSorted s = sort_by_label(b.dist, b.labels, /*prefix=*/false, /*pos=*/false, /*column=*/true);
  const at::Tensor g = grad.to(at::kDouble).contiguous();
  const at::Tensor out = family_total(semi_hard_stats(b, s, margin), Denominator::Count, g);
  at::Tensor grad_dist = at::zeros({b.B, b.B}, b.dist.options());
  TRIPLETOPS_LAUNCH(semi_hard_grad_kernel, row_blocks(b.B), kFamilyThreads, 0, current_stream(),
                    b.dist.data_ptr<double>(), labels_view(b.labels), s.neg.data_ptr<double>(),
                    s.neg_column.data_ptr<int64_t>(), b.B, margin, out.data_ptr<double>() + 1,
                    grad_dist.data_ptr<double>());
  auto [gx, unused] = pairwise_distance_backward_cuda(grad_dist, embeddings.to(at::kDouble), c10::nullopt, b.dist,
                                                      metric);
  return gx.to(embeddings.scalar_type());
}

// ---- contrastive ----------------------------------------------------------------------

// Rows in the compute dtype (fp32 for halves, fp64 for fp64), as the CPU op takes them,
// and which rows are finite.
struct PairInputs {
  at::Tensor x, finite, labels;
  int64_t B;
};
PairInputs pair_inputs(const at::Tensor& embeddings, const at::Tensor& labels) {
  const at::Tensor x = embeddings.to(embeddings.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  return {x, at::isfinite(x).all(1).contiguous(), pack_labels(labels), x.size(0)};
}

at::Tensor contrastive_stats(const PairInputs& in, const at::Tensor& dist, double pm, double nm) {
  at::Tensor stats = at::empty({in.B, kStats}, dist.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(dist.scalar_type(), "contrastive_loss_cuda", [&] {
    TRIPLETOPS_LAUNCH((contrastive_stats_kernel<scalar_t>), row_blocks(in.B), kFamilyThreads, 0, current_stream(),
                      dist.data_ptr<scalar_t>(), labels_view(in.labels), in.finite.data_ptr<bool>(), in.B, pm,
                      nm, stats.data_ptr<double>());
  });
  return stats;
}

std::tuple<at::Tensor, at::Tensor> contrastive_loss_cuda(const at::Tensor& embeddings, const at::Tensor& labels,
                                                         double pos_margin, double neg_margin, c10::string_view metric,
                                                         c10::string_view reduction_name) {
  check_batch(embeddings, labels);
  check_margin(pos_margin, "pos_margin");
  check_margin(neg_margin, "neg_margin");
  const Reduction reduction = parse_reduction(reduction_name);
  const DeviceGuard guard(embeddings.device());
  const PairInputs in = pair_inputs(embeddings, labels);
  at::Tensor dist = pairwise_distance_cuda(in.x, c10::nullopt, metric).contiguous();
  if (reduction != Reduction::None) {
    const at::Tensor out = family_total(contrastive_stats(in, dist, pos_margin, neg_margin), denominator(reduction), {});
    return {loss_of(out, embeddings), dist};
  }
  at::Tensor terms = at::empty({in.B * (in.B - 1) / 2}, dist.options());
  AT_DISPATCH_FLOATING_TYPES(dist.scalar_type(), "contrastive_loss_cuda", [&] {
    TRIPLETOPS_LAUNCH((contrastive_pairs_kernel<scalar_t>), entry_blocks(in.B), kElementThreads, 0, current_stream(),
                      dist.data_ptr<scalar_t>(), labels_view(in.labels), in.finite.data_ptr<bool>(), in.B,
                      pos_margin, neg_margin, terms.data_ptr<scalar_t>(), nullptr, nullptr, nullptr);
  });
  return {terms.to(embeddings.scalar_type()), dist};
}

at::Tensor contrastive_loss_backward_cuda(const at::Tensor& grad, const at::Tensor& embeddings,
                                          const at::Tensor& labels, const at::Tensor& dist, double pos_margin,
                                          double neg_margin, c10::string_view metric,
                                          c10::string_view reduction_name) {
  check_batch(embeddings, labels);
  const Reduction reduction = parse_reduction(reduction_name);
  const DeviceGuard guard(embeddings.device());
  const PairInputs in = pair_inputs(embeddings, labels);
  check_saved("contrastive_loss", grad, reduction == Reduction::None ? in.B * (in.B - 1) / 2 : 1, dist, embeddings,
              in.x.scalar_type(), kDeviceType);
  const at::Tensor d = dist.contiguous();
  const at::Tensor g = grad.to(at::kDouble).contiguous();
  // The reduction's scale (its denominator is a count, held constant, as autograd would).
  at::Tensor out;
  if (reduction != Reduction::None)
    out = family_total(contrastive_stats(in, d, pos_margin, neg_margin), denominator(reduction), g);
  at::Tensor grad_dist = at::empty({in.B, in.B}, d.options());
  AT_DISPATCH_FLOATING_TYPES(d.scalar_type(), "contrastive_loss_backward_cuda", [&] {
    TRIPLETOPS_LAUNCH((contrastive_pairs_kernel<scalar_t>), entry_blocks(in.B), kElementThreads, 0, current_stream(),
                      d.data_ptr<scalar_t>(), labels_view(in.labels), in.finite.data_ptr<bool>(), in.B,
                      pos_margin, neg_margin, static_cast<scalar_t*>(nullptr),
                      reduction == Reduction::None ? ptr_or_null<double>(g) : nullptr,
                      out.defined() ? out.data_ptr<double>() + 1 : nullptr, grad_dist.data_ptr<scalar_t>());
  });
  auto [gx, unused] = pairwise_distance_backward_cuda(grad_dist, in.x, c10::nullopt, d, metric);
  return gx.to(embeddings.scalar_type());
}

}  // namespace
}  // namespace cuda
}  // namespace tripletops

TORCH_LIBRARY_IMPL(TRIPLETOPS_CUDA_LIBRARY, TRIPLETOPS_CUDA_KEY, m) {
  m.impl("batch_all_loss", &tripletops::cuda::batch_all_loss_cuda);
  m.impl("batch_all_loss_backward", &tripletops::cuda::batch_all_loss_backward_cuda);
  m.impl("semi_hard_loss", &tripletops::cuda::semi_hard_loss_cuda);
  m.impl("semi_hard_loss_backward", &tripletops::cuda::semi_hard_loss_backward_cuda);
  m.impl("contrastive_loss", &tripletops::cuda::contrastive_loss_cuda);
  m.impl("contrastive_loss_backward", &tripletops::cuda::contrastive_loss_backward_cuda);
}
