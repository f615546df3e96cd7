// Device code of batch_all_loss, semi_hard_loss and contrastive_loss (launchers:
// loss_family_cuda.cu), with csrc/cpu/loss_family_cpu.cpp's semantics.
//
// One block per anchor row of the (B, B) distance matrix. Each anchor's negatives (and,
// for batch-all's backward, its positives) come sorted per row by at::sort, so a
// positive's hinge over all negatives is one binary search plus a prefix sum: O(B^2 log B)
// for the batch, no B^3 work or memory. Every block reduces its row in a fixed order
// (block_sum), writes one row of per-anchor statistics, and one block reduces those to
// the loss (family_total_kernel): the same bits on every run. The backward kernels write
// each anchor's row of d loss / d dist, with one writer per entry, except semi-hard's
// negatives, which take their -s from atomicAdd: every addend of one entry is the same
// -s, so the order the atomics run in cannot change the sum.
#pragma once

#include "../common.h"
#include "warp.cuh"

#include <cmath>
#include <cstdint>

namespace tripletops {
namespace cuda {

constexpr int kFamilyThreads = 128;  // threads per block of the per-row kernels (4 warps)
constexpr int kFamilyWarps = kFamilyThreads / kWarp;

// Per-anchor statistics, a (B, kStats) double row per anchor: the loss terms' sum, the
// denominator's count for "mean" (valid triplets / anchor-positive pairs / pairs), the
// count of nonzero terms, and a NaN flag. Counts are exact in double up to 2^53.
constexpr int kStats = 4;
enum Stat { kSum = 0, kCount = 1, kNonzero = 2, kNan = 3 };

// The sum over the block (any whole number of warps, up to 1024 threads), on every
// thread, in one fixed order. Block-uniform: every thread of the block calls it.
template <typename T>
__device__ T block_sum(T v) {
  __shared__ T partial[32];
  v = warp_sum(v);
  __syncthreads();  // partial[] may still be read from the previous call
  if (threadIdx.x % kWarp == 0) partial[threadIdx.x / kWarp] = v;
  __syncthreads();
  T total = T(0);
  for (unsigned w = 0; w < blockDim.x / kWarp; ++w) total += partial[w];
  return total;
}

// In an ascending array v[0, n): how many entries are < a + b, and how many are <= a + b,
// for the exact sum (common.h: below_sum, not_above_sum).
__device__ __forceinline__ int64_t count_below(const double* v, int64_t n, double a, double b = 0.0) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (below_sum(v[mid], a, b)) lo = mid + 1; else hi = mid;
  }
  return lo;
}
__device__ __forceinline__ int64_t count_not_above(const double* v, int64_t n, double a, double b = 0.0) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (not_above_sum(v[mid], a, b)) lo = mid + 1; else hi = mid;
  }
  return lo;
}

// Anchor a's row: how many positives (same label, not a) and negatives, and whether any
// of their distances is NaN or infinite (the anchor's loss is then NaN: an infinite
// negative would only zero its hinges, and the loss would come out finite and wrong).
struct RowCounts {
  int64_t pos, neg;
  bool nan;
  __device__ bool valid() const { return pos > 0 && neg > 0; }
};
__device__ __forceinline__ RowCounts row_counts(const double* d, Labels lab, int64_t a, int64_t B) {
  long long pos = 0, neg = 0, bad = 0;
  for (int64_t j = threadIdx.x; j < B; j += blockDim.x) {
    if (j == a) continue;
    (lab.shares(a, lab, j) ? pos : neg) += 1;
    bad += !(d[j] - d[j] == 0.0);
  }
  return {block_sum(pos), block_sum(neg), block_sum(bad) > 0};
}

// Each anchor's distances split into two rows to sort: its negatives' (+inf elsewhere)
// and, when pos_key is given, its positives' (+inf elsewhere, the anchor itself too).
// One thread per entry.
__global__ void split_by_label_kernel(const double* __restrict__ dist, Labels lab, int64_t B,
                                      double* __restrict__ neg_key, double* __restrict__ pos_key) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= B * B) return;
  const int64_t a = idx / B, j = idx % B;
  const double inf = INFINITY;
  const bool same = lab.shares(a, lab, j);
  neg_key[idx] = same || j == a ? inf : dist[idx];  // (a row with no label shares none, itself included)
  if (pos_key) pos_key[idx] = same && j != a ? dist[idx] : inf;
}

