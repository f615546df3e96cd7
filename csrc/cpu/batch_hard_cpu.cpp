// Batch-hard mining fused with the triplet loss, on CPU.
//
// Forward: the reference set is walked in tiles; each tile's Gram block comes from
// one BLAS GEMM into a reused buffer, and a label-masked reduction keeps every
// anchor's farthest positive and closest negative. The B x M distance matrix never
// exists: extra memory is O((B + M) * D + B * tile). When the reference set is the
// batch, only tiles on or above the diagonal are computed and each off-diagonal
// tile updates both its row anchors and its column anchors: half of x x^T.
// The selected pairs' distances are then recomputed exactly from the rows.
//
// Backward: only the 2B selected pairs are touched, O(B * D). Contributions to
// positive/negative rows are scattered in ascending anchor order, parallel over
// feature slices, so gradients are bit-identical from run to run.
#include "mining_cpu.h"

#include <ATen/ops/from_blob.h>
#include <ATen/ops/full.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/where.h>
#include <ATen/ops/isfinite.h>
#include <ATen/ops/zeros_like.h>
#include <cmath>
#include <torch/library.h>

#include <cstring>
#include <limits>
#include <unordered_map>
#include <tuple>
#include <type_traits>

namespace tripletops {
namespace cpu {
namespace {

// Tile sizes: rows per tile when the reference set is the batch (symmetric
// tiles), and a bound on tile elements when it is a separate set (columns per
// tile = kTileElems / B): 8 MiB of fp32 Gram entries at most.
constexpr int64_t kTileElems = int64_t(1) << 21;
constexpr int64_t kSelfTileRows = 128;
// Up to this B one whole B x B Gram matrix (one GEMM, one scan over rows) beats the
// triangle of tiles: the extra quarter of GEMM work costs less than the second GEMM
// call and the column pass, each a fork/join of the thread pool.
constexpr int64_t kSelfWholeMaxB = 512;  // measured best or within noise for B = 256..4096 on MKL

// Candidates reach each anchor in ascending reference index, so a strict
// comparison keeps the smallest index among ties. A NaN key wins (as torch.max
// and torch.min propagate NaN), and the first NaN stays.
// `second` keeps the runner-up's key (the best of the other candidates; NaN keys left
// out), which certifies the choice afterwards (settle_near_ties).
template <typename T>
inline void offer_farther(T key, int64_t j, T& best, int64_t& idx, T& second) {
  if (idx < 0 || key > best || (key != key && best == best)) {
    if (idx >= 0) second = std::max(second, best);
    best = key;
    idx = j;
  } else if (key == key) {
    second = std::max(second, key);
  }
}
template <typename T>
inline void offer_closer(T key, int64_t j, T& best, int64_t& idx, T& second) {
  if (idx < 0 || key < best || (key != key && best == best)) {
    if (idx >= 0) second = std::min(second, best);
    best = key;
    idx = j;
  } else if (key == key) {
    second = std::min(second, key);
  }
}

// Mining key of (anchor i, reference j) from their Gram entry g: ordered like the
// distance (d^2 for (sq)euclidean, 1 - cos for cosine); NaN when a row is not finite.
template <typename T>
struct KeyFn {
  Metric metric;
  const T *sa, *sr;
  const uint8_t *fa, *fr;
  inline T operator()(int64_t i, int64_t j, T g) const {
    if (!(fa[i] && fr[j])) return std::numeric_limits<T>::quiet_NaN();
    if (metric == Metric::Cosine) return T(1) - g;
    return relu_nan(sa[i] + sr[j] - T(2) * g);
  }
};

// ---- Fast path: every row finite and no norm near overflow, so no key is NaN or
// inf. Branch-free vector loops: each lane keeps its own running best (strict
// comparison keeps the lane's first index), and the lanes are merged by (value,
// smallest index). Cloned for AVX-512 / AVX2 / baseline (TRIPLETOPS_SIMD_CLONES).

// One anchor (squared norm sa, label li) against candidates c0..c0+n (Gram row g,
// labels as int32 class ids). Merges into (pk, pi) / (nk, ni), which hold only
// candidates of smaller index, and into the runner-up keys pk2 / nk2 (the best key among
// the other candidates, which certifies the choice: settle_near_ties). GCC vector types
// keep each lane's running best, runner-up and offset in registers (64-byte vectors: one
// zmm, two ymm or four xmm per clone).
// Lanes<T, Bytes>: the 64-byte vectors of the scans (one zmm), and, for the row scan on
// machines without AVX-512, 32-byte ones: the row scan keeps seven vectors live (best,
// runner-up and index of each kind, and the offsets), which in 64-byte vectors is 14 ymm
// on AVX2 plus temporaries: more than its 16 registers, and GCC spilled the loop to the
// stack (perf, AMD EPYC with AVX2, 2026-12-07: scan_row_fast_f 38 % of a B = 256 forward,
// ~6 ns per key). The generic template is the 32-byte form.
template <typename T, int Bytes = 64>
struct Lanes {
  static constexpr int N = Bytes / int(sizeof(T));
  typedef T V __attribute__((vector_size(Bytes)));
  typedef typename std::conditional<sizeof(T) == 4, int32_t, int64_t>::type Lane;
  typedef Lane I __attribute__((vector_size(Bytes)));
  typedef int32_t L __attribute__((vector_size(N * 4)));
  static TRIPLETOPS_INLINE void shared(const int32_t* lo, const int32_t* hi, int64_t other, I& out) {
    L l, h;
    std::memcpy(&l, lo, sizeof(l));
    std::memcpy(&h, hi, sizeof(h));
    out = __builtin_convertvector(((l & static_cast<int32_t>(other)) | (h & static_cast<int32_t>(other >> 32))) != 0, I);
  }
  static TRIPLETOPS_INLINE void labels(const int32_t* p, I& out) {
    L l;
    std::memcpy(&l, p, sizeof(l));
    out = __builtin_convertvector(l, I);
  }
};
template <>
struct Lanes<float, 64> {
  typedef float V __attribute__((vector_size(64)));
  typedef int32_t I __attribute__((vector_size(64)));
  static constexpr int N = 16;
  static TRIPLETOPS_INLINE void labels(const int32_t* p, I& out) { std::memcpy(&out, p, sizeof(out)); }
  // Lanes whose bitset word shares a bit with `other`, from the words' 32-bit halves: an
  // AND, an OR and a compare on int32 lanes, as cheap as the class ids' compare (int64
  // lanes would need a mask conversion per vector).
  static TRIPLETOPS_INLINE void shared(const int32_t* lo, const int32_t* hi, int64_t other, I& out) {
    I l, h;
    std::memcpy(&l, lo, sizeof(l));
    std::memcpy(&h, hi, sizeof(h));
    out = ((l & static_cast<int32_t>(other)) | (h & static_cast<int32_t>(other >> 32))) != 0;
  }
};
template <>
struct Lanes<double, 64> {
  typedef double V __attribute__((vector_size(64)));
  typedef int64_t I __attribute__((vector_size(64)));
  typedef int32_t L __attribute__((vector_size(32)));
  static constexpr int N = 8;
  static TRIPLETOPS_INLINE void shared(const int32_t* lo, const int32_t* hi, int64_t other, I& out) {
    L l, h;
    std::memcpy(&l, lo, sizeof(l));
    std::memcpy(&h, hi, sizeof(h));
    out = __builtin_convertvector(((l & static_cast<int32_t>(other)) | (h & static_cast<int32_t>(other >> 32))) != 0, I);
  }
  static TRIPLETOPS_INLINE void labels(const int32_t* p, I& out) {
    L l;
    std::memcpy(&l, p, sizeof(l));
    out = __builtin_convertvector(l, I);
  }
};

// Multi-hot labels of at most 64 labels on the fast scans: each row's bitset word as its
// low and high 32-bit halves, in two arrays (int32 lanes, as the class ids').
struct HalfWords {
  const int32_t* lo = nullptr;
  const int32_t* hi = nullptr;
};

// The label test of the fast scans, lanes j .. j + N - 1 (ids or words) against `other`:
// class ids (kWords false: int32 ids, equal), or multi-hot labels of at most 64 labels
// (kWords true: the rows' words, `other` a whole word, an AND). Writes the lanes' mask
// (an out-parameter, as LT::labels: no vector return value crosses an ABI).
template <typename T, bool kWords, int Bytes = 64>
TRIPLETOPS_INLINE void same_lanes(const int32_t* ids, HalfWords words, int64_t j, int64_t other,
                                  typename Lanes<T, Bytes>::I& same) {
  using LT = Lanes<T, Bytes>;
  using I = typename LT::I;
  if constexpr (kWords) {  // (only the pointer of the kind in use is offset: the other may be null)
    LT::shared(words.lo + j, words.hi + j, other, same);
  } else {
    I lv;
    LT::labels(ids + j, lv);
    same = lv == static_cast<int32_t>(other);
  }
}
template <bool kWords>
TRIPLETOPS_INLINE bool same_one(const int32_t* ids, HalfWords words, int64_t j, int64_t other) {
  if constexpr (kWords)
    return ((words.lo[j] & static_cast<int32_t>(other)) | (words.hi[j] & static_cast<int32_t>(other >> 32))) != 0;
  else return ids[j] == static_cast<int32_t>(other);
}

template <typename T, bool kWords, int Bytes = 64>
TRIPLETOPS_INLINE void scan_row_fast(const T* g, const T* sr, const int32_t* lab, HalfWords words, T sa, int64_t li,
                                     int64_t c0, int32_t n, bool cosine, T& pk, int64_t& pi, T& nk, int64_t& ni, T& pk2,
                                     T& nk2) {
  using LT = Lanes<T, Bytes>;
  using V = typename LT::V;
  using I = typename LT::I;
  constexpr int N = LT::N;
  const T inf = std::numeric_limits<T>::infinity();
  V pv, nv, p2, n2;
  I pj, nj, jv;
  for (int l = 0; l < N; ++l) pv[l] = p2[l] = -inf, nv[l] = n2[l] = inf, pj[l] = -1, nj[l] = -1, jv[l] = l;
  const V zero = pv * T(0) + T(0), ninf = zero - inf, pinf = zero + inf;
  int32_t j = 0;
  for (; j + N <= n; j += N) {
    V gv, sv;
    std::memcpy(&gv, g + j, sizeof(V));
    std::memcpy(&sv, sr + j, sizeof(V));
    V k = cosine ? (T(1) - gv) : (sa + sv - T(2) * gv);
    k = k < zero ? zero : k;
    I same;
    same_lanes<T, kWords, Bytes>(lab, words, j, li, same);
    const V kp = same ? k : ninf;
    const V kn = same ? pinf : k;
    const I bp = kp > pv, bn = kn < nv;
    p2 = bp ? pv : (kp > p2 ? kp : p2);  // the lane's runner-up: max(p2, min(kp, pv))
    n2 = bn ? nv : (kn < n2 ? kn : n2);
    pv = bp ? kp : pv;
    pj = bp ? jv : pj;
    nv = bn ? kn : nv;
    nj = bn ? jv : nj;
    jv += N;
  }
  T tpv = -inf, tnv = inf, tp2 = -inf, tn2 = inf;  // the tail, scalar
  int32_t tpj = -1, tnj = -1;
  for (; j < n; ++j) {
    T k = cosine ? T(1) - g[j] : sa + sr[j] - T(2) * g[j];
    k = k < T(0) ? T(0) : k;
    if (same_one<kWords>(lab, words, j, li)) {
      if (k > tpv) tp2 = tpv, tpv = k, tpj = j;
      else tp2 = std::max(tp2, k);
    } else if (k < tnv) {
      tn2 = tnv, tnv = k, tnj = j;
    } else {
      tn2 = std::min(tn2, k);
    }
  }
  // Among lanes (and the tail), ties go to the smaller index; against the running
  // state (smaller indices), the tile's best wins only when strictly better. The
  // runner-up is the best of every other lane's best and every runner-up.
  T bpv = tpv, bnv = tnv, bp2 = tp2, bn2 = tn2;
  int32_t bpj = tpj, bnj = tnj;
  for (int l = 0; l < N; ++l) {
    const int32_t lp = int32_t(pj[l]), ln = int32_t(nj[l]);
    bp2 = std::max(bp2, p2[l]), bn2 = std::min(bn2, n2[l]);
    if (lp >= 0 && (bpj < 0 || pv[l] > bpv || (pv[l] == bpv && lp < bpj))) {
      bp2 = std::max(bp2, bpv), bpv = pv[l], bpj = lp;
    } else if (lp >= 0) {
      bp2 = std::max(bp2, pv[l]);
    }
    if (ln >= 0 && (bnj < 0 || nv[l] < bnv || (nv[l] == bnv && ln < bnj))) {
      bn2 = std::min(bn2, bnv), bnv = nv[l], bnj = ln;
    } else if (ln >= 0) {
      bn2 = std::min(bn2, nv[l]);
    }
  }
  // Merged with the running state: the loser's best joins the runner-ups (-inf / +inf
  // stand for "none" there).
  pk2 = std::max(pk2, std::max(bp2, std::min(pk, bpv)));
  nk2 = std::min(nk2, std::min(bn2, std::max(nk, bnv)));
  if (bpj >= 0 && (pi < 0 || bpv > pk)) pk = bpv, pi = c0 + bpj;
  if (bnj >= 0 && (ni < 0 || bnv < nk)) nk = bnv, ni = c0 + bnj;
}

// One function per (T, label kind); scan_*_any<kWords>(...) picks it. On x86 with GCC:
// 64-byte lanes compiled for AVX-512 where the CPU has it, else 32-byte lanes cloned for
// AVX2 and the baseline (see Lanes); elsewhere one plain build of the 64-byte form.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define TRIPLETOPS_SCAN_ROW(T, W, name)                                                                              \
  __attribute__((target("avx512f"))) void name##_wide(const T* g, const T* sr, const int32_t* lab, HalfWords words, \
                                                      T sa, int64_t li, int64_t c0, int32_t n, bool cosine, T& pk,  \
                                                      int64_t& pi, T& nk, int64_t& ni, T& pk2, T& nk2) {            \
    scan_row_fast<T, W, 64>(g, sr, lab, words, sa, li, c0, n, cosine, pk, pi, nk, ni, pk2, nk2);                     \
  }                                                                                                                  \
  __attribute__((target_clones("avx2", "default"))) void name##_narrow(                                              \
      const T* g, const T* sr, const int32_t* lab, HalfWords words, T sa, int64_t li, int64_t c0, int32_t n,         \
      bool cosine, T& pk, int64_t& pi, T& nk, int64_t& ni, T& pk2, T& nk2) {                                        \
    scan_row_fast<T, W, 32>(g, sr, lab, words, sa, li, c0, n, cosine, pk, pi, nk, ni, pk2, nk2);                     \
  }                                                                                                                  \
  void name(const T* g, const T* sr, const int32_t* lab, HalfWords words, T sa, int64_t li, int64_t c0, int32_t n,   \
            bool cosine, T& pk, int64_t& pi, T& nk, int64_t& ni, T& pk2, T& nk2) {                                   \
    static const bool wide = __builtin_cpu_supports("avx512f");                                                      \
    (wide ? name##_wide : name##_narrow)(g, sr, lab, words, sa, li, c0, n, cosine, pk, pi, nk, ni, pk2, nk2);        \
  }
#else
#define TRIPLETOPS_SCAN_ROW(T, W, name)                                                                         \
  void name(const T* g, const T* sr, const int32_t* lab, HalfWords words, T sa, int64_t li, int64_t c0,         \
            int32_t n, bool cosine, T& pk, int64_t& pi, T& nk, int64_t& ni, T& pk2, T& nk2) {                   \
    scan_row_fast<T, W>(g, sr, lab, words, sa, li, c0, n, cosine, pk, pi, nk, ni, pk2, nk2);                     \
  }
#endif
TRIPLETOPS_SCAN_ROW(float, false, scan_row_fast_f)
TRIPLETOPS_SCAN_ROW(double, false, scan_row_fast_d)
TRIPLETOPS_SCAN_ROW(float, true, scan_row_fast_fw)
TRIPLETOPS_SCAN_ROW(double, true, scan_row_fast_dw)
#undef TRIPLETOPS_SCAN_ROW
template <bool kWords, typename T>
inline void scan_row_fast_any(const T* g, const T* sr, const int32_t* lab, HalfWords words, T sa, int64_t li,
                              int64_t c0, int32_t n, bool cosine, T& pk, int64_t& pi, T& nk, int64_t& ni, T& pk2,
                              T& nk2) {
  if constexpr (std::is_same_v<T, float>)
    (kWords ? scan_row_fast_fw : scan_row_fast_f)(g, sr, lab, words, sa, li, c0, n, cosine, pk, pi, nk, ni, pk2, nk2);
  else
    (kWords ? scan_row_fast_dw : scan_row_fast_d)(g, sr, lab, words, sa, li, c0, n, cosine, pk, pi, nk, ni, pk2, nk2);
}

// Candidate row i (squared norm si, label li) offered to anchors [0, n) of a
// symmetric tile's column range: vectorized across anchors, whose states are arrays.
// Candidates arrive in ascending i, so strict comparisons keep the smallest index.
template <typename T, bool kWords>
TRIPLETOPS_INLINE void scan_col_fast(const T* g, const T* sa, const int32_t* lab, HalfWords words, T si, int64_t li,
                                     int64_t i, int64_t n, bool cosine, T* pk, int64_t* pi, T* nk, int64_t* ni, T* pk2,
                                     T* nk2) {
  const T inf = std::numeric_limits<T>::infinity();
  for (int64_t j = 0; j < n; ++j) {
    T k = cosine ? T(1) - g[j] : sa[j] + si - T(2) * g[j];
    k = k < T(0) ? T(0) : k;
    const bool same = same_one<kWords>(lab, words, j, li);
    const T kp = same ? k : -inf;
    const T kn = same ? inf : k;
    const bool bp = kp > pk[j], bn = kn < nk[j];
    pk2[j] = bp ? pk[j] : (kp > pk2[j] ? kp : pk2[j]);  // runner-ups, as in scan_row_fast
    nk2[j] = bn ? nk[j] : (kn < nk2[j] ? kn : nk2[j]);
    pk[j] = bp ? kp : pk[j];
    pi[j] = bp ? i : pi[j];
    nk[j] = bn ? kn : nk[j];
    ni[j] = bn ? i : ni[j];
  }
}

#define TRIPLETOPS_SCAN_COL(T, W, name)                                                                         \
  TRIPLETOPS_SIMD_CLONES void name(const T* g, const T* sa, const int32_t* lab, HalfWords words, T si,      \
                                   int64_t li, int64_t i, int64_t n, bool cosine, T* pk, int64_t* pi, T* nk,    \
                                   int64_t* ni, T* pk2, T* nk2) {                                               \
    scan_col_fast<T, W>(g, sa, lab, words, si, li, i, n, cosine, pk, pi, nk, ni, pk2, nk2);                      \
  }
TRIPLETOPS_SCAN_COL(float, false, scan_col_fast_f)
TRIPLETOPS_SCAN_COL(double, false, scan_col_fast_d)
TRIPLETOPS_SCAN_COL(float, true, scan_col_fast_fw)
TRIPLETOPS_SCAN_COL(double, true, scan_col_fast_dw)
#undef TRIPLETOPS_SCAN_COL
template <bool kWords, typename T>
inline void scan_col_fast_any(const T* g, const T* sa, const int32_t* lab, HalfWords words, T si, int64_t li,
                              int64_t i, int64_t n, bool cosine, T* pk, int64_t* pi, T* nk, int64_t* ni, T* pk2,
                              T* nk2) {
  if constexpr (std::is_same_v<T, float>)
    (kWords ? scan_col_fast_fw : scan_col_fast_f)(g, sa, lab, words, si, li, i, n, cosine, pk, pi, nk, ni, pk2, nk2);
  else
    (kWords ? scan_col_fast_dw : scan_col_fast_d)(g, sa, lab, words, si, li, i, n, cosine, pk, pi, nk, ni, pk2, nk2);
}

// N anchors j0 .. j0+N-1 of a symmetric tile's columns (one vector of lanes, state kept in
// registers) against its candidate rows r0 .. r1-1 (row i's Gram entries at
// g + (i - r0) * ld). Candidates arrive in ascending i, so strict comparisons keep the
// smallest index; runner-ups as in scan_row_fast. Walking all rows for one chunk of
// anchors keeps the six state arrays out of the inner loop.
template <typename T, bool kWords, int Bytes = 64>
TRIPLETOPS_INLINE void scan_cols_chunk(const T* g, int64_t ld, const T* sq_rows, const int32_t* id_rows,
                                       const int64_t* w_rows, int64_t r0, int64_t r1, const T* sa, const int32_t* lab,
                                       HalfWords words, bool cosine, T* pk, int64_t* pi, T* nk, int64_t* ni,
                                       T* pk2, T* nk2) {
  using LT = Lanes<T, Bytes>;
  using V = typename LT::V;
  using I = typename LT::I;
  constexpr int N = LT::N;
  const T inf = std::numeric_limits<T>::infinity();
  V pv, nv, p2, n2, sv;
  I pj, nj;
  std::memcpy(&pv, pk, sizeof(V));
  std::memcpy(&nv, nk, sizeof(V));
  std::memcpy(&p2, pk2, sizeof(V));
  std::memcpy(&n2, nk2, sizeof(V));
  std::memcpy(&sv, sa, sizeof(V));
  for (int l = 0; l < N; ++l) pj[l] = pi[l], nj[l] = ni[l];
  I lv;  // the anchors' ids (class ids; their words, multi-hot, are read per row from L1)
  if constexpr (!kWords) LT::labels(lab, lv);
  const V zero = pv * T(0), ninf = zero - inf, pinf = zero + inf;
  for (int64_t i = r0; i < r1; ++i) {
    V gv;
    std::memcpy(&gv, g + (i - r0) * ld, sizeof(V));
    const I iv = pj * 0 + static_cast<typename std::remove_reference_t<decltype(pj[0])>>(i);
    V k = cosine ? (T(1) - gv) : (sv + sq_rows[i] - T(2) * gv);
    k = k < zero ? zero : k;
    I same;
    if constexpr (kWords) LT::shared(words.lo, words.hi, w_rows[i], same);
    else same = lv == id_rows[i];
    const V kp = same ? k : ninf;
    const V kn = same ? pinf : k;
    const I bp = kp > pv, bn = kn < nv;
    p2 = bp ? pv : (kp > p2 ? kp : p2);  // runner-ups, as in scan_row_fast
    n2 = bn ? nv : (kn < n2 ? kn : n2);
    pv = bp ? kp : pv;
    nv = bn ? kn : nv;
    pj = bp ? iv : pj;
    nj = bn ? iv : nj;
  }
  std::memcpy(pk, &pv, sizeof(V));
  std::memcpy(nk, &nv, sizeof(V));
  std::memcpy(pk2, &p2, sizeof(V));
  std::memcpy(nk2, &n2, sizeof(V));
  for (int l = 0; l < N; ++l) pi[l] = pj[l], ni[l] = nj[l];
}

// As the row scan: 64-byte lanes on AVX-512, else the chunk's Lanes<T>::N anchors as two
// halves of 32-byte lanes (eight live vectors: 16 ymm in the 64-byte form, which spilled).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define TRIPLETOPS_SCAN_COLS(T, W, name)                                                                            \
  __attribute__((target("avx512f"))) void name##_wide(                                                              \
      const T* g, int64_t ld, const T* sq_rows, const int32_t* id_rows, const int64_t* w_rows, int64_t r0,         \
      int64_t r1, const T* sa, const int32_t* lab, HalfWords words, bool cosine, T* pk, int64_t* pi, T* nk,         \
      int64_t* ni, T* pk2, T* nk2) {                                                                                \
    scan_cols_chunk<T, W, 64>(g, ld, sq_rows, id_rows, w_rows, r0, r1, sa, lab, words, cosine, pk, pi, nk, ni, pk2, \
                              nk2);                                                                                 \
  }                                                                                                                 \
  __attribute__((target_clones("avx2", "default"))) void name##_narrow(                                             \
      const T* g, int64_t ld, const T* sq_rows, const int32_t* id_rows, const int64_t* w_rows, int64_t r0,         \
      int64_t r1, const T* sa, const int32_t* lab, HalfWords words, bool cosine, T* pk, int64_t* pi, T* nk,         \
      int64_t* ni, T* pk2, T* nk2) {                                                                                \
    constexpr int h = Lanes<T>::N / 2;                                                                              \
    for (int part = 0; part < 2; ++part) {                                                                          \
      const int o = part * h;                                                                                       \
      const HalfWords wo{words.lo ? words.lo + o : nullptr, words.hi ? words.hi + o : nullptr};                     \
      scan_cols_chunk<T, W, 32>(g + o, ld, sq_rows, id_rows, w_rows, r0, r1, sa + o, lab ? lab + o : nullptr, wo,   \
                                cosine, pk + o, pi + o, nk + o, ni + o, pk2 + o, nk2 + o);                          \
    }                                                                                                               \
  }                                                                                                                 \
  void name(const T* g, int64_t ld, const T* sq_rows, const int32_t* id_rows, const int64_t* w_rows, int64_t r0,    \
            int64_t r1, const T* sa, const int32_t* lab, HalfWords words, bool cosine, T* pk, int64_t* pi, T* nk,   \
            int64_t* ni, T* pk2, T* nk2) {                                                                          \
    static const bool wide = __builtin_cpu_supports("avx512f");                                                     \
    (wide ? name##_wide : name##_narrow)(g, ld, sq_rows, id_rows, w_rows, r0, r1, sa, lab, words, cosine, pk, pi,   \
                                         nk, ni, pk2, nk2);                                                         \
  }
