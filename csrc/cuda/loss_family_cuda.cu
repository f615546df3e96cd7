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
//
// That is the general path. A batch of B <= kFusedMaxB (1024) takes the fused path
// instead, 3 or 4 launches each way where the general one makes ~20 with its ATen glue: the
// distances straight from the rows, the sorts in shared memory, the reduction in the last
// block, the gradient to the rows in one kernel (loss_family_fused_kernels.cuh). The choice
// depends on B only, so a captured CUDA graph replays the same kernels.
// Device code: loss_family_kernels.cuh, loss_family_fused_kernels.cuh; host code on
// device-agnostic ATen (device.h).
#include "device.h"
#include "loss_family_fused_kernels.cuh"
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

// ---- small batches (B <= kFusedMaxB): the fused kernels ----------------------------------
// Two kernels each way (loss_family_fused_kernels.cuh), plus the counter's fill, and the
// unit rows' kernel under cosine. Up to kSharedSortMaxB, batch-all and semi-hard
// still take their statistics from triplet_family_fused_kernel (rows sorted in shared
// memory), around pairwise_distance's GEMM-based kernels.

bool fused(int64_t B) { return B <= kFusedMaxB; }

enum class FamilyPath { Fused, SharedSort, General };
// `sorted_row`: the statistics sort the whole row in shared memory (semi-hard, and the
// soft margin); batch-all's hinge streams it (batch_all_stream_kernel), with no such limit.
FamilyPath triplet_family_path(int64_t B, bool sorted_row) {
  if (fused(B)) return FamilyPath::Fused;
  if (B <= kSharedSortMaxB &&
      (!sorted_row || sorted_row_bytes(B) + kFusedStaticShared <= max_dynamic_shared_bytes()))
    return FamilyPath::SharedSort;
  return FamilyPath::General;
}

// The rows the fused kernels read: the embeddings (contiguous), and for cosine their unit
// rows in double.
struct FusedRows {
  at::Tensor x, unit, unit_ok, sq_norm;
  Metric metric;
};
FusedRows fused_rows(const at::Tensor& embeddings, Metric metric) {
  FusedRows r{embeddings.contiguous(), {}, {}, {}, metric};
  if (metric != Metric::Cosine) return r;
  const int64_t B = r.x.size(0), D = r.x.size(1);
  r.unit = at::empty({B, D}, r.x.options().dtype(at::kDouble));
  r.unit_ok = at::empty({B}, r.x.options().dtype(at::kByte));
  r.sq_norm = at::empty({B}, r.x.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, r.x.scalar_type(), "family_unit_rows", [&] {
    TRIPLETOPS_LAUNCH((family_unit_rows_kernel<scalar_t>), unsigned((B + kFamilyWarps - 1) / kFamilyWarps),
                      kFamilyThreads, 0, current_stream(), r.x.data_ptr<scalar_t>(), B, D,
                      r.unit.data_ptr<double>(), r.unit_ok.data_ptr<uint8_t>(), r.sq_norm.data_ptr<double>());
  });
  return r;
}

// The (B, B) distances, in `dtype` (double, or contrastive's compute dtype).
at::Tensor fused_distances(const FusedRows& r, at::ScalarType dtype) {
  const int64_t B = r.x.size(0), D = r.x.size(1);
  at::Tensor dist = at::empty({B, B}, r.x.options().dtype(dtype));
  const unsigned tiles = unsigned((B + kDistTile - 1) / kDistTile);
  const dim3 grid(tiles, tiles);
  AT_DISPATCH_FLOATING_TYPES(dtype, "family_distances", [&] {
    using OutT = scalar_t;
    if (r.metric == Metric::Cosine) {
      TRIPLETOPS_LAUNCH((family_distance_kernel<double, OutT>), grid, 256, 0, current_stream(),
                        r.unit.data_ptr<double>(), r.unit_ok.data_ptr<uint8_t>(), B, D, r.metric,
                        dist.data_ptr<OutT>());
      return;
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, r.x.scalar_type(), "family_distances", [&] {
      TRIPLETOPS_LAUNCH((family_distance_kernel<scalar_t, OutT>), grid, 256, 0, current_stream(),
                        r.x.data_ptr<scalar_t>(), static_cast<const uint8_t*>(nullptr), B, D, r.metric,
                        dist.data_ptr<OutT>());
    });
  });
  return dist;
}