// Inclusive prefix sums of each row, one warp per row, 32 entries at a time (a shuffle
// scan, then the carry): a fixed order. Entries past a row's count are +inf and only
// reach the sums past it.
__global__ void row_prefix_sum_kernel(const double* __restrict__ v, int64_t B, double* __restrict__ out) {
  const int64_t row = blockIdx.x;
  const int lane = threadIdx.x;
  double carry = 0;
  for (int64_t base = 0; base < B; base += kWarp) {
    const int64_t j = base + lane;
    double x = j < B ? v[row * B + j] : 0.0;
    for (int offset = 1; offset < kWarp; offset *= 2) {
      const double y = __shfl_up_sync(kFullMask, x, offset);
      if (lane >= offset) x += y;
    }
    x += carry;
    if (j < B) out[row * B + j] = x;
    carry = __shfl_sync(kFullMask, x, kWarp - 1);
  }
}

// ---- batch-all ------------------------------------------------------------------------

// Anchor a's sum over every (p, n) of the triplet term, and its counts. Hinge: over the
// sorted negatives with prefix sums (neg_prefix[k] = sum of the k + 1 smallest), each
// positive's sum over d_an < d_ap + m of (d_ap + m - d_an) is c (d_ap + m) - prefix[c - 1].
// Soft margin: every (p, n), as on CPU.
__global__ void batch_all_stats_kernel(const double* __restrict__ dist, Labels lab,
                                       const double* __restrict__ neg_sorted, const double* __restrict__ neg_prefix,
                                       int64_t B, double margin, bool soft, double* __restrict__ stats) {
  const int64_t a = blockIdx.x;
  const double* d = dist + a * B;
  const RowCounts rc = row_counts(d, lab, a, B);
  double sum = 0, nonzero = 0;
  if (rc.valid() && !rc.nan) {
    for (int64_t p = threadIdx.x; p < B; p += blockDim.x) {
      if (p == a || !lab.shares(a, lab, p)) continue;
      if (soft) {
        for (int64_t n = 0; n < B; ++n) {
          if (n == a || lab.shares(a, lab, n)) continue;
          const double l = softplus(d[p] - d[n]);
          sum += l;
          nonzero += l > 0.0;
        }
        continue;
      }
      const double t = d[p] + margin;
      const int64_t c = count_below(neg_sorted + a * B, rc.neg, d[p], margin);
      if (c > 0) sum += double(c) * t - neg_prefix[a * B + c - 1];
      nonzero += double(c);
    }
  }
  sum = block_sum(sum);
  nonzero = block_sum(nonzero);
  if (threadIdx.x == 0) {
    double* st = stats + a * kStats;
    const bool counted = rc.valid();
    st[kSum] = sum;
    st[kCount] = counted ? double(rc.pos) * double(rc.neg) : 0.0;
    st[kNonzero] = nonzero;
    st[kNan] = counted && rc.nan ? 1.0 : 0.0;
  }
}

// A NaN anchor keeps its NaN on the way to the embeddings: its row of the gradient.
__device__ inline void poison_row(double* ga, int64_t a, int64_t B) {
  for (int64_t j = threadIdx.x; j < B; j += blockDim.x)
    if (j != a) ga[j] = NAN;
}

// d loss / d dist, anchor a's row, with s = d loss / d (sum of terms) (scale[0]).
// Hinge: d/d d_ap = s * #(d_an <= d_ap + m); d/d d_an = -s * #(d_ap + m >= d_an), both by
// binary search, the second over the positives sorted (d_ap + m is monotone in d_ap).
__global__ void batch_all_grad_kernel(const double* __restrict__ dist, Labels lab,
                                      const double* __restrict__ neg_sorted, const double* __restrict__ pos_sorted,
                                      int64_t B, double margin, bool soft, const double* __restrict__ scale,
                                      double* __restrict__ grad_dist) {
  const int64_t a = blockIdx.x;
  const double* d = dist + a * B;
  const RowCounts rc = row_counts(d, lab, a, B);
  if (!rc.valid()) return;
  double* ga = grad_dist + a * B;
  if (rc.nan) return poison_row(ga, a, B);
  const double s = scale[0];
  const double *neg = neg_sorted + a * B, *pos = pos_sorted + a * B;
  for (int64_t j = threadIdx.x; j < B; j += blockDim.x) {
    if (j == a) continue;
    const bool positive = lab.shares(a, lab, j);
    if (soft) {  // sum over the other side of s * sigmoid(d_ap - d_an)
      double w = 0;
      for (int64_t k = 0; k < B; ++k) {
        if (k == a || lab.shares(a, lab, k) == positive) continue;
        w += s * (positive ? sigmoid(d[j] - d[k]) : sigmoid(d[k] - d[j]));
      }
      ga[j] = positive ? w : -w;
      continue;
    }
    if (positive) {
      ga[j] = s * double(count_not_above(neg, rc.neg, d[j], margin));
    } else {  // positives p with d_p + m >= d_j: all from the first such one on
      int64_t lo = 0, hi = rc.pos;
      while (lo < hi) {
        const int64_t mid = lo + (hi - lo) / 2;
        if (not_above_sum(d[j], pos[mid], margin)) hi = mid; else lo = mid + 1;
      }
      ga[j] = -(s * double(rc.pos - lo));
    }
  }
}

