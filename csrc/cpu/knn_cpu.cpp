// Exact k-nearest search on CPU (tripletops.knn).
//
// The gallery is walked in tiles, as batch-hard mining walks its reference set: each
// tile's Gram block comes from one BLAS GEMM into a reused buffer, and an epilogue keeps,
// for every query, the candidates whose Gram-form key is within twice the certified
// rounding bound (common.h: gram_key_bound) of the query's running k-th smallest key.
// Those are the only rows that can be among the exact k nearest: the exact k-th distance
// is at most the k-th key plus the bound, and every key is within the bound of its exact
// value. They are ranked on exact difference-form keys in double (mining_cpu.h:
// ExactKeys), ties to the smallest index, so the result equals a float64 brute force,
// indices included. The Q x G matrix never exists: extra memory is
// O((Q + G) D + Q k + tile), plus the few candidates per query inside the window.
//
// Without a gallery only tiles on or above the diagonal are computed, and each
// off-diagonal tile serves both its row queries and its column queries: half of x x^T.
//
// Rows that hold NaN/Inf take no part in the Gram pass (their keys are NaN): a query
// whose own row is not finite, or that has fewer than k finite candidates, is searched
// directly on exact keys over the whole gallery (NaN distances rank last). So is every
// query of a small problem (Q G D <= kDirectWork), and every query when the bound is
// infinite (fp32 with D > ~167,000).
#include "mining_cpu.h"

#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <tuple>
#include <vector>

namespace tripletops {
namespace cpu {
namespace {

// Gram tile of queries x gallery rows: up to 2^21 entries (8 MiB of fp32), so the tile
// written by one GEMM is still in the last-level cache when the epilogue scans it (a
// whole Q x G GEMM at Q = G = 10^4 writes 400 MB and runs at memory speed). Measured on
// the 2-core CI machine (Q = G = 10^4, D = 128): the GEMMs take ~130 ms in all at any
// tile from 2^20 to 2^21 entries and 512 to 1024 columns, the epilogue ~35 ms.
constexpr int64_t kTileElems = int64_t(1) << 21;
constexpr int64_t kTileCols = 1024;  // gallery rows per tile (query blocks of kTileElems / kTileCols)
constexpr int64_t kSymTile = 1024;   // rows per side of a symmetric tile (no gallery)
constexpr int64_t kDirectWork = int64_t(1) << 16;

// (key, index) with NaN after every number, then the smallest index: torch.sort's order
// (stable) of the exact distances.
inline bool nearer(double ka, int64_t ia, double kb, int64_t ib) {
  const bool na = ka != ka, nb = kb != kb;
  if (na != nb) return nb;
  if (!na && ka != kb) return ka < kb;
  return ia < ib;
}

// The window's admission threshold: the k-th smallest key plus `twice`, rounded up in T
// (a key equal to it must stay in).
template <typename T>
inline T admit_above(T kth, double twice) {
  const double v = double(kth) + twice;
  T a = T(v);
  if (double(a) < v) a = std::nextafter(a, std::numeric_limits<T>::infinity());
  return a;
}

// The rows that exact keys are read from: the input rows in the compute dtype (for fp32,
// fp16 and bf16 inputs never the rows scaled by 2^-e: their squares and differences are
// exact in double at any fp32 magnitude, while the scaled rows would have lost the bits of
// small rows next to an exploding one).
template <typename T>
struct ExactRows {
  const T* x;
  const T* y;
  int64_t D;
  bool cosine;
};

// One query's candidates from the Gram pass: every gallery row whose key was at most
// `admit` when it arrived, where admit is the k-th smallest key seen so far plus twice
// the rounding bound (+inf until k keys have been seen). `best` is a max-heap of the k
// smallest keys, so the threshold tightens with every candidate that beats it (about
// k (1 + ln(G / k)) of them on random data). Candidates that fall out of the window
// are dropped whenever the buffer reaches `limit`, so it stays O(k) unless many keys
// sit inside the window.
//
// Keys inside the window are indistinguishable in the Gram form: on collapsed embeddings
// (identical or nearly identical rows) that is every row. So a window that still holds
// more than kSettleAt(k) candidates after pruning is settled: the candidates are ranked on
// exact keys, the k nearest kept as (exact key, index) in `exact` (a max-heap by `nearer`),
// and from then on each admitted candidate is decided at once against the k-th of them.
// A candidate beaten by k others can never be among the k nearest, so this drops nothing
// that matters, and a window holds O(k) entries on any data. When the k-th exact key is
// 0 (no key is smaller), a candidate of larger index than the k-th's cannot enter, and is
// dropped without computing its key: identical rows then cost one comparison each.
inline size_t settle_at(int64_t k) { return size_t(4 * k + 64); }

template <typename T>
struct Window {
  std::vector<T> best;
  std::vector<std::pair<T, int64_t>> cand;
  size_t limit = 0;
  std::vector<std::pair<double, int64_t>> exact;  // settled: the k nearest by exact key
  std::unique_ptr<ExactKeys<T>> keys;             // settled: the query's exact-key state