#else
#define TRIPLETOPS_SCAN_COLS(T, W, name)                                                                            \
  void name(const T* g, int64_t ld, const T* sq_rows, const int32_t* id_rows, const int64_t* w_rows, int64_t r0,    \
            int64_t r1, const T* sa, const int32_t* lab, HalfWords words, bool cosine, T* pk, int64_t* pi, T* nk,   \
            int64_t* ni, T* pk2, T* nk2) {                                                                          \
    scan_cols_chunk<T, W>(g, ld, sq_rows, id_rows, w_rows, r0, r1, sa, lab, words, cosine, pk, pi, nk, ni, pk2,    \
                          nk2);                                                                                     \
  }
#endif
TRIPLETOPS_SCAN_COLS(float, false, scan_cols_chunk_f)
TRIPLETOPS_SCAN_COLS(double, false, scan_cols_chunk_d)
TRIPLETOPS_SCAN_COLS(float, true, scan_cols_chunk_fw)
TRIPLETOPS_SCAN_COLS(double, true, scan_cols_chunk_dw)
#undef TRIPLETOPS_SCAN_COLS
template <bool kWords, typename T>
inline void scan_cols_chunk_any(const T* g, int64_t ld, const T* sq_rows, const int32_t* id_rows, const int64_t* w_rows,
                                int64_t r0, int64_t r1, const T* sa, const int32_t* lab, HalfWords words,
                                bool cosine, T* pk, int64_t* pi, T* nk, int64_t* ni, T* pk2, T* nk2) {
  if constexpr (std::is_same_v<T, float>)
    (kWords ? scan_cols_chunk_fw : scan_cols_chunk_f)(g, ld, sq_rows, id_rows, w_rows, r0, r1, sa, lab, words, cosine,
                                                      pk, pi, nk, ni, pk2, nk2);
  else
    (kWords ? scan_cols_chunk_dw : scan_cols_chunk_d)(g, ld, sq_rows, id_rows, w_rows, r0, r1, sa, lab, words, cosine,
                                                      pk, pi, nk, ni, pk2, nk2);
}

