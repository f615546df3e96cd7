// Batch-hard mining fused with the triplet loss, on CUDA: the twin of
// csrc/cpu/batch_hard_cpu.cpp. Device code: batch_hard_kernels.cuh.
//
// Forward, after FAISS's exact k = 1 search (faiss/gpu/impl/Distance.cu): the reference
// set is walked in tiles; each tile's Gram block is one GEMM (at::mm_out, cuBLAS) into a
// reused buffer, and a kernel adds the norms, masks by label and merges every anchor's
// farthest positive and closest negative into its running state. The B x M matrix
// never exists. Self-mining computes only the tiles on or above the diagonal; an
// off-diagonal tile updates its row anchors and its column anchors. The selected pairs'
// distances are then recomputed exactly from the rows.
//  - First, one kernel prepares the anchors as GEMM operand (fp32 for halves) and, for
//    (sq)euclidean, shifts the columns whose means dominate: exact far from the origin,
//    exact ties on integer grids, and no data-dependent host decision.
//  - Self-mining at B <= 1024: then one GEMM (B x B) and one kernel (a warp per anchor:
//    mining, exact distances, losses; the last block to finish reduces them). With the
//    one-kernel backward: 4 launches for forward + backward (halves add the gradient's
//    conversion).
//  - Otherwise: row norms, then per tile a GEMM and a mining kernel, then the settling of
//    the anchors that certification does not clear (settle_parts_kernel), then one kernel
//    for the exact distances, the losses and (last block) their reduction.
//  - Mining is certified: every Gram key's rounding is bounded, and a choice that does
//    not beat its runner-up by twice that bound is settled on exact distances.
// Backward: O(B * D) arithmetic on the 2B selected pairs, one writer per gradient row and
// a fixed order of additions (deterministic, no atomics). Self-mining up to B = 4096: one
// kernel; beyond, and for a reference set, the pairs sorted by row (at::sort) first.
// No host synchronisation anywhere (no .item(), no data-dependent shape): a training step
// can be captured in a CUDA graph. Indexing is 64-bit.
#include "device.h"
#include "batch_hard_kernels.cuh"

#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/TensorOperators.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/sub.h>
#include <ATen/ops/zeros.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

