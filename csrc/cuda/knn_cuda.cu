// Exact k-nearest search on CUDA (tripletops.knn): the twin of csrc/cpu/knn_cpu.cpp, with
// the same certified windows, one pass over the gallery. Device code: knn_kernels.cuh.
//
//  1. The gallery in tiles: each tile's keys come from one addmm (cuBLAS) on the rows in
//     the compute dtype, shifted by the gallery's mean for (sq)euclidean: |g|^2 - 2 q.g,
//     or -q.g on unit rows for cosine; NaN for a row that is not finite and for query i's
//     own row under exclude_self.
//  2. For k <= 256, knn_tile_select_kernel reads each tile once: every query keeps its k
//     smallest keys so far in registers (one warp per query row, or per part of a row when
//     the queries are few) and appends each key within twice the certified bound of that
//     running k-th (common.h: gram_key_bound, with TF32's input rounding where cuBLAS may
//     use it) as a candidate. The running k-th only falls, so the candidates hold the final
//     window: about k (1 + ln(G / 256)) per query on random data, filtered at the end to
//     the final k-th key plus twice the bound (about k + 2). For k > 256, at::topk merges
//     each tile into every query's k smallest and at::nonzero lists the candidates.
//  3. The candidates' exact keys in double (knn_exact_keys_kernel), a stable sort by
//     (query, key, index), and the first k of each query are the answer: the float64
//     brute force's, indices included.
// A query whose row is not finite, or that has fewer than k finite candidates, takes every
// gallery row as a candidate; so does every query of a small problem (Q G D <= 2^16) and,
// when the bound is infinite (fp32 with D > ~167,000), every query.
//
// Cost, expected on an H200 at Q = G = 10^5, D = 128, fp32, k = 10 (a model, not
// measured): the GEMMs, 1.3e12 multiply-adds at ~50 TFLOP/s, ~52 ms, writing 150 tiles of
// 2^26 keys (40 GB, inside the GEMM's time while it is compute-bound); the selection
// reads them once, 40 GB at ~4 TB/s, ~10 ms; ~70 candidates per query (7e6: ~84 MB
// written and read, the final filter, the sorts of ~1.2e6 survivors) and the exact keys,
// ~2 ms. In all ~65 ms, ~1.25x one GEMM (the goal: 1.5x; the topk path it replaces
// modelled ~130 ms). Extra memory: one tile of keys (256 MiB) and the candidate buffer
// (12 bytes per entry, ~k (2 + 2 ln(G / 256)) + 16 per query: ~190 MB at Q = 10^5).
// Host synchronizations per call: two under (sq)euclidean (the scaling decision reads the
// largest norm and entry; the tile selection reads its candidate count with the number of
// direct queries), one under cosine; after an overflow one more per slice, and on the
// k > 256 path one per tile. Nothing else reads a value on the host: dropped candidates
// are marked (query Q), not compacted.
#include "device.h"
#include "knn_kernels.cuh"

#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

namespace tripletops {
namespace cuda {
namespace {

#ifdef TRIPLETOPS_EMU
constexpr int64_t kKnnTileElems = int64_t(1) << 12;  // several tiles at the tests' sizes
constexpr int64_t kKnnTargetWarps = 64;              // several segments at the tests' sizes
constexpr int64_t kKnnMinSegment = 8;
#else
constexpr int64_t kKnnTileElems = int64_t(1) << 26;  // 256 MiB of fp32 keys per tile
constexpr int64_t kKnnTargetWarps = 132 * 64;        // an H100/H200 full of warps
constexpr int64_t kKnnMinSegment = kKnnChunkPerLane * kWarp;  // a chunk: 256 keys of a row
#endif
constexpr int64_t kKnnDirectWork = int64_t(1) << 16;
// Candidates held before they are settled on exact keys (the k nearest of each query kept,
// the rest dropped), where the window is not bounded (collapsed embeddings, queries searched
// on every row): 2^23 pairs, ~200 MB with their keys and the sort's copies.
constexpr int64_t kKnnSettleRoom = kKnnTileElems / 8;

// The gallery in tiles of `cols` rows: the queries' keys against each, and the threshold
// of a query from its k-th smallest key so far.
struct Tiles {
  at::Tensor x, y, bias, twice, direct;  // GEMM operands, key bias per gallery row, twice the bound, direct queries
  int64_t Q, G, cols;
  bool cosine, exclude_self;