// ---- semi-hard (FaceNet; TF-Addons TripletSemiHardLoss) --------------------------------

// For a positive at d_ap: the position, in the sorted negatives, of the closest negative
// farther than d_ap, else of the first of the farthest. The stable sort keeps equal
// distances in column order, so the first of a run is the smallest column, as on CPU.
__device__ __forceinline__ int64_t semi_hard_pick(const double* neg, int64_t n, double d_ap) {
  const int64_t above = count_not_above(neg, n, d_ap);
  return above < n ? above : count_below(neg, n, neg[n - 1]);
}

__global__ void semi_hard_stats_kernel(const double* __restrict__ dist, Labels lab,
                                       const double* __restrict__ neg_sorted, int64_t B, double margin,
                                       double* __restrict__ stats) {
  const int64_t a = blockIdx.x;
  const double* d = dist + a * B;
  const RowCounts rc = row_counts(d, lab, a, B);
  double sum = 0;
  if (rc.valid() && !rc.nan) {
    const double* neg = neg_sorted + a * B;
    for (int64_t p = threadIdx.x; p < B; p += blockDim.x) {
      if (p == a || !lab.shares(a, lab, p)) continue;
      sum += relu_nan(d[p] - neg[semi_hard_pick(neg, rc.neg, d[p])] + margin);
    }
  }
  sum = block_sum(sum);
  if (threadIdx.x == 0) {
    double* st = stats + a * kStats;
    st[kSum] = sum;
    st[kCount] = rc.valid() ? double(rc.pos) : 0.0;  // anchor-positive pairs whose anchor has a negative
    st[kNonzero] = 0.0;
    st[kNan] = rc.valid() && rc.nan ? 1.0 : 0.0;
  }
}

// Each positive whose hinge passes its gradient: +s to d_ap, -s to its negative's d_an.
// Positives have one writer each; a negative picked by several positives takes its -s by
// atomicAdd (equal addends: the sum does not depend on their order).
__global__ void semi_hard_grad_kernel(const double* __restrict__ dist, Labels lab,
                                      const double* __restrict__ neg_sorted, const int64_t* __restrict__ neg_column,
                                      int64_t B, double margin, const double* __restrict__ scale,
                                      double* __restrict__ grad_dist) {
  const int64_t a = blockIdx.x;
  const double* d = dist + a * B;
  const RowCounts rc = row_counts(d, lab, a, B);
  if (!rc.valid()) return;
  double* ga = grad_dist + a * B;
  if (rc.nan) return poison_row(ga, a, B);
  const double s = scale[0];
  const double* neg = neg_sorted + a * B;
  for (int64_t p = threadIdx.x; p < B; p += blockDim.x) {
    if (p == a || !lab.shares(a, lab, p)) continue;
    const int64_t k = semi_hard_pick(neg, rc.neg, d[p]);
    if (triplet_term_grad(d[p] - neg[k], margin, /*soft_margin=*/false) == 0.0) continue;
    ga[p] = s;
    atomicAdd(ga + neg_column[a * B + k], -s);
  }
}

// ---- contrastive: every pair i < j -----------------------------------------------------