namespace tripletops {
namespace cuda {
namespace {

#ifndef TRIPLETOPS_EMU
// Gram tiles hold at most this many entries (128 MiB in fp32): B = 1024 against a bank of
// 2^20 rows walks 32 tiles of 1024 x 32768.
constexpr int64_t kTileElems = int64_t(1) << 25;
constexpr int64_t kSelfTileRows = 4096;  // square tiles of self-mining above kSmallMaxB
constexpr int64_t kSmallMaxB = 1024;     // self-mining up to this B: one B x B GEMM, one mining kernel
constexpr int64_t kSelfScanMaxB = 4096;  // self-mining backward up to this B: one kernel, O(B^2) index scan
constexpr int64_t kSettleParts = 256;    // warps per settled anchor (settle_parts_kernel), at most
constexpr int kSettlePartShift = 18;     // ... and about 2^18 reference elements per warp
#else
// Under the emulator, tiny tiles (not multiples of the warp) and a small whole-Gram limit,
// so that the test suite's batches walk many tiles, partial tiles and both paths.
constexpr int64_t kTileElems = 12000;
constexpr int64_t kSelfTileRows = 48;
constexpr int64_t kSmallMaxB = 100;
constexpr int64_t kSelfScanMaxB = 200;
constexpr int64_t kSettleParts = 3;
constexpr int kSettlePartShift = 10;
#endif
constexpr int64_t kMaxGridBlocks = 4096; // the backward kernels stride over rows beyond this

struct Inputs {
  bool self;
  at::Tensor labels, ref_labels;  // pack_labels: int64 class ids or multi-hot bitsets, contiguous
};

Inputs check_inputs(const at::Tensor& embeddings, const at::Tensor& labels,
                    const c10::optional<at::Tensor>& ref_embeddings, const c10::optional<at::Tensor>& ref_labels) {
  check_mining_inputs(embeddings, labels, ref_embeddings, ref_labels, kDeviceType);
  Inputs in{!ref_embeddings.has_value(), pack_labels(labels), at::Tensor()};
  in.ref_labels = in.self ? in.labels : pack_labels(*ref_labels);
  return in;
}

inline unsigned blocks_of(int64_t rows, int64_t per_block, int64_t cap = int64_t(0x7fffffff)) {
  return unsigned(std::min<int64_t>(std::max<int64_t>((rows + per_block - 1) / per_block, 1), cap));
}

inline at::ScalarType compute_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

struct Mined {
  at::Tensor pos_idx, neg_idx, pos_dist, neg_dist;  // (B,): int64, int64, T, T
  at::Tensor loss;                                  // the reduced loss (input dtype), when asked
};

// Mines every anchor and, with `want_loss`, forms the loss. The whole forward.
Mined mine(const at::Tensor& embeddings, const Inputs& in, const c10::optional<at::Tensor>& ref_embeddings,
           Metric metric, bool want_loss, double margin, bool soft_margin, Reduction reduction) {
  const DeviceGuard guard(embeddings.device());
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);  // GEMMs in the compute dtype
  const at::Tensor X = embeddings.contiguous();
  const at::Tensor R = in.self ? X : ref_embeddings->contiguous();
  const int64_t B = X.size(0), D = X.size(1), M = R.size(0);
  const auto ct = compute_dtype(X.scalar_type());
  const auto opts = X.options().dtype(ct);
  const Stream stream = current_stream();
  // The anchors as GEMM operand, in the compute dtype, by one kernel: for (sq)euclidean
  // shifted by their column means where those dominate (distances do not change, and
  // mining stays exact far from the origin). A reference set gets the same treatment one
  // tile at a time, below.
  const bool shifted = metric != Metric::Cosine;
  at::Tensor Xc = at::empty({B, D}, opts), shift = at::empty({D}, opts);
  at::Tensor counter = at::empty({1}, X.options().dtype(at::kInt));  // reduce_in_last_block's tickets
  Mined m;
  m.pos_idx = at::empty({B}, X.options().dtype(at::kLong));
  m.neg_idx = at::empty({B}, X.options().dtype(at::kLong));
  m.pos_dist = at::empty({B}, opts);
  m.neg_dist = at::empty({B}, opts);
  m.loss = at::empty(want_loss && reduction == Reduction::None ? at::IntArrayRef{B} : at::IntArrayRef{}, X.options());
  at::Tensor anchor_loss = at::empty({B}, opts), anchor_valid = at::empty({B}, X.options().dtype(at::kByte));
  auto counter_ptr = [&] { return reinterpret_cast<unsigned*>(counter.data_ptr<int32_t>()); };
  // cuBLAS rounds fp32 GEMM inputs to TF32 where torch allows it: the mining keys' rounding
  // bound (certify) must count that (a query that fails counts as allowed).
  double gemm_u = 0;
  if (ct == at::kFloat) {
    try {
      if (at::globalContext().allowTF32CuBLAS()) gemm_u = 0x1p-11;
    } catch (...) {
      gemm_u = 0x1p-11;
    }
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, X.scalar_type(), "batch_hard_prepare_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    TRIPLETOPS_LAUNCH((prepare_rows_kernel<scalar_t, T>), blocks_of(D, kCenterCols), kCenterCols * kCenterRowStripes,
                      0, stream, X.data_ptr<scalar_t>(), B, D, shifted, Xc.data_ptr<T>(), shift.data_ptr<T>(),
                      counter_ptr());
  });

