// Exact k-nearest search on CUDA (tripletops.knn): the twin of csrc/cpu/knn_cpu.cpp, with
// the same certified windows, one pass over the gallery. Device code: knn_kernels.cuh.
//
//  1. The gallery in tiles: each tile's keys come from one addmm (cuBLAS) on the rows in
//     the compute dtype, shifted by the gallery's mean for (sq)euclidean: |g|^2 - 2 q.g,
//     or -q.g on unit rows for cosine; NaN for a row that is not finite and for query i's
//     own row under exclude_self. at::topk merges them into every query's k smallest keys
//     so far, and every key of the tile within twice the certified bound of the running
//     k-th (common.h: gram_key_bound, with TF32's input rounding where cuBLAS may use it)
//     is kept as a candidate (at::nonzero). The running k-th only falls, so the kept
//     candidates hold the final window: about k (1 + ln(G / tile)) per query on random
//     data, filtered at the end to the final k-th key plus twice the bound (about k + 2).
//  2. The candidates' exact keys in double (knn_exact_keys_kernel), a stable sort by
//     (query, key, index), and the first k of each query are the answer: the float64
//     brute force's, indices included.
// A query whose row is not finite, or that has fewer than k finite candidates, takes every
// gallery row as a candidate; so does every query of a small problem (Q G D <= 2^16) and,
// when the bound is infinite (fp32 with D > ~167,000), every query.
//
// Cost: one GEMM pass (Q G D multiply-adds), then per tile a top-k, a compare and a
// nonzero, each reading the tile: memory-bound. Expected H200 time at Q = G = 10^5,
// D = 128 fp32 (not measured): the GEMMs 1.3e12 multiply-adds at ~50 TFLOP/s ~ 52 ms; per
// tile (2^26 keys, 150 tiles) the addmm's write, top-k's passes (~3 reads), the compare
// and the nonzero move ~1.5 GB: ~225 GB at ~3 TB/s ~ 75 ms; the exact keys ~1 ms. In all
// ~130 ms, ~2.5x one GEMM, against the goal of 1.5x: that needs the selection inside the
// GEMM's epilogue (the CPU's design), reading each key once, in registers. Extra memory:
// one tile of keys (2^26 entries) and ~60 candidates per query (Q = 10^5: ~120 MB).
// The candidate count is data-dependent, so the search synchronizes with the host.
#include "device.h"
#include "knn_kernels.cuh"

#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

namespace tripletops {
namespace cuda {
namespace {

#ifdef TRIPLETOPS_EMU
constexpr int64_t kKnnTileElems = int64_t(1) << 12;  // several tiles at the tests' sizes
#else
constexpr int64_t kKnnTileElems = int64_t(1) << 26;  // 256 MiB of fp32 keys per tile
#endif
constexpr int64_t kKnnDirectWork = int64_t(1) << 16;

std::tuple<at::Tensor, at::Tensor> knn_cuda(const at::Tensor& queries, const c10::optional<at::Tensor>& gallery,
                                            int64_t k, c10::string_view metric_name, bool exclude_self) {
  check_knn_inputs(queries, gallery, k, kDeviceType);
  const Metric metric = parse_metric(metric_name);
  const bool cosine = metric == Metric::Cosine;
  const DeviceGuard guard(queries.device());
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);  // GEMMs in the compute dtype
  const at::Tensor X = queries.contiguous();
  const at::Tensor Y = gallery.has_value() ? gallery->contiguous() : X;
  const int64_t Q = X.size(0), G = Y.size(0), D = X.size(1);
  const auto ct = X.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = X.options().dtype(ct);
  const auto lopts = X.options().dtype(at::kLong);
  const double inf = std::numeric_limits<double>::infinity();

