// Batch-hard mining fused with the triplet loss, on CUDA: the twin of
// csrc/cpu/batch_hard_cpu.cpp. Device code: batch_hard_kernels.cuh.
//
// Forward, after FAISS's exact k = 1 search (faiss/gpu/impl/Distance.cu): the reference
// set is walked in tiles; each tile's Gram block is one GEMM (cuBLAS; halves on tensor
// cores, see gram_out) into a reused buffer, and a kernel adds the norms, masks by label
// and merges every anchor's kept candidates (the best and kKept - 1 runner-ups per kind)
// into its state. The B x M matrix never exists. Self-mining computes only the tiles on
// or above the diagonal; an off-diagonal tile updates its row anchors and its column
// anchors. The selected pairs' distances are then recomputed exactly from the rows.
//  - First, one kernel prepares the anchors as GEMM operand (fp32/fp64; halves are used
//    as they are) and, for (sq)euclidean, shifts the columns whose means dominate: exact
//    far from the origin, exact ties on integer grids, no data-dependent host decision.
//  - Self-mining at B <= 1024: then one GEMM (B x B) and one kernel (a warp per anchor:
//    mining, exact distances, losses; the last block to finish reduces them). With the
//    one-kernel backward: 4 launches for forward + backward (halves add the gradient's
//    conversion).
//  - Otherwise: row norms, then per tile a GEMM and a mining kernel spread over thousands
//    of blocks (each column range of an anchor in its own state slot), then the merge of
//    the slots with certification, the rescan of the anchors whose window the kept
//    candidates do not cover (settle_parts_kernel: none on random data), then one kernel
//    that settles from the kept candidates, forms the exact distances, the losses and
//    (last block) their reduction.
//  - Mining is certified: every Gram key's rounding is bounded, and a choice that does
//    not beat its runner-up by twice that bound is settled on exact distances.
// Expected H200 times (not measured; the model of issue 22): B = 8192, D = 512 fp32:
// GEMM tiles ~0.9 ms (3 of 4096^2 x 512 at ~55 TFLOP/s), mining ~0.1 ms (192 MiB of tiles
// at ~2 TB/s), merge/settle/finish ~30 us; bf16: GEMM ~30 us on tensor cores, the rest as
// fp32. Bank, B = 1024 against 2^20 x 128 fp32: GEMMs ~5 ms (34 TFLOP at ~55 TFLOP/s;
// 32 launches), mining ~2.2 ms (4 GiB of tiles at ~2 TB/s), the reference set's norms and
// shift ~0.3 ms.
// Backward: O(B * D) arithmetic on the 2B selected pairs, one writer per gradient row and
// a fixed order of additions (deterministic, no atomics). Self-mining up to B = 1024: one
// kernel; beyond, and for a reference set, the denominator once (count_kernel), the
// anchors' rows, then the pairs sorted by row (at::sort) and the reference rows, a warp
// per chunk of at most kHubChunk (8) terms, and a kernel that adds the chunks of the
// rows picked by more anchors ("hubs") in order.
// No host synchronisation anywhere (no .item(), no data-dependent shape): a training step
// can be captured in a CUDA graph. Indexing is 64-bit (the row scan's offsets within one
// tile row are 32-bit).
#include "device.h"
#include "batch_hard_kernels.cuh"