// Labels as dense int32 class ids (equality is all that counts), so they fit the
// fast scans' lanes. `ids` covers `lab` then `ref_lab` (when not the same array).
inline std::vector<int32_t> class_ids(const int64_t* lab, int64_t n, const int64_t* ref_lab, int64_t m) {
  std::vector<int32_t> ids(n + m);
  int64_t lo = std::numeric_limits<int64_t>::max(), hi = std::numeric_limits<int64_t>::min();
  for (int64_t i = 0; i < n; ++i) lo = std::min(lo, lab[i]), hi = std::max(hi, lab[i]);
  for (int64_t i = 0; i < m; ++i) lo = std::min(lo, ref_lab[i]), hi = std::max(hi, ref_lab[i]);
  if (lo >= std::numeric_limits<int32_t>::min() && hi <= std::numeric_limits<int32_t>::max()) {
    for (int64_t i = 0; i < n; ++i) ids[i] = static_cast<int32_t>(lab[i]);
    for (int64_t i = 0; i < m; ++i) ids[n + i] = static_cast<int32_t>(ref_lab[i]);
    return ids;
  }
  std::unordered_map<int64_t, int32_t> map;
  auto id = [&](int64_t v) { return map.emplace(v, static_cast<int32_t>(map.size())).first->second; };
  for (int64_t i = 0; i < n; ++i) ids[i] = id(lab[i]);
  for (int64_t i = 0; i < m; ++i) ids[n + i] = id(ref_lab[i]);
  return ids;
}