  // The rows as GEMM operands, their finiteness and the bias of every key.
  at::Tensor x = X.to(ct), y = Y.to(ct);
  const at::Tensor fin_x = x.isfinite().all(1), fin_y = gallery.has_value() ? y.isfinite().all(1) : fin_x;
  // Rows whose squares leave the compute dtype's range (fp32 norms above ~1.8e19, or every
  // squared norm below min / eps^2, e.g. rows of norm 1e-30) are multiplied by 2^-e, with
  // 2^e just above the largest finite entry, as on CPU (rows_cpu.h: safe_scale_exponent).
  // The keys only rank; the distances come from the unscaled rows, in double.
  {
    const bool f32 = ct == at::kFloat;
    const double big = (f32 ? double(std::numeric_limits<float>::max()) : std::numeric_limits<double>::max()) / 8;
    const double tiny = f32 ? double(std::numeric_limits<float>::min()) / 0x1p-46 : std::numeric_limits<double>::min() / 0x1p-104;
    double max_sq = 0, amax = 0;
    for (const at::Tensor* r : {&x, &y}) {
      const at::Tensor f = r->index({r == &x ? fin_x : fin_y});
      if (f.numel() == 0) continue;
      max_sq = std::max(max_sq, f.to(at::kDouble).square().sum(1).max().item<double>());
      amax = std::max(amax, f.abs().max().item<double>());
    }
    if (amax > 0 && (!(max_sq < big) || (!cosine && max_sq < tiny))) {
      int e = 0;
      std::frexp(amax, &e);
      x = x.to(at::kDouble).mul(std::ldexp(1.0, -e)).to(ct);
      y = gallery.has_value() ? y.to(at::kDouble).mul(std::ldexp(1.0, -e)).to(ct) : x;
    }
  }
  if (cosine) {
    x = x / x.norm(2, 1, true).clamp_min(kNormEps);
    y = gallery.has_value() ? y / y.norm(2, 1, true).clamp_min(kNormEps) : x;
  } else {
    const at::Tensor finite_rows = y.index({fin_y});
    if (finite_rows.size(0) > 0) {
      const at::Tensor mean = finite_rows.mean(0);
      x = x - mean;
      y = gallery.has_value() ? y - mean : x;
    }
  }
  const at::Tensor sq_x = x.square().sum(1), sq_y = gallery.has_value() ? y.square().sum(1) : sq_x;
  const at::Tensor nan_row = at::full({G}, std::numeric_limits<double>::quiet_NaN(), opts);
  const at::Tensor bias = at::where(fin_y, cosine ? at::zeros_like(sq_y) : sq_y, nan_row);

  // The bound of every key (gram_key_bound, elementwise).
  const double u = ct == at::kFloat ? 0x1p-24 : 0x1p-53;
  double gemm_u = 0;
#ifndef TRIPLETOPS_EMU
  if (ct == at::kFloat && at::globalContext().allowTF32CuBLAS()) gemm_u = 0x1p-11;
#endif
  const double per_norm = gram_key_bound(D, u, gemm_u, 1.0);
  const int64_t finite_gallery = fin_y.sum().item<int64_t>();
  const bool all_direct = Q * G * D <= kKnnDirectWork || std::isinf(per_norm);
  at::Tensor twice;
  if (cosine) {
    twice = at::full({Q}, 2 * gram_key_bound(D, u, gemm_u, 4.0), X.options().dtype(at::kDouble));
  } else {
    const double max_sy = finite_gallery > 0 ? sq_y.index({fin_y}).max().item<double>() : 0.0;
    twice = (sq_x.to(at::kDouble).clamp_min(0).sqrt() + std::sqrt(std::max(0.0, max_sy))).square() * (2 * per_norm);
  }
  // Queries searched on every gallery row: own_finite[i] = 1 where query i's own gallery
  // row is excluded and would have counted.
  at::Tensor own_finite = at::zeros({Q}, lopts);
  if (exclude_self) {
    const int64_t n = std::min(Q, G);
    own_finite.narrow(0, 0, n).copy_(fin_y.narrow(0, 0, n).to(at::kLong));
  }
  at::Tensor direct = all_direct ? at::ones({Q}, X.options().dtype(at::kBool))
                                 : fin_x.logical_not().logical_or((finite_gallery - own_finite) < k);