#include <ATen/Context.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/TensorOperators.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sort.h>
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
constexpr int64_t kSelfScanMaxB = 1024;  // self-mining backward up to this B: one kernel, O(B^2) index scan
// Rescans (settle_parts_kernel): a fixed grid of kSettleBlocks blocks strides over the
// (listed anchor, part) items; an anchor's reference set is split in at most
// kSettleMaxParts parts of at least kSettlePartRows rows (8 per warp), and the items'
// results fit max(B, kSettleItems) slots (512 KiB).
constexpr int64_t kSettleBlocks = 1056;  // 8 blocks per SM of an H100/H200
constexpr int64_t kSettleMaxParts = 1024;
constexpr int64_t kSettlePartRows = 64;
constexpr int64_t kSettleItems = int64_t(1) << 14;
// Splits of a Gram tile (mine_tile_kernel): each warp mines about kRowChunk columns of its
// anchor row, each column thread about kColumnChunk rows, so that a tile fills the GPU
// many times over (a bank tile of 1024 x 32768: 2048 blocks of 256 threads; a 4096^2
// tile: 1024 + 256 blocks).
constexpr int64_t kRowChunk = 2048;
constexpr int64_t kColumnChunk = 256;
#else
// Under the emulator, tiny tiles (not multiples of the warp) and a small whole-Gram limit,
// so that the test suite's batches walk many tiles, partial tiles and both paths.
constexpr int64_t kTileElems = 12000;
constexpr int64_t kSelfTileRows = 48;
constexpr int64_t kSmallMaxB = 100;
constexpr int64_t kSelfScanMaxB = 200;
constexpr int64_t kSettleBlocks = 2;  // blocks that take several items, anchors split in parts
constexpr int64_t kSettleMaxParts = 3;
constexpr int64_t kSettlePartRows = 8;
constexpr int64_t kSettleItems = 4;
constexpr int64_t kRowChunk = 128;    // bank tiles (250 columns) in 2 slots
constexpr int64_t kColumnChunk = 20;  // 48-row tiles in 3 slots (column anchors)
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

inline int64_t splits_of(int64_t n, int64_t chunk) { return std::max<int64_t>(1, (n + chunk - 1) / chunk); }

// Halves (fp16 / bf16) are multiplied as they are, on tensor cores, into an fp32 Gram:
// a product of two halves is exact in fp32, so only the accumulation rounds. Tensor cores
// accumulate in fp32 with truncation rather than rounding (Fasi et al., "Numerical
// behavior of NVIDIA tensor cores", 2021: error per addition up to 2u); the bound takes
// 4u, twice that. The same bound covers cuBLAS's split-K and a plain fp32 GEMM of the
// converted halves (the fallback, and the emulator's twin).
constexpr double kHalfGemmAccU = 0x1p-22;

// out (R x C, fp32 or fp64) = a · bᵀ. Halves: aten::mm.dtype_out (torch >= 2.8: cuBLAS
// with bf16/fp16 inputs, fp32 output and fp32 compute). Whether it is used is decided once
// per process, from the op's availability (its schema, and a CUDA kernel for it), never
// from a failed call: an error of the op, an out-of-memory included, reaches the caller
// as it is (it used to turn every later half GEMM into fp32 SIMT, silently). Where the op
// is missing (torch < 2.8), and under the emulator, the same product of the rows
// converted to fp32.
const c10::optional<c10::OperatorHandle>& mm_dtype_out() {
  static const c10::optional<c10::OperatorHandle> op = [] {
    c10::optional<c10::OperatorHandle> found = c10::Dispatcher::singleton().findSchema({"aten::mm", "dtype_out"});
    if (found.has_value() && !found->hasKernelForDispatchKey(c10::DispatchKey::CUDA)) found = c10::nullopt;
    return found;
  }();
  return op;
}

void gram_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() == out.scalar_type()) {
    at::mm_out(out, a, b.t());
    return;
  }
#ifndef TRIPLETOPS_EMU
  if (const auto& op = mm_dtype_out()) {
    op->typed<at::Tensor&(const at::Tensor&, const at::Tensor&, at::ScalarType, at::Tensor&)>().call(
        a, b.t(), out.scalar_type(), out);
    return;
  }
#endif
  at::mm_out(out, a.to(out.scalar_type()), b.to(out.scalar_type()).t());
}