// Multi-hot labels on the fast scans: for anchor i and candidates c0..c0+n, out[j - c0]
// is 0 where they share a label and 1 where not, so the scans' "same id as 0" test is the
// shared-label test. One AND per word; for L <= 64 a single vectorizable pass.
inline void shared_label_ids(const Labels& lab, int64_t i, const Labels& ref, int64_t c0, int64_t n, int32_t* out) {
  if (lab.words == 1) {
    const int64_t a = lab.data[i];
    const int64_t* r = ref.data + c0;
    for (int64_t j = 0; j < n; ++j) out[j] = (a & r[j]) == 0;
    return;
  }
  for (int64_t j = 0; j < n; ++j) out[j] = !lab.shares(i, ref, c0 + j);
}

// Certified mining (no candidate misranked because a Gram key rounds). Each anchor's
// choice came with the runner-up's key (pk2 / nk2); every key is within
// gram_key_bound(D, u, (|a| + max |r|)^2) of the exact one, so a best that beats its
// runner-up by more than twice that bound is the exact best. The other anchors (near-ties,
// exact ties between distinct rows, duplicated rows) are settled:
//  1. one more GEMM, of just those anchors against the reference set in tiles, gives
//     keys with the same bound: a candidate can be at least as good as the exact best only
//     if its key is within twice the bound of the first pass's best key;
//  2. those candidates (typically two or three) are ranked on exact_key over the input
//     rows x / y (unshifted, in the compute dtype; for cosine their canonical unit rows in
//     double), ties to the smallest index.
// On random fp32 unit rows about 0.3% of anchors need it at B = 1024, D = 256 (1.2% at
// B = 4096, D = 512); the rest pay only the runner-up keys and the check.
template <typename T>
int64_t settle_near_ties(const PreparedRows& Em, const PreparedRows& Rm, const T* x, const T* y, const Labels& lab,
                      const Labels& ref_lab, bool self, Metric metric, const T* pk, const T* pk2, const T* nk,
                      const T* nk2, int64_t* pos, int64_t* neg) {
  const int64_t B = Em.rows.size(0), M = Rm.rows.size(0), D = Em.rows.size(1);
  const bool cosine = metric == Metric::Cosine;
  const T inf = std::numeric_limits<T>::infinity();
  const T* sa = Em.sq_norm.data_ptr<T>();
  const T* sr = Rm.sq_norm.data_ptr<T>();
  const uint8_t* fr = Rm.finite.data_ptr<uint8_t>();
  double max_sr = 0;  // over finite reference rows (a non-finite one gave NaN keys: no settling)
  for (int64_t j = 0; j < M; ++j)
    if (fr[j]) max_sr = std::max(max_sr, double(sr[j]));
  const double u = double(std::numeric_limits<T>::epsilon()) / 2;
  struct Todo {
    int64_t i;
    bool sp, sn;
    double lo, hi;  // candidates' key windows: positives >= lo, negatives <= hi
  };
  std::vector<Todo> todo;
  for (int64_t i = 0; i < B; ++i) {
    const double norms = cosine ? 4.0 : std::pow(std::sqrt(double(sa[i])) + std::sqrt(max_sr), 2.0);
    const double twice = 2 * gram_key_bound(D, u, 0.0, norms);
    const bool sp = pos[i] >= 0 && pk[i] == pk[i] && pk2[i] > -inf && !(double(pk[i]) - double(pk2[i]) > twice);
    const bool sn = neg[i] >= 0 && nk[i] == nk[i] && nk2[i] < inf && !(double(nk2[i]) - double(nk[i]) > twice);
    if (sp || sn) todo.push_back({i, sp, sn, double(pk[i]) - twice, double(nk[i]) + twice});
  }
  if (todo.empty()) return 0;
  const int64_t U = int64_t(todo.size());
  std::vector<int64_t> rows(U);
  for (int64_t t = 0; t < U; ++t) rows[t] = todo[t].i;
  const at::Tensor anchors =
      Em.rows.index_select(0, at::from_blob(rows.data(), {U}, at::TensorOptions().dtype(at::kLong)));
  std::vector<std::vector<int64_t>> cand(U);  // per anchor: the candidates in the window, ascending
  const int64_t cols_per_tile = std::max<int64_t>(64, kTileElems / U);
  at::Tensor buffer = at::empty({U * std::min(cols_per_tile, M)}, Em.rows.options());
  for (int64_t c0 = 0; c0 < M; c0 += cols_per_tile) {
    const int64_t c1 = std::min(M, c0 + cols_per_tile), cols = c1 - c0;
    at::Tensor tile = buffer.narrow(0, 0, U * cols).view({U, cols});
    at::mm_out(tile, anchors, Rm.rows.narrow(0, c0, cols).t());
    const T* g = tile.data_ptr<T>();
    at::parallel_for(0, U, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const Todo& w = todo[t];
        for (int64_t j = c0; j < c1; ++j) {
          if ((self && j == w.i) || !fr[j]) continue;
          const bool same = lab.shares(w.i, ref_lab, j);
          if (same ? !w.sp : !w.sn) continue;
          const T gj = g[t * cols + (j - c0)];
          const double k = cosine ? double(T(1) - gj) : double(relu_nan(sa[w.i] + sr[j] - T(2) * gj));
          if (same ? k >= w.lo : k <= w.hi) cand[t].push_back(j);
        }
      }
    });
  }
  at::parallel_for(0, U, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const Todo& w = todo[t];
      const int64_t i = w.i;
      ExactKeys<T> exact(x + i * D, D, cosine);
      double bp = -1, bn = 0;
      int64_t ip = -1, in = -1;
      for (const int64_t j : cand[t]) {
        const bool same = lab.shares(i, ref_lab, j);
        const double k = exact.key(y + j * D);
        if (same && (ip < 0 || k > bp)) bp = k, ip = j;
        if (!same && (in < 0 || k < bn)) bn = k, in = j;
      }
      // The first pass's choice is always in its own window; keep it if the window was lost.
      if (w.sp && ip >= 0) pos[i] = ip;
      if (w.sn && in >= 0) neg[i] = in;
    }
  });
  return U;
}

