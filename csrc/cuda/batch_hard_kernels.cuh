// Device code of batch-hard mining and its fused loss (launchers: batch_hard_cuda.cu).
//
// T is the compute type (fp32 for fp32/fp16/bf16 inputs, fp64 for fp64); scalar_t is
// the input's. Mining compares Gram-form keys (d^2, or 1 - cos) from a GEMM tile;
// the selected pairs' distances are then recomputed exactly from the rows.
//
// Order independence: every comparison (within a lane, across a warp, across tiles)
// orders candidates by (key, index) with NaN first, so the result does not depend on
// the order in which tiles, warps or lanes meet: the merge is deterministic without
// atomics, and exact ties go to the smallest index.
#pragma once

#include "../common.h"
#include "reduce.cuh"
#include "warp.cuh"

#include <cstdint>

namespace tripletops {
namespace cuda {

constexpr int kRowsPerBlock = 8;     // warps per block in the per-row kernels (256 threads)
constexpr int kColumnThreads = 256;  // threads per block in the column part of tile mining
static_assert(kRowsPerBlock * kWarp <= kReduceThreads, "the per-row kernels reduce the losses in their last block");

template <typename T>
__device__ __forceinline__ T quiet_nan() {
  return T(NAN);
}

// Candidate (ka, ia) beats (kb, ib): a NaN key wins (torch.max/min propagate NaN), then
// the farther (positives) or closer (negatives) key, then the smaller index. Index -1 is
// "none" and loses to everything.
template <typename T>
__device__ __forceinline__ bool beats(T ka, int64_t ia, T kb, int64_t ib, bool farther) {
  if (ia < 0) return false;
  if (ib < 0) return true;
  const bool na = ka != ka, nb = kb != kb;
  if (na || nb) return na && (!nb || ia < ib);
  if (ka != kb) return farther ? ka > kb : ka < kb;
  return ia < ib;
}

// Mining key of a pair from its Gram entry g and squared norms sa, sb: ordered like the
// distance. NaN when a norm is not finite (a NaN/Inf entry, or a norm that overflows:
// never a finite key from a wrong ordering).
template <typename T>
__device__ __forceinline__ T mining_key(Metric metric, T g, T sa, T sb) {
  if (!(sa - sa == T(0) && sb - sb == T(0))) return quiet_nan<T>();
  if (metric == Metric::Cosine) {
    const T eps = T(kNormEps);
    return T(1) - g / (fmax(sqrt(sa), eps) * fmax(sqrt(sb), eps));
  }
  return relu_nan(sa + sb - T(2) * g);  // d^2 >= 0
}

// Candidates kept per kind in the mining state. Settling ranks the candidates whose Gram
// keys are within the rounding window of the best on exact distances; when they are all
// among the kept ones (on random data nearly always: the window holds the best and one
// runner-up), no rescan of the reference set is needed.
constexpr int kKept = 3;

// One kind's kKept best candidates by `beats` (best first; index -1: empty), and
// `beyond`, the best key among the others (NaN keys left out; -inf / +inf for none).
// Every field merges independently of the order in which candidates arrive.
template <typename T>
struct Kept {
  T key[kKept];
  int64_t idx[kKept];
  T beyond;
  __device__ __forceinline__ void clear(bool farther) {
#pragma unroll
    for (int s = 0; s < kKept; ++s) key[s] = T(0), idx[s] = -1;
    beyond = farther ? T(-INFINITY) : T(INFINITY);
  }
  __device__ __forceinline__ void push_out(T k, int64_t j, bool farther) {
    if (j >= 0 && k == k) beyond = farther ? fmax(beyond, k) : fmin(beyond, k);
  }
  __device__ __forceinline__ void take(T k, int64_t j, bool farther) {
    if (!beats(k, j, key[kKept - 1], idx[kKept - 1], farther)) {  // the common case: one compare
      push_out(k, j, farther);
      return;
    }
    push_out(key[kKept - 1], idx[kKept - 1], farther);
#pragma unroll
    for (int s = 0; s < kKept; ++s)  // insertion: the carried candidate swaps down the sorted list
      if (beats(k, j, key[s], idx[s], farther)) {
        const T tk = key[s];
        const int64_t tj = idx[s];
        key[s] = k, idx[s] = j, k = tk, j = tj;
      }
  }
  __device__ __forceinline__ void merge(const Kept& o, bool farther) {
#pragma unroll
    for (int s = 0; s < kKept; ++s) take(o.key[s], o.idx[s], farther);
    beyond = farther ? fmax(beyond, o.beyond) : fmin(beyond, o.beyond);
  }
  // The key a candidate must beat to enter the list, for a candidate whose index is above
  // every kept one (a lane's scan in ascending order: a tie goes to the kept, smaller
  // index): the last kept key, or NaN (no key is then "no better") while a slot is empty.
  __device__ __forceinline__ T entry_key() const { return idx[kKept - 1] >= 0 ? key[kKept - 1] : T(NAN); }
  // The runner-up's key: the best key among the other candidates (NaN keys left out).
  __device__ __forceinline__ T second() const { return idx[1] >= 0 && key[1] == key[1] ? key[1] : beyond; }
  // The list of lane ^ offset. Under the emulator (TRIPLETOPS_EMU), the same bits in one
  // exchange (tools/cuda_emu moves up to 64 bytes; each exchange costs 32 fiber switches).
  __device__ __forceinline__ void shuffle_xor(int offset) {
#ifdef TRIPLETOPS_EMU
    *this = __shfl_xor_sync(kFullMask, *this, offset);
    return;
#endif
#pragma unroll
    for (int s = 0; s < kKept; ++s) {
      key[s] = __shfl_xor_sync(kFullMask, key[s], offset);
      idx[s] = __shfl_xor_sync(kFullMask, idx[s], offset);
    }
    beyond = __shfl_xor_sync(kFullMask, beyond, offset);
  }
};

// An anchor's mining state: its kept positives (farthest first) and negatives (closest
// first), and the largest finite squared norm among the candidates seen: they certify the
// choice afterwards (certify).
template <typename T>
struct Hardest {
  Kept<T> pos, neg;
  T sq_max;
  // Takes N candidates of a lane's scan (sq: their squared norms, for sq_max), their
  // indices ascending (within the N and from call to call), in two phases. First each candidate is tested against its kind's
  // entry key as it was before the N: one no better (the common case) only updates
  // `beyond`, branch-free. Then the others, if any, take the general path in order. The
  // first phase's answers stay right after the second's insertions: those only make the
  // last kept key better. The SASS review of 2026-12-07 counted ~55 instructions per key
  // for the general test on every candidate.
  template <int N>
  __device__ __forceinline__ void offer_ascending(const T (&key)[N], const int64_t (&j)[N], const bool (&same)[N],
                                                  const bool (&valid)[N], const T (&sq)[N]) {
    // Both kinds in one order, "better is smaller": a positive's keys negated (exact), so
    // one compare and one running minimum per candidate; selects, not branches (fmin with
    // +inf and fmax(x, 0), sq_max >= 0, leave a field as it is).
    const T entry_p = -pos.entry_key(), entry_n = neg.entry_key();  // NaN stays NaN
    T low_p = -pos.beyond, low_n = neg.beyond;
    unsigned rest = 0;
#pragma unroll
    for (int q = 0; q < N; ++q) {
      const T s = same[q] ? -key[q] : key[q];
      const bool out = valid[q] && s >= (same[q] ? entry_p : entry_n);  // false for a NaN key
      const T c = out ? s : T(INFINITY);
      low_p = fmin(low_p, same[q] ? c : T(INFINITY));
      low_n = fmin(low_n, same[q] ? T(INFINITY) : c);
      sq_max = fmax(sq_max, valid[q] && sq[q] - sq[q] == T(0) ? sq[q] : T(0));
      rest |= unsigned(valid[q] && !out) << q;
    }
    pos.beyond = -low_p, neg.beyond = low_n;
    if (rest == 0) return;
#pragma unroll
    for (int q = 0; q < N; ++q) {
      if (!((rest >> q) & 1u)) continue;
      if (same[q]) pos.take(key[q], j[q], true);
      else neg.take(key[q], j[q], false);
    }
  }
  __device__ __forceinline__ void merge(const Hardest& o) {
    sq_max = fmax(sq_max, o.sq_max);
    pos.merge(o.pos, true);
    neg.merge(o.neg, false);
  }
};

template <typename T>
__device__ __forceinline__ Hardest<T> no_candidate() {
  Hardest<T> h;
  h.pos.clear(true);
  h.neg.clear(false);
  h.sq_max = T(0);
  return h;
}

// The warp's merged state, on every lane (butterfly of shuffles; (key, index) order: exact).
template <typename T>
__device__ __forceinline__ Hardest<T> warp_merge(Hardest<T> h) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    Hardest<T> o = h;
    o.pos.shuffle_xor(offset);
    o.neg.shuffle_xor(offset);
    o.sq_max = __shfl_xor_sync(kFullMask, h.sq_max, offset);
    h.merge(o);
  }
  return h;
}