// What a fused statistics kernel writes: the loss (forward, `result` a 0-dim tensor of the
// embeddings' dtype), or the scale and, for batch-all / semi-hard, w (backward: `result`
// is the upstream gradient).
struct FusedPass {
  at::Tensor stats, counter, scale, w;
  template <typename scalar_t>
  FusedOut<scalar_t> out(const at::Tensor& result, bool backward) {
    if (!backward) return {result.data_ptr<scalar_t>(), nullptr, nullptr, nullptr};
    return {nullptr, result.data_ptr<scalar_t>(), scale.data_ptr<double>(), w.defined() ? w.data_ptr<double>() : nullptr};
  }
  unsigned* ticket() { return reinterpret_cast<unsigned*>(counter.data_ptr<int32_t>()); }
};
FusedPass fused_pass(const at::Tensor& dist, bool backward, bool with_w) {
  const int64_t B = dist.size(0);
  const auto f64 = dist.options().dtype(at::kDouble);
  FusedPass p{at::empty({B, kStats}, f64), at::zeros({1}, dist.options().dtype(at::kInt)), {}, {}};
  if (backward) p.scale = at::empty({1}, f64);
  if (backward && with_w) p.w = at::empty({B, B}, f64);
  return p;
}

// The loss's 0-dim result, or the upstream gradient in the embeddings' dtype.
at::Tensor fused_result(const at::Tensor& embeddings, const at::Tensor& grad) {
  if (!grad.defined()) return at::empty({}, embeddings.options());
  return grad.scalar_type() == embeddings.scalar_type() ? grad.contiguous() : grad.to(embeddings.scalar_type());
}

// Batch-all (semi_hard false) or semi-hard: the forward's loss, or the backward's scale
// and w, from the (B, B) float64 distances.
FusedPass fused_triplet_pass(const at::Tensor& dist, const at::Tensor& embeddings, const at::Tensor& labels,
                             bool semi_hard, double margin, bool soft, Denominator den, const at::Tensor& result,
                             bool backward) {
  const int64_t B = dist.size(0);
  const at::Tensor packed = pack_labels(labels);
  FusedPass p = fused_pass(dist, backward, /*with_w=*/true);
  if (!semi_hard && !soft) {  // batch-all's hinge: only the positives sorted, the row streamed
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, embeddings.scalar_type(), "batch_all_stream", [&] {
      TRIPLETOPS_LAUNCH((batch_all_stream_kernel<scalar_t>), row_blocks(B), kStreamThreads, 0, current_stream(),
                        dist.data_ptr<double>(), labels_view(packed), B, margin, den, p.stats.data_ptr<double>(),
                        p.ticket(), p.out<scalar_t>(result, backward));
    });
    return p;
  }
  const size_t shared = sorted_row_bytes(B);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, embeddings.scalar_type(), "triplet_family_fused", [&] {
    allow_dynamic_shared(triplet_family_fused_kernel<scalar_t>, shared);
    TRIPLETOPS_LAUNCH((triplet_family_fused_kernel<scalar_t>), row_blocks(B), sorted_row_threads(B), shared,
                      current_stream(), dist.data_ptr<double>(), labels_view(packed), B, semi_hard, margin, soft,
                      den, p.stats.data_ptr<double>(), p.ticket(), p.out<scalar_t>(result, backward));
  });
  return p;
}