// Mines every anchor and, with `want_loss`, forms the loss. The whole forward. With
// `stats` (int64 (2,), zeroed), counts the anchors that settle and those rescanned.
Mined mine(const at::Tensor& embeddings, const Inputs& in, const c10::optional<at::Tensor>& ref_embeddings,
           Metric metric, bool want_loss, double margin, bool soft_margin, Reduction reduction,
           const at::Tensor* stats = nullptr) {
  const DeviceGuard guard(embeddings.device());
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);  // GEMMs in the compute dtype
  const at::Tensor X = embeddings.contiguous();
  const at::Tensor R = in.self ? X : ref_embeddings->contiguous();
  const int64_t B = X.size(0), D = X.size(1), M = R.size(0);
  const auto ct = compute_dtype(X.scalar_type());
  const auto opts = X.options().dtype(ct);
  const Stream stream = current_stream();
  const bool halves = X.scalar_type() == at::kHalf || X.scalar_type() == at::kBFloat16;
  // The anchors as GEMM operand, by one kernel: fp32/fp64 for (sq)euclidean shifted by
  // their column means where those dominate (distances do not change, and mining stays
  // exact far from the origin). A reference set gets the same treatment one tile at a
  // time, below. Halves are multiplied as they are (a shift would round them); far from
  // the origin their bound widens, and certification settles what it no longer clears.
  const bool shifted = metric != Metric::Cosine && !halves;
  at::Tensor Xc = halves ? X : at::empty({B, D}, opts), shift = at::empty({D}, opts);
  // [0]: reduce_in_last_block's tickets; [1]: anchors listed for a rescan (merge_slots_kernel).
  at::Tensor counter = at::empty({2}, X.options().dtype(at::kInt));
  Mined m;
  m.pos_idx = at::empty({B}, X.options().dtype(at::kLong));
  m.neg_idx = at::empty({B}, X.options().dtype(at::kLong));
  m.pos_dist = at::empty({B}, opts);
  m.neg_dist = at::empty({B}, opts);
  m.loss = at::empty(want_loss && reduction == Reduction::None ? at::IntArrayRef{B} : at::IntArrayRef{}, X.options());
  at::Tensor anchor_loss = at::empty({B}, opts), anchor_valid = at::empty({B}, X.options().dtype(at::kByte));
  auto counter_ptr = [&] { return reinterpret_cast<unsigned*>(counter.data_ptr<int32_t>()); };
  unsigned long long* stats_ptr =
      stats != nullptr ? reinterpret_cast<unsigned long long*>(stats->data_ptr<int64_t>()) : nullptr;
  // The Gram keys' rounding (certify): the accumulation's unit roundoff, and the inputs'
  // when cuBLAS rounds fp32 GEMM inputs to TF32 where torch allows it (a query that fails
  // counts as allowed). Halves are exact in TF32.
  const double acc_u = halves ? kHalfGemmAccU : ct == at::kFloat ? 0x1p-24 : 0x1p-53;
  double gemm_u = 0;
  if (ct == at::kFloat && !halves) {
    try {
      if (at::globalContext().allowTF32CuBLAS()) gemm_u = 0x1p-11;
    } catch (...) {
      gemm_u = 0x1p-11;
    }
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, X.scalar_type(), "batch_hard_prepare_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    TRIPLETOPS_LAUNCH((prepare_rows_kernel<scalar_t, T>), blocks_of(D, kCenterCols), kCenterCols * kCenterRowStripes,
                      0, stream, X.data_ptr<scalar_t>(), B, D, shifted, halves ? nullptr : Xc.data_ptr<T>(),
                      shift.data_ptr<T>(), counter_ptr());
  });

  if (in.self && B <= kSmallMaxB) {
    at::Tensor gram = at::empty({B, B}, opts);
    gram_out(gram, Xc, Xc);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, X.scalar_type(), "batch_hard_small_cuda", [&] {
      using T = at::opmath_type<scalar_t>;
      TRIPLETOPS_LAUNCH((batch_hard_small_kernel<scalar_t, T>), blocks_of(B, kRowsPerBlock), kRowsPerBlock * kWarp, 0,
                        stream, X.data_ptr<scalar_t>(), gram.data_ptr<T>(), labels_view(in.labels), B, D,
                        metric, acc_u, gemm_u, margin, soft_margin, reduction, want_loss,
                        m.pos_idx.data_ptr<int64_t>(), m.neg_idx.data_ptr<int64_t>(), m.pos_dist.data_ptr<T>(),
                        m.neg_dist.data_ptr<T>(), anchor_loss.data_ptr<T>(), anchor_valid.data_ptr<uint8_t>(),
                        counter_ptr(), want_loss ? m.loss.data_ptr<scalar_t>() : nullptr, stats_ptr);
    });
    return m;
  }

  at::Tensor sq_x = at::empty({B}, opts);
  at::Tensor sq_r = in.self ? sq_x : at::empty({M}, opts);
  // Tile shapes: square tiles on and above the diagonal for self-mining; else row blocks of
  // at most kSelfTileRows anchors against as many reference rows as the budget allows.
  const int64_t tile_rows = std::min(B, kSelfTileRows);
  const int64_t tile_cols = in.self ? tile_rows : std::min(M, std::max<int64_t>(kTileElems / tile_rows, 1));
  at::Tensor tile_buffer = at::empty({tile_rows * tile_cols}, opts);
  // Every anchor's state, in as many slots as a tile has splits (mine_tile_kernel).
  const int64_t slots =
      std::max(splits_of(tile_cols, kRowChunk), in.self ? splits_of(tile_rows, kColumnChunk) : int64_t(1));
  at::Tensor state_key = at::empty({kStateKeys, slots * B}, opts);
  at::Tensor state_idx = at::empty({kStateIdx, slots * B}, X.options().dtype(at::kLong));
  at::Tensor rescan = at::empty({B}, X.options().dtype(at::kByte));
  at::Tensor rescan_list = at::empty({2, B}, X.options().dtype(at::kInt));  // list, list_pos
  // settle_parts_kernel's results: (listed anchor, part) items, best positive and negative.
  const int64_t settle_items = std::max(B, kSettleItems);
  const int64_t settle_parts = std::max<int64_t>(1, std::min(kSettleMaxParts, splits_of(M, kSettlePartRows)));
  at::Tensor part_key = at::empty({settle_items, 2}, X.options().dtype(at::kDouble));
  at::Tensor part_idx = at::empty({settle_items, 2}, X.options().dtype(at::kLong));
  // A reference tile shifted in the compute dtype: reused, so the reference set is never
  // copied whole. Only for (sq)euclidean in fp32/fp64.
  const bool ref_buffer = !in.self && shifted;
  at::Tensor ref_tile = ref_buffer ? at::empty({tile_cols, D}, opts) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, X.scalar_type(), "batch_hard_mine_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    const unsigned row_threads = kRowsPerBlock * kWarp;
    const MiningState<T> state{state_key.data_ptr<T>(), state_idx.data_ptr<int64_t>(), slots * B};
    // Squared norms of the GEMM operands (rows of Xc, or of a reference tile); with
    // `shifted`, the rows less `shift` are the operand, written there in the same pass.
    auto norms = [&](const at::Tensor& rows, int64_t n, T* out, bool reset, T* shifted = nullptr) {
      const T* by = shifted != nullptr ? shift.data_ptr<T>() : nullptr;
      if (rows.scalar_type() == ct)
        TRIPLETOPS_LAUNCH((row_norms_kernel<T, T>), blocks_of(n, kRowsPerBlock), row_threads, 0, stream,
                          rows.data_ptr<T>(), n, D, out, reset, state, slots, by, shifted);
      else
        TRIPLETOPS_LAUNCH((row_norms_kernel<scalar_t, T>), blocks_of(n, kRowsPerBlock), row_threads, 0, stream,
                          rows.data_ptr<scalar_t>(), n, D, out, reset, state, slots, nullptr, nullptr);
    };
    norms(Xc, B, sq_x.data_ptr<T>(), true);  // also resets every anchor's state
    // One GEMM tile and its mining; r0/c0 index the anchors / the reference set.
    auto mine_tile = [&](int64_t r0, int64_t rows, int64_t c0, int64_t cols, const at::Tensor& ref_rows) {
      at::Tensor g = tile_buffer.narrow(0, 0, rows * cols).view({rows, cols});
      gram_out(g, Xc.narrow(0, r0, rows), ref_rows);
      const bool columns = in.self && c0 != r0;  // an off-diagonal tile also mines for its columns
      const unsigned row_blocks = blocks_of(rows, kRowsPerBlock), column_blocks = blocks_of(cols, kColumnThreads);
      const int64_t row_splits = splits_of(cols, kRowChunk), column_splits = splits_of(rows, kColumnChunk);
      const int64_t blocks = row_blocks * row_splits + (columns ? column_blocks * column_splits : 0);
      TRIPLETOPS_LAUNCH((mine_tile_kernel<T>), unsigned(blocks), row_threads, 0, stream, g.data_ptr<T>(), cols, r0,
                        rows, c0, cols, sq_x.data_ptr<T>(), sq_r.data_ptr<T>(), labels_view(in.labels),
                        labels_view(in.ref_labels), in.self, columns, row_blocks, row_splits, column_blocks,
                        column_splits, metric, state, B);
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
        if (ref_buffer) {  // the tile shifted and its norms, one pass
          at::Tensor buf = ref_tile.narrow(0, 0, cols);
          norms(ref_rows, cols, sq_r.data_ptr<T>() + c0, false, buf.data_ptr<T>());
          ref_rows = buf;
        } else {
          norms(ref_rows, cols, sq_r.data_ptr<T>() + c0, false);
        }
        for (int64_t r0 = 0; r0 < B; r0 += tile_rows) mine_tile(r0, std::min(tile_rows, B - r0), c0, cols, ref_rows);
      }
    }
    unsigned* listed = counter_ptr() + 1;
    int32_t* list = rescan_list.data_ptr<int32_t>();
    TRIPLETOPS_LAUNCH((merge_slots_kernel<T>), blocks_of(B, kRowsPerBlock), row_threads, 0, stream, state, slots, B,
                      sq_x.data_ptr<T>(), D, metric, acc_u, gemm_u, rescan.data_ptr<uint8_t>(), listed, list,
                      list + B, stats_ptr);
    // Rescanning of the listed anchors (none on random data: the fixed grid exits after
    // one load), each spread over up to kSettleMaxParts blocks. The grid does not depend
    // on how many anchors are listed, so there is no host read.
    TRIPLETOPS_LAUNCH((settle_parts_kernel<scalar_t, T>), unsigned(kSettleBlocks), row_threads, 0, stream,
                      X.data_ptr<scalar_t>(), R.data_ptr<scalar_t>(), M, D, sq_x.data_ptr<T>(),
                      labels_view(in.labels), labels_view(in.ref_labels), in.self, metric, acc_u, gemm_u, state,
                      listed, list, settle_parts, settle_items, part_key.data_ptr<double>(),
                      part_idx.data_ptr<int64_t>());
    TRIPLETOPS_LAUNCH((finish_anchors_kernel<scalar_t, T>), blocks_of(B, kRowsPerBlock), row_threads, 0, stream,
                      X.data_ptr<scalar_t>(), R.data_ptr<scalar_t>(), B, D, sq_x.data_ptr<T>(), metric, acc_u,
                      gemm_u, margin, soft_margin, state, listed, list + B, settle_parts, settle_items,
                      part_key.data_ptr<double>(), part_idx.data_ptr<int64_t>(), m.pos_idx.data_ptr<int64_t>(),
                      m.neg_idx.data_ptr<int64_t>(), m.pos_dist.data_ptr<T>(), m.neg_dist.data_ptr<T>(), anchor_loss.data_ptr<T>(), anchor_valid.data_ptr<uint8_t>(),
                      reduction, want_loss, counter_ptr(), want_loss ? m.loss.data_ptr<scalar_t>() : nullptr);
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