// The exact choice among candidates ranked on exact keys (double): the farthest positive
// and the closest negative, ties to the smallest index.
struct Choice {
  double pk = 0, nk = 0;
  int64_t pi = -1, ni = -1;
  __device__ __forceinline__ void offer(double key, int64_t j, bool positive) {
    if (positive) {
      if (beats(key, j, pk, pi, true)) pk = key, pi = j;
    } else if (beats(key, j, nk, ni, false)) {
      nk = key, ni = j;
    }
  }
  __device__ __forceinline__ void merge(const Choice& o) {
    offer(o.pk, o.pi, true);
    offer(o.nk, o.ni, false);
  }
};

__device__ __forceinline__ Choice warp_merge(Choice c) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    Choice o;
    o.pk = __shfl_xor_sync(kFullMask, c.pk, offset);
    o.pi = __shfl_xor_sync(kFullMask, c.pi, offset);
    o.nk = __shfl_xor_sync(kFullMask, c.nk, offset);
    o.ni = __shfl_xor_sync(kFullMask, c.ni, offset);
    c.merge(o);
  }
  return c;
}

// Every anchor's mining state on the tiled path, in `slots` partial states per anchor
// (entry e = slot * B + anchor): the blocks that mine different column ranges of one tile
// for one anchor write different slots, so no two writers meet; merge_slots_kernel merges
// them. Structure of arrays: key (kStateKeys, n), idx (kStateIdx, n), n = slots * B.
constexpr int kStateKeys = 2 * kKept + 3, kStateIdx = 2 * kKept;
template <typename T>
struct MiningState {
  T* key;
  int64_t* idx;
  int64_t n;
  __device__ __forceinline__ Hardest<T> load(int64_t e) const {
    Hardest<T> h;
#pragma unroll
    for (int s = 0; s < kKept; ++s) {
      h.pos.key[s] = key[s * n + e], h.neg.key[s] = key[(kKept + s) * n + e];
      h.pos.idx[s] = idx[s * n + e], h.neg.idx[s] = idx[(kKept + s) * n + e];
    }
    h.pos.beyond = key[2 * kKept * n + e], h.neg.beyond = key[(2 * kKept + 1) * n + e];
    h.sq_max = key[(2 * kKept + 2) * n + e];
    return h;
  }
  __device__ __forceinline__ void store(int64_t e, const Hardest<T>& h) const {
#pragma unroll
    for (int s = 0; s < kKept; ++s) {
      key[s * n + e] = h.pos.key[s], key[(kKept + s) * n + e] = h.neg.key[s];
      idx[s * n + e] = h.pos.idx[s], idx[(kKept + s) * n + e] = h.neg.idx[s];
    }
    key[2 * kKept * n + e] = h.pos.beyond, key[(2 * kKept + 1) * n + e] = h.neg.beyond;
    key[(2 * kKept + 2) * n + e] = h.sq_max;
  }
};

// One warp scans anchor i's Gram row g[0, n) (candidates c0 .. c0 + n - 1), lanes strided,
// four loads in flight per lane. Squared norms of candidate c0 + t: sq[t * sq_stride] (a
// norms vector, or the Gram diagonal). The loop runs on 32-bit offsets (n <= 2^31 / stride:
// a tile's row range, kRowChunk-ish, or B <= kSmallMaxB), with the anchor's class id
// hoisted (kIds: class ids; else multi-hot bitsets) and offer_ascending (each lane's j
// ascends): the SASS review of 2026-12-07 counted ~55 instructions per key, with the
// anchor's label reloaded, 64-bit index arithmetic and the general candidate test.
template <bool kIds, typename T>
__device__ __forceinline__ Hardest<T> scan_row_labels(const T* g, int n, int64_t c0, const T* sq, int sq_stride,
                                                      Labels ref_labels, T sa, Labels labels, int64_t i,
                                                      int64_t self_index, Metric metric, int lane) {
  constexpr int kUnroll = 4;
  const int self_t = self_index >= c0 && self_index < c0 + n ? int(self_index - c0) : -1;
  const int64_t la = kIds ? labels.data[i] : 0;
  const int64_t* lr = ref_labels.data + c0;
  Hardest<T> h = no_candidate<T>();
  for (int t0 = lane; t0 < n; t0 += kUnroll * kWarp) {
    // All kUnroll in range (every iteration but the last): loads without predicates.
    const bool whole = t0 + (kUnroll - 1) * kWarp < n;
    T gv[kUnroll], sv[kUnroll];
    int64_t lv[kUnroll];
#pragma unroll
    for (int q = 0; q < kUnroll; ++q) {
      const int t = t0 + q * kWarp;
      const bool in = whole || t < n;
      gv[q] = in ? g[t] : T(0);
      sv[q] = in ? sq[t * sq_stride] : T(0);
      lv[q] = kIds && in ? lr[t] : 0;
    }
    T key[kUnroll];
    int64_t j[kUnroll];
    bool same[kUnroll], valid[kUnroll];
#pragma unroll
    for (int q = 0; q < kUnroll; ++q) {
      const int t = t0 + q * kWarp;
      valid[q] = (whole || t < n) && t != self_t;  // an anchor is not its own positive
      j[q] = c0 + t;
      same[q] = kIds ? lv[q] == la : valid[q] && labels.shares(i, ref_labels, j[q]);
      key[q] = mining_key(metric, gv[q], sa, sv[q]);
    }
    h.offer_ascending(key, j, same, valid, sv);
  }
  return warp_merge(h);
}
template <typename T>
__device__ __forceinline__ Hardest<T> scan_row(const T* g, int n, int64_t c0, const T* sq, int sq_stride,
                                               Labels ref_labels, T sa, Labels labels, int64_t i, int64_t self_index,
                                               Metric metric, int lane) {
  return labels.words == 0
             ? scan_row_labels<true>(g, n, c0, sq, sq_stride, ref_labels, sa, labels, i, self_index, metric, lane)
             : scan_row_labels<false>(g, n, c0, sq, sq_stride, ref_labels, sa, labels, i, self_index, metric, lane);
}

// Certified mining (SPEC: no candidate misranked because a Gram key rounds; the CPU twin
// is settle_near_ties). Every key is within gram_key_bound(D, acc_u, gemm_u,
// (|a| + max |r|)^2) of the exact one (acc_u: the GEMM's accumulation; gemm_u: TF32
// rounding of its inputs, when torch allows it), so a best that beats its runner-up by
// more than twice that is the exact best. Otherwise that kind (sp: positive, sn: negative)
// is settled: a candidate can be at least as good as the exact best only if its key is
// within twice the bound of the best key (the window [lo, +inf) for positives, (-inf, hi]
// for negatives), and those are ranked on exact keys. The window's candidates are all
// among the kept ones unless `beyond` falls inside it (rp / rn: the reference set must be
// rescanned). A kind whose best Gram key is not finite (NaN or inf: a NaN/Inf row, or
// finite rows whose squares overflow T, fp32 norms beyond ~1.8e19) is ranked on exact
// keys over all its candidates (all_p / all_n, with a rescan): finite rows then get the
// right choice, and NaN rows still win with a NaN key.
struct Settle {
  bool sp, sn, rp, rn, all_p, all_n;
  double lo, hi;
};
template <typename T>
__device__ __forceinline__ Settle certify(const Hardest<T>& h, T sa, int64_t D, Metric metric, double acc_u,
                                          double gemm_u) {
  const double norm_sum = sqrt(double(sa)) + sqrt(double(h.sq_max));
  const double twice =
      2 * gram_key_bound(D, acc_u, gemm_u, metric == Metric::Cosine ? 4.0 : norm_sum * norm_sum);
  const T pk = h.pos.key[0], nk = h.neg.key[0], p2 = h.pos.second(), n2 = h.neg.second();
  Settle w;
  w.all_p = h.pos.idx[0] >= 0 && !(double(pk) - double(pk) == 0.0);
  w.all_n = h.neg.idx[0] >= 0 && !(double(nk) - double(nk) == 0.0);
  w.sp = w.all_p || (h.pos.idx[0] >= 0 && p2 > T(-INFINITY) && !(double(pk) - double(p2) > twice));
  w.sn = w.all_n || (h.neg.idx[0] >= 0 && n2 < T(INFINITY) && !(double(n2) - double(nk) > twice));
  w.lo = double(pk) - twice;
  w.hi = double(nk) + twice;
  w.rp = w.all_p || (w.sp && double(h.pos.beyond) >= w.lo);
  w.rn = w.all_n || (w.sn && double(h.neg.beyond) <= w.hi);
  return w;
}

