// Device code of the explicit-triplet margin loss (launchers: triplet_margin_loss_cuda.cu).
// One warp per triplet; sums in the opmath type (fp32 for halves, fp64 for fp64), reduced
// by a butterfly of shuffles in a fixed order; the backward is row-aligned (every
// triplet owns its three gradient rows: no atomics, deterministic).
#pragma once

#include "../common.h"
#include "reduce.cuh"
#include "warp.cuh"

namespace tripletops {
namespace cuda {

constexpr int kTripletWarpsPerBlock = 4;

// One triplet's sums: |a-p|^2, |a-n|^2, |p-n|^2 (difference form: exact), the six dot
// products (cosine and the cosine gradient), and sum (a+p+n)*0 (NaN when a row is not finite).
struct TripletSums {
  double ap2, an2, pn2, aa, pp, nn, ap, an, pn, zero;
};

// The sums are in double for every dtype: an fp32 row of norm 1e-30 or 1e20 has squares
// that under- or overflow fp32 (distances of 0 or inf, a loss of exactly the margin and no
// gradient), while fp32 squares never leave double's range. Memory-bound: the fp64 FMAs
// (10 per entry) cost nothing next to the loads.
template <typename scalar_t, typename acc_t>
__device__ TripletSums triplet_sums(const scalar_t* a, const scalar_t* p, const scalar_t* n, int64_t D, int lane) {
  double s[10] = {};
  for (int64_t k = lane; k < D; k += kWarp) {
    const double av = double(a[k]), pv = double(p[k]), nv = double(n[k]);
    const double dap = av - pv, dan = av - nv, dpn = pv - nv;
    s[0] += dap * dap, s[1] += dan * dan, s[2] += dpn * dpn;
    s[3] += av * av, s[4] += pv * pv, s[5] += nv * nv;
    s[6] += av * pv, s[7] += av * nv, s[8] += pv * nv;
    s[9] += (av + pv + nv) * 0.0;
  }
  for (int j = 0; j < 10; ++j) s[j] = warp_sum(s[j]);  // on every lane
  return {double(s[0]), double(s[1]), double(s[2]), double(s[3]), double(s[4]),
          double(s[5]), double(s[6]), double(s[7]), double(s[8]), double(s[9])};
}

// A distance from a pair's sums: |x-y|^2 (difference form), x.y, |x|^2, |y|^2.
__device__ __forceinline__ double distance_from_sums(Metric metric, double diff_sq, double dot, double x_sq,
                                                     double y_sq) {
  if (metric == Metric::SqEuclidean) return diff_sq;
  if (metric == Metric::Euclidean) return sqrt(diff_sq);
  const double eps = kNormEps, nx = fmax(sqrt(x_sq), eps), ny = fmax(sqrt(y_sq), eps);
  return 1.0 - dot / (nx * ny);
}

// The forward in one launch: a warp per triplet writes its distances and loss, then (with
// a reduction) the last block reduces the losses into `out` (input dtype; `counter`
// zeroed beforehand). Expected on the H200: N = 1024, D = 128 fp32 (1.5 MiB) ~5 us, the
// launch floor; N = 65536 (96 MiB) ~30 us.
template <typename scalar_t, typename acc_t>
__global__ void triplet_forward_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ p,
                                       const scalar_t* __restrict__ n, int64_t N, int64_t D, Metric metric, bool swap,
                                       double margin, acc_t* loss, acc_t* d_ap, acc_t* d_an, acc_t* d_pn,
                                       Reduction reduction, unsigned* counter, scalar_t* out) {
  const int64_t i = int64_t(blockIdx.x) * kTripletWarpsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (i < N) {  // whole warps: the shuffles stay full-warp; no return (the reduction needs every thread)
    const TripletSums s = triplet_sums<scalar_t, acc_t>(a + i * D, p + i * D, n + i * D, D, lane);
    if (lane == 0) {
      const acc_t dap = acc_t(distance_from_sums(metric, s.ap2, s.ap, s.aa, s.pp));
      const acc_t dan = acc_t(distance_from_sums(metric, s.an2, s.an, s.aa, s.nn));
      acc_t neg = dan;
      d_ap[i] = dap, d_an[i] = dan;
      if (swap) {
        const acc_t dpn = acc_t(distance_from_sums(metric, s.pn2, s.pn, s.pp, s.nn));
        d_pn[i] = dpn;
        if (dpn < neg) neg = dpn;
      }
      loss[i] = s.zero == 0.0 ? relu_nan(dap - neg + acc_t(margin)) : acc_t(NAN);
    }
  }
  if (reduction != Reduction::None) reduce_in_last_block(counter, loss, static_cast<const uint8_t*>(nullptr), N,
                                                         reduction, out);
}

// The per-triplet loss as the forward formed it, from its saved distances.
template <typename acc_t>
__device__ __forceinline__ acc_t saved_loss(const acc_t* d_ap, const acc_t* d_an, const acc_t* d_pn, bool swap,
                                            double margin, int64_t i) {
  const acc_t neg = swap && d_pn[i] < d_an[i] ? d_pn[i] : d_an[i];
  return relu_nan(d_ap[i] - neg + acc_t(margin));
}

// mean_nonzero's denominator (losses > 0), once, by one block in a fixed order.
template <typename acc_t>
__global__ void triplet_count_kernel(const acc_t* d_ap, const acc_t* d_an, const acc_t* d_pn, bool swap,
                                     double margin, int64_t N, int64_t* count) {
  __shared__ int64_t counts[kReduceThreads];
  const int t = threadIdx.x;
  int64_t c = 0;
  for (int64_t i = t; i < N; i += blockDim.x) c += saved_loss(d_ap, d_an, d_pn, swap, margin, i) > acc_t(0);
  counts[t] = c;
  __syncthreads();
  for (int width = kReduceThreads / 2; width > 0; width /= 2) {  // blockDim.x == kReduceThreads
    if (t < width) counts[t] += counts[t + width];
    __syncthreads();
  }
  if (t == 0) *count = counts[0];
}

// The backward of the reduction and of each triplet in one launch (after
// triplet_count_kernel for mean_nonzero): d loss / d (triplet i's loss) is grad[i * stride]
// ("none"), g ("sum"), g / N ("mean"), or g / count ("mean_nonzero"; 0 for an empty
// denominator), and the triplet's own hinge gradient decides (1 at the kink, clamp's
// convention), as csrc/cpu/rows_cpu.h's reduction_scale.
template <typename scalar_t, typename acc_t>
__global__ void triplet_backward_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ p,
                                        const scalar_t* __restrict__ n, int64_t N, int64_t D, Metric metric, bool swap,
                                        double margin, const acc_t* d_ap, const acc_t* d_an, const acc_t* d_pn,
                                        const scalar_t* grad, int64_t grad_stride, Reduction reduction,
                                        const int64_t* count, acc_t* ga, acc_t* gp, acc_t* gn) {
  const int64_t i = int64_t(blockIdx.x) * kTripletWarpsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (i >= N) return;
  const TripletSums s = triplet_sums<scalar_t, acc_t>(a + i * D, p + i * D, n + i * D, D, lane);
  const bool use_pn = swap && d_pn[i] < d_an[i];
  const acc_t neg = use_pn ? d_pn[i] : d_an[i];
  const double g = double(grad[reduction == Reduction::None ? i * grad_stride : 0]);
  double scale = g;  // "none" and "sum"
  if (reduction == Reduction::Mean) scale = g / double(N);
  else if (reduction == Reduction::MeanNonzero) scale = *count > 0 ? g / double(*count) : 0.0;
  const double w = scale * double(triplet_term_grad(d_ap[i] - neg, acc_t(margin), /*soft_margin=*/false));
  const PairGrad g1 = pair_grad(metric, double(d_ap[i]), s.ap, s.aa, s.pp).scaled(w);
  const PairGrad g2 = (use_pn ? pair_grad(metric, double(d_pn[i]), s.pn, s.pp, s.nn)
                              : pair_grad(metric, double(d_an[i]), s.an, s.aa, s.nn)).scaled(-w);
  const scalar_t *ar = a + i * D, *pr = p + i * D, *nr = n + i * D;
  acc_t *gar = ga + i * D, *gpr = gp + i * D, *gnr = gn + i * D;
  for (int64_t k = lane; k < D; k += kWarp) {
    const acc_t av = ar[k], pv = pr[k], nv = nr[k];
    const acc_t d1 = av - pv;
    acc_t g_a = acc_t(g1.da) * d1 + acc_t(g1.ea) * pv;
    acc_t g_p = acc_t(g1.db) * d1 + acc_t(g1.eb) * av;
    acc_t g_n;
    if (use_pn) {
      const acc_t d2 = pv - nv;
      g_p += acc_t(g2.da) * d2 + acc_t(g2.ea) * nv;
      g_n = acc_t(g2.db) * d2 + acc_t(g2.eb) * pv;
    } else {
      const acc_t d2 = av - nv;
      g_a += acc_t(g2.da) * d2 + acc_t(g2.ea) * nv;
      g_n = acc_t(g2.db) * d2 + acc_t(g2.eb) * av;
    }
    gar[k] = g_a, gpr[k] = g_p, gnr[k] = g_n;
  }
}

}  // namespace cuda
}  // namespace tripletops