  std::vector<at::Tensor> cand_q, cand_j;
  if (!all_direct) {
    const int64_t cols = std::max<int64_t>(1, std::min(G, kKnnTileElems / Q));
    // Keys of queries against gallery rows [c0, c0 + n): (Q, n), NaN where excluded.
    auto keys_of = [&](int64_t c0, int64_t n) {
      at::Tensor key = at::addmm(bias.narrow(0, c0, n).unsqueeze(0), x, y.narrow(0, c0, n).t(), 1.0,
                                 cosine ? -1.0 : -2.0);
      if (exclude_self && c0 < Q) key.diagonal(-c0).fill_(std::numeric_limits<double>::quiet_NaN());
      return key;
    };
    // The threshold of a query: its k-th smallest key so far plus twice the bound, rounded
    // up in the compute dtype (-inf for a direct query). Keys only fall as tiles come in, so the running
    // threshold never drops below the final one: what it admits holds the final window.
    auto threshold = [&](const at::Tensor& best) {
      // NaN among the k smallest: fewer than k finite keys yet, so no threshold (+inf).
      const at::Tensor kth = at::nan_to_num(best.amax(1).to(at::kDouble), inf);
      at::Tensor admit = (kth + twice).to(ct);
      admit = at::nextafter(admit, at::full_like(admit, inf));
      return at::where(direct, at::full_like(admit, -inf), admit).unsqueeze(1);
    };
    at::Tensor best = at::full({Q, std::min(k, G)}, inf, opts);
    std::vector<at::Tensor> cand_key;
    for (int64_t c0 = 0; c0 < G; c0 += cols) {
      const int64_t n = std::min(cols, G - c0);
      const at::Tensor key = keys_of(c0, n);
      // The tile's own k smallest, then the merge on (Q, 2k): the tile is read once by topk.
      const at::Tensor tile_best = std::get<0>(at::topk(key, std::min(k, n), 1, /*largest=*/false, /*sorted=*/false));
      best = std::get<0>(at::topk(at::cat({best, tile_best}, 1), std::min(k, G), 1, /*largest=*/false,
                                  /*sorted=*/false));
      const at::Tensor hit = key.le(threshold(best)).nonzero();
      cand_q.push_back(hit.select(1, 0));
      cand_j.push_back(hit.select(1, 1) + c0);
      cand_key.push_back(key.index({cand_q.back(), cand_j.back() - c0}));
    }
    // The final window (NaN in best: fewer than k finite keys, a direct query).
    const at::Tensor q = at::cat(cand_q), k_approx = at::cat(cand_key);
    const at::Tensor keep = k_approx.le(threshold(best).squeeze(1).index({q}));
    const at::Tensor j = at::cat(cand_j);
    cand_q = {q.index({keep})};
    cand_j = {j.index({keep})};
  }
  const at::Tensor dq = direct.nonzero().squeeze(1);
  if (dq.size(0) > 0) {
    at::Tensor pq = dq.repeat_interleave(G), pj = at::arange(G, lopts).repeat({dq.size(0)});
    if (exclude_self) {
      const at::Tensor keep = pq != pj;
      pq = pq.index({keep}), pj = pj.index({keep});
    }
    cand_q.push_back(pq);
    cand_j.push_back(pj);
  }
  at::Tensor q = cand_q.empty() ? at::empty({0}, lopts) : at::cat(cand_q);
  at::Tensor j = cand_j.empty() ? at::empty({0}, lopts) : at::cat(cand_j);
  const int64_t n = q.size(0);
  at::Tensor key = at::empty({n}, X.options().dtype(at::kDouble));
  if (n > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, X.scalar_type(), "knn_exact_keys_cuda", [&] {
      const int64_t blocks = std::min<int64_t>((n + kKnnWarpsPerBlock - 1) / kKnnWarpsPerBlock, 65535);
      TRIPLETOPS_LAUNCH((knn_exact_keys_kernel<scalar_t>), unsigned(blocks), kKnnWarpsPerBlock * kWarp, 0,
                        current_stream(), X.data_ptr<scalar_t>(), Y.data_ptr<scalar_t>(), D, cosine,
                        q.data_ptr<int64_t>(), j.data_ptr<int64_t>(), n, key.data_ptr<double>());
    });
  }
  // (query, key, index): j ascends within each query already (tiles in order, nonzero's
  // row-major order, direct queries whole), so two stable sorts finish the order.
  at::Tensor order = std::get<1>(at::sort(key, /*stable=*/true, 0, false));
  q = q.index({order}), j = j.index({order}), key = key.index({order});
  order = std::get<1>(at::sort(q, /*stable=*/true, 0, false));
  q = q.index({order}), j = j.index({order}), key = key.index({order});
  const at::Tensor counts = at::bincount(q, {}, Q);
  const at::Tensor start = counts.cumsum(0) - counts;
  const at::Tensor pos = at::arange(n, lopts) - start.index({q});
  const at::Tensor keep = pos < k;
  const at::Tensor slot = (q * k + pos).index({keep});
  at::Tensor out_key = at::full({Q * k}, inf, X.options().dtype(at::kDouble));
  at::Tensor out_idx = at::full({Q * k}, -1, lopts);
  out_key.index_put_({slot}, key.index({keep}));
  out_idx.index_put_({slot}, j.index({keep}));
  // Exact keys to distances: |a - b|, |a - b|^2, or 1 - cos = |â - b̂|^2 / 2.
  const at::Tensor dist = metric == Metric::Euclidean ? out_key.sqrt() : cosine ? out_key / 2 : out_key;
  return {dist.to(ct).view({Q, k}), out_idx.view({Q, k})};
}

}  // namespace
}  // namespace cuda
}  // namespace tripletops

TORCH_LIBRARY_IMPL(TRIPLETOPS_CUDA_LIBRARY, TRIPLETOPS_CUDA_KEY, m) { m.impl("knn", &tripletops::cuda::knn_cuda); }