// A row's factors for exact cosine keys (whole warp, lanes over D, fixed order): the
// canonical unit row x̂_k = (x_k / m) / q, with m = max |x_k| and q = |x / m| in double, as
// csrc/cpu/rows_cpu.h's canonical_unit_row: bitwise the same for x and c·x (c > 0; each
// quotient x_k / m is correctly rounded from an exact value that c cancels from), so rows
// of one direction meet at exactly 0 and tie to the smallest index. Also 1 / max(|x|, eps)
// and whether the row is a unit row (common.h's is_unit_row; for the others' key). All 1
// and true unless cosine.
struct ExactNorm {
  double max, q, inv;
  bool unit;
};
template <typename scalar_t>
__device__ __forceinline__ ExactNorm warp_exact_norm(const scalar_t* a, int64_t D, bool cosine, int lane) {
  if (!cosine) return {1.0, 1.0, 1.0, true};
  double m = 0, s = 0;
  for (int64_t k = lane; k < D; k += kWarp) {
    const double v = double(a[k]);
    m = fmax(m, fabs(v)), s += v * v;
  }
  for (int offset = kWarp / 2; offset > 0; offset /= 2) m = fmax(m, __shfl_xor_sync(kFullMask, m, offset));
  s = warp_sum(s);
  double q = 0;
  if (m > 0 && m - m == 0.0)
    for (int64_t k = lane; k < D; k += kWarp) {
      const double p = double(a[k]) / m;
      q += p * p;
    }
  q = sqrt(warp_sum(q));
  return {m, q, 1.0 / fmax(sqrt(s), kNormEps), is_unit_row(s)};
}

// The exact key of rows a and b (whole warp, lanes over D, the same butterfly for every
// pair: identical rows give identical keys), in double from their difference: |a - b|^2,
// or for cosine |â - b̂|^2 = 2 (1 - cos) on canonical unit rows (warp_exact_norm); for
// cosine with a row that is no unit row, 2 (1 - (a·b) ia ib). na: the anchor's factors.
// NaN when either row holds a NaN or Inf: such a row wins, as its Gram keys do.
template <typename scalar_t>
__device__ __forceinline__ double warp_exact_key(const scalar_t* a, const ExactNorm& na, const scalar_t* b, int64_t D,
                                                 bool cosine, int lane) {
  const ExactNorm nb = warp_exact_norm(b, D, cosine, lane);
  const bool unit = na.unit && nb.unit;
  double acc = 0, zero = 0;  // zero: the sum of a_k * 0 + b_k * 0, NaN iff a row is not finite
  for (int64_t k = lane; k < D; k += kWarp) {
    const double av = double(a[k]), bv = double(b[k]);
    zero += av * 0.0 + bv * 0.0;
    if (!unit) {
      acc += av * bv;
    } else {
      const double d = cosine ? (av / na.max) / na.q - (bv / nb.max) / nb.q : av - bv;
      acc += d * d;
    }
  }
  acc = warp_sum(acc);
  if (warp_sum(zero) != 0.0) return quiet_nan<double>();
  return unit ? acc : 2.0 * (1.0 - acc * na.inv * nb.inv);
}

// Settling from the kept candidates (the kinds whose window they cover: sp && !rp, sn &&
// !rn): at most 2 kKept exact keys, by the whole warp. h is the same on every lane.
template <typename scalar_t, typename T>
__device__ __forceinline__ void settle_from_kept(Hardest<T>& h, const Settle& w, const scalar_t* a,
                                                 const scalar_t* r, int64_t D, Metric metric, int lane) {
  const bool from_p = w.sp && !w.rp, from_n = w.sn && !w.rn;
  if (!(from_p || from_n)) return;
  const bool cosine = metric == Metric::Cosine;
  const ExactNorm na = warp_exact_norm(a, D, cosine, lane);
  Choice c;
#pragma unroll
  for (int s = 0; s < kKept; ++s) {
    const int64_t jp = h.pos.idx[s], jn = h.neg.idx[s];
    if (from_p && jp >= 0 && double(h.pos.key[s]) >= w.lo)
      c.offer(warp_exact_key(a, na, r + jp * D, D, cosine, lane), jp, true);
    if (from_n && jn >= 0 && double(h.neg.key[s]) <= w.hi)
      c.offer(warp_exact_key(a, na, r + jn * D, D, cosine, lane), jn, false);
  }
  if (from_p && c.pi >= 0) h.pos.idx[0] = c.pi, h.pos.key[0] = T(c.pk);
  if (from_n && c.ni >= 0) h.neg.idx[0] = c.ni, h.neg.key[0] = T(c.nk);
}

// Settling with the anchor's whole Gram row at hand (the small self-mining kernel): the
// candidates in the window come from the row's own keys (typically two or three), one
// warp-wide exact key each. Whole warp; h is the same on every lane.
template <typename scalar_t, typename T>
__device__ __forceinline__ void settle_from_row(Hardest<T>& h, const Settle& w, int64_t i, const T* g, const T* sq,
                                                int64_t sq_stride, T sa, const scalar_t* x, int64_t B, int64_t D,
                                                Labels labels, Metric metric, int lane) {
  if (!(w.sp || w.sn)) return;
  const bool cosine = metric == Metric::Cosine;
  const scalar_t* a = x + i * D;
  const ExactNorm na = warp_exact_norm(a, D, cosine, lane);
  Choice c;
  for (int64_t j0 = 0; j0 < B; j0 += kWarp) {
    const int64_t j = j0 + lane;
    bool in = false, same = false;
    if (j < B && j != i) {
      same = labels.shares(i, labels, j);
      const double key = double(mining_key(metric, g[j], sa, sq[j * sq_stride]));
      in = same ? w.sp && (w.all_p || key >= w.lo) : w.sn && (w.all_n || key <= w.hi);
    }
    const unsigned hits = __ballot_sync(kFullMask, in);
    const unsigned pos = __ballot_sync(kFullMask, in && same);
    for (unsigned m = hits; m != 0; m &= m - 1) {
      const int b = __ffs(int(m)) - 1;
      c.offer(warp_exact_key(a, na, x + (j0 + b) * D, D, cosine, lane), j0 + b, (pos >> b) & 1u);
    }
  }
  if (w.sp && c.pi >= 0) h.pos.idx[0] = c.pi, h.pos.key[0] = T(c.pk);
  if (w.sn && c.ni >= 0) h.neg.idx[0] = c.ni, h.neg.key[0] = T(c.nk);
}