// Fills pos[i] / neg[i] (pre-set to -1) with each anchor's farthest positive and
// closest negative in R. `self`: R is E, and an anchor is not its own positive. E and R
// are the rows mined on (shifted, or unit rows); x and y the input rows, for settling.
// Returns the number of anchors settled.
template <typename T>
int64_t mine_tiles(const PreparedRows& E, const Labels& lab, const PreparedRows& R, const Labels& ref_lab,
                const T* x, const T* y, bool self, Metric metric, int64_t* pos, int64_t* neg) {
  const int64_t B = E.rows.size(0), M = R.rows.size(0);
  const bool fast = keys_all_finite<T>(E) && (self || keys_all_finite<T>(R));
  const bool cosine = metric == Metric::Cosine;
  // Running bests and runner-ups start at -inf / +inf: on the fast path every key is finite.
  const T inf = std::numeric_limits<T>::infinity();
  std::vector<T> pos_key(B, -inf), neg_key(B, inf), pos_key2(B, -inf), neg_key2(B, inf);
  const T* sq_e = E.sq_norm.data_ptr<T>();
  const T* sq_r = R.sq_norm.data_ptr<T>();
  // Labels on the fast scans: class ids as int32 ids; multi-hot labels of at most 64
  // labels as their bitset words (an AND per lane); more labels as shared_label_ids,
  // built per anchor (or per candidate, for the symmetric tiles' columns) and chunk.
  const bool words1 = lab.words == 1, multi_ids = lab.words > 1;
  const std::vector<int32_t> ids =
      fast && lab.words == 0 ? class_ids(lab.data, B, ref_lab.data, self ? 0 : M) : std::vector<int32_t>();
  // One-word labels as 32-bit halves: [lo of the anchors, lo of the reference rows (not
  // for self), hi of the anchors, hi of the reference rows].
  const int64_t n_halves = fast && words1 ? B + (self ? 0 : M) : 0;
  std::vector<int32_t> halves(2 * n_halves);
  for (int64_t k = 0; k < n_halves; ++k) {
    const uint64_t w = static_cast<uint64_t>(k < B ? lab.data[k] : ref_lab.data[k - B]);
    halves[k] = static_cast<int32_t>(w), halves[n_halves + k] = static_cast<int32_t>(w >> 32);
  }
  auto words_at = [&](bool anchors, int64_t j) {  // rows j, j + 1, ... of the anchors or the reference set
    const int64_t k = (anchors || self) ? j : B + j;
    return HalfWords{halves.data() + k, halves.data() + n_halves + k};
  };
  const int32_t* id_e = ids.data();
  const int32_t* id_r = self ? ids.data() : ids.data() + B;
  const KeyFn<T> key{metric, E.sq_norm.data_ptr<T>(), R.sq_norm.data_ptr<T>(), E.finite.data_ptr<uint8_t>(),
                     R.finite.data_ptr<uint8_t>()};

  // Anchors [r0, r1) against candidates [c0, c1); tile row i - r0 holds g(i, c0..c1).
  auto reduce_rows = [&](const T* tile, int64_t ld, int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, c1 - c0));
    at::parallel_for(r0, r1, grain, [&](int64_t begin, int64_t end) {
      std::vector<int32_t> shared(multi_ids && fast ? c1 - c0 : 0);
      for (int64_t i = begin; i < end; ++i) {
        const T* g = tile + (i - r0) * ld;
        T pk = pos_key[i], nk = neg_key[i], pk2 = pos_key2[i], nk2 = neg_key2[i];
        int64_t pi = pos[i], ni = neg[i];
        if (fast) {
          // Candidates c0 + [from, from + count) of the tile row.
          auto scan = [&](int64_t from, int64_t count) {
            if (words1) {
              scan_row_fast_any<true>(g + from, sq_r + c0 + from, nullptr, words_at(false, c0 + from), sq_e[i],
                                      lab.data[i], c0 + from, int32_t(count), cosine, pk, pi, nk, ni, pk2, nk2);
            } else {
              const int32_t* ids_c = multi_ids ? shared.data() + from : id_r + c0 + from;
              scan_row_fast_any<false>(g + from, sq_r + c0 + from, ids_c, HalfWords{}, sq_e[i], multi_ids ? 0 : id_e[i],
                                       c0 + from, int32_t(count), cosine, pk, pi, nk, ni, pk2, nk2);
            }
          };
          if (multi_ids) shared_label_ids(lab, i, ref_lab, c0, c1 - c0, shared.data());
          // An anchor is not its own positive: scan around it (keeps ascending order).
          const int64_t cut = (self && i >= c0 && i < c1) ? i : c1;
          scan(0, cut - c0);
          if (cut < c1) scan(cut + 1 - c0, c1 - cut - 1);
        } else {
          for (int64_t j = c0; j < c1; ++j) {
            if (self && j == i) continue;
            const T k = key(i, j, g[j - c0]);
            if (lab.shares(i, ref_lab, j)) offer_farther(k, j, pk, pi, pk2);
            else offer_closer(k, j, nk, ni, nk2);
          }
        }
        pos_key[i] = pk, neg_key[i] = nk, pos[i] = pi, neg[i] = ni, pos_key2[i] = pk2, neg_key2[i] = nk2;
      }
    });
  };
  // Symmetric tiles: anchors [c0, c1) take candidates [r0, r1) from the tile's
  // columns (tile column j - col0), walking rows so the reads stay contiguous.
  auto reduce_cols = [&](const T* tile, int64_t ld, int64_t col0, int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
    at::parallel_for(c0, c1, 64, [&](int64_t begin, int64_t end) {
      std::vector<int32_t> shared(multi_ids && fast ? end - begin : 0);
      if (fast && !multi_ids) {  // whole vectors of anchors first, then the rest anchor array by array
        constexpr int64_t N = Lanes<T>::N;
        for (; begin + N <= end; begin += N) {
          T *pk = pos_key.data() + begin, *nk = neg_key.data() + begin;
          T *pk2 = pos_key2.data() + begin, *nk2 = neg_key2.data() + begin;
          if (words1)
            scan_cols_chunk_any<true>(tile + begin - col0, ld, sq_e, nullptr, lab.data, r0, r1, sq_e + begin, nullptr,
                                      words_at(true, begin), cosine, pk, pos + begin, nk, neg + begin, pk2, nk2);
          else
            scan_cols_chunk_any<false>(tile + begin - col0, ld, sq_e, id_e, nullptr, r0, r1, sq_e + begin,
                                       id_e + begin, HalfWords{}, cosine, pk, pos + begin, nk, neg + begin, pk2, nk2);
        }
      }
      for (int64_t i = r0; i < r1 && begin < end; ++i) {
        const T* g = tile + (i - r0) * ld - col0;
        if (fast) {
          T *pk = pos_key.data() + begin, *nk = neg_key.data() + begin;
          T *pk2 = pos_key2.data() + begin, *nk2 = neg_key2.data() + begin;
          if (words1) {  // the anchors' words against the candidate's
            scan_col_fast_any<true>(g + begin, sq_e + begin, nullptr, words_at(true, begin), sq_e[i], lab.data[i], i,
                                    end - begin, cosine, pk, pos + begin, nk, neg + begin, pk2, nk2);
            continue;
          }
          if (multi_ids) shared_label_ids(lab, i, lab, begin, end - begin, shared.data());
          scan_col_fast_any<false>(g + begin, sq_e + begin, multi_ids ? shared.data() : id_e + begin, HalfWords{},
                                   sq_e[i], multi_ids ? 0 : id_e[i], i, end - begin, cosine, pk, pos + begin, nk,
                                   neg + begin, pk2, nk2);
          continue;
        }
        for (int64_t j = begin; j < end; ++j) {
          const T k = key(j, i, g[j]);
          if (lab.shares(j, lab, i)) offer_farther(k, i, pos_key[j], pos[j], pos_key2[j]);
          else offer_closer(k, i, neg_key[j], neg[j], neg_key2[j]);
        }
      }
    });
  };

  if (self) {
    // Tiles on and above the diagonal, in row order: anchor j first gets
    // candidates < its tile row start from earlier tiles' columns, then the rest
    // from its own row, so candidates arrive in ascending index.
    const int64_t rows_per_tile = B <= kSelfWholeMaxB ? B : kSelfTileRows;
    at::Tensor buffer = at::empty({std::min(rows_per_tile, B) * B}, E.rows.options());
    for (int64_t r0 = 0; r0 < B; r0 += rows_per_tile) {
      const int64_t r1 = std::min(B, r0 + rows_per_tile), rows = r1 - r0, cols = B - r0;
      at::Tensor tile = buffer.narrow(0, 0, rows * cols).view({rows, cols});
      at::mm_out(tile, E.rows.narrow(0, r0, rows), E.rows.narrow(0, r0, cols).t());
      const T* t = tile.data_ptr<T>();
      reduce_rows(t, cols, r0, r1, r0, B);
      if (r1 < B) reduce_cols(t, cols, r0, r0, r1, r1, B);
    }
  } else {
    const int64_t cols_per_tile = std::max<int64_t>(64, kTileElems / B);
    at::Tensor buffer = at::empty({B * std::min(cols_per_tile, M)}, E.rows.options());
    for (int64_t c0 = 0; c0 < M; c0 += cols_per_tile) {
      const int64_t c1 = std::min(M, c0 + cols_per_tile), cols = c1 - c0;
      at::Tensor tile = buffer.narrow(0, 0, B * cols).view({B, cols});
      at::mm_out(tile, E.rows, R.rows.narrow(0, c0, cols).t());
      reduce_rows(tile.data_ptr<T>(), cols, 0, B, c0, c1);
    }
  }
  return settle_near_ties<T>(E, R, x, y, lab, ref_lab, self, metric, pos_key.data(), pos_key2.data(),
                             neg_key.data(), neg_key2.data(), pos, neg);
}

struct Inputs {
  bool self;
  at::Tensor labels, ref_labels;  // pack_labels: int64 class ids or multi-hot bitsets, contiguous
  Labels lab, ref;                // their views
};

Inputs check_inputs(const at::Tensor& embeddings, const at::Tensor& labels,
                    const c10::optional<at::Tensor>& ref_embeddings, const c10::optional<at::Tensor>& ref_labels) {
  check_mining_inputs(embeddings, labels, ref_embeddings, ref_labels, c10::DeviceType::CPU);
  Inputs in{!ref_embeddings.has_value(), pack_labels(labels), at::Tensor(), {}, {}};
  in.ref_labels = in.self ? in.labels : pack_labels(*ref_labels);
  in.lab = labels_view(in.labels);
  in.ref = labels_view(in.ref_labels);
  return in;
}

struct Mined {
  at::Tensor pos_idx, neg_idx;    // (B,) int64, -1 where none
  at::Tensor pos_dist, neg_dist;  // (B,) compute dtype, exact; 0 where none
  at::Tensor triplet_finite;      // (B,) uint8: anchor, positive and negative rows all finite
  int64_t settled = 0;            // anchors settled on exact distances (settle_near_ties)
};