  int64_t count() const { return (G + cols - 1) / cols; }

  // Keys of the queries against gallery rows [c0, c0 + n): (Q, n), NaN where excluded.
  at::Tensor keys(int64_t c0, int64_t n) const {
    // A 1-D bias: cuBLASLt adds it in the GEMM's epilogue (a (1, n) one would first be
    // copied into the whole tile: one more write and read of every key).
    at::Tensor key = at::addmm(bias.narrow(0, c0, n), x, y.narrow(0, c0, n).t(), 1.0, cosine ? -1.0 : -2.0);
    if (exclude_self && c0 < Q) key.diagonal(-c0).fill_(std::numeric_limits<double>::quiet_NaN());
    return key;
  }

  // The threshold of every query: its k-th smallest key so far (kth, (Q), NaN or +inf
  // while it has fewer than k finite keys: no threshold) plus twice the bound, rounded up
  // in the compute dtype; -inf for a direct query. Keys only fall as tiles come in, so the
  // running threshold never drops below the final one: what it admits holds the final window.
  at::Tensor threshold(const at::Tensor& kth) const {
    const double inf = std::numeric_limits<double>::infinity();
    at::Tensor admit = (at::nan_to_num(kth.to(at::kDouble), inf) + twice).to(x.scalar_type());
    admit = at::nextafter(admit, at::full_like(admit, inf));
    return at::where(direct, at::full_like(admit, -inf), admit);
  }
};

// The rows exact keys are read from (the inputs, or fp64 rows scaled into double's range).
// Candidate pairs travel as (query, gallery row) index arrays; a pair whose query is Q (the
// sentinel) is a dropped one, kept in place so that nothing is compacted: compacting
// (a boolean index, nonzero) would read the count on the host, a synchronization per step.
struct ExactRows {
  at::Tensor x, y;
  int64_t Q, D;
  bool cosine;