// The exact distances of anchor a to its selected rows p and n (difference form,
// accumulated in double from the rows, then rounded to T), on every lane: no square over-
// or underflows where the distance itself fits in T (fp32 rows of norm 1e20 or 1e-30).
// A pair whose rows hold NaN/Inf, or whose mining key was NaN, gets NaN.
template <typename scalar_t, typename T>
__device__ __forceinline__ void exact_pair_distances(const scalar_t* a, const scalar_t* p, const scalar_t* n, int64_t D,
                                                     Metric metric, int lane, bool nan_p, bool nan_n, T& pd, T& nd) {
  // |a-p|^2, |a-n|^2, a.p, a.n, |a|^2, |p|^2, |n|^2, sum (a+p)*0, sum (a+n)*0
  double s[9] = {};
  for (int64_t k = lane; k < D; k += kWarp) {
    const double av = double(a[k]), pv = double(p[k]), nv = double(n[k]);
    const double dp = av - pv, dn = av - nv;
    s[0] += dp * dp, s[1] += dn * dn, s[2] += av * pv, s[3] += av * nv;
    s[4] += av * av, s[5] += pv * pv, s[6] += nv * nv;
    s[7] += (av + pv) * 0.0, s[8] += (av + nv) * 0.0;
  }
  for (int j = 0; j < 9; ++j) s[j] = warp_sum(s[j]);
  auto dist = [&](double diff_sq, double dot, double bb) -> T {
    if (metric == Metric::SqEuclidean) return T(diff_sq);
    if (metric == Metric::Euclidean) return T(sqrt(diff_sq));
    return T(1.0 - dot / (fmax(sqrt(s[4]), kNormEps) * fmax(sqrt(bb), kNormEps)));
  };
  pd = (nan_p || s[7] != 0.0) ? quiet_nan<T>() : dist(s[0], s[2], s[5]);
  nd = (nan_n || s[8] != 0.0) ? quiet_nan<T>() : dist(s[1], s[3], s[6]);
}

// Finishes anchor i from its mining result: indices, exact distances (0 where none), and
// the per-anchor loss (0 for an anchor without both; NaN propagates). Whole warp.
template <typename scalar_t, typename T>
__device__ __forceinline__ void finish_anchor(const Hardest<T>& h, int64_t i, const scalar_t* x, const scalar_t* r,
                                              int64_t D, Metric metric, double margin, bool soft_margin, int lane,
                                              int64_t* pos_idx, int64_t* neg_idx, T* pos_dist, T* neg_dist,
                                              T& loss, bool& valid) {
  const int64_t pi = h.pos.idx[0], ni = h.neg.idx[0];
  const scalar_t* a = x + i * D;
  const scalar_t* p = pi >= 0 ? r + pi * D : a;
  const scalar_t* n = ni >= 0 ? r + ni * D : a;
  T pd, nd;
  exact_pair_distances<scalar_t, T>(a, p, n, D, metric, lane, h.pos.key[0] != h.pos.key[0],
                                    h.neg.key[0] != h.neg.key[0], pd, nd);
  if (pi < 0) pd = T(0);
  if (ni < 0) nd = T(0);
  valid = pi >= 0 && ni >= 0;
  loss = valid ? triplet_term(pd - nd, T(margin), soft_margin) : T(0);
  if (lane == 0) {
    pos_idx[i] = pi, neg_idx[i] = ni;
    pos_dist[i] = pd, neg_dist[i] = nd;
  }
}

// ---- Forward kernels ------------------------------------------------------------------

// A block of prepare_rows_kernel: 32 columns x 32 row stripes (1024 threads). The grid
// has only D / 32 blocks (16 at D = 512), so each block carries many loads in flight: at
// B = 8192, D = 512 fp32 (16 MiB read twice, 16 MiB written) ~40 us (was 0.24 ms with
// 256-thread blocks on the H200); halves, which are not shifted, skip the pass (~3 us).
constexpr int kCenterCols = 32, kCenterRowStripes = 32;

// The anchors as GEMM operand, in T. For (sq)euclidean (`shift_columns`), rows minus a
// translation: the Gram form's rounding then scales with the data's spread, not with its
// distance from the origin. Column c is shifted when that pays (mean^2 > E[x_c^2] / 16,
// the CPU kernels' rule, per column) by its mean rounded to keep grids exact (grid_shift:
// integer grids keep exact keys and exact ties), else left as it is; distances do not
// change under any translation. Non-finite
// entries are left out of the statistics (their rows stay non-finite, the others exact).
// Also zeroes counter[0], the tickets of reduce_in_last_block, and counter[1], the count of
// anchors listed for a rescan (merge_slots_kernel). A block per 32 columns, 32 row
// stripes, fixed summation order; no host decision. With `out` null (halves, multiplied
// as they are), only the counters and the shift (zeros).
template <typename scalar_t, typename T>
__global__ void __launch_bounds__(kCenterCols * kCenterRowStripes) prepare_rows_kernel(const scalar_t* __restrict__ x, int64_t N, int64_t D, bool shift_columns,
                                    T* __restrict__ out, T* __restrict__ shift, unsigned* counter) {
  // Statistics in double: the variance (for grid_shift) is a difference of two of them.
  __shared__ double sum[kCenterRowStripes][kCenterCols];
  __shared__ double sum_sq[kCenterRowStripes][kCenterCols];
  const int tx = threadIdx.x % kCenterCols, ty = threadIdx.x / kCenterCols;
  const int64_t c = int64_t(blockIdx.x) * kCenterCols + tx;
  if (blockIdx.x == 0 && threadIdx.x == 0) counter[0] = 0, counter[1] = 0;
  if (shift_columns) {  // uniform over the grid
    double s = 0, s2 = 0;
    if (c < D) {
#pragma unroll 4
      for (int64_t r = ty; r < N; r += kCenterRowStripes) {
        double v = double(x[r * D + c]);
        v = v - v == 0.0 ? v : 0.0;
        s += v, s2 += v * v;
      }
    }
    sum[ty][tx] = s, sum_sq[ty][tx] = s2;
    __syncthreads();
    if (ty == 0) {
      double total = 0, total_sq = 0;
      for (int k = 0; k < kCenterRowStripes; ++k) total += sum[k][tx], total_sq += sum_sq[k][tx];
      const double mean = total / double(N), mean_sq = total_sq / double(N);
      sum[0][tx] = mean * mean * 16 > mean_sq ? grid_shift(mean, mean_sq - mean * mean) : 0.0;
    }
    __syncthreads();
  }
  if (c >= D) return;
  const T mu = shift_columns ? T(sum[0][tx]) : T(0);
  if (ty == 0) shift[c] = mu;
  if (out == nullptr) return;
#pragma unroll 4
  for (int64_t r = ty; r < N; r += kCenterRowStripes) out[r * D + c] = T(x[r * D + c]) - mu;
}

// Self-mining at B <= kSmallMaxB on the whole (B, B) Gram matrix (squared norms from its
// diagonal), one warp per anchor: mining, exact distances, per-anchor losses, and (last
// block) their reduction. With the GEMM and prepare_rows_kernel, the whole forward.
// With `stats`, counts the anchors that settle ([0]; no anchor rescans here: [1] stays).
template <typename scalar_t, typename T>
__global__ void batch_hard_small_kernel(const scalar_t* __restrict__ x, const T* __restrict__ gram,
                                        Labels labels, int64_t B, int64_t D, Metric metric, double acc_u,
                                        double gemm_u, double margin, bool soft_margin, Reduction reduction,
                                        bool want_loss,
                                        int64_t* pos_idx, int64_t* neg_idx, T* pos_dist, T* neg_dist,
                                        T* anchor_loss, uint8_t* anchor_valid, unsigned* counter,
                                        scalar_t* loss_out, unsigned long long* stats) {
  const int64_t i = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (i < B) {  // no early return: the reduction below needs every thread of the block
    const T sa = gram[i * (B + 1)];
    Hardest<T> h = scan_row(gram + i * B, int(B), 0, gram, int(B + 1), labels, sa, labels, i, i, metric, lane);
    const Settle w = certify(h, sa, D, metric, acc_u, gemm_u);
    if (stats != nullptr && lane == 0 && (w.sp || w.sn)) atomicAdd(stats, 1ull);
    settle_from_row<scalar_t, T>(h, w, i, gram + i * B, gram, B + 1, sa, x, B, D, labels, metric, lane);
    T loss;
    bool valid;
    finish_anchor<scalar_t, T>(h, i, x, x, D, metric, margin, soft_margin, lane, pos_idx, neg_idx, pos_dist, neg_dist,
                               loss, valid);
    if (lane == 0) {
      anchor_loss[i] = loss, anchor_valid[i] = valid;
      if (want_loss && reduction == Reduction::None) loss_out[i] = scalar_t(loss);
    }
  }
  if (want_loss && reduction != Reduction::None)  // uniform over the grid
    reduce_in_last_block(counter, anchor_loss, anchor_valid, B, reduction, loss_out);
}