// Small problems (B * M * D up to kDirectWork) are mined on exact difference-form
// distances, every pair, with no Gram matrix: cheaper than a GEMM call and the tensors
// around it at these sizes (the fixed cost of one loss call is what counts there), and
// exact by construction, so ties go to the smallest index.
constexpr int64_t kDirectWork = int64_t(1) << 16;

template <typename T>
void mine_direct(const PreparedRows& E, const Labels& lab, const PreparedRows& R, const Labels& ref_lab, bool self,
                 Metric metric, int64_t* pos, int64_t* neg, T* pd, T* nd) {
  const int64_t B = E.rows.size(0), M = R.rows.size(0), D = E.rows.size(1);
  const T *e = E.rows.data_ptr<T>(), *r = R.rows.data_ptr<T>();
  const uint8_t *fe = E.finite.data_ptr<uint8_t>(), *fr = R.finite.data_ptr<uint8_t>();
  for (int64_t i = 0; i < B; ++i) {
    T pk = 0, nk = 0, pk2 = 0, nk2 = 0;  // exact keys: the runner-ups are not needed
    int64_t pi = -1, ni = -1;
    for (int64_t j = 0; j < M; ++j) {
      if (self && j == i) continue;
      // A NaN key for a non-finite row, as the Gram path's KeyFn gives.
      const T d = (fe[i] && fr[j]) ? row_distance(e + i * D, r + j * D, D, metric)
                                    : std::numeric_limits<T>::quiet_NaN();
      if (lab.shares(i, ref_lab, j)) offer_farther(d, j, pk, pi, pk2);
      else offer_closer(d, j, nk, ni, nk2);
    }
    pos[i] = pi, neg[i] = ni;
    // The reported distances are the exact ones (a non-finite row's is recomputed, as on
    // the Gram path, so the value matches it: inf or NaN).
    pd[i] = pi >= 0 ? row_distance(e + i * D, r + pi * D, D, metric) : T(0);
    nd[i] = ni >= 0 ? row_distance(e + i * D, r + ni * D, D, metric) : T(0);
  }
}

Mined mine_and_measure(const at::Tensor& embeddings, const Inputs& in,
                       const c10::optional<at::Tensor>& ref_embeddings, Metric metric) {
  const ScaledRows S = prepare_scaled(embeddings, ref_embeddings, metric);
  const PreparedRows &E = S.E, &R = S.R;
  const int scale_e = S.scale_e;
  const bool scaled = scale_e != 0;
  const PreparedRows &Es = E, &Rs = R;
  // The measured distances back to the input's scale: 2^e (euclidean), 2^2e (sqeuclidean).
  const auto scale_back = [&](Mined& m) {
    if (!scaled || metric == Metric::Cosine) return;
    const int k = metric == Metric::Euclidean ? scale_e : 2 * scale_e;
    scale_by_power_of_two(m.pos_dist, k);
    scale_by_power_of_two(m.neg_dist, k);
  };
  const int64_t B = embeddings.size(0), D = embeddings.size(1);
  Mined m;
  if (B * R.rows.size(0) * D <= kDirectWork) {
    m.pos_idx = at::empty({B}, E.rows.options().dtype(at::kLong));
    m.neg_idx = at::empty({B}, E.rows.options().dtype(at::kLong));
    m.pos_dist = at::empty({B}, E.rows.options());
    m.neg_dist = at::empty({B}, E.rows.options());
    m.triplet_finite = at::empty({B}, E.rows.options().dtype(at::kByte));
    AT_DISPATCH_FLOATING_TYPES(E.rows.scalar_type(), "batch_hard_mine_direct", [&] {
      int64_t *pos = m.pos_idx.data_ptr<int64_t>(), *neg = m.neg_idx.data_ptr<int64_t>();
      scalar_t *pd = m.pos_dist.data_ptr<scalar_t>(), *nd = m.neg_dist.data_ptr<scalar_t>();
      mine_direct<scalar_t>(Es, in.lab, Rs, in.ref, in.self,
                            metric, pos, neg, pd, nd);
      const uint8_t *fe = E.finite.data_ptr<uint8_t>(), *fr = R.finite.data_ptr<uint8_t>();
      uint8_t* ft = m.triplet_finite.data_ptr<uint8_t>();
      for (int64_t i = 0; i < B; ++i) ft[i] = fe[i] && (pos[i] < 0 || fr[pos[i]]) && (neg[i] < 0 || fr[neg[i]]);
    });
    scale_back(m);
    return m;
  }
  m.pos_idx = at::full({B}, -1, E.rows.options().dtype(at::kLong));
  m.neg_idx = at::full({B}, -1, E.rows.options().dtype(at::kLong));
  m.pos_dist = at::empty({B}, E.rows.options());
  m.neg_dist = at::empty({B}, E.rows.options());
  m.triplet_finite = at::empty({B}, E.rows.options().dtype(at::kByte));
  AT_DISPATCH_FLOATING_TYPES(E.rows.scalar_type(), "batch_hard_mine_cpu", [&] {
    using T = scalar_t;
    int64_t* pos = m.pos_idx.data_ptr<int64_t>();
    int64_t* neg = m.neg_idx.data_ptr<int64_t>();
    PreparedRows Em = Es, Rm = Rs;
    if (metric != Metric::Cosine) center_for_mining<T>(Es, Rs, in.self, Em, Rm);
    // The input rows for settling near-ties: the mined-on rows unless those are unit rows.
    const at::Tensor &xs = S.x, &ys = S.y;
    m.settled = mine_tiles<T>(Em, in.lab, Rm, in.ref, xs.data_ptr<T>(), ys.data_ptr<T>(), in.self, metric, pos,
                              neg);
    const T *e = E.rows.data_ptr<T>(), *r = R.rows.data_ptr<T>();
    const uint8_t *fe = E.finite.data_ptr<uint8_t>(), *fr = R.finite.data_ptr<uint8_t>();
    T *pd = m.pos_dist.data_ptr<T>(), *nd = m.neg_dist.data_ptr<T>();
    uint8_t* ft = m.triplet_finite.data_ptr<uint8_t>();
    at::parallel_for(0, B, std::max<int64_t>(64, (int64_t(1) << 15) / D), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        pd[i] = pos[i] >= 0 ? row_distance(e + i * D, r + pos[i] * D, D, metric) : T(0);
        nd[i] = neg[i] >= 0 ? row_distance(e + i * D, r + neg[i] * D, D, metric) : T(0);
        ft[i] = fe[i] && (pos[i] < 0 || fr[pos[i]]) && (neg[i] < 0 || fr[neg[i]]);
      }
    });
  });
  scale_back(m);
  return m;
}