  // The exact keys of the pairs (query q[t], gallery row j[t]), in double; +inf for a
  // dropped pair.
  at::Tensor keys(const at::Tensor& pq, const at::Tensor& pj) const {
    const at::Tensor q = pq.contiguous(), j = pj.contiguous();  // the kernel reads flat arrays
    const int64_t n = q.size(0);
    at::Tensor key = at::empty({n}, x.options().dtype(at::kDouble));
    if (n == 0) return key;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "knn_exact_keys_cuda", [&] {
      const int64_t blocks = std::min<int64_t>((n + kKnnWarpsPerBlock - 1) / kKnnWarpsPerBlock, 65535);
      TRIPLETOPS_LAUNCH((knn_exact_keys_kernel<scalar_t>), unsigned(blocks), kKnnWarpsPerBlock * kWarp, 0,
                        current_stream(), x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), D, cosine,
                        q.data_ptr<int64_t>(), j.data_ptr<int64_t>(), n, Q, key.data_ptr<double>());
    });
    return key;
  }
};

// Every query's k nearest as (Q * k) arrays in output order (query i's at i k .. i k + k - 1,
// nearest first): a missing neighbour has query Q, row -1 and key +inf.
struct Nearest {
  at::Tensor q, j, key;
};

// Sorts candidates by (query, exact key, index) and keeps the first k of every query.
// Under (sq)euclidean, the double sums of knn_exact_keys_kernel round in lane order, so
// two rows at exactly equal distance can differ by a rounding and tie the wrong way: keys
// within the sums' rounding bound of a neighbour and at most the query's k-th key plus
// that bound (nothing past it can reach the first k) are formed again correctly rounded
// (knn_refine_keys_kernel) and the pairs sorted once more, as on CPU (knn_cpu.cpp:
// rank_exact). No host synchronization.
Nearest nearest_k(const ExactRows& e, at::Tensor q, at::Tensor j, at::Tensor key, int64_t k) {
  const int64_t Q = e.Q, n = q.size(0);
  const auto lopts = q.options();
  const auto sort_pairs = [&] {
    // (query, key, index): three stable sorts, the last key first (the tile selection
    // appends in no fixed order); dropped pairs (query Q) go last.
    at::Tensor order = std::get<1>(at::sort(j, /*stable=*/true, 0, false));
    q = q.index({order}), j = j.index({order}), key = key.index({order});
    order = std::get<1>(at::sort(key, /*stable=*/true, 0, false));
    q = q.index({order}), j = j.index({order}), key = key.index({order});
    order = std::get<1>(at::sort(q, /*stable=*/true, 0, false));
    q = q.index({order}), j = j.index({order}), key = key.index({order});
  };
  sort_pairs();
  // Pairs per query (index_add: at::bincount reads its maximum on the host).
  const at::Tensor counts = at::zeros({Q + 1}, lopts).index_add_(0, q, at::ones_like(q));
  const at::Tensor start = counts.cumsum(0) - counts;
  if (!e.cosine && n > 1) {
    const double rel = 4.0 * double(e.D + 4) * 0x1p-53;  // knn_cpu.cpp's bound
    const at::Tensor kth = key.index({(start + counts.clamp_max(k) - 1).clamp(0, n - 1)});
    const at::Tensor reach = key.le((kth * (1 + 2 * rel) + 0x1p-1000).index({q})).logical_and(key.isfinite());
    const at::Tensor same = q.narrow(0, 1, n - 1) == q.narrow(0, 0, n - 1);
    const at::Tensor later = key.narrow(0, 1, n - 1);
    const at::Tensor tie_prev = same.logical_and((later - key.narrow(0, 0, n - 1)) <= later * rel + 0x1p-1000);
    at::Tensor tie = at::zeros({n}, q.options().dtype(at::kBool));
    tie.narrow(0, 1, n - 1).logical_or_(tie_prev);
    tie.narrow(0, 0, n - 1).logical_or_(tie_prev);
    const at::Tensor refine = tie.logical_and_(reach);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, e.x.scalar_type(), "knn_refine_keys_cuda", [&] {
      const int64_t threads = kKnnWarpsPerBlock * kWarp;
      const int64_t blocks = std::min<int64_t>((n + threads - 1) / threads, 65535);
      TRIPLETOPS_LAUNCH((knn_refine_keys_kernel<scalar_t>), unsigned(blocks), unsigned(threads), 0,
                        current_stream(), e.x.data_ptr<scalar_t>(), e.y.data_ptr<scalar_t>(), e.D,
                        q.data_ptr<int64_t>(), j.data_ptr<int64_t>(), refine.data_ptr<bool>(), n,
                        key.data_ptr<double>());
    });
    sort_pairs();  // the same queries, so counts and start hold
  }
  // Pair t goes to slot q k + its place in its query, when that place is < k; every other
  // pair (and every dropped one) to slot Q k, cut off below.
  const at::Tensor pos = at::arange(n, lopts) - start.index({q});
  const at::Tensor slot = at::where(pos.lt(k).logical_and_(q.lt(Q)), q * k + pos, at::full_like(q, Q * k));
  Nearest out{at::full({Q * k + 1}, Q, lopts), at::full({Q * k + 1}, -1, lopts),
              at::full({Q * k + 1}, std::numeric_limits<double>::infinity(), key.options())};
  out.q.index_put_({slot}, q), out.j.index_put_({slot}, j), out.key.index_put_({slot}, key);
  return {out.q.narrow(0, 0, Q * k), out.j.narrow(0, 0, Q * k), out.key.narrow(0, 0, Q * k)};
}