// Squared norms of N rows (one warp per row), in T, from the rows as given to the GEMM.
// With `reset`, also resets these rows' mining state (as anchors) in all `slots` slots.
// With `shift` (a reference tile of (sq)euclidean in fp32/fp64, scalar_t = T), the GEMM's
// rows are x - shift, written to `shifted` in the same pass (the same rounding as a
// separate subtraction; it saves a read and a write of the tile: ~0.3 ms on a 2^20 x 128
// bank at ~4 TB/s, model).
template <typename scalar_t, typename T>
__global__ void row_norms_kernel(const scalar_t* __restrict__ x, int64_t N, int64_t D, T* sq, bool reset,
                                 MiningState<T> state, int64_t slots, const T* __restrict__ shift,
                                 T* __restrict__ shifted) {
  const int64_t i = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (i >= N) return;
  T s = 0;
  for (int64_t k = lane; k < D; k += kWarp) {
    T v = T(x[i * D + k]);
    if (shift != nullptr) {  // uniform over the grid
      v = v - shift[k];
      shifted[i * D + k] = v;
    }
    s += v * v;
  }
  s = warp_sum(s);
  if (lane == 0) sq[i] = s;
  if (reset)
    for (int64_t q = lane; q < slots; q += kWarp) state.store(q * N + i, no_candidate<T>());
}

// One Gram tile (rows r0 .. r0+R-1 of the anchors, columns c0 .. c0+C-1 of the reference
// set; row stride ld) merged into the anchors' state slots, split over blocks so that a
// tile fills the GPU many times over (launcher: kRowChunk, kColumnChunk). Blocks [0, row_blocks *
// row_splits) mine the tile's rows (a warp per row and column range; slot = the range);
// with `columns` (an off-diagonal tile of self-mining), the other blocks mine its columns
// for the column anchors (a thread per column and row range, reading the tile down:
// coalesced; slot = the range). Slots of one anchor never meet within a launch (the row
// and column anchors of an off-diagonal tile differ), and launches follow each other.
// Traffic: the tile once (4 R C bytes) plus norms and labels, mostly from L1/L2; at ~2
// TB/s a 1024 x 32768 tile takes ~70 us, a 4096 x 4096 one ~35 us (the GEMM that made it:
// ~70 us / ~140 us in fp32, 1024 x 32768 x 128 / 4096^2 x 512).
// fp32: three blocks per SM (__launch_bounds__: at most 80 registers; 84 allowed only
// two, 25 % occupancy). fp64 keeps two: at 80 registers it spilled ~700 bytes. Issue:
// the SASS review counted ~55 instructions per key; with the anchor's class id hoisted,
// 32-bit offsets and offer_ascending's branch-free test, the common path of the row scan
// (class ids, euclidean) reads ~42 in the sm_90 SASS of nvcc 13.0 (~166 per 4 keys: loads
// and addresses ~42, keys ~30, the test ~84, the loop ~10); its 12 bytes of spill sit
// outside the loops. Not measured: the model (make cuda-perf) takes 42.
template <typename T>
__global__ void __launch_bounds__(kRowsPerBlock * kWarp, sizeof(T) == 4 ? 3 : 2) mine_tile_kernel(const T* __restrict__ tile, int64_t ld, int64_t r0, int64_t R, int64_t c0, int64_t C,
                                 const T* __restrict__ sq_rows, const T* __restrict__ sq_cols,
                                 Labels row_labels, Labels col_labels, bool self, bool columns,
                                 unsigned row_blocks, int64_t row_splits, unsigned column_blocks,
                                 int64_t column_splits, Metric metric, MiningState<T> state, int64_t B) {
  const int64_t row_part = int64_t(row_blocks) * row_splits;
  if (int64_t(blockIdx.x) < row_part) {
    const int64_t s = blockIdx.x / row_blocks;
    const int64_t u = int64_t(blockIdx.x % row_blocks) * kRowsPerBlock + threadIdx.x / kWarp;
    const int lane = threadIdx.x % kWarp;
    if (u >= R) return;
    const int64_t i = r0 + u, t0 = C * s / row_splits, t1 = C * (s + 1) / row_splits;
    const Hardest<T> h = scan_row(tile + u * ld + t0, int(t1 - t0), c0 + t0, sq_cols + c0 + t0, 1, col_labels,
                                  sq_rows[i], row_labels, i, self ? i : int64_t(-1), metric, lane);
    if (lane != 0) return;
    Hardest<T> st = state.load(s * B + i);
    st.merge(h);
    state.store(s * B + i, st);
    return;
  }
  if (!columns) return;
  const int64_t b = int64_t(blockIdx.x) - row_part;
  const int64_t s = b / column_blocks;
  const int64_t t = (b % column_blocks) * kColumnThreads + threadIdx.x;
  if (t >= C) return;
  const int64_t j = c0 + t;  // the column anchor; its candidates are the tile's rows
  const int64_t u0 = R * s / column_splits, u1 = R * (s + 1) / column_splits;
  const T sj = sq_cols[j];
  const bool ids = col_labels.words == 0;
  const int64_t lj = ids ? col_labels.data[j] : 0;
  Hardest<T> h = no_candidate<T>();
  constexpr int kUnroll = 4;
  for (int64_t u = u0; u < u1; u += kUnroll) {
    T gv[kUnroll];
#pragma unroll
    for (int q = 0; q < kUnroll; ++q) gv[q] = u + q < u1 ? tile[(u + q) * ld + t] : T(0);
    T key[kUnroll], sv[kUnroll];
    int64_t rows[kUnroll];
    bool same[kUnroll], valid[kUnroll];
#pragma unroll
    for (int q = 0; q < kUnroll; ++q) {
      valid[q] = u + q < u1;
      rows[q] = r0 + u + q;  // ascending: offer_ascending
      sv[q] = valid[q] ? sq_rows[rows[q]] : T(0);
      same[q] = valid[q] && (ids ? row_labels.data[rows[q]] == lj : col_labels.shares(j, row_labels, rows[q]));
      key[q] = mining_key(metric, gv[q], sj, sv[q]);
    }
    h.offer_ascending(key, rows, same, valid, sv);
  }
  Hardest<T> st = state.load(s * B + j);
  st.merge(h);
  state.store(s * B + j, st);
}

// After the last tile: every anchor's slots merged into slot 0 (a warp per anchor, lane q
// taking slots q, q + 32, ...), and certification: `rescan` gets bit 0 / bit 1 when the
// positive / negative window is not covered by the kept candidates. Such an anchor is
// listed for settle_parts_kernel, which rescans the reference set for it: list[p] = i and
// list_pos[i] = p, p a ticket from *listed (zeroed by prepare_rows_kernel). The order of
// the list depends on the atomics, nothing computed from it does. With `stats`, counts
// the anchors that settle and those rescanned ([0] and [1]). ~B (slots * 100 + 1) bytes.
template <typename T>
__global__ void merge_slots_kernel(MiningState<T> state, int64_t slots, int64_t B, const T* __restrict__ sq_x,
                                   int64_t D, Metric metric, double acc_u, double gemm_u, uint8_t* rescan,
                                   unsigned* listed, int32_t* list, int32_t* list_pos, unsigned long long* stats) {
  const int64_t i = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (i >= B) return;
  Hardest<T> h = no_candidate<T>();
  for (int64_t q = lane; q < slots; q += kWarp) h.merge(state.load(q * B + i));
  h = warp_merge(h);
  if (lane != 0) return;
  state.store(i, h);
  const Settle w = certify(h, sq_x[i], D, metric, acc_u, gemm_u);
  rescan[i] = uint8_t((w.rp ? 1 : 0) | (w.rn ? 2 : 0));
  if (w.rp || w.rn) {
    const unsigned p = atomicAdd(listed, 1u);
    list[p] = int32_t(i), list_pos[i] = int32_t(p);
  }
  if (stats != nullptr) {
    if (w.sp || w.sn) atomicAdd(stats, 1ull);
    if (w.rp || w.rn) atomicAdd(stats + 1, 1ull);
  }
}

// Parts per listed anchor in a rescan (settle_parts_kernel, finish_anchors_kernel): as
// many as `max_parts` allows while the n listed anchors' parts fit the `items` result
// slots (items >= B >= n: at least one part each). A function of n alone, so the result
// does not depend on which anchor got which ticket.
__device__ __forceinline__ int64_t settle_parts_of(int64_t n, int64_t max_parts, int64_t items) {
  const int64_t fit = n > 0 ? items / n : items;
  return fit < max_parts ? (fit > 1 ? fit : 1) : max_parts;
}