// Per-anchor losses (0 for an invalid anchor, NaN where a row is not finite) and validity.
template <typename T>
void anchor_losses(const int64_t* pos, const int64_t* neg, const T* pd, const T* nd, const uint8_t* finite,
                   double margin, bool soft_margin, int64_t B, T* loss, uint8_t* valid) {
  for (int64_t i = 0; i < B; ++i) {
    valid[i] = pos[i] >= 0 && neg[i] >= 0;
    if (!valid[i]) loss[i] = T(0);
    else if (!finite[i]) loss[i] = std::numeric_limits<T>::quiet_NaN();
    else loss[i] = triplet_term(pd[i] - nd[i], T(margin), soft_margin);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_hard_mine_cpu(
    const at::Tensor& embeddings, const at::Tensor& labels, const c10::optional<at::Tensor>& ref_embeddings,
    const c10::optional<at::Tensor>& ref_labels, c10::string_view metric_name) {
  const Inputs in = check_inputs(embeddings, labels, ref_embeddings, ref_labels);
  const Mined m = mine_and_measure(embeddings, in, ref_embeddings, parse_metric(metric_name));
  return {m.pos_idx, m.neg_idx, m.pos_dist, m.neg_dist};
}

at::Tensor batch_hard_settle_stats_cpu(const at::Tensor& embeddings, const at::Tensor& labels,
                                      const c10::optional<at::Tensor>& ref_embeddings,
                                      const c10::optional<at::Tensor>& ref_labels, c10::string_view metric_name) {
  const Inputs in = check_inputs(embeddings, labels, ref_embeddings, ref_labels);
  const Mined m = mine_and_measure(embeddings, in, ref_embeddings, parse_metric(metric_name));
  at::Tensor stats = at::empty({2}, embeddings.options().dtype(at::kLong));
  stats.data_ptr<int64_t>()[0] = stats.data_ptr<int64_t>()[1] = m.settled;  // settling rescans via a GEMM
  return stats;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_hard_loss_cpu(
    const at::Tensor& embeddings, const at::Tensor& labels, const c10::optional<at::Tensor>& ref_embeddings,
    const c10::optional<at::Tensor>& ref_labels, double margin, c10::string_view metric_name, bool soft_margin,
    c10::string_view reduction_name) {
  const Inputs in = check_inputs(embeddings, labels, ref_embeddings, ref_labels);
  const Metric metric = parse_metric(metric_name);
  const Reduction reduction = parse_reduction(reduction_name);
  TORCH_CHECK_VALUE(margin >= 0, "tripletops: margin must be >= 0, got ", margin);
  const Mined m = mine_and_measure(embeddings, in, ref_embeddings, metric);
  const int64_t B = embeddings.size(0);
  at::Tensor loss = at::empty({B}, m.pos_dist.options());
  at::Tensor valid = at::empty({B}, m.pos_dist.options().dtype(at::kByte));
  AT_DISPATCH_FLOATING_TYPES(loss.scalar_type(), "batch_hard_loss_cpu", [&] {
    anchor_losses<scalar_t>(m.pos_idx.data_ptr<int64_t>(), m.neg_idx.data_ptr<int64_t>(),
                            m.pos_dist.data_ptr<scalar_t>(), m.neg_dist.data_ptr<scalar_t>(),
                            m.triplet_finite.data_ptr<uint8_t>(), margin, soft_margin, B, loss.data_ptr<scalar_t>(),
                            valid.data_ptr<uint8_t>());
  });
  return {reduce_loss(loss, valid, reduction, embeddings.scalar_type()), m.pos_idx, m.neg_idx, m.pos_dist,
          m.neg_dist};
}

// Over one triplet's rows: |a|^2, |p|^2, |n|^2, a.p, a.n (cosine only; 0 otherwise) and
// sum((a + p + n) * 0), which is NaN when any entry is NaN/Inf. Per-lane partial sums as
// in row_sumsq (halves go lane by lane after conversion): vectorized (one serial chain of
// D adds per quantity cost more than the rest of the backward) and the same on every run.
template <bool Cosine, typename scalar_t, typename acc_t>
TRIPLETOPS_INLINE void triplet_sums(const scalar_t* ar, const scalar_t* pr, const scalar_t* nr, int64_t D, acc_t out[6]) {
  using W = Vec64<acc_t>;
  typename W::V s[6] = {};
  int64_t k = 0;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    for (; k + W::N <= D; k += W::N) {
      const typename W::V a = W::load(ar + k), p = W::load(pr + k), n = W::load(nr + k);
      s[5] += (a + p + n) * acc_t(0);
      if (Cosine) s[0] += a * a, s[1] += p * p, s[2] += n * n, s[3] += a * p, s[4] += a * n;
    }
  }
  for (int l = 0; k < D; ++k, l = (l + 1) % W::N) {
    const acc_t a = ar[k], p = pr[k], n = nr[k];
    s[5].add(l, (a + p + n) * acc_t(0));
    if (Cosine) s[0].add(l, a * a), s[1].add(l, p * p), s[2].add(l, n * n), s[3].add(l, a * p), s[4].add(l, a * n);
  }
  for (int q = 0; q < 6; ++q) out[q] = W::sum(s[q]);
}

// triplet_sums compiled per SIMD clone where the rows are in the accumulation dtype
// (Vec64's halves are 32-byte vectors, which only the AVX clones hold in registers).
TRIPLETOPS_SIMD_CLONES inline void triplet_sums_f(const float* a, const float* p, const float* n, int64_t D,
                                                  float out[6], bool cosine) {
  if (cosine) triplet_sums<true>(a, p, n, D, out);
  else triplet_sums<false>(a, p, n, D, out);
}
TRIPLETOPS_SIMD_CLONES inline void triplet_sums_d(const double* a, const double* p, const double* n, int64_t D,
                                                  double out[6], bool cosine) {
  if (cosine) triplet_sums<true>(a, p, n, D, out);
  else triplet_sums<false>(a, p, n, D, out);
}
template <typename scalar_t, typename acc_t>
inline void triplet_sums_any(const scalar_t* a, const scalar_t* p, const scalar_t* n, int64_t D, acc_t out[6],
                             bool cosine) {
  if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>) triplet_sums_f(a, p, n, D, out, cosine);
  else if constexpr (std::is_same_v<scalar_t, double> && std::is_same_v<acc_t, double>)
    triplet_sums_d(a, p, n, D, out, cosine);
  else if (cosine) triplet_sums<true>(a, p, n, D, out);
  else triplet_sums<false>(a, p, n, D, out);
}

// The backward's row updates. __restrict: each writes one gradient row that none of its
// inputs overlaps (a positive or negative row is never the anchor's own), which lets the
// compiler vectorize them.
template <typename scalar_t, typename acc_t>
TRIPLETOPS_INLINE void anchor_row_grad(acc_t* __restrict g, const scalar_t* __restrict a, const scalar_t* __restrict p,
                            const scalar_t* __restrict n, int64_t len, acc_t pda, acc_t pea, acc_t nda, acc_t nea) {
  for (int64_t k = 0; k < len; ++k) {
    const acc_t av = a[k], pv = p[k], nv = n[k];
    g[k] += pda * (av - pv) + pea * pv + nda * (av - nv) + nea * nv;
  }
}
template <typename scalar_t, typename acc_t>
TRIPLETOPS_INLINE void other_row_grad(acc_t* __restrict g, const scalar_t* __restrict a, const scalar_t* __restrict b,
                           int64_t len, acc_t db, acc_t eb) {
  for (int64_t k = 0; k < len; ++k) {
    const acc_t av = a[k], bv = b[k];
    g[k] += db * (av - bv) + eb * av;
  }
}

// fp32/fp64 rows: the same updates cloned for AVX-512 / AVX2 / baseline (the backward
// is otherwise bound by the baseline's 128-bit vectors). Halves use the templates.
TRIPLETOPS_SIMD_CLONES inline void anchor_row_grad_v(float* g, const float* a, const float* p, const float* n,
                                                     int64_t len, float pda, float pea, float nda, float nea) {
  anchor_row_grad(g, a, p, n, len, pda, pea, nda, nea);
}
TRIPLETOPS_SIMD_CLONES inline void anchor_row_grad_v(double* g, const double* a, const double* p, const double* n,
                                                     int64_t len, double pda, double pea, double nda, double nea) {
  anchor_row_grad(g, a, p, n, len, pda, pea, nda, nea);
}
template <typename scalar_t, typename acc_t>
inline void anchor_row_grad_v(acc_t* g, const scalar_t* a, const scalar_t* p, const scalar_t* n, int64_t len,
                              acc_t pda, acc_t pea, acc_t nda, acc_t nea) {
  anchor_row_grad(g, a, p, n, len, pda, pea, nda, nea);
}
TRIPLETOPS_SIMD_CLONES inline void other_row_grad_v(float* g, const float* a, const float* b, int64_t len, float db,
                                                    float eb) {
  other_row_grad(g, a, b, len, db, eb);
}
TRIPLETOPS_SIMD_CLONES inline void other_row_grad_v(double* g, const double* a, const double* b, int64_t len,
                                                    double db, double eb) {
  other_row_grad(g, a, b, len, db, eb);
}
template <typename scalar_t, typename acc_t>
inline void other_row_grad_v(acc_t* g, const scalar_t* a, const scalar_t* b, int64_t len, acc_t db, acc_t eb) {
  other_row_grad(g, a, b, len, db, eb);
}

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor> batch_hard_backward_impl(const at::Tensor& grad, const at::Tensor& emb,
                                                            const at::Tensor& refs, bool self, bool want_ref,
                                                            const at::Tensor& pos, const at::Tensor& neg,
                                                            const at::Tensor& pos_dist, const at::Tensor& neg_dist,
                                                            double margin, Metric metric, bool soft_margin,
                                                            Reduction reduction) {
  using acc_t = at::opmath_type<scalar_t>;  // float for half types
  const int64_t B = emb.size(0), D = emb.size(1), M = refs.size(0);
  const scalar_t* a = emb.data_ptr<scalar_t>();
  const scalar_t* r = refs.data_ptr<scalar_t>();
  const int64_t *pi = pos.data_ptr<int64_t>(), *ni = neg.data_ptr<int64_t>();
  // The forward's losses were formed in the compute dtype: redo them in it, so hinge and
  // mean_nonzero decisions match the forward's bit for bit.
  using comp_t = compute_t<scalar_t>;
  const auto comp_dtype = c10::CppTypeToScalarType<comp_t>::value;
  const at::Tensor pdt = pos_dist.to(comp_dtype).contiguous(), ndt = neg_dist.to(comp_dtype).contiguous();
  const comp_t *pd = pdt.data_ptr<comp_t>(), *nd = ndt.data_ptr<comp_t>();

  // Pass 1, per anchor: finiteness (to recompute the forward's losses exactly), and for
  // cosine the norms and dot products of the selected pairs.
  // wide: a row's squared norm overflowed acc_t (cosine): the sums are in double, and the
  // anchor's gradient is formed in double in the alpha a + beta b form (below).
  struct Stats { double a_sq, p_sq, n_sq, ap, an; uint8_t finite, wide; };
  std::vector<Stats> st(B);
  const bool cosine = metric == Metric::Cosine;
  // Below ~2^16 row elements both passes run on one thread: forking costs more there.
  constexpr int64_t kSerialElems = int64_t(1) << 16;
  at::parallel_for(0, B, std::max<int64_t>(1, kSerialElems / D), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      Stats s{0, 0, 0, 0, 0, 1, 0};
      if (pi[i] >= 0 && ni[i] >= 0 && !cosine && std::isfinite(pd[i]) && std::isfinite(nd[i])) {
        // (sq)euclidean: the exact distances are formed from the rows' differences, so a
        // NaN or Inf entry in any of the three rows makes one of them NaN or Inf. Finite
        // distances therefore mean finite rows (the converse fails only on overflow, which
        // reads the rows below), and nothing else of pass 1 is needed.
      } else if (pi[i] >= 0 && ni[i] >= 0) {
        acc_t v[6];
        const scalar_t *ar = a + i * D, *pr = r + pi[i] * D, *nr = r + ni[i] * D;
        triplet_sums_any(ar, pr, nr, D, v, cosine);
        s = {v[0], v[1], v[2], v[3], v[4], uint8_t(v[5] == acc_t(0)), 0};
        const acc_t lim = std::numeric_limits<acc_t>::max() / acc_t(8);
        if (cosine && s.finite && !(v[0] < lim && v[1] < lim && v[2] < lim)) {
          // A finite row whose squared norm overflowed acc_t (fp32 rows of norm >= ~1.8e19):
          // the sums again in double, where fp32 squares never overflow (NaN gradients else).
          s.a_sq = s.p_sq = s.n_sq = s.ap = s.an = 0;
          s.wide = 1;
          for (int64_t k = 0; k < D; ++k) {
            const double av = double(ar[k]), pv = double(pr[k]), nv = double(nr[k]);
            s.a_sq += av * av, s.p_sq += pv * pv, s.n_sq += nv * nv, s.ap += av * pv, s.an += av * nv;
          }
        }
      }
      st[i] = s;
    }
  });
  std::vector<comp_t> loss_v(B);
  std::vector<uint8_t> valid(B), finite(B);
  for (int64_t i = 0; i < B; ++i) finite[i] = st[i].finite;
  anchor_losses<comp_t>(pi, ni, pd, nd, finite.data(), margin, soft_margin, B, loss_v.data(), valid.data());
  const at::Tensor loss_t = at::from_blob(loss_v.data(), {B}, at::TensorOptions().dtype(comp_dtype));
  const at::Tensor valid_t = at::from_blob(valid.data(), {B}, at::TensorOptions().dtype(at::kByte));
  const std::vector<double> scale = reduction_scale(grad, loss_t, valid_t, reduction);

  // Per anchor, the (a, p) pair with weight +s and the (a, n) pair with weight -s.
  struct Coef { acc_t pda, pea, pdb, peb, nda, nea, ndb, neb; };
  std::vector<Coef> cf(B);
  std::vector<uint8_t> active(B);
  std::vector<double> wide_scale(B, 0.0);
  for (int64_t i = 0; i < B; ++i) {
    const double s = valid[i] ? scale[i] * double(triplet_term_grad(pd[i] - nd[i], comp_t(margin), soft_margin)) : 0.0;
    active[i] = s != 0 && !st[i].wide;
    wide_scale[i] = st[i].wide ? s : 0.0;
    if (!active[i]) continue;
    const PairGrad gp = pair_grad(metric, pd[i], st[i].ap, st[i].a_sq, st[i].p_sq).scaled(s);
    const PairGrad gn = pair_grad(metric, nd[i], st[i].an, st[i].a_sq, st[i].n_sq).scaled(-s);
    cf[i] = {acc_t(gp.da), acc_t(gp.ea), acc_t(gp.db), acc_t(gp.eb),
             acc_t(gn.da), acc_t(gn.ea), acc_t(gn.db), acc_t(gn.eb)};
  }

  // Pass 2, parallel over feature slices, anchors in ascending order: each element
  // sums its contributions in the same order on every run.
  at::Tensor grad_a = at::zeros({B, D}, emb.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  at::Tensor grad_r = (!self && want_ref) ? at::zeros({M, D}, grad_a.options()) : at::Tensor();
  acc_t* ga = grad_a.data_ptr<acc_t>();
  acc_t* gr = self ? ga : (grad_r.defined() ? grad_r.data_ptr<acc_t>() : nullptr);
  at::parallel_for(0, D, B * D < kSerialElems ? D : 16, [&](int64_t k0, int64_t k1) {
    for (int64_t i = 0; i < B; ++i) {
      if (!active[i]) continue;
      const Coef c = cf[i];
      const scalar_t *ar = a + i * D, *pr = r + pi[i] * D, *nr = r + ni[i] * D;
      anchor_row_grad_v(ga + i * D + k0, ar + k0, pr + k0, nr + k0, k1 - k0, c.pda, c.pea, c.nda, c.nea);
      if (!gr) continue;
      other_row_grad_v(gr + pi[i] * D + k0, ar + k0, pr + k0, k1 - k0, c.pdb, c.peb);
      other_row_grad_v(gr + ni[i] * D + k0, ar + k0, nr + k0, k1 - k0, c.ndb, c.neb);
    }
  });
  // Anchors with an exploding row under cosine: d(1 - cos)/da = alpha_a a + beta b and
  // d/db = alpha_b b + beta a, in double, serially in anchor order (deterministic). The
  // kernels' form around a - b would cancel two terms of ~|b| when |b| >> |a|, and beta
  // (~1/|b|) vanishes from alpha_a + beta in any precision.
  for (int64_t i = 0; i < B; ++i) {
    if (wide_scale[i] == 0.0) continue;
    const scalar_t *ar = a + i * D, *pr = r + pi[i] * D, *nr = r + ni[i] * D;
    const CosinePairGrad gp = cosine_pair_grad(st[i].ap, st[i].a_sq, st[i].p_sq);
    const CosinePairGrad gn = cosine_pair_grad(st[i].an, st[i].a_sq, st[i].n_sq);
    const double sp = wide_scale[i], sn = -wide_scale[i];
    for (int64_t k = 0; k < D; ++k) {
      const double av = double(ar[k]), pv = double(pr[k]), nv = double(nr[k]);
      ga[i * D + k] += acc_t(sp * (gp.alpha_a * av + gp.beta * pv) + sn * (gn.alpha_a * av + gn.beta * nv));
      if (!gr) continue;
      gr[pi[i] * D + k] += acc_t(sp * (gp.alpha_b * pv + gp.beta * av));
      gr[ni[i] * D + k] += acc_t(sn * (gn.alpha_b * nv + gn.beta * av));
    }
  }
  return {grad_a.to(emb.scalar_type()),
          grad_r.defined() ? grad_r.to(refs.scalar_type()) : at::empty({0}, emb.options())};
}