// k <= 256: knn_tile_select_kernel reads each tile once, keeping every query's k smallest
// keys in registers and appending the candidates within its threshold. Returns the
// candidates (query, gallery row; query Q: dropped, past the final threshold); when they
// overflow the buffer, the k nearest of every query (settled on exact keys, see below).
// `direct_count`: how many queries are searched directly, read with the candidate count.
std::pair<at::Tensor, at::Tensor> candidates_by_tile_select(const Tiles& t, const ExactRows& e, int64_t k,
                                                            int64_t& direct_count) {
  const double inf = std::numeric_limits<double>::infinity();
  const auto opts = t.x.options(), lopts = opts.dtype(at::kLong);
  const int kpl = k <= kWarp ? 1 : k <= 2 * kWarp ? 2 : k <= 4 * kWarp ? 4 : 8;
  // Segments per row: enough warps to fill the GPU when the queries are few (132 SMs,
  // 64 warps each), but each at least a chunk (256 keys) of a tile's row.
  const int64_t segments =
      std::max<int64_t>(1, std::min((kKnnTargetWarps + t.Q - 1) / t.Q, t.cols / kKnnMinSegment));
  at::Tensor best = at::full({t.Q, segments, kpl * kWarp}, -inf, opts);
  best.narrow(2, 0, k).fill_(inf);
  // A segment's candidates on random data: about k (1 + ln(G / (segments 256))), a chunk
  // of 256 keys admitting about k and each later one its share; room for twice that and
  // the near-ties.
  const double chunks = std::max(1.0, double(t.G) / double(segments * kKnnChunkPerLane * kWarp));
  int64_t capacity = t.Q * segments * int64_t(std::ceil(k * (2 + 2 * std::log(chunks)) + 16));
  capacity = std::min(capacity, t.Q * t.G);
#ifdef TRIPLETOPS_EMU
  // Test hook of the emulator build: a small buffer, so that the tests run the overflow.
  if (const char* cap = std::getenv("TRIPLETOPS_EMU_KNN_CAPACITY")) capacity = std::atoll(cap);
#endif
  at::Tensor pair = at::empty({capacity}, lopts), ckey = at::empty({capacity}, opts);
  at::Tensor count = at::zeros({1}, lopts);
  // Gallery rows [c0, c0 + n) through the kernel, best's segments merging them or not.
  auto select = [&](int64_t c0, int64_t n, const at::Tensor& seg_best, bool merge) {
    const at::Tensor key = t.keys(c0, n);
    const int64_t blocks = std::min<int64_t>((t.Q * segments + kKnnWarpsPerBlock - 1) / kKnnWarpsPerBlock, 1 << 20);
    auto* counter = reinterpret_cast<unsigned long long*>(count.data_ptr<int64_t>());
    AT_DISPATCH_FLOATING_TYPES(key.scalar_type(), "knn_tile_select_cuda", [&] {
      auto go = [&](auto kernel, const char* name) {
        launch_kernel(name, kernel, unsigned(blocks), kKnnWarpsPerBlock * kWarp, 0, current_stream(),
                      key.data_ptr<scalar_t>(), t.Q, n, segments, c0, t.G, k, seg_best.data_ptr<scalar_t>(),
                      t.twice.data_ptr<double>(), t.direct.data_ptr<bool>(), merge, counter, pair.size(0),
                      pair.data_ptr<int64_t>(), ckey.data_ptr<scalar_t>());
      };
      const char* name = "knn_tile_select_kernel";
      if (kpl == 1) go(knn_tile_select_kernel<scalar_t, 1>, name);
      else if (kpl == 2) go(knn_tile_select_kernel<scalar_t, 2>, name);
      else if (kpl == 4) go(knn_tile_select_kernel<scalar_t, 4>, name);
      else go(knn_tile_select_kernel<scalar_t, 8>, name);
    });
  };
  const int64_t tiles = t.count();
  // The counter after each tile, and the number of direct queries: one read at the end.
  at::Tensor count_after = at::empty({tiles + 1}, lopts);
  count_after.narrow(0, tiles, 1).copy_(t.direct.sum().view({1}));
  for (int64_t i = 0; i < tiles; ++i) {
    select(i * t.cols, std::min(t.cols, t.G - i * t.cols), best, /*merge=*/true);
    count_after.narrow(0, i, 1).copy_(count);
  }
  const at::Tensor after = count_after.cpu();  // the one synchronization of the search
  const int64_t* a = after.data_ptr<int64_t>();
  const int64_t found = a[tiles - 1];
  direct_count = a[tiles];
  // The query's k-th smallest key: the k-th of its segments' k smallest (padding: +inf).
  best.narrow(2, k, best.size(2) - k).fill_(inf);
  const at::Tensor kth = std::get<0>(at::kthvalue(best.view({t.Q, -1}), k, 1));
  if (found <= capacity) {
    const at::Tensor cand = pair.narrow(0, 0, found), q = cand.div(t.G, "floor");
    const at::Tensor keep = ckey.narrow(0, 0, found).le(t.threshold(kth).index({q}));  // the final window
    return {at::where(keep, q, at::full_like(q, t.Q)), cand - q * t.G};
  }
  // Overflow: many keys within the bound of the k-th, as on collapsed embeddings, where
  // every key is (then the window of a query is the whole gallery, and a buffer of the
  // count would be Q x G). Tiles up to the first that overflowed wrote every candidate; they
  // are settled at once: the k nearest of each query by exact key (nearest_k: ties to the
  // smallest index), and a candidate beaten by k others is dropped for good. The rest of
  // the gallery runs again on the final thresholds (merge = false: every segment holds the
  // query's k-th), in slices of at most `room / Q` rows, each settled in turn: memory
  // O(Q k + room), one synchronization per slice.
  int64_t first = 0;
  while (a[first] <= capacity) ++first;
  const int64_t kept = first > 0 ? a[first - 1] : 0;
  at::Tensor cand = pair.narrow(0, 0, kept), q = cand.div(t.G, "floor"), j = cand - q * t.G;
  Nearest held = nearest_k(e, q, j, e.keys(q, j), k);
  const at::Tensor final_best = kth.view({t.Q, 1, 1}).expand({t.Q, segments, kpl * kWarp}).contiguous();
  const int64_t room = std::max({capacity, std::min(t.Q * t.G, kKnnSettleRoom), t.Q});
  if (pair.size(0) < room) pair = at::empty({room}, lopts), ckey = at::empty({room}, opts);
  const int64_t slice = std::max<int64_t>(1, room / t.Q);
  for (int64_t c0 = first * t.cols; c0 < t.G; c0 += slice) {
    count.zero_();
    select(c0, std::min(slice, t.G - c0), final_best, /*merge=*/false);
    const int64_t got = count.item<int64_t>();  // at most Q x slice <= room
    cand = pair.narrow(0, 0, got), q = cand.div(t.G, "floor"), j = cand - q * t.G;
    held = nearest_k(e, at::cat({held.q, q}), at::cat({held.j, j}), at::cat({held.key, e.keys(q, j)}), k);
  }
  return {held.q, held.j};
}