// Rescanning for the anchors listed by merge_slots_kernel (n = *listed; on random data
// none, and the grid exits after one load). Work item (p, s): part s of the reference set
// for the p-th listed anchor i, one block per item (the grid, a fixed number of blocks,
// strides over the n * parts items). The block's warps split the part; each ranks its
// candidates of the kinds that rescan on exact keys (warp_exact_key, one candidate at a
// time, lanes over D), and the block merges its warps' choices into result slot item
// (best positive, best negative). finish_anchors_kernel merges anchor i's parts. A rescan
// of one anchor is thus spread over up to max_parts blocks (~1000 on a GPU): about one
// read of the reference rows, mostly from L2, instead of one warp's serial chain of exact
// keys over 2^18 elements of them (512 keys at D = 512: ~0.6 ms at B = 8192; ~5 ms on a
// 2^20 bank: SASS review, 2026-12-07).
template <typename scalar_t, typename T>
__global__ void settle_parts_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ r, int64_t M,
                                    int64_t D, const T* __restrict__ sq_x, Labels labels, Labels ref_labels,
                                    bool self, Metric metric, double acc_u, double gemm_u, MiningState<T> state,
                                    const unsigned* __restrict__ listed, const int32_t* __restrict__ list,
                                    int64_t max_parts, int64_t items, double* part_key, int64_t* part_idx) {
  __shared__ double warp_key[kRowsPerBlock][2];
  __shared__ int64_t warp_idx[kRowsPerBlock][2];
  const int64_t n = int64_t(*listed);
  const int64_t parts = settle_parts_of(n, max_parts, items);
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const bool cosine = metric == Metric::Cosine;
  for (int64_t item = blockIdx.x; item < n * parts; item += gridDim.x) {  // uniform over the block
    const int64_t i = list[item / parts], s = item % parts;
    const Settle w = certify(state.load(i), sq_x[i], D, metric, acc_u, gemm_u);
    const scalar_t* a = x + i * D;
    const ExactNorm na = warp_exact_norm(a, D, cosine, lane);
    const int64_t j0 = M * s / parts, n_part = M * (s + 1) / parts - j0;
    const int64_t k0 = j0 + n_part * warp / kRowsPerBlock, k1 = j0 + n_part * (warp + 1) / kRowsPerBlock;
    Choice c;
    for (int64_t j = k0; j < k1; ++j) {
      if (self && j == i) continue;
      const bool same = labels.shares(i, ref_labels, j);
      if (same ? !w.rp : !w.rn) continue;
      c.offer(warp_exact_key(a, na, r + j * D, D, cosine, lane), j, same);
    }
    if (lane == 0) {
      warp_key[warp][0] = c.pk, warp_idx[warp][0] = c.pi;
      warp_key[warp][1] = c.nk, warp_idx[warp][1] = c.ni;
    }
    __syncthreads();
    if (warp == 0) {
      Choice b;
      if (lane < kRowsPerBlock) {
        b.offer(warp_key[lane][0], warp_idx[lane][0], true);
        b.offer(warp_key[lane][1], warp_idx[lane][1], false);
      }
      b = warp_merge(b);
      if (lane == 0) {
        part_key[item * 2] = b.pk, part_idx[item * 2] = b.pi;
        part_key[item * 2 + 1] = b.nk, part_idx[item * 2 + 1] = b.ni;
      }
    }
    __syncthreads();  // the shared choices are reused by the next item
  }
}

// Last: settling (from the kept candidates, or merging settle_parts_kernel's parts for a
// rescanned kind), exact distances and per-anchor losses (one warp per anchor), then
// (last block) their reduction. sq_x: the anchors' squared norms as mined on.
template <typename scalar_t, typename T>
__global__ void finish_anchors_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ r, int64_t B,
                                      int64_t D, const T* __restrict__ sq_x, Metric metric, double acc_u,
                                      double gemm_u, double margin, bool soft_margin, MiningState<T> state,
                                      const unsigned* listed, const int32_t* list_pos, int64_t max_parts,
                                      int64_t items, const double* part_key, const int64_t* part_idx,
                                      int64_t* pos_idx, int64_t* neg_idx, T* pos_dist, T* neg_dist,
                                      T* anchor_loss, uint8_t* anchor_valid, Reduction reduction, bool want_loss,
                                      unsigned* counter, scalar_t* loss_out) {
  const int64_t i = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (i < B) {
    Hardest<T> h = state.load(i);
    const Settle w = certify(h, sq_x[i], D, metric, acc_u, gemm_u);
    settle_from_kept<scalar_t, T>(h, w, x + i * D, r, D, metric, lane);
    if (w.rp || w.rn) {  // uniform over the warp: merge settle_parts_kernel's parts
      const int64_t parts = settle_parts_of(int64_t(*listed), max_parts, items), p = list_pos[i];
      Choice c;
      for (int64_t q = lane; q < parts; q += kWarp) {
        const int64_t at = (p * parts + q) * 2;
        c.offer(part_key[at], part_idx[at], true);
        c.offer(part_key[at + 1], part_idx[at + 1], false);
      }
      c = warp_merge(c);
      if (w.rp && c.pi >= 0) h.pos.idx[0] = c.pi, h.pos.key[0] = T(c.pk);
      if (w.rn && c.ni >= 0) h.neg.idx[0] = c.ni, h.neg.key[0] = T(c.nk);
    }
    T loss;
    bool valid;
    finish_anchor<scalar_t, T>(h, i, x, r, D, metric, margin, soft_margin, lane, pos_idx, neg_idx,
                               pos_dist, neg_dist, loss, valid);
    if (lane == 0) {
      anchor_loss[i] = loss, anchor_valid[i] = valid;
      if (want_loss && reduction == Reduction::None) loss_out[i] = scalar_t(loss);
    }
  }
  if (want_loss && reduction != Reduction::None)
    reduce_in_last_block(counter, anchor_loss, anchor_valid, B, reduction, loss_out);
}

// ---- Backward -----------------------------------------------------------------------

// Anchor i's gradient coefficients: the (a, p) pair with weight +s and the (a, n) pair
// with weight -s, in difference form (common.h's pair_grad); inactive when s = 0.
struct AnchorCoef {
  bool active;
  PairGrad p, n;
  // Cosine with a row whose squared norm overflows T (fp32 rows of norm >= ~1.8e19): the
  // plain form alpha a + beta b of each pair, scaled, in double. The form around a - b
  // cancels two terms of ~|b| when |b| >> |a|, and beta (~1 / |b|) vanishes from alpha +
  // beta in any precision (common.h: cosine_pair_grad).
  bool plain;
  CosinePairGrad cp, cn;
};

// What every backward kernel needs about the forward.
template <typename scalar_t, typename T>
struct BackwardArgs {
  const scalar_t* grad;  // upstream gradient: one value, or B values with stride grad_stride
  int64_t grad_stride;
  const scalar_t *x, *r;  // anchors (B, D) and reference rows (M, D); r == x when self-mining
  int64_t B, D;
  const int64_t *pos_idx, *neg_idx;
  const T *pos_dist, *neg_dist;
  double margin;
  Metric metric;
  bool soft_margin;
  Reduction reduction;
  const int64_t* count;  // count_kernel's kCountBlocks partial denominators, or null: each block counts
};

// count_kernel's blocks: each counts a 32nd of the anchors; a consumer sums the 32 partial
// counts with one warp (integers: any order gives the same sum).
constexpr int kCountBlocks = kWarp;

// The forward's per-anchor loss, recomputed from its distances in T (so the hinge and
// mean_nonzero decisions match it bit for bit; NaN distances carry NaN rows).
template <typename scalar_t, typename T>
__device__ __forceinline__ T forward_loss(const BackwardArgs<scalar_t, T>& a, int64_t i, bool& valid) {
  valid = a.pos_idx[i] >= 0 && a.neg_idx[i] >= 0;
  return valid ? triplet_term(a.pos_dist[i] - a.neg_dist[i], T(a.margin), a.soft_margin) : T(0);
}