// The gradient to the embeddings, in their dtype, from each pair's weight (times `scale`,
// when given).
template <typename DT>
at::Tensor fused_embedding_grad(const FusedRows& r, const PairWeights<DT>& pw, const at::Tensor& scale) {
  const int64_t B = r.x.size(0), D = r.x.size(1);
  const bool cosine = r.metric == Metric::Cosine;
  at::Tensor grad = at::empty_like(r.x);
  at::Tensor scratch = cosine ? at::empty({B, D}, r.x.options().dtype(at::kDouble)) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, r.x.scalar_type(), "family_embedding_grad", [&] {
    if (cosine) {
      TRIPLETOPS_LAUNCH((family_embedding_grad_kernel<scalar_t, double, DT>), row_blocks(B), kFamilyThreads, 0,
                        current_stream(), r.unit.data_ptr<double>(), r.sq_norm.data_ptr<double>(), pw, B, D,
                        r.metric, ptr_or_null<double>(scale), scratch.data_ptr<double>(), grad.data_ptr<scalar_t>());
    } else {
      TRIPLETOPS_LAUNCH((family_embedding_grad_kernel<scalar_t, scalar_t, DT>), row_blocks(B), kFamilyThreads, 0,
                        current_stream(), r.x.data_ptr<scalar_t>(), static_cast<const double*>(nullptr), pw, B, D,
                        r.metric, ptr_or_null<double>(scale), static_cast<double*>(nullptr),
                        grad.data_ptr<scalar_t>());
    }
  });
  return grad;
}

std::tuple<at::Tensor, at::Tensor> fused_triplet_forward(const at::Tensor& embeddings, const at::Tensor& labels,
                                                         bool semi_hard, double margin, c10::string_view metric,
                                                         bool soft, Denominator den) {
  at::Tensor dist = fused(embeddings.size(0))
                        ? fused_distances(fused_rows(embeddings, parse_metric(metric)), at::kDouble)
                        : pairwise_distance_cuda(embeddings.to(at::kDouble), c10::nullopt, metric);
  const at::Tensor loss = fused_result(embeddings, {});
  fused_triplet_pass(dist, embeddings, labels, semi_hard, margin, soft, den, loss, /*backward=*/false);
  return {loss, dist};
}