at::Tensor batch_hard_settle_stats_cuda(const at::Tensor& embeddings, const at::Tensor& labels,
                                       const c10::optional<at::Tensor>& ref_embeddings,
                                       const c10::optional<at::Tensor>& ref_labels, c10::string_view metric_name) {
  const Inputs in = check_inputs(embeddings, labels, ref_embeddings, ref_labels);
  const DeviceGuard guard(embeddings.device());
  const at::Tensor stats = at::zeros({2}, embeddings.options().dtype(at::kLong));
  mine(embeddings, in, ref_embeddings, parse_metric(metric_name), /*want_loss=*/false, 0.0, false, Reduction::Sum,
       &stats);
  return stats;
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
    BackwardArgs<scalar_t, T> args{g.data_ptr<scalar_t>(), g.dim() == 0 ? 0 : g.stride(0),
                                         X.data_ptr<scalar_t>(), R.data_ptr<scalar_t>(), B, D,
                                         pos.data_ptr<int64_t>(), neg.data_ptr<int64_t>(), pd.data_ptr<T>(),
                                         nd.data_ptr<T>(), margin, metric, soft_margin, reduction, nullptr};
    if (self && B <= kSelfScanMaxB) {  // one kernel: a warp per row finds its contributors
      TRIPLETOPS_LAUNCH((self_grad_kernel<scalar_t, T>), blocks_of(B, kRowsPerBlock, kMaxGridBlocks), threads, 0,
                        stream, args, grad_x.data_ptr<T>());
      return;
    }
    // The denominator once, for every block of the kernels below.
    at::Tensor count = at::empty({kCountBlocks}, X.options().dtype(at::kLong));
    TRIPLETOPS_LAUNCH((count_kernel<scalar_t, T>), unsigned(kCountBlocks), threads, 0, stream, args,
                      count.data_ptr<int64_t>());
    args.count = count.data_ptr<int64_t>();
    TRIPLETOPS_LAUNCH((anchor_grad_kernel<scalar_t, T>), blocks_of(B, kRowsPerBlock, kMaxGridBlocks), threads, 0,
                      stream, args, grad_x.data_ptr<T>());
    if (!self && !want_ref) return;
    // Group the 2B (row, anchor) pairs by row; stable, so each group keeps ascending entry
    // order. Self-mining adds the groups onto the anchors' own terms (O(B log B), where the
    // scan above would cost O(B^2) index compares).
    const auto sorted = at::sort(at::cat({pos, neg}), /*stable=*/true, /*dim=*/0, /*descending=*/false);
    const at::Tensor target = std::get<0>(sorted).contiguous(), entry = std::get<1>(sorted).contiguous();
    // Chunks of at most kHubChunk terms, one warp each; the groups longer than that ("hub"
    // rows) sum their chunks' partial rows from `parts` in a second kernel.
    at::Tensor parts = at::empty({hub_slots(2 * B), D}, X.options().dtype(compute_dtype(X.scalar_type())));
    T* rows_out = self ? grad_x.data_ptr<T>() : grad_r.data_ptr<T>();
    TRIPLETOPS_LAUNCH((ref_grad_kernel<scalar_t, T>), blocks_of(2 * B, kRowsPerBlock, kMaxGridBlocks), threads, 0,
                      stream, args, target.data_ptr<int64_t>(), entry.data_ptr<int64_t>(), rows_out,
                      parts.data_ptr<T>());
    TRIPLETOPS_LAUNCH((ref_merge_kernel<T>), blocks_of(2 * B, kRowsPerBlock, kMaxGridBlocks), threads, 0, stream,
                      target.data_ptr<int64_t>(), 2 * B, D, parts.data_ptr<T>(), rows_out);
  });
  return {grad_x.to(X.scalar_type()),
          want_ref ? grad_r.to(R.scalar_type()) : at::empty({0}, X.options())};
}

}  // namespace
}  // namespace cuda
}  // namespace tripletops

TORCH_LIBRARY_IMPL(TRIPLETOPS_CUDA_LIBRARY, TRIPLETOPS_CUDA_KEY, m) {
  m.impl("batch_hard_mine", &tripletops::cuda::batch_hard_mine_cuda);
  m.impl("batch_hard_settle_stats", &tripletops::cuda::batch_hard_settle_stats_cuda);
  m.impl("batch_hard_loss", &tripletops::cuda::batch_hard_loss_cuda);
  m.impl("batch_hard_loss_backward", &tripletops::cuda::batch_hard_loss_backward_cuda);
}