// The reduction's denominator (valid anchors, or anchors with loss > 0) among anchors
// first, first + stride, ... (every anchor: 0 and blockDim.x), counted by the whole block:
// every block gets the same integer.
template <typename scalar_t, typename T>
__device__ int64_t block_count(const BackwardArgs<scalar_t, T>& a, int64_t first = 0, int64_t stride = 0) {
  __shared__ int64_t counts[kRowsPerBlock * kWarp];
  const int t = threadIdx.x;
  int64_t c = 0;
  if (stride == 0) stride = blockDim.x;
  if (a.reduction == Reduction::Mean || a.reduction == Reduction::MeanNonzero) {
    for (int64_t i = first + t; i < a.B; i += stride) {
      bool valid;
      const T l = forward_loss(a, i, valid);
      c += a.reduction == Reduction::Mean ? int64_t(valid) : int64_t(l > T(0));
    }
  }
  counts[t] = c;
  __syncthreads();
  for (int width = kRowsPerBlock * kWarp / 2; width > 0; width /= 2) {
    if (t < width) counts[t] += counts[t + width];
    __syncthreads();
  }
  const int64_t total = counts[0];
  __syncthreads();  // counts is reused by the next call
  return total;
}

// The denominator for every block: the sum of count_kernel's partial counts (one warp
// each, no barrier), else the block's own count (O(B) per block: only where the grid is
// small, the one-kernel self-mining backward).
template <typename scalar_t, typename T>
__device__ __forceinline__ int64_t denominator(const BackwardArgs<scalar_t, T>& a) {
  if (a.count == nullptr) return block_count(a);  // uniform over the grid
  const int lane = threadIdx.x % kWarp;
  return warp_sum(lane < kCountBlocks ? a.count[lane] : int64_t(0));
}

// The denominator once, before the kernels of the sorted backward (each of their blocks
// counting it again cost O(B^2 / 8) loads: 1 ms at B = 8192), by kCountBlocks blocks:
// block b counts anchors b * 256 + t, + kCountBlocks * 256, ... into out[b]. One block,
// as before, made B / 256 dependent passes (~23 us at B = 8192 in the model); now ~1.
template <typename scalar_t, typename T>
__global__ void count_kernel(BackwardArgs<scalar_t, T> a, int64_t* out) {
  const int64_t c = block_count(a, int64_t(blockIdx.x) * blockDim.x, int64_t(gridDim.x) * blockDim.x);
  if (threadIdx.x == 0) out[blockIdx.x] = c;
}

// Anchor i's coefficients (whole warp: cosine needs the pairs' dot products).
template <typename scalar_t, typename T>
__device__ AnchorCoef anchor_coef(const BackwardArgs<scalar_t, T>& a, int64_t i, int64_t count, int lane) {
  bool valid;
  forward_loss(a, i, valid);
  double scale = 0;
  if (valid) {
    const double g = double(a.grad[a.reduction == Reduction::None ? i * a.grad_stride : 0]);
    if (a.reduction == Reduction::None || a.reduction == Reduction::Sum) scale = g;
    else if (a.reduction == Reduction::Mean) scale = g / double(count);
    else if (count > 0) scale = g / double(count);  // mean_nonzero: the hinge gradient decides (kink: 1)
  }
  const T pd = a.pos_dist[i], nd = a.neg_dist[i];
  const double s = valid ? scale * double(triplet_term_grad(pd - nd, T(a.margin), a.soft_margin)) : 0.0;
  AnchorCoef c{s != 0.0, {}, {}, false, {}, {}};
  if (!c.active) return c;
  double aa = 0, pp = 0, nn = 0, ap = 0, an = 0;
  if (a.metric == Metric::Cosine) {
    // In double: fp32 squares never overflow there (in T an fp32 row of norm 1e20 gave
    // inf, then NaN gradients).
    const scalar_t *ar = a.x + i * a.D, *pr = a.r + a.pos_idx[i] * a.D, *nr = a.r + a.neg_idx[i] * a.D;
    double sum[5] = {};
    for (int64_t k = lane; k < a.D; k += kWarp) {
      const double av = double(ar[k]), pv = double(pr[k]), nv = double(nr[k]);
      sum[0] += av * av, sum[1] += pv * pv, sum[2] += nv * nv, sum[3] += av * pv, sum[4] += av * nv;
    }
    for (int j = 0; j < 5; ++j) sum[j] = warp_sum(sum[j]);
    aa = sum[0], pp = sum[1], nn = sum[2], ap = sum[3], an = sum[4];
    const double limit = sizeof(T) == 4 ? 0x1p124 : 0x1p1020;  // T's max / 8
    c.plain = !(aa < limit && pp < limit && nn < limit);
    if (c.plain) {
      const CosinePairGrad gp = cosine_pair_grad(ap, aa, pp), gn = cosine_pair_grad(an, aa, nn);
      c.cp = {s * gp.alpha_a, s * gp.alpha_b, s * gp.beta};
      c.cn = {-s * gn.alpha_a, -s * gn.alpha_b, -s * gn.beta};
    }
  }
  c.p = pair_grad(a.metric, double(pd), ap, aa, pp).scaled(s);
  c.n = pair_grad(a.metric, double(nd), an, aa, nn).scaled(-s);
  return c;
}

// Anchor i's own gradient row: d/da of its two pairs (0 when inactive). Whole warp.
template <typename scalar_t, typename T>
__device__ __forceinline__ void write_anchor_row(const BackwardArgs<scalar_t, T>& a, int64_t i, const AnchorCoef& c,
                                                 T* out, int lane) {
  T* o = out + i * a.D;
  if (!c.active) {
    for (int64_t k = lane; k < a.D; k += kWarp) o[k] = T(0);
    return;
  }
  const scalar_t *ar = a.x + i * a.D, *pr = a.r + a.pos_idx[i] * a.D, *nr = a.r + a.neg_idx[i] * a.D;
  if (c.plain) {
    for (int64_t k = lane; k < a.D; k += kWarp) {
      const double av = double(ar[k]), pv = double(pr[k]), nv = double(nr[k]);
      o[k] = T(c.cp.alpha_a * av + c.cp.beta * pv + c.cn.alpha_a * av + c.cn.beta * nv);
    }
    return;
  }
  for (int64_t k = lane; k < a.D; k += kWarp) {
    const T av = T(ar[k]), pv = T(pr[k]), nv = T(nr[k]);
    o[k] = T(c.p.da) * (av - pv) + T(c.p.ea) * pv + T(c.n.da) * (av - nv) + T(c.n.ea) * nv;
  }
}

// Adds anchor i's contribution to reference row j, as its positive or its negative.
template <typename scalar_t, typename T>
__device__ __forceinline__ void add_ref_contribution(const BackwardArgs<scalar_t, T>& a, int64_t i, int64_t j,
                                                     const AnchorCoef& c, bool positive, T* out_row, int lane) {
  const scalar_t *ar = a.x + i * a.D, *rr = a.r + j * a.D;
  if (c.plain) {
    const CosinePairGrad& g = positive ? c.cp : c.cn;
    for (int64_t k = lane; k < a.D; k += kWarp) out_row[k] += T(g.alpha_b * double(rr[k]) + g.beta * double(ar[k]));
    return;
  }
  const PairGrad& g = positive ? c.p : c.n;
  for (int64_t k = lane; k < a.D; k += kWarp) {
    const T av = T(ar[k]), rv = T(rr[k]);
    out_row[k] += T(g.db) * (av - rv) + T(g.eb) * av;
  }
}

// Self-mining backward, one warp per row j of the gradient: anchor j's own term, then,
// in ascending anchor order, the terms of every anchor that picked j as its positive or
// negative (found by scanning the indices with ballots). Each row has one writer and a
// fixed order of additions: deterministic, no atomics. O(B^2) index compares, O(B*D) math.
template <typename scalar_t, typename T>
__global__ void self_grad_kernel(BackwardArgs<scalar_t, T> a, T* out) {
  const int64_t count = denominator(a);
  const int lane = threadIdx.x % kWarp;
  const int64_t rows_per_grid = int64_t(gridDim.x) * kRowsPerBlock;
  for (int64_t j = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp; j < a.B; j += rows_per_grid) {
    write_anchor_row(a, j, anchor_coef(a, j, count, lane), out, lane);
    T* o = out + j * a.D;
    for (int64_t i0 = 0; i0 < a.B; i0 += kWarp) {
      const int64_t i = i0 + lane;
      const bool in = i < a.B;
      const unsigned as_pos = __ballot_sync(kFullMask, in && a.pos_idx[i] == j);
      const unsigned as_neg = __ballot_sync(kFullMask, in && a.neg_idx[i] == j);
      for (unsigned m = as_pos | as_neg; m != 0; m &= m - 1) {
        const int b = __ffs(int(m)) - 1;
        const AnchorCoef c = anchor_coef(a, i0 + b, count, lane);
        if (!c.active) continue;
        if (as_pos >> b & 1u) add_ref_contribution(a, i0 + b, j, c, true, o, lane);
        if (as_neg >> b & 1u) add_ref_contribution(a, i0 + b, j, c, false, o, lane);
      }
    }
  }
}