  bool settled() const { return keys != nullptr; }

  // Candidate j with Gram-form key `key`; `admit` is this query's threshold (kept in an
  // array beside the windows, which the column scans compare against lane by lane).
  TRIPLETOPS_INLINE void offer(T key, int64_t j, int64_t k, double twice, T& admit, int64_t i,
                               const ExactRows<T>& rows) {
    if (!(key <= admit)) return;
    if (int64_t(best.size()) < k) {
      best.push_back(key);
      std::push_heap(best.begin(), best.end());
      if (int64_t(best.size()) == k) admit = admit_above(best.front(), twice);
    } else if (key < best.front()) {
      std::pop_heap(best.begin(), best.end());
      best.back() = key;
      std::push_heap(best.begin(), best.end());
      admit = admit_above(best.front(), twice);
    }
    if (settled()) return decide(j, k, rows);
    cand.emplace_back(key, j);
    if (cand.size() >= limit) {
      prune(k, admit);
      if (cand.size() > settle_at(k)) settle(k, i, rows);
    }
  }
  void prune(int64_t k, T admit) {
    const T lim = admit;
    cand.erase(std::remove_if(cand.begin(), cand.end(),
                              [lim](const std::pair<T, int64_t>& p) { return !(p.first <= lim); }),
               cand.end());
    limit = std::max<size_t>(2 * cand.size(), size_t(2 * k + 32));
  }
  static bool heap_less(const std::pair<double, int64_t>& a, const std::pair<double, int64_t>& b) {
    return nearer(a.first, a.second, b.first, b.second);
  }
  void settle(int64_t k, int64_t i, const ExactRows<T>& rows) {
    keys.reset(new ExactKeys<T>(rows.x + i * rows.D, rows.D, rows.cosine));
    exact.reserve(size_t(k));
    for (const auto& c : cand) decide(c.second, k, rows);
    std::vector<std::pair<T, int64_t>>().swap(cand);
  }
  void decide(int64_t j, int64_t k, const ExactRows<T>& rows) {
    const bool full = int64_t(exact.size()) == k;
    if (full && exact.front().first <= 0.0 && j > exact.front().second) return;  // exact keys are >= 0
    std::pair<double, int64_t> c{keys->key(rows.y + j * rows.D), j};
    // (Sq)euclidean: a key that enters the k nearest, or that sits within the double sum's
    // rounding bound of the k-th (rank_exact's), is formed again correctly rounded, so the
    // k nearest hold correctly rounded keys and an exact tie at the k-th place goes to the
    // smallest index, as in rank_exact. A key past the bound is beaten by all k.
    if (!rows.cosine && std::isfinite(c.first)) {
      const double rel = 4.0 * double(rows.D + 4) * 0x1p-53;
      if (!full || c.first <= exact.front().first * (1 + 2 * rel) + 0x1p-1000)
        c.first = correctly_rounded_sq_distance(keys->a, rows.y + j * rows.D, rows.D);
    }
    if (!full) {
      exact.push_back(c);
      std::push_heap(exact.begin(), exact.end(), heap_less);
    } else if (heap_less(c, exact.front())) {
      std::pop_heap(exact.begin(), exact.end(), heap_less);
      exact.back() = c;
      std::push_heap(exact.begin(), exact.end(), heap_less);
    }
  }
};

// Positions l in [0, n) whose key (sr[l] - 2 g[l]; -g[l] for cosine unit rows) is at
// most `admit` (admit[l] per lane when kPerLane: the symmetric tiles' columns, one query
// each), written to hits; returns their count. 64 bytes of keys are compared at a time
// and only a block with a hit is looked at lane by lane: hits are rare once the windows
// have narrowed, so the scan runs at vector speed next to the GEMM.
template <typename T, bool Cosine, bool kPerLane>
TRIPLETOPS_INLINE typename Vec64<T>::V key_lanes(const T* g, const T* sr, T s0, int64_t l) {
  using W = Vec64<T>;
  const typename W::V gv = W::load(g + l);
  if (Cosine) return -gv;
  if (kPerLane) return s0 - T(2) * gv;
  return W::load(sr + l) - T(2) * gv;
}
template <typename T, bool Cosine, bool kPerLane>
TRIPLETOPS_INLINE int64_t admitted_lanes(const T* g, const T* sr, T s0, const T* admit, T a0, int64_t n,
                                         int32_t* hits) {
  using W = Vec64<T>;
  using I = typename W::Int;
  using M = typename W::M;
  constexpr int kBlock = 4;  // vectors per test for a hit: one horizontal OR per 256 bytes
  int64_t h = 0, l = 0;
  for (; l + kBlock * W::N <= n; l += kBlock * W::N) {
    M m[kBlock];
    for (int b = 0; b < kBlock; ++b) {
      const typename W::V key = key_lanes<T, Cosine, kPerLane>(g, sr, s0, l + b * W::N);
      m[b] = kPerLane ? key <= W::load(admit + l + b * W::N) : key <= a0;
    }
    const M any = (m[0] | m[1]) | (m[2] | m[3]);
    uint64_t w[8];
    std::memcpy(w, &any, sizeof(w));
    if ((w[0] | w[1] | w[2] | w[3] | w[4] | w[5] | w[6] | w[7]) == 0) continue;
    // The lanes' hits as a bit mask (lane t: bit t), then one step per hit.
    M weight;
    for (int t = 0; t < W::N; ++t) weight.set(t, I(1) << t);
    for (int b = 0; b < kBlock; ++b) {
      const M bits = m[b] & weight;
      uint64_t word = 0;
      for (int t = 0; t < W::N; ++t) word |= uint64_t(bits.get(t));
      for (; word != 0; word &= word - 1) hits[h++] = int32_t(l + b * W::N + __builtin_ctzll(word));
    }
  }
  for (; l < n; ++l) {
    const T key = Cosine ? -g[l] : (kPerLane ? s0 : sr[l]) - T(2) * g[l];
    if (key <= (kPerLane ? admit[l] : a0)) hits[h++] = int32_t(l);
  }
  return h;
}
template <typename T, bool Cosine>
TRIPLETOPS_INLINE int64_t admitted(const T* g, const T* sr, int64_t n, T admit, int32_t* hits) {
  return admitted_lanes<T, Cosine, false>(g, sr, T(0), nullptr, admit, n, hits);
}
TRIPLETOPS_SIMD_CLONES int64_t admitted_f(const float* g, const float* sr, int64_t n, float a, int32_t* h, bool cos) {
  return cos ? admitted<float, true>(g, sr, n, a, h) : admitted<float, false>(g, sr, n, a, h);
}
TRIPLETOPS_SIMD_CLONES int64_t admitted_d(const double* g, const double* sr, int64_t n, double a, int32_t* h,
                                          bool cos) {
  return cos ? admitted<double, true>(g, sr, n, a, h) : admitted<double, false>(g, sr, n, a, h);
}
inline int64_t admitted_any(const float* g, const float* sr, int64_t n, float a, int32_t* h, bool cos) {
  return admitted_f(g, sr, n, a, h, cos);
}
inline int64_t admitted_any(const double* g, const double* sr, int64_t n, double a, int32_t* h, bool cos) {
  return admitted_d(g, sr, n, a, h, cos);
}

// Columns j in [0, n) of one Gram row (candidate i, squared norm si) whose key for query
// j (si - 2 g[j]; -g[j] for cosine) is at most that query's admit[j].
template <typename T, bool Cosine>
TRIPLETOPS_INLINE int64_t admitted_cols(const T* g, T si, const T* admit, int64_t n, int32_t* hits) {
  return admitted_lanes<T, Cosine, true>(g, nullptr, si, admit, T(0), n, hits);
}
TRIPLETOPS_SIMD_CLONES int64_t admitted_cols_f(const float* g, float si, const float* a, int64_t n, int32_t* h,
                                               bool cos) {
  return cos ? admitted_cols<float, true>(g, si, a, n, h) : admitted_cols<float, false>(g, si, a, n, h);
}
TRIPLETOPS_SIMD_CLONES int64_t admitted_cols_d(const double* g, double si, const double* a, int64_t n, int32_t* h,
                                               bool cos) {
  return cos ? admitted_cols<double, true>(g, si, a, n, h) : admitted_cols<double, false>(g, si, a, n, h);
}
inline int64_t admitted_cols_any(const float* g, float si, const float* a, int64_t n, int32_t* h, bool cos) {
  return admitted_cols_f(g, si, a, n, h, cos);
}
inline int64_t admitted_cols_any(const double* g, double si, const double* a, int64_t n, int32_t* h, bool cos) {
  return admitted_cols_d(g, si, a, n, h, cos);
}

struct Search {
  int64_t Q, G, D, k;
  bool self;          // no gallery: the gallery is the query set
  bool exclude_self;  // query i never finds gallery row i
  Metric metric;
};

// The k nearest of query i by exact keys: out (key, index) pairs, nearest first, written
// to keys / idx (k of them; missing neighbours: index -1, key +inf).
template <typename T>
void rank_exact(const Search& s, const T* x, const T* y, int64_t i, std::vector<std::pair<double, int64_t>>& cand,
                bool query_finite, const uint8_t* fr, double* keys, int64_t* idx) {
  ExactKeys<T> exact(x + i * s.D, s.D, s.metric == Metric::Cosine);
  for (auto& c : cand) {
    // Cosine of a non-finite row is NaN (F.normalize gives NaN entries); the difference
    // form gives inf or NaN by itself.
    c.first = (s.metric == Metric::Cosine && !(query_finite && fr[c.second]))
                  ? std::numeric_limits<double>::quiet_NaN()
                  : exact.key(y + c.second * s.D);
  }
  const int64_t n = std::min<int64_t>(s.k, int64_t(cand.size()));
  const auto by_key = [](const std::pair<double, int64_t>& a, const std::pair<double, int64_t>& b) {
    return nearer(a.first, a.second, b.first, b.second);
  };
  if (s.metric == Metric::Cosine) {
    std::partial_sort(cand.begin(), cand.begin() + n, cand.end(), by_key);
  } else {
    // (Sq)euclidean near ties: the double sums above round in the order of the entries,
    // so two rows at exactly equal distance can differ by a rounding and tie the wrong way.
    // Keys within the sums' rounding bound of their neighbour form runs; a run that
    // reaches the first n is ranked again on correctly rounded keys, which are equal for
    // equal distances (ties to the smallest index) and keep every other order.
    std::sort(cand.begin(), cand.end(), by_key);
    const double rel = 4.0 * double(s.D + 4) * 0x1p-53;
    for (size_t a = 0; a < cand.size() && int64_t(a) < n;) {
      size_t b = a + 1;
      while (b < cand.size() && std::isfinite(cand[b].first) &&
             cand[b].first - cand[b - 1].first <= rel * cand[b].first + 0x1p-1000)
        ++b;
      if (b - a > 1 && std::isfinite(cand[a].first)) {
        for (size_t t = a; t < b; ++t)
          cand[t].first = correctly_rounded_sq_distance(x + i * s.D, y + cand[t].second * s.D, s.D);
        std::sort(cand.begin() + a, cand.begin() + b, by_key);
      }
      a = b;
    }
  }
  for (int64_t t = 0; t < s.k; ++t) {
    keys[t] = t < n ? cand[t].first : std::numeric_limits<double>::infinity();
    idx[t] = t < n ? cand[t].second : -1;
  }
}

// The Gram pass: every query's window of candidates. Returns, per query, whether it must
// be searched directly instead (its row is not finite, or it has fewer than k candidates).
template <typename T>
std::vector<uint8_t> gram_pass(const Search& s, const PreparedRows& Em, const PreparedRows& Rm,
                               const ExactRows<T>& rows, std::vector<Window<T>>& win) {
  const int64_t Q = s.Q, G = s.G, D = s.D, k = s.k;
  const bool cosine = s.metric == Metric::Cosine;
  const T inf = std::numeric_limits<T>::infinity();
  const T* sq_e = Em.sq_norm.data_ptr<T>();
  const uint8_t* fe = Em.finite.data_ptr<uint8_t>();
  const uint8_t* fr = Rm.finite.data_ptr<uint8_t>();
  // The gallery's squared norms, NaN for a row that is not finite: its keys are NaN and
  // never admitted. Cosine keys need no norms (unit rows).
  std::vector<T> sr(G);
  double max_sr = 0;
  int64_t finite_gallery = 0;
  for (int64_t j = 0; j < G; ++j) {
    sr[j] = fr[j] ? Rm.sq_norm.data_ptr<T>()[j] : std::numeric_limits<T>::quiet_NaN();
    if (fr[j]) max_sr = std::max(max_sr, double(sr[j])), ++finite_gallery;
  }
  const double u = double(std::numeric_limits<T>::epsilon()) / 2;
  std::vector<double> twice(Q);
  for (int64_t i = 0; i < Q; ++i) {
    const double norms = cosine ? 4.0 : std::pow(std::sqrt(double(sq_e[i])) + std::sqrt(max_sr), 2.0);
    twice[i] = 2 * gram_key_bound(D, u, 0.0, norms);
  }
  std::vector<T> admit(Q, inf);
  for (int64_t i = 0; i < Q; ++i) win[i].limit = size_t(2 * k + 32), win[i].best.reserve(k);

  // Offer candidates c0 + hits[...] to query i.
  auto offer = [&](int64_t i, const T* g, const T* keys_sr, int64_t c0, const int32_t* hits, int64_t h) {
    Window<T>& w = win[i];
    for (int64_t t = 0; t < h; ++t) {
      const int64_t j = c0 + hits[t];
      if (s.exclude_self && j == i) continue;
      const T key = cosine ? -g[hits[t]] : keys_sr[hits[t]] - T(2) * g[hits[t]];
      w.offer(key, j, k, twice[i], admit[i], i, rows);  // admit may have dropped since the scan
    }
  };
  // Queries [r0, r1) against gallery rows [c0, c1); tile row i - r0 holds g(i, c0..c1).
  auto scan_rows = [&](const T* tile, int64_t ld, int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
    at::parallel_for(r0, r1, std::max<int64_t>(1, 8192 / (c1 - c0)), [&](int64_t begin, int64_t end) {
      std::vector<int32_t> hits(c1 - c0);
      for (int64_t i = begin; i < end; ++i) {
        if (!fe[i]) continue;
        // A window still filling (admit +inf) would take the whole row as hits: it is offered
        // pieces of k + 1, 2 (k + 1), 4 (k + 1), ... entries, each scanned against the
        // threshold the previous ones set, so it takes about k log2(row / k) hits.
        int64_t piece = int64_t(win[i].best.size()) < k ? k + 1 : c1 - c0;
        for (int64_t p0 = c0; p0 < c1; p0 += piece, piece *= 2) {
          const int64_t n = std::min(piece, c1 - p0);
          const T* g = tile + (i - r0) * ld + (p0 - c0);
          const int64_t h = admitted_any(g, sr.data() + p0, n, admit[i], hits.data(), cosine);
          offer(i, g, sr.data() + p0, p0, hits.data(), h);
        }
      }
    });
  };
  // Symmetric tiles: queries [c0, c1) (the tile's columns) against candidates [r0, r1)
  // (its rows), walking rows so that the reads stay contiguous.
  auto scan_cols = [&](const T* tile, int64_t ld, int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
    at::parallel_for(c0, c1, 64, [&](int64_t begin, int64_t end) {
      std::vector<int32_t> hits(end - begin);
      for (int64_t i = r0; i < r1; ++i) {
        if (!fr[i]) continue;
        const T* g = tile + (i - r0) * ld + (begin - c0);
        const int64_t h = admitted_cols_any(g, sr[i], admit.data() + begin, end - begin, hits.data(), cosine);
        for (int64_t t = 0; t < h; ++t) {
          const int64_t q = begin + hits[t];
          if (!fe[q]) continue;
          const T key = cosine ? -g[hits[t]] : sr[i] - T(2) * g[hits[t]];
          win[q].offer(key, i, k, twice[q], admit[q], q, rows);
        }
      }
    });
  };

  if (s.self) {
    // The diagonal tiles first: each query's own tile sets its threshold (scan_rows)
    // before the off-diagonal tiles offer it candidates by columns.
    const int64_t n_tiles = (Q + kSymTile - 1) / kSymTile;
    const int64_t side = std::min(kSymTile, Q);
    at::Tensor buffer = at::empty({side * side}, Em.rows.options());
    for (int64_t d = 0; d < n_tiles; ++d) {
      for (int64_t a = 0; a + d < n_tiles; ++a) {
        const int64_t b = a + d;
        const int64_t r0 = a * kSymTile, r1 = std::min(Q, r0 + kSymTile);
        const int64_t c0 = b * kSymTile, c1 = std::min(Q, c0 + kSymTile);
        at::Tensor tile = buffer.narrow(0, 0, (r1 - r0) * (c1 - c0)).view({r1 - r0, c1 - c0});
        at::mm_out(tile, Em.rows.narrow(0, r0, r1 - r0), Em.rows.narrow(0, c0, c1 - c0).t());
        const T* t = tile.data_ptr<T>();
        scan_rows(t, c1 - c0, r0, r1, c0, c1);
        if (b != a) scan_cols(t, c1 - c0, r0, r1, c0, c1);
      }
    }
  } else {
    const int64_t cols = std::min(kTileCols, G);
    const int64_t rows = std::min(Q, std::max<int64_t>(64, kTileElems / cols));
    at::Tensor buffer = at::empty({rows * cols}, Em.rows.options());
    for (int64_t r0 = 0; r0 < Q; r0 += rows) {
      const int64_t r1 = std::min(Q, r0 + rows);
      for (int64_t c0 = 0; c0 < G; c0 += cols) {
        const int64_t c1 = std::min(G, c0 + cols);
        at::Tensor tile = buffer.narrow(0, 0, (r1 - r0) * (c1 - c0)).view({r1 - r0, c1 - c0});
        at::mm_out(tile, Em.rows.narrow(0, r0, r1 - r0), Rm.rows.narrow(0, c0, c1 - c0).t());
        scan_rows(tile.data_ptr<T>(), c1 - c0, r0, r1, c0, c1);
      }
    }
  }
  // Final pruning: only the window is ranked exactly.
  std::vector<uint8_t> direct(Q);
  at::parallel_for(0, Q, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t own = (s.exclude_self && i < G && fr[i]) ? 1 : 0;
      direct[i] = !fe[i] || finite_gallery - own < k;
      if (!direct[i]) win[i].prune(k, admit[i]);
    }
  });
  return direct;
}

template <typename T>
void knn_impl(const Search& s, const ScaledRows& S, const at::Tensor& xe, const at::Tensor& ye, double* keys,
              int64_t* idx) {
  const int64_t Q = s.Q, G = s.G, D = s.D, k = s.k;
  const T* x = xe.data_ptr<T>();
  const T* y = ye.data_ptr<T>();
  const uint8_t* fe = S.E.finite.data_ptr<uint8_t>();
  const uint8_t* fr = S.R.finite.data_ptr<uint8_t>();
  const double u = double(std::numeric_limits<T>::epsilon()) / 2;
  const bool all_direct = Q * G * D <= kDirectWork || std::isinf(gram_key_bound(D, u, 0.0, 1.0));
  std::vector<Window<T>> win(Q);
  std::vector<uint8_t> direct(Q, 1);
  if (!all_direct) {
    PreparedRows Em = S.E, Rm = S.R;
    if (s.metric != Metric::Cosine) center_for_mining<T>(S.E, S.R, s.self, Em, Rm);
    direct = gram_pass<T>(s, Em, Rm, ExactRows<T>{x, y, D, s.metric == Metric::Cosine}, win);
  }
  at::parallel_for(0, Q, 16, [&](int64_t begin, int64_t end) {
    std::vector<std::pair<double, int64_t>> cand;
    for (int64_t i = begin; i < end; ++i) {
      cand.clear();
      if (direct[i]) {
        for (int64_t j = 0; j < G; ++j)
          if (!(s.exclude_self && j == i)) cand.emplace_back(0.0, j);
      } else {
        for (const auto& c : win[i].cand) cand.emplace_back(0.0, c.second);
        for (const auto& c : win[i].exact) cand.emplace_back(0.0, c.second);
        win[i] = Window<T>();  // frees its buffers
      }
      rank_exact<T>(s, x, y, i, cand, fe[i], fr, keys + i * k, idx + i * k);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> knn_cpu(const at::Tensor& queries, const c10::optional<at::Tensor>& gallery,
                                           int64_t k, c10::string_view metric_name, bool exclude_self) {
  check_knn_inputs(queries, gallery, k, c10::DeviceType::CPU);
  const Metric metric = parse_metric(metric_name);
  const Search s{queries.size(0), gallery.has_value() ? gallery->size(0) : queries.size(0), queries.size(1), k,
                 !gallery.has_value(), exclude_self, metric};
  const ScaledRows S = prepare_scaled(queries, gallery, metric);
  at::Tensor keys = at::empty({s.Q, k}, queries.options().dtype(at::kDouble));
  at::Tensor idx = at::empty({s.Q, k}, queries.options().dtype(at::kLong));
  // Exact keys from the unscaled rows wherever double holds their squares (every input
  // but fp64); fp64 rows out of range are ranked on the scaled rows (docs/retrieval.md).
  at::Tensor xe = S.x, ye = S.y;
  int e = S.scale_e;
  if (e != 0 && S.x.scalar_type() == at::kFloat) {
    xe = queries.to(at::kFloat).contiguous();
    ye = gallery.has_value() ? gallery->to(at::kFloat).contiguous() : xe;
    e = 0;
  }
  AT_DISPATCH_FLOATING_TYPES(S.E.rows.scalar_type(), "knn_cpu", [&] {
    knn_impl<scalar_t>(s, S, xe, ye, keys.data_ptr<double>(), idx.data_ptr<int64_t>());
  });
  // Exact keys to distances: |a - b| (euclidean), |a - b|^2, or 1 - cos = |â - b̂|^2 / 2,
  // back to the input's scale (2^e, 2^2e) where they came from scaled rows, then in the
  // compute dtype.
  double* kv = keys.data_ptr<double>();
  for (int64_t t = 0; t < keys.numel(); ++t) {
    const double v = kv[t];
    kv[t] = metric == Metric::Cosine ? v / 2
            : metric == Metric::Euclidean ? std::ldexp(std::sqrt(v), e)
                                          : std::ldexp(v, 2 * e);
  }
  return {keys.to(compute_dtype(queries.scalar_type())), idx};
}

}  // namespace
}  // namespace cpu
}  // namespace tripletops

TORCH_LIBRARY_IMPL(tripletops, CPU, m) { m.impl("knn", &tripletops::cpu::knn_cpu); }