// Row i's pairs (i, j > i): the sum of their terms and how many are nonzero.
template <typename T>
__global__ void contrastive_stats_kernel(const T* __restrict__ dist, Labels lab,
                                         const bool* __restrict__ finite, int64_t B, double pos_margin,
                                         double neg_margin, double* __restrict__ stats) {
  const int64_t i = blockIdx.x;
  double sum = 0, nonzero = 0;
  for (int64_t j = i + 1 + threadIdx.x; j < B; j += blockDim.x) {
    const T v = contrastive_term(dist[i * B + j], lab.shares(i, lab, j), finite[i] && finite[j], pos_margin, neg_margin).value;
    sum += double(v);
    nonzero += v > T(0);
  }
  sum = block_sum(sum);
  nonzero = block_sum(nonzero);
  if (threadIdx.x == 0) {
    double* st = stats + i * kStats;
    st[kSum] = sum;
    st[kCount] = double(B - 1 - i);
    st[kNonzero] = nonzero;
    st[kNan] = 0.0;  // a NaN term reaches the sum itself
  }
}

// The position of pair (i, j), i < j, in torch.triu_indices(B, B, 1) order.
__device__ __forceinline__ int64_t pair_index(int64_t i, int64_t j, int64_t B) {
  return i * B - i * (i + 1) / 2 + (j - i - 1);
}

// One thread per entry (i, j) of the (B, B) matrix. Forward (terms != nullptr): the pair
// terms of reduction "none". Backward (grad_dist != nullptr): d loss / d dist, the slope
// times the pair's upstream gradient (pair_grad[k], or scale[0] for a reduced loss), 0 on
// and below the diagonal.
template <typename T>
__global__ void contrastive_pairs_kernel(const T* __restrict__ dist, Labels lab,
                                         const bool* __restrict__ finite, int64_t B, double pos_margin,
                                         double neg_margin, T* __restrict__ terms, const double* __restrict__ pair_grad,
                                         const double* __restrict__ scale, T* __restrict__ grad_dist) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= B * B) return;
  const int64_t i = idx / B, j = idx % B;
  if (j <= i) {
    if (grad_dist) grad_dist[idx] = T(0);
    return;
  }
  const PairTerm<T> t = contrastive_term(dist[idx], lab.shares(i, lab, j), finite[i] && finite[j], pos_margin, neg_margin);
  const int64_t k = pair_index(i, j, B);
  if (terms) terms[k] = t.value;
  if (grad_dist) grad_dist[idx] = T(double(t.slope) * (pair_grad ? pair_grad[k] : scale[0]));
}

// ---- the loss from the per-anchor statistics -------------------------------------------

// What the statistics' reduction divides by.
enum class Denominator { One, Count, Nonzero };

// The batch's totals of the per-anchor statistics, in a fixed order, by one whole block:
// on thread 0, *loss = sum / den (0 for an empty denominator, NaN when an anchor was NaN)
// and *scale = grad / den, d loss / d (each term) for the backward (0 for an empty
// denominator: a loss of exactly 0 has zero gradients, kinks included, in every loss).
// (Volatile reads: the statistics may come from other blocks, on other SMs.)
__device__ __forceinline__ void family_totals(const volatile double* stats, int64_t B, Denominator den_kind, double grad,
                                     double* loss, double* scale) {
  double t[kStats] = {0, 0, 0, 0};
  for (int64_t a = threadIdx.x; a < B; a += blockDim.x)
    for (int k = 0; k < kStats; ++k) t[k] += stats[a * kStats + k];
  for (int k = 0; k < kStats; ++k) t[k] = block_sum(t[k]);
  if (threadIdx.x != 0) return;
  const double den = den_kind == Denominator::One ? 1.0 : den_kind == Denominator::Count ? t[kCount] : t[kNonzero];
  *loss = t[kNan] > 0 ? double(NAN) : (den > 0 ? t[kSum] / den : 0.0);
  *scale = den > 0 ? grad / den : 0.0;
}

// One block: out[0] = the loss and, when `grad` is given, out[1] = the backward's scale.
__global__ void family_total_kernel(const double* __restrict__ stats, int64_t B, Denominator den_kind,
                                    const double* __restrict__ grad, double* __restrict__ out) {
  double loss = 0, scale = 0;
  family_totals(stats, B, den_kind, grad ? grad[0] : 0.0, &loss, &scale);
  if (threadIdx.x != 0) return;
  out[0] = loss;
  if (grad) out[1] = scale;
}

}  // namespace cuda
}  // namespace tripletops