// Anchors' own gradient rows (a reference set, or large self-mining): one warp per row.
template <typename scalar_t, typename T>
__global__ void anchor_grad_kernel(BackwardArgs<scalar_t, T> a, T* out) {
  const int64_t count = denominator(a);
  const int lane = threadIdx.x % kWarp;
  const int64_t rows_per_grid = int64_t(gridDim.x) * kRowsPerBlock;
  for (int64_t i = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp; i < a.B; i += rows_per_grid)
    write_anchor_row(a, i, anchor_coef(a, i, count, lane), out, lane);
}

// Reference rows' gradient: `target` is [pos_idx; neg_idx] sorted stably (-1 first) and
// `entry` its permutation (entry e < B: anchor e's positive, else anchor e - B's
// negative). A group of equal targets j (the anchors that picked row j) is cut into
// chunks at the positions that are multiples of kHubChunk: one warp per chunk adds its
// terms in ascending entry order. A group within one chunk (nearly all) is added onto
// the row (zeroed for a reference set; the anchor's own term when self-mining, after
// anchor_grad_kernel) and stored; a longer one (a "hub" row, the hardest negative of
// many anchors) writes each chunk's sum to its slot of `parts`, and ref_merge_kernel adds
// the slots onto the row in chunk order. One writer per row and a fixed order of
// additions: deterministic.
// Why: the SASS review of 2026-12-07 found one warp serving a whole group, with every
// term waiting on the previous one's stores; on randn data one row is the hardest
// negative of ~98 anchors at B = 4096 and ~142 at 8192, ~16 serial L2 round trips each
// (0.4-0.9 ms). The row is now held in registers, kRefPerLane columns per lane (512
// columns per pass), stored once per pass, so a term costs about three dependent round
// trips (entry, coefficients, rows), and a chain is at most kHubChunk terms: the largest
// hub at B = 8192 is 18 chunks in parallel, then a merge of 18 partial rows, ~30 us in the
// model where one warp's chain of 142 terms was ~0.25 ms (not measured). For D > 512
// each pass recomputes the terms' coefficients (a cosine term's five dot products).
// Registers (nvcc 13.0, sm_90): capped at 128 by __launch_bounds__ (2 blocks of 256
// threads per SM, no spill); uncapped, ptxas took 137 once the denominator became a
// warp's sum (1 block per SM).
constexpr int kRefPerLane = 16;
#ifdef TRIPLETOPS_EMU
constexpr int64_t kHubChunk = 2;  // the tests' small batches split their groups too
#else
constexpr int64_t kHubChunk = 8;
#endif

// The slot in `parts` of the chunk that starts at s: two per kHubChunk positions (one
// starting on the multiple, one starting at a group's head inside it).
__host__ __device__ inline int64_t hub_slot(int64_t s) { return 2 * (s / kHubChunk) + (s % kHubChunk != 0); }
inline int64_t hub_slots(int64_t E) { return 2 * (E / kHubChunk + 1); }

template <typename scalar_t, typename T>
__global__ void __launch_bounds__(kRowsPerBlock * kWarp, 2)
    ref_grad_kernel(BackwardArgs<scalar_t, T> a, const int64_t* __restrict__ target,
                                const int64_t* __restrict__ entry, T* out, T* __restrict__ parts) {
  const int64_t count = denominator(a);
  const int lane = threadIdx.x % kWarp;
  const int64_t E = 2 * a.B, rows_per_grid = int64_t(gridDim.x) * kRowsPerBlock;
  for (int64_t s = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp; s < E; s += rows_per_grid) {
    const int64_t j = target[s];
    const bool head = s == 0 || target[s - 1] != j;
    if (j < 0 || (!head && s % kHubChunk != 0)) continue;  // not a chunk's first position (warp-uniform)
    int64_t end = s + 1;
    while (end < E && end % kHubChunk != 0 && target[end] == j) ++end;
    const bool whole = head && (end == E || target[end] != j);  // the group is this chunk
    T* o = whole ? out + j * a.D : parts + hub_slot(s) * a.D;
    const scalar_t* rr = a.r + j * a.D;
    for (int64_t c0 = 0; c0 < a.D; c0 += int64_t(kWarp) * kRefPerLane) {
      T acc[kRefPerLane];
#pragma unroll
      for (int q = 0; q < kRefPerLane; ++q) {
        const int64_t k = c0 + q * kWarp + lane;
        acc[q] = whole && k < a.D ? o[k] : T(0);
      }
      for (int64_t u = s; u < end; ++u) {
        const int64_t e = entry[u], i = e < a.B ? e : e - a.B;
        const AnchorCoef c = anchor_coef(a, i, count, lane);
        if (!c.active) continue;
        const scalar_t* ar = a.x + i * a.D;
        if (c.plain) {
          const CosinePairGrad& g = e < a.B ? c.cp : c.cn;
#pragma unroll
          for (int q = 0; q < kRefPerLane; ++q) {
            const int64_t k = c0 + q * kWarp + lane;
            if (k < a.D) acc[q] += T(g.alpha_b * double(rr[k]) + g.beta * double(ar[k]));
          }
        } else {
          const PairGrad& g = e < a.B ? c.p : c.n;
#pragma unroll
          for (int q = 0; q < kRefPerLane; ++q) {
            const int64_t k = c0 + q * kWarp + lane;
            if (k < a.D) {
              const T av = T(ar[k]), rv = T(rr[k]);
              acc[q] += T(g.db) * (av - rv) + T(g.eb) * av;
            }
          }
        }
      }
#pragma unroll
      for (int q = 0; q < kRefPerLane; ++q) {
        const int64_t k = c0 + q * kWarp + lane;
        if (k < a.D) o[k] = acc[q];
      }
    }
  }
}

// The groups that ref_grad_kernel split (longer than their first chunk): a warp per group
// head adds its chunks' sums from `parts` onto the row, in chunk order.
template <typename T>
__global__ void ref_merge_kernel(const int64_t* __restrict__ target, int64_t E, int64_t D,
                                 const T* __restrict__ parts, T* out) {
  const int lane = threadIdx.x % kWarp;
  const int64_t rows_per_grid = int64_t(gridDim.x) * kRowsPerBlock;
  for (int64_t s = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp; s < E; s += rows_per_grid) {
    const int64_t j = target[s];
    if (j < 0 || (s > 0 && target[s - 1] == j)) continue;  // not a group's head (warp-uniform)
    const int64_t next = (s / kHubChunk + 1) * kHubChunk;  // where the head's chunk ends at the latest
    if (next >= E || target[next] != j) continue;          // one chunk: ref_grad_kernel stored it
    T* o = out + j * D;
    for (int64_t c0 = 0; c0 < D; c0 += int64_t(kWarp) * kRefPerLane) {
      T acc[kRefPerLane];
#pragma unroll
      for (int q = 0; q < kRefPerLane; ++q) {
        const int64_t k = c0 + q * kWarp + lane;
        acc[q] = k < D ? o[k] + parts[hub_slot(s) * D + k] : T(0);
      }
      for (int64_t c = next; c < E && target[c] == j; c += kHubChunk) {
        const T* p = parts + hub_slot(c) * D;
#pragma unroll
        for (int q = 0; q < kRefPerLane; ++q) {
          const int64_t k = c0 + q * kWarp + lane;
          if (k < D) acc[q] += p[k];
        }
      }
#pragma unroll
      for (int q = 0; q < kRefPerLane; ++q) {
        const int64_t k = c0 + q * kWarp + lane;
        if (k < D) o[k] = acc[q];
      }
    }
  }
}

}  // namespace cuda
}  // namespace tripletops