// k > 256: per tile, at::topk merges the tile's k smallest keys into every query's, and
// at::nonzero lists the keys within the threshold (each tile read three to four times;
// a host synchronization per tile).
// Candidates past kKnnSettleRoom (collapsed embeddings: every key is within the window)
// are settled on exact keys as they come, as in candidates_by_tile_select's overflow.
std::pair<at::Tensor, at::Tensor> candidates_by_topk(const Tiles& t, const ExactRows& e, int64_t k) {
  const double inf = std::numeric_limits<double>::infinity();
  at::Tensor best = at::full({t.Q, k}, inf, t.x.options());
  std::vector<at::Tensor> cand_q, cand_j, cand_key;
  const int64_t room = std::max(kKnnSettleRoom, 4 * t.Q * k);
  int64_t pending = 0;
  bool settled = false;
  Nearest held;
  for (int64_t c0 = 0; c0 < t.G; c0 += t.cols) {
    const int64_t n = std::min(t.cols, t.G - c0);
    const at::Tensor key = t.keys(c0, n);
    // The tile's own k smallest, then the merge on (Q, 2k).
    const at::Tensor tile_best = std::get<0>(at::topk(key, std::min(k, n), 1, /*largest=*/false, /*sorted=*/false));
    best = std::get<0>(at::topk(at::cat({best, tile_best}, 1), k, 1, /*largest=*/false, /*sorted=*/false));
    // NaN among the k smallest (topk ranks NaN largest): fewer than k finite keys yet.
    const at::Tensor hit = key.le(t.threshold(best.amax(1)).unsqueeze(1)).nonzero();
    cand_q.push_back(hit.select(1, 0));
    cand_j.push_back(hit.select(1, 1) + c0);
    cand_key.push_back(key.index({cand_q.back(), cand_j.back() - c0}));
    pending += hit.size(0);
    if (pending > room || (settled && c0 + n == t.G)) {
      const at::Tensor q = at::cat(cand_q), j = at::cat(cand_j);
      held = settled ? nearest_k(e, at::cat({held.q, q}), at::cat({held.j, j}), at::cat({held.key, e.keys(q, j)}), k)
                     : nearest_k(e, q, j, e.keys(q, j), k);
      settled = true, pending = 0;
      cand_q.clear(), cand_j.clear(), cand_key.clear();
    }
  }
  if (settled) return {held.q, held.j};
  const at::Tensor q = at::cat(cand_q);
  const at::Tensor keep = at::cat(cand_key).le(t.threshold(best.amax(1)).index({q}));  // the final window
  return {at::where(keep, q, at::full_like(q, t.Q)), at::cat(cand_j)};
}

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
  // (Sq)euclidean: rows whose squares leave the compute dtype's range (fp32 norms above
  // ~1.8e19, or every squared norm below min / eps^2, e.g. rows of norm 1e-30) are
  // multiplied by 2^-e, with 2^e just above the largest finite entry, as on CPU (rows_cpu.h:
  // safe_scale_exponent), in two steps of at most 2^±538 (a single 2^-e overflows double
  // for fp64 subnormal rows). Cosine is never scaled as a whole: each row is divided by its
  // own largest entry below (one exploding row must not push the others under eps).
  // The keys only rank; the distances come from the unscaled rows, in double.
  // The rows exact keys are read from: the unscaled inputs, except for fp64 rows whose
  // squares leave double's own range (all-subnormal, or norms beyond ~1e154): then the
  // scaled rows, and the distances times 2^exact_e at the end, as on CPU.
  at::Tensor xe = X, ye = Y;
  int exact_e = 0;
  if (!cosine) {
    const bool f32 = ct == at::kFloat;
    const double big = (f32 ? double(std::numeric_limits<float>::max()) : std::numeric_limits<double>::max()) / 8;
    const double tiny = f32 ? double(std::numeric_limits<float>::min()) / 0x1p-46 : std::numeric_limits<double>::min() / 0x1p-104;
    // The largest squared norm and |entry| over the finite rows: one host read (a
    // synchronization) decides the scaling; masked by where(), not by boolean indexing
    // (which reads a count on the host, one more synchronization each).
    const auto largest = [&](const at::Tensor& r, const at::Tensor& fin) {
      const at::Tensor f = at::where(fin.unsqueeze(1), r, at::zeros_like(r)).to(at::kDouble);
      return at::stack({f.square().sum(1).amax(), f.abs().amax()});
    };
    const at::Tensor read = (gallery.has_value() ? at::maximum(largest(x, fin_x), largest(y, fin_y))
                                                 : largest(x, fin_x)).cpu();
    const double max_sq = read.data_ptr<double>()[0], amax = read.data_ptr<double>()[1];
    if (amax > 0 && (!(max_sq < big) || max_sq < tiny)) {
      int e = 0;
      std::frexp(amax, &e);
      const double first = std::ldexp(1.0, -(e / 2)), second = std::ldexp(1.0, -(e - e / 2));
      x = x.to(at::kDouble).mul(first).mul(second).to(ct);
      y = gallery.has_value() ? y.to(at::kDouble).mul(first).mul(second).to(ct) : x;
      if (!f32) xe = x, ye = y, exact_e = e;
    }
  }
  if (cosine) {
    // F.normalize's x / max(|x|, eps) with |x| formed as m |x / m| (m: the row's largest
    // |entry|), so that no square overflows: a row of norm 1e20 is a unit row like any other.
    const auto unit_rows = [](const at::Tensor& r) {
      const at::Tensor m = r.abs().amax(1, true);
      const at::Tensor p = r / at::where(m > 0, m, at::ones_like(m));
      const at::Tensor pn = p.norm(2, 1, true);
      return at::where(pn * m > kNormEps, p / pn.clamp_min(1.0), r / kNormEps);
    };
    x = unit_rows(x);
    y = gallery.has_value() ? unit_rows(y) : x;
  } else {
    // The mean of the finite gallery rows (0 when there are none), without a host read.
    const at::Tensor n_fin = fin_y.sum().clamp_min(1).to(ct);
    const at::Tensor mean = at::where(fin_y.unsqueeze(1), y, at::zeros_like(y)).sum(0) / n_fin;
    x = x - mean;
    y = gallery.has_value() ? y - mean : x;
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
  const at::Tensor finite_gallery = fin_y.sum();  // on the device
  const bool all_direct = Q * G * D <= kKnnDirectWork || std::isinf(per_norm);
  at::Tensor twice;
  if (cosine) {
    twice = at::full({Q}, 2 * gram_key_bound(D, u, gemm_u, 4.0), X.options().dtype(at::kDouble));
  } else {
    const at::Tensor sq = sq_y.to(at::kDouble);
    const at::Tensor max_sy = at::where(fin_y, sq, at::zeros_like(sq)).amax().clamp_min(0);
    twice = (sq_x.to(at::kDouble).clamp_min(0).sqrt() + max_sy.sqrt()).square() * (2 * per_norm);
  }
  // Queries searched on every gallery row: own_finite[i] = 1 where query i's own gallery
  // row is excluded and would have counted.
  at::Tensor own_finite = at::zeros({Q}, lopts);
  if (exclude_self) {
    const int64_t n = std::min(Q, G);
    own_finite.narrow(0, 0, n).copy_(fin_y.narrow(0, 0, n).to(at::kLong));
  }
  at::Tensor direct = all_direct ? at::ones({Q}, X.options().dtype(at::kBool))
                                 : fin_x.logical_not().logical_or((finite_gallery - own_finite).lt(k));

  // Candidates with their exact keys: the tile search's, then the direct queries' (every
  // gallery row), in blocks of at most kKnnSettleRoom pairs settled one at a time.
  const ExactRows exact{xe, ye, Q, D, cosine};
  std::vector<at::Tensor> cand_q, cand_j, cand_key;
  int64_t direct_count = Q;
  if (!all_direct) {
    // Gallery rows per tile: up to kKnnTileElems keys, a multiple of 64 when there are that
    // many (2^26 / Q is 671 at Q = 10^5): each tile's leading dimension and its rows' offset
    // stay 256-byte aligned, for cuBLAS's aligned kernels and its bias epilogue.
    int64_t cols = std::max<int64_t>(1, std::min(G, kKnnTileElems / Q));
    if (cols < G && cols >= 64) cols -= cols % 64;
    const Tiles tiles{x, y, bias, twice, direct, Q, G, cols, cosine, exclude_self};
    const int64_t kk = std::min(k, G);
    std::pair<at::Tensor, at::Tensor> found;
    if (kk <= kKnnMaxKeysPerLane * kWarp) {
      found = candidates_by_tile_select(tiles, exact, kk, direct_count);
    } else {
      found = candidates_by_topk(tiles, exact, kk);
      direct_count = direct.sum().item<int64_t>();
    }
    cand_q.push_back(found.first);
    cand_j.push_back(found.second);
    cand_key.push_back(exact.keys(found.first, found.second));
  }
  // The direct queries, first in a stable sort of the flags (their count is known here;
  // nonzero would read it again).
  const at::Tensor dq = std::get<1>(at::sort(direct.to(at::kByte), /*stable=*/true, 0, /*descending=*/true))
                            .narrow(0, 0, direct_count);
  const int64_t per_block = std::max<int64_t>(1, kKnnSettleRoom / G);
  for (int64_t b0 = 0; b0 < direct_count; b0 += per_block) {
    const at::Tensor rows = dq.narrow(0, b0, std::min(per_block, direct_count - b0));
    at::Tensor pq = rows.unsqueeze(1).expand({rows.size(0), G}).contiguous().view({-1});
    at::Tensor pj = at::arange(G, lopts).repeat({rows.size(0)});
    if (exclude_self) pq = at::where(pq != pj, pq, at::full_like(pq, Q));  // own row: dropped
    at::Tensor pkey = exact.keys(pq, pj);
    if (direct_count > per_block) {
      const Nearest r = nearest_k(exact, pq, pj, pkey, k);
      pq = r.q, pj = r.j, pkey = r.key;
    }
    cand_q.push_back(pq);
    cand_j.push_back(pj);
    cand_key.push_back(pkey);
  }
  const at::Tensor q = cand_q.empty() ? at::empty({0}, lopts) : at::cat(cand_q);
  const at::Tensor j = cand_j.empty() ? at::empty({0}, lopts) : at::cat(cand_j);
  const at::Tensor key = cand_key.empty() ? at::empty({0}, X.options().dtype(at::kDouble)) : at::cat(cand_key);
  const Nearest nearest = nearest_k(exact, q, j, key, k);
  const at::Tensor out_key = nearest.key, out_idx = nearest.j;
  // Exact keys to distances: |a - b|, |a - b|^2, or 1 - cos = |â - b̂|^2 / 2.
  at::Tensor dist = metric == Metric::Euclidean ? out_key.sqrt() : cosine ? out_key / 2 : out_key;
  if (exact_e != 0) {  // back to the input's scale: 2^e (2^2e in two steps for sqeuclidean)
    const double up = std::ldexp(1.0, exact_e);
    dist = metric == Metric::Euclidean ? dist.mul(up) : dist.mul(up).mul(up);
  }
  return {dist.to(ct).view({Q, k}), out_idx.view({Q, k})};
}

}  // namespace
}  // namespace cuda
}  // namespace tripletops

TORCH_LIBRARY_IMPL(TRIPLETOPS_CUDA_LIBRARY, TRIPLETOPS_CUDA_KEY, m) { m.impl("knn", &tripletops::cuda::knn_cuda); }