std::tuple<at::Tensor, at::Tensor> batch_hard_loss_backward_cpu(
    const at::Tensor& grad, const at::Tensor& embeddings, const c10::optional<at::Tensor>& ref_embeddings,
    const at::Tensor& pos_idx, const at::Tensor& neg_idx, const at::Tensor& pos_dist, const at::Tensor& neg_dist,
    double margin, c10::string_view metric_name, bool soft_margin, c10::string_view reduction_name,
    bool compute_ref_grad) {
  const Metric metric = parse_metric(metric_name);
  const Reduction reduction = parse_reduction(reduction_name);
  const bool self = !ref_embeddings.has_value();
  const at::Tensor emb = embeddings.contiguous();
  const at::Tensor refs = self ? emb : ref_embeddings->contiguous();
  const int64_t B = emb.size(0), M = refs.size(0);
  TORCH_CHECK_VALUE(emb.dim() == 2 && refs.dim() == 2 && refs.size(1) == emb.size(1) &&
                        refs.scalar_type() == emb.scalar_type(),
                    "tripletops.batch_hard_loss_backward: embeddings and ref_embeddings must be (B, D) and (M, D) "
                    "of one dtype, got ", emb.sizes(), " and ", refs.sizes());
  const char* op = "batch_hard_loss";
  check_saved_grad(op, grad, reduction == Reduction::None, B);
  check_saved_rows(op, "pos_idx", pos_idx, B, emb.device());
  check_saved_rows(op, "neg_idx", neg_idx, B, emb.device());
  check_saved_rows(op, "pos_dist", pos_dist, B, emb.device());
  check_saved_rows(op, "neg_dist", neg_dist, B, emb.device());
  const at::Tensor pos = pos_idx.to(at::kLong).contiguous(), neg = neg_idx.to(at::kLong).contiguous();
  {  // every index is a row of the reference set, or -1 (none)
    const int64_t *p = pos.data_ptr<int64_t>(), *n = neg.data_ptr<int64_t>();
    for (int64_t i = 0; i < B; ++i)
      TORCH_CHECK_VALUE(p[i] >= -1 && p[i] < M && n[i] >= -1 && n[i] < M,
                        "tripletops.batch_hard_loss_backward: pos_idx and neg_idx must hold row indices of the "
                        "reference set (0..", M - 1, ") or -1, got ", p[i], " and ", n[i], " at row ", i);
  }
  std::tuple<at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, emb.scalar_type(), "batch_hard_loss_backward_cpu", [&] {
    out = batch_hard_backward_impl<scalar_t>(grad, emb, refs, self, compute_ref_grad, pos, neg, pos_dist, neg_dist,
                                             margin, metric, soft_margin, reduction);
  });
  return out;
}

}  // namespace
}  // namespace cpu
}  // namespace tripletops

TORCH_LIBRARY_IMPL(tripletops, CPU, m) {
  m.impl("batch_hard_mine", &tripletops::cpu::batch_hard_mine_cpu);
  m.impl("batch_hard_settle_stats", &tripletops::cpu::batch_hard_settle_stats_cpu);
  m.impl("batch_hard_loss", &tripletops::cpu::batch_hard_loss_cpu);
  m.impl("batch_hard_loss_backward", &tripletops::cpu::batch_hard_loss_backward_cpu);
}