  if (in.self && B <= kSmallMaxB) {
    const at::Tensor gram = at::mm(Xc, Xc.t());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, X.scalar_type(), "batch_hard_small_cuda", [&] {
      using T = at::opmath_type<scalar_t>;
      TRIPLETOPS_LAUNCH((batch_hard_small_kernel<scalar_t, T>), blocks_of(B, kRowsPerBlock), kRowsPerBlock * kWarp, 0,
                        stream, X.data_ptr<scalar_t>(), gram.data_ptr<T>(), labels_view(in.labels), B, D,
                        metric, gemm_u, margin, soft_margin, reduction, want_loss, m.pos_idx.data_ptr<int64_t>(),
                        m.neg_idx.data_ptr<int64_t>(), m.pos_dist.data_ptr<T>(), m.neg_dist.data_ptr<T>(),
                        anchor_loss.data_ptr<T>(), anchor_valid.data_ptr<uint8_t>(), counter_ptr(),
                        want_loss ? m.loss.data_ptr<scalar_t>() : nullptr);
    });
    return m;
  }

  // Keys of every anchor's state: best and runner-up positive and negative, largest norm.
  at::Tensor keys = at::empty({5, B}, opts);
  at::Tensor sq_x = at::empty({B}, opts);
  at::Tensor sq_r = in.self ? sq_x : at::empty({M}, opts);
  // Tile shapes: square tiles on and above the diagonal for self-mining; else row blocks of
  // at most kSelfTileRows anchors against as many reference rows as the budget allows.
  const int64_t tile_rows = std::min(B, kSelfTileRows);
  const int64_t tile_cols = in.self ? tile_rows : std::min(M, std::max<int64_t>(kTileElems / tile_rows, 1));
  at::Tensor tile = at::empty({tile_rows, tile_cols}, opts);
  // A reference tile in the compute dtype (shifted for (sq)euclidean): reused, so the
  // reference set is never copied whole. Not needed for fp32/fp64 cosine.
  const bool ref_buffer = !in.self && (shifted || R.scalar_type() != ct);
  at::Tensor ref_tile = ref_buffer ? at::empty({tile_cols, D}, opts) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, X.scalar_type(), "batch_hard_mine_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    const unsigned row_threads = kRowsPerBlock * kWarp;
    T* k = keys.data_ptr<T>();
    const MiningState<T> state{m.pos_idx.data_ptr<int64_t>(), m.neg_idx.data_ptr<int64_t>(), k, k + B, k + 2 * B,
                               k + 3 * B, k + 4 * B};
    // Squared norms of the GEMM operands; also resets every anchor's state.
    TRIPLETOPS_LAUNCH((row_norms_kernel<T, T>), blocks_of(B, kRowsPerBlock), row_threads, 0, stream, Xc.data_ptr<T>(),
                      B, D, sq_x.data_ptr<T>(), true, state);
    // One GEMM tile and its mining; r0/c0 index the anchors / the reference set.
    auto mine_tile = [&](int64_t r0, int64_t rows, int64_t c0, int64_t cols, const at::Tensor& ref_rows) {
      at::Tensor g = tile.narrow(0, 0, rows).narrow(1, 0, cols);
      at::mm_out(g, Xc.narrow(0, r0, rows), ref_rows.t());
      const bool columns = in.self && c0 != r0;  // an off-diagonal tile also mines for its columns
      const unsigned row_blocks = blocks_of(rows, kRowsPerBlock);
      const unsigned blocks = row_blocks + (columns ? blocks_of(cols, kColumnThreads) : 0);
      TRIPLETOPS_LAUNCH((mine_tile_kernel<T>), blocks, row_threads, 0, stream, g.data_ptr<T>(), g.stride(0), r0, rows,
                        c0, cols, sq_x.data_ptr<T>(), sq_r.data_ptr<T>(), labels_view(in.labels),
                        labels_view(in.ref_labels), in.self, columns, row_blocks, metric, state);
    };
    if (in.self) {
      for (int64_t r0 = 0; r0 < B; r0 += tile_rows)
        for (int64_t c0 = r0; c0 < B; c0 += tile_cols)
          mine_tile(r0, std::min(tile_rows, B - r0), c0, std::min(tile_cols, B - c0),
                    Xc.narrow(0, c0, std::min(tile_cols, B - c0)));
    } else {
      for (int64_t c0 = 0; c0 < M; c0 += tile_cols) {
        const int64_t cols = std::min(tile_cols, M - c0);
        at::Tensor ref_rows = R.narrow(0, c0, cols);
        if (ref_buffer) {
          at::Tensor buf = ref_tile.narrow(0, 0, cols);
          if (shifted) at::sub_out(buf, ref_rows, shift);
          else buf.copy_(ref_rows);
          ref_rows = buf;
        }
        TRIPLETOPS_LAUNCH((row_norms_kernel<T, T>), blocks_of(cols, kRowsPerBlock), row_threads, 0, stream,
                          ref_rows.data_ptr<T>(), cols, D, sq_r.data_ptr<T>() + c0, false, state);
        for (int64_t r0 = 0; r0 < B; r0 += tile_rows) mine_tile(r0, std::min(tile_rows, B - r0), c0, cols, ref_rows);
      }
    }
    // Settling of the anchors that certification does not clear (the others' blocks exit).
    // About 2^18 reference elements per warp (8192 per lane), at most kSettleParts warps per
    // anchor: few empty warps to retire where M * D is small, a bank spread over SMs.
    const int64_t parts = std::max<int64_t>(1, std::min<int64_t>({kSettleParts, M, (M * D) >> kSettlePartShift}));
    at::Tensor part_key = at::empty({B, parts, 2}, X.options().dtype(at::kDouble));
    at::Tensor part_idx = at::empty({B, parts, 2}, X.options().dtype(at::kLong));
    TRIPLETOPS_LAUNCH((settle_parts_kernel<scalar_t, T>), dim3(blocks_of(B, kRowsPerBlock), unsigned(parts)),
                      row_threads, 0, stream, X.data_ptr<scalar_t>(), R.data_ptr<scalar_t>(), M, D, sq_x.data_ptr<T>(),
                      labels_view(in.labels), labels_view(in.ref_labels), in.self, metric, gemm_u, B,
                      state, part_key.data_ptr<double>(), part_idx.data_ptr<int64_t>());
    TRIPLETOPS_LAUNCH((finish_anchors_kernel<scalar_t, T>), blocks_of(B, kRowsPerBlock), row_threads, 0, stream,
                      X.data_ptr<scalar_t>(), R.data_ptr<scalar_t>(), B, M, D, sq_x.data_ptr<T>(),
                      labels_view(in.labels), labels_view(in.ref_labels), in.self, metric, gemm_u,
                      margin, soft_margin, state, part_key.data_ptr<double>(), part_idx.data_ptr<int64_t>(), parts,
                      m.pos_dist.data_ptr<T>(), m.neg_dist.data_ptr<T>(),
                      anchor_loss.data_ptr<T>(), anchor_valid.data_ptr<uint8_t>(), reduction, want_loss,
                      counter_ptr(), want_loss ? m.loss.data_ptr<scalar_t>() : nullptr);
  });
  return m;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_hard_mine_cuda(
    const at::Tensor& embeddings, const at::Tensor& labels, const c10::optional<at::Tensor>& ref_embeddings,
    const c10::optional<at::Tensor>& ref_labels, c10::string_view metric_name) {
  const Inputs in = check_inputs(embeddings, labels, ref_embeddings, ref_labels);
  const Mined m = mine(embeddings, in, ref_embeddings, parse_metric(metric_name), /*want_loss=*/false, 0.0, false,
                       Reduction::Sum);
  return {m.pos_idx, m.neg_idx, m.pos_dist, m.neg_dist};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_hard_loss_cuda(
    const at::Tensor& embeddings, const at::Tensor& labels, const c10::optional<at::Tensor>& ref_embeddings,
    const c10::optional<at::Tensor>& ref_labels, double margin, c10::string_view metric_name, bool soft_margin,
    c10::string_view reduction_name) {
  const Inputs in = check_inputs(embeddings, labels, ref_embeddings, ref_labels);
  const Metric metric = parse_metric(metric_name);
  const Reduction reduction = parse_reduction(reduction_name);
  TORCH_CHECK_VALUE(margin >= 0, "tripletops: margin must be >= 0, got ", margin);
  const Mined m = mine(embeddings, in, ref_embeddings, metric, /*want_loss=*/true, margin, soft_margin, reduction);
  return {m.loss, m.pos_idx, m.neg_idx, m.pos_dist, m.neg_dist};
}

std::tuple<at::Tensor, at::Tensor> batch_hard_loss_backward_cuda(
    const at::Tensor& grad, const at::Tensor& embeddings, const c10::optional<at::Tensor>& ref_embeddings,
    const at::Tensor& pos_idx, const at::Tensor& neg_idx, const at::Tensor& pos_dist, const at::Tensor& neg_dist,
    double margin, c10::string_view metric_name, bool soft_margin, c10::string_view reduction_name,
    bool compute_ref_grad) {
  const Metric metric = parse_metric(metric_name);
  const Reduction reduction = parse_reduction(reduction_name);
  const bool self = !ref_embeddings.has_value();
  TORCH_CHECK(on_kernel_device(embeddings), "tripletops: embeddings must be a ", kDeviceType, " tensor here, got ",
              embeddings.device());
  const DeviceGuard guard(embeddings.device());
  const at::Tensor X = embeddings.contiguous();
  const at::Tensor R = self ? X : ref_embeddings->contiguous();
  const int64_t B = X.size(0), D = X.size(1), M = R.size(0);
  // Shapes and devices are checked here (no host sync); the index values are not (that
  // would need a device-side check): the CPU backward checks them.
  const char* op = "batch_hard_loss";
  check_saved_grad(op, grad, reduction == Reduction::None, B);
  check_saved_rows(op, "pos_idx", pos_idx, B, X.device());
  check_saved_rows(op, "neg_idx", neg_idx, B, X.device());
  check_saved_rows(op, "pos_dist", pos_dist, B, X.device());
  check_saved_rows(op, "neg_dist", neg_dist, B, X.device());
  const auto ct = compute_dtype(X.scalar_type());
  const at::Tensor pos = pos_idx.to(at::kLong).contiguous(), neg = neg_idx.to(at::kLong).contiguous();
  const at::Tensor pd = pos_dist.to(ct).contiguous(), nd = neg_dist.to(ct).contiguous();
  const at::Tensor g = grad.to(X.scalar_type());
  TORCH_CHECK_VALUE(g.numel() == (reduction == Reduction::None ? B : 1), "tripletops: grad has ", g.numel(),
                    " elements, expected ", reduction == Reduction::None ? B : 1);
  const bool want_ref = !self && compute_ref_grad;
  at::Tensor grad_x = at::empty({B, D}, X.options().dtype(ct));
  at::Tensor grad_r = want_ref ? at::zeros({M, D}, grad_x.options()) : at::Tensor();
  const Stream stream = current_stream();
  const unsigned threads = kRowsPerBlock * kWarp;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, X.scalar_type(), "batch_hard_loss_backward_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    const BackwardArgs<scalar_t, T> args{g.data_ptr<scalar_t>(), g.dim() == 0 ? 0 : g.stride(0),
                                         X.data_ptr<scalar_t>(), R.data_ptr<scalar_t>(), B, D,
                                         pos.data_ptr<int64_t>(), neg.data_ptr<int64_t>(), pd.data_ptr<T>(),
                                         nd.data_ptr<T>(), margin, metric, soft_margin, reduction};
    if (self && B <= kSelfScanMaxB) {  // one kernel: a warp per row finds its contributors
      TRIPLETOPS_LAUNCH((self_grad_kernel<scalar_t, T>), blocks_of(B, kRowsPerBlock, kMaxGridBlocks), threads, 0,
                        stream, args, grad_x.data_ptr<T>());
      return;
    }
    TRIPLETOPS_LAUNCH((anchor_grad_kernel<scalar_t, T>), blocks_of(B, kRowsPerBlock, kMaxGridBlocks), threads, 0,
                      stream, args, grad_x.data_ptr<T>());
    if (!self && !want_ref) return;
    // Group the 2B (row, anchor) pairs by row; stable, so each group keeps ascending entry
    // order. Self-mining adds the groups onto the anchors' own terms (O(B log B), where the
    // scan above would cost O(B^2) index compares).
    const auto sorted = at::sort(at::cat({pos, neg}), /*stable=*/true, /*dim=*/0, /*descending=*/false);
    const at::Tensor target = std::get<0>(sorted).contiguous(), entry = std::get<1>(sorted).contiguous();
    TRIPLETOPS_LAUNCH((ref_grad_kernel<scalar_t, T>), blocks_of(2 * B, kRowsPerBlock, kMaxGridBlocks), threads, 0,
                      stream, args, target.data_ptr<int64_t>(), entry.data_ptr<int64_t>(),
                      self ? grad_x.data_ptr<T>() : grad_r.data_ptr<T>());
  });
  return {grad_x.to(X.scalar_type()),
          want_ref ? grad_r.to(R.scalar_type()) : at::empty({0}, X.options())};
}

}  // namespace
}  // namespace cuda
}  // namespace tripletops

TORCH_LIBRARY_IMPL(TRIPLETOPS_CUDA_LIBRARY, TRIPLETOPS_CUDA_KEY, m) {
  m.impl("batch_hard_mine", &tripletops::cuda::batch_hard_mine_cuda);
  m.impl("batch_hard_loss", &tripletops::cuda::batch_hard_loss_cuda);
  m.impl("batch_hard_loss_backward", &tripletops::cuda::batch_hard_loss_backward_cuda);
}