at::Tensor fused_triplet_backward(const at::Tensor& grad, const at::Tensor& embeddings, const at::Tensor& labels,
                                  const at::Tensor& dist, bool semi_hard, double margin, c10::string_view metric,
                                  bool soft, Denominator den) {
  const at::Tensor d = dist.contiguous();
  const FusedPass p = fused_triplet_pass(d, embeddings, labels, semi_hard, margin, soft, den,
                                         fused_result(embeddings, grad), /*backward=*/true);
  if (!fused(embeddings.size(0))) {  // the shared-sort path: d loss / d dist, then pairwise_distance's backward
    auto [gx, unused] = pairwise_distance_backward_cuda(p.w.mul_(p.scale), embeddings.to(at::kDouble), c10::nullopt,
                                                        d, metric);
    return gx.to(embeddings.scalar_type());
  }
  const FusedRows r = fused_rows(embeddings, parse_metric(metric));
  return fused_embedding_grad(r, PairWeights<double>{d.data_ptr<double>(), p.w.data_ptr<double>(), Labels{}, 0, 0},
                              p.scale);
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
  if (triplet_family_path(embeddings.size(0), soft_margin) != FamilyPath::General)
    return fused_triplet_forward(embeddings, labels, /*semi_hard=*/false, margin, metric, soft_margin,
                                 denominator(reduction));
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
  if (triplet_family_path(embeddings.size(0), soft_margin) != FamilyPath::General)
    return fused_triplet_backward(grad, embeddings, labels, dist, /*semi_hard=*/false, margin, metric, soft_margin,
                                  denominator(reduction));
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
  if (triplet_family_path(embeddings.size(0), true) != FamilyPath::General)
    return fused_triplet_forward(embeddings, labels, /*semi_hard=*/true, margin, metric, /*soft=*/false,
                                 Denominator::Count);
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
  if (triplet_family_path(embeddings.size(0), true) != FamilyPath::General)
    return fused_triplet_backward(grad, embeddings, labels, dist, /*semi_hard=*/true, margin, metric,
                                  /*soft=*/false, Denominator::Count);
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

at::ScalarType compute_dtype(const at::Tensor& embeddings) {
  return embeddings.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// The fused path's statistics pass (B <= kFusedMaxB, a reduced loss): the forward's loss,
// or the backward's scale.
FusedPass fused_contrastive_pass(const at::Tensor& dist, const at::Tensor& embeddings, const at::Tensor& labels,
                                 double pm, double nm, Denominator den, const at::Tensor& result, bool backward) {
  const int64_t B = dist.size(0);
  const at::Tensor packed = pack_labels(labels);
  FusedPass p = fused_pass(dist, backward, /*with_w=*/false);
  AT_DISPATCH_FLOATING_TYPES(dist.scalar_type(), "contrastive_fused", [&] {
    using DT = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, embeddings.scalar_type(), "contrastive_fused", [&] {
      TRIPLETOPS_LAUNCH((contrastive_fused_kernel<DT, scalar_t>), row_blocks(B), kFamilyThreads, 0, current_stream(),
                        dist.data_ptr<DT>(), labels_view(packed), B, pm, nm, den, p.stats.data_ptr<double>(),
                        p.ticket(), p.out<scalar_t>(result, backward));
    });
  });
  return p;
}

// Rows in the compute dtype (fp32 for halves, fp64 for fp64), as the CPU op takes them,
// and which rows are finite.
struct PairInputs {
  at::Tensor x, finite, labels;
  int64_t B;
};
PairInputs pair_inputs(const at::Tensor& embeddings, const at::Tensor& labels) {
  const at::Tensor x = embeddings.to(compute_dtype(embeddings));
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
  const int64_t B = embeddings.size(0);
  if (fused(B)) {
    at::Tensor dist = fused_distances(fused_rows(embeddings, parse_metric(metric)), compute_dtype(embeddings));
    if (reduction != Reduction::None) {
      const at::Tensor loss = fused_result(embeddings, {});
      fused_contrastive_pass(dist, embeddings, labels, pos_margin, neg_margin, denominator(reduction), loss,
                             /*backward=*/false);
      return {loss, dist};
    }
    at::Tensor terms = at::empty({B * (B - 1) / 2}, embeddings.options());  // each pair's term
    if (B > 1) {
      const at::Tensor packed = pack_labels(labels);
      const dim3 grid(unsigned((B - 1 + kElementThreads - 1) / kElementThreads), unsigned(B));
      AT_DISPATCH_FLOATING_TYPES(dist.scalar_type(), "contrastive_terms", [&] {
        using DT = scalar_t;
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, embeddings.scalar_type(), "contrastive_terms", [&] {
          TRIPLETOPS_LAUNCH((contrastive_terms_kernel<DT, scalar_t>), grid, kElementThreads, 0, current_stream(),
                            dist.data_ptr<DT>(), labels_view(packed), B, pos_margin, neg_margin,
                            terms.data_ptr<scalar_t>());
        });
      });
    }
    return {terms, dist};
  }
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
  const int64_t B = embeddings.size(0);
  check_saved("contrastive_loss", grad, reduction == Reduction::None ? B * (B - 1) / 2 : 1, dist, embeddings,
              compute_dtype(embeddings), kDeviceType);
  const at::Tensor d = dist.contiguous();
  if (fused(B)) {  // the scale (a reduced loss) or each pair's upstream gradient ("none"), then the rows'
    const bool none = reduction == Reduction::None;
    at::Tensor scale, pair_grad;
    if (none)
      pair_grad = grad.to(at::kDouble).contiguous();
    else
      scale = fused_contrastive_pass(d, embeddings, labels, pos_margin, neg_margin, denominator(reduction),
                                     fused_result(embeddings, grad), /*backward=*/true).scale;
    const FusedRows r = fused_rows(embeddings, parse_metric(metric));
    const at::Tensor packed = pack_labels(labels);
    at::Tensor gx;
    AT_DISPATCH_FLOATING_TYPES(d.scalar_type(), "contrastive_fused_backward", [&] {
      gx = fused_embedding_grad(r, PairWeights<scalar_t>{d.data_ptr<scalar_t>(), nullptr, labels_view(packed),
                                                         pos_margin, neg_margin, ptr_or_null<double>(pair_grad)},
                                scale);
    });
    return gx;
  }
  const PairInputs in = pair_inputs(embeddings, labels);
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
