// Batch-all, semi-hard and contrastive losses on CPU. Each op builds the batch's (B, B)
// distance matrix with the pairwise_distance kernel, reduces it, and returns it for the
// backward, which takes the gradient to the distances and then, through
// pairwise_distance's backward, to the embeddings: one op and one autograd node per loss.
// No B x B x B tensor: each anchor's row is reduced on its own, with its negatives
// sorted once, so batch-all's hinge costs O(B^2 log B), not O(B^3). Parallel over
// anchors, each writing only its own row of the gradient: deterministic.
#include "pairwise_distance_cpu.h"
#include "rows_cpu.h"

#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

namespace tripletops {
namespace cpu {
namespace {

// A loss value as a 0-d tensor of `dtype`, through a float64 tensor: a value past the
// dtype's range (an fp16 "sum" above 65504) becomes inf, where a Scalar fill raises on
// torch 2.6 ("value cannot be converted to type at::Half without overflow").
inline at::Tensor loss_scalar(double value, at::ScalarType dtype) {
  return at::empty({}, at::TensorOptions().dtype(at::kDouble)).fill_(value).to(dtype);
}

// The ops' prologue: embeddings and labels as the mining ops take them (the margins and
// a backward op's saved arguments: check_margin and check_saved in common.h).
void check_batch(const at::Tensor& embeddings, const at::Tensor& labels) {
  check_mining_inputs(embeddings, labels, c10::nullopt, c10::nullopt, c10::DeviceType::CPU);
}

// One anchor's positives (same label, not itself) and negatives, as distances.
template <typename T>
struct AnchorRow {
  std::vector<std::pair<T, int64_t>> pos, neg;  // (distance, column)
  // A NaN or infinite distance among them (a row with NaN/Inf): the anchor's loss is NaN.
  // An infinite one must count too: as a negative it would only zero the hinge, and the
  // loss would come out finite and wrong.
  bool nan = false;

  void fill(const T* d, const Labels& lab, int64_t a, int64_t B) {
    pos.clear(), neg.clear(), nan = false;
    for (int64_t j = 0; j < B; ++j) {
      if (j == a) continue;
      (lab.shares(a, lab, j) ? pos : neg).emplace_back(d[j], j);
      nan |= !(d[j] - d[j] == T(0));
    }
  }
  bool valid() const { return !pos.empty() && !neg.empty(); }
  // A NaN loss keeps its NaN on the way to the embeddings: poison the row's gradient.
  void poison(T* grad_row) const {
    for (const auto& p : pos) grad_row[p.second] = std::numeric_limits<T>::quiet_NaN();
    for (const auto& n : neg) grad_row[n.second] = std::numeric_limits<T>::quiet_NaN();
  }
};

// fn(a, row) for every anchor a, with its row filled; parallel over anchors, so fn may
// write only what belongs to anchor a.
template <typename T, typename Fn>
void for_each_anchor(const at::Tensor& dist, const at::Tensor& labels, const Fn& fn) {
  const int64_t B = dist.size(0);
  const T* d = dist.data_ptr<T>();
  const Labels lab = labels_view(labels);
  at::parallel_for(0, B, 16, [&](int64_t begin, int64_t end) {
    AnchorRow<T> row;
    for (int64_t a = begin; a < end; ++a) {
      row.fill(d + a * B, lab, a, B);
      fn(a, row);
    }
  });
}

// ---- batch-all ------------------------------------------------------------------------

// How many of the sorted negatives are closer than d_ap + m (their hinge d_ap + m - d_an
// > 0), the sum taken exactly (common.h: below_sum: one ulp from the kink too, the
// reference's (d_ap - d_an) + m > 0).
template <typename T>
inline int64_t active_negatives(const std::vector<std::pair<T, int64_t>>& neg, double d_ap, double m) {
  return std::partition_point(neg.begin(), neg.end(),
                              [=](const std::pair<T, int64_t>& n) { return below_sum(double(n.first), d_ap, m); }) -
         neg.begin();
}
// ... and how many are not farther than d_ap + m: the triplets whose gradient passes (at
// the kink d_an == d_ap + m too, the hinge convention of triplet_term_grad).
template <typename T>
inline int64_t gradient_negatives(const std::vector<std::pair<T, int64_t>>& neg, double d_ap, double m) {
  return std::partition_point(neg.begin(), neg.end(),
                              [=](const std::pair<T, int64_t>& n) { return not_above_sum(double(n.first), d_ap, m); }) -
         neg.begin();
}

struct AllStats {
  double sum = 0;
  int64_t valid = 0, nonzero = 0;
  bool nan = false;
};

// Anchor a's sum over every (p, n) of triplet_term(d_ap - d_an), and its counts. With
// the hinge, sorted negatives and their prefix sums give each positive's sum at once:
// sum over d_an < d_ap + m of (d_ap + m - d_an) = c (d_ap + m) - prefix[c].
template <typename T>
AllStats batch_all_anchor(AnchorRow<T>& row, double margin, bool soft) {
  AllStats st;
  if (!row.valid()) return st;
  st.valid = int64_t(row.pos.size()) * int64_t(row.neg.size());
  if (row.nan) {
    st.nan = true;
    return st;
  }
  if (soft) {
    for (const auto& p : row.pos)
      for (const auto& n : row.neg) {
        const T l = softplus(p.first - n.first);
        st.sum += double(l);
        st.nonzero += l > T(0);
      }
    return st;
  }
  std::sort(row.neg.begin(), row.neg.end());
  std::vector<double> prefix(row.neg.size() + 1, 0.0);
  for (size_t k = 0; k < row.neg.size(); ++k) prefix[k + 1] = prefix[k] + double(row.neg[k].first);
  for (const auto& p : row.pos) {
    const double t = double(p.first) + margin;  // in double: no rounding of d_ap + m
    const auto c = active_negatives(row.neg, double(p.first), margin);
    st.sum += double(c) * t - prefix[c];
    st.nonzero += c;
  }
  return st;
}

template <typename T>
std::vector<AllStats> batch_all_stats(const at::Tensor& dist, const at::Tensor& labels, double margin, bool soft) {
  std::vector<AllStats> stats(dist.size(0));
  for_each_anchor<T>(dist, labels, [&](int64_t a, AnchorRow<T>& row) { stats[a] = batch_all_anchor(row, margin, soft); });
  return stats;
}

// The reduction's denominator (serial: the same on every run).
struct AllTotals {
  double sum = 0;
  int64_t valid = 0, nonzero = 0;
  bool nan = false;
};
inline AllTotals totals(const std::vector<AllStats>& stats) {
  AllTotals t;
  for (const auto& s : stats) t.sum += s.sum, t.valid += s.valid, t.nonzero += s.nonzero, t.nan |= s.nan;
  return t;
}
inline double denominator(const AllTotals& t, Reduction r) {
  return r == Reduction::Sum ? 1.0 : double(r == Reduction::Mean ? t.valid : t.nonzero);
}

// Prepared inputs: distances in the compute dtype, labels packed (pack_labels).
struct DistInputs {
  at::Tensor dist, labels;
};
inline DistInputs prepare(const at::Tensor& dist, const at::Tensor& labels) {
  return {dist.to(compute_dtype(dist.scalar_type())).contiguous(), pack_labels(labels)};
}

double batch_all_from_dist(const at::Tensor& dist, const at::Tensor& labels, double margin, bool soft_margin,
                          Reduction reduction) {
  const DistInputs in = prepare(dist, labels);
  AllTotals t;
  AT_DISPATCH_FLOATING_TYPES(in.dist.scalar_type(), "batch_all_loss_cpu", [&] {
    t = totals(batch_all_stats<scalar_t>(in.dist, in.labels, margin, soft_margin));
  });
  const double den = denominator(t, reduction);
  double value = den > 0 ? t.sum / den : 0.0;  // an empty denominator gives exactly 0 ...
  if (t.nan) value = std::numeric_limits<double>::quiet_NaN();  // ... but never hides a NaN
  return value;
}

// d loss / d dist, (B, B).
at::Tensor batch_all_grad_dist(const at::Tensor& grad, const at::Tensor& dist, const at::Tensor& labels, double margin,
                               bool soft_margin, Reduction reduction) {
  const DistInputs in = prepare(dist, labels);
  const int64_t B = in.dist.size(0);
  at::Tensor out = at::zeros({B, B}, in.dist.options());
  AT_DISPATCH_FLOATING_TYPES(in.dist.scalar_type(), "batch_all_loss_backward_cpu", [&] {
    using T = scalar_t;
    const AllTotals t = totals(batch_all_stats<T>(in.dist, in.labels, margin, soft_margin));
    const double den = denominator(t, reduction);
    const double s = den > 0 ? grad.item<double>() / den : 0.0;
    if (s == 0 && !t.nan) return;
    T* g = out.data_ptr<T>();
    for_each_anchor<T>(in.dist, in.labels, [&](int64_t a, AnchorRow<T>& row) {
      if (!row.valid()) return;
      T* ga = g + a * B;
      if (row.nan) return row.poison(ga);
      if (soft_margin) {
        for (const auto& p : row.pos)
          for (const auto& n : row.neg) {
            const double w = s * double(sigmoid(p.first - n.first));
            ga[p.second] += T(w), ga[n.second] -= T(w);
          }
        return;
      }
      // d/d d_ap = s * #(d_an <= d_ap + m);  d/d d_an = -s * #(d_ap + m >= d_an), the sums
      // exact (not_above_sum), over the sorted negatives and the sorted positives.
      std::sort(row.neg.begin(), row.neg.end());
      std::vector<double> pos_d;
      for (const auto& p : row.pos) pos_d.push_back(double(p.first));
      std::sort(pos_d.begin(), pos_d.end());
      for (const auto& p : row.pos) ga[p.second] += T(s * double(gradient_negatives(row.neg, double(p.first), margin)));
      for (const auto& n : row.neg) {  // positives whose d_ap + m reaches d_an: all from the first on
        const double dn = double(n.first);
        const auto c = pos_d.end() - std::partition_point(pos_d.begin(), pos_d.end(), [=](double dp) {
                         return !not_above_sum(dn, dp, margin);
                       });
        ga[n.second] -= T(s * double(c));
      }
    });
  });
  return out.to(dist.scalar_type());
}

// ---- semi-hard (FaceNet; TF-Addons TripletSemiHardLoss) --------------------------------

// For anchor a's positive p: the closest negative farther than p, else the farthest
// negative; among equal distances the smallest column. `neg` is sorted by (d, column).
template <typename T>
inline const std::pair<T, int64_t>& semi_hard_negative(const std::vector<std::pair<T, int64_t>>& neg, T d_ap) {
  const auto above = std::upper_bound(neg.begin(), neg.end(), std::make_pair(d_ap, std::numeric_limits<int64_t>::max()));
  if (above != neg.end()) return *above;
  return *std::lower_bound(neg.begin(), neg.end(), std::make_pair(neg.back().first, int64_t(-1)));
}

struct SemiStats {
  double sum = 0;
  int64_t pairs = 0;
  bool nan = false;
};

template <typename T>
std::vector<SemiStats> semi_hard_stats(const at::Tensor& dist, const at::Tensor& labels, double margin) {
  std::vector<SemiStats> stats(dist.size(0));
  for_each_anchor<T>(dist, labels, [&](int64_t a, AnchorRow<T>& row) {
    SemiStats& st = stats[a];
    if (!row.valid()) return;  // no negative (or no positive): no pair counts
    st.pairs = int64_t(row.pos.size());
    st.nan = row.nan;
    if (row.nan) return;
    std::sort(row.neg.begin(), row.neg.end());
    for (const auto& p : row.pos)
      st.sum += double(relu_nan(p.first - semi_hard_negative(row.neg, p.first).first + T(margin)));
  });
  return stats;
}

inline SemiStats semi_totals(const std::vector<SemiStats>& stats) {
  SemiStats t;
  for (const auto& s : stats) t.sum += s.sum, t.pairs += s.pairs, t.nan |= s.nan;
  return t;
}

double semi_hard_from_dist(const at::Tensor& dist, const at::Tensor& labels, double margin) {
  const DistInputs in = prepare(dist, labels);
  SemiStats t;
  AT_DISPATCH_FLOATING_TYPES(in.dist.scalar_type(), "semi_hard_loss_cpu", [&] {
    t = semi_totals(semi_hard_stats<scalar_t>(in.dist, in.labels, margin));
  });
  double value = t.pairs > 0 ? t.sum / double(t.pairs) : 0.0;
  if (t.nan) value = std::numeric_limits<double>::quiet_NaN();
  return value;
}

// d loss / d dist, (B, B).
at::Tensor semi_hard_grad_dist(const at::Tensor& grad, const at::Tensor& dist, const at::Tensor& labels,
                               double margin) {
  const DistInputs in = prepare(dist, labels);
  const int64_t B = in.dist.size(0);
  at::Tensor out = at::zeros({B, B}, in.dist.options());
  AT_DISPATCH_FLOATING_TYPES(in.dist.scalar_type(), "semi_hard_loss_backward_cpu", [&] {
    using T = scalar_t;
    const SemiStats t = semi_totals(semi_hard_stats<T>(in.dist, in.labels, margin));
    const double s = t.pairs > 0 ? grad.item<double>() / double(t.pairs) : 0.0;
    if (s == 0 && !t.nan) return;
    T* g = out.data_ptr<T>();
    for_each_anchor<T>(in.dist, in.labels, [&](int64_t a, AnchorRow<T>& row) {
      if (!row.valid()) return;
      T* ga = g + a * B;
      if (row.nan) return row.poison(ga);
      std::sort(row.neg.begin(), row.neg.end());
      for (const auto& p : row.pos) {
        const auto& n = semi_hard_negative(row.neg, p.first);
        if (triplet_term_grad(p.first - n.first, T(margin), /*soft_margin=*/false) == T(0)) continue;
        ga[p.second] += T(s), ga[n.second] -= T(s);
      }
    });
  });
  return out.to(dist.scalar_type());
}

// ---- contrastive (Hadsell et al.): every pair i < j ----------------------------------

// Rows with no NaN/Inf, as uint8 per row.
std::vector<uint8_t> finite_rows(const at::Tensor& x) {
  const at::Tensor c = x.contiguous();
  std::vector<uint8_t> out(c.size(0));
  AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "tripletops_finite_rows", [&] {
    const scalar_t* p = c.data_ptr<scalar_t>();
    const int64_t D = c.size(1);
    for (int64_t i = 0; i < c.size(0); ++i) {
      bool ok = true;
      row_sumsq(p + i * D, D, ok);
      out[i] = ok;
    }
  });
  return out;
}

// Sum over pairs (double, row-major i < j: the same on every run) and the denominator: 0
// when it is empty (mean_nonzero with no term > 0, or no pair), for a loss of exactly 0 and
// zero gradients, as every loss reduces (a NaN sum still shows).
template <typename T>
std::pair<double, double> contrastive_total(const T* d, const Labels& lab, const uint8_t* fin, int64_t B,
                                            double pm, double nm, Reduction reduction) {
  double sum = 0;
  int64_t nonzero = 0;
  for (int64_t i = 0; i < B; ++i)
    for (int64_t j = i + 1; j < B; ++j) {
      const T v = contrastive_term(d[i * B + j], lab.shares(i, lab, j), fin[i] && fin[j], pm, nm).value;
      sum += double(v);
      nonzero += v > T(0);
    }
  const int64_t pairs = B * (B - 1) / 2;
  const double den = reduction == Reduction::Sum ? 1.0 : reduction == Reduction::Mean ? double(pairs) : double(nonzero);
  return {sum, den};
}

// ---- the ops -------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> batch_all_loss_cpu(const at::Tensor& embeddings, const at::Tensor& labels,
                                                      double margin, c10::string_view metric, bool soft_margin,
                                                      c10::string_view reduction_name) {
  check_batch(embeddings, labels);
  check_margin(margin, "margin");
  const Reduction reduction = parse_reduction(reduction_name);
  TORCH_CHECK_VALUE(reduction != Reduction::None,
                    "tripletops: batch_all_loss has no reduction 'none' (B^3 triplets); use mean, mean_nonzero or sum");
  at::Tensor dist = pairwise_distance_cpu(embeddings.to(at::kDouble), c10::nullopt, metric);
  const double value = batch_all_from_dist(dist, labels, margin, soft_margin, reduction);
  return {loss_scalar(value, embeddings.scalar_type()), dist};
}

at::Tensor batch_all_loss_backward_cpu(const at::Tensor& grad, const at::Tensor& embeddings, const at::Tensor& labels,
                                       const at::Tensor& dist, double margin, c10::string_view metric,
                                       bool soft_margin, c10::string_view reduction_name) {
  check_batch(embeddings, labels);
  check_saved("batch_all_loss", grad, 1, dist, embeddings, at::kDouble, c10::DeviceType::CPU);
  const Reduction reduction = parse_reduction(reduction_name);
  const at::Tensor grad_dist = batch_all_grad_dist(grad, dist, labels, margin, soft_margin, reduction);
  auto [gx, unused] = pairwise_distance_backward_cpu(grad_dist, embeddings.to(at::kDouble), c10::nullopt, dist, metric);
  return gx.to(embeddings.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> semi_hard_loss_cpu(const at::Tensor& embeddings, const at::Tensor& labels,
                                                      double margin, c10::string_view metric) {
  check_batch(embeddings, labels);
  check_margin(margin, "margin");
  at::Tensor dist = pairwise_distance_cpu(embeddings.to(at::kDouble), c10::nullopt, metric);
  return {loss_scalar(semi_hard_from_dist(dist, labels, margin), embeddings.scalar_type()), dist};
}

at::Tensor semi_hard_loss_backward_cpu(const at::Tensor& grad, const at::Tensor& embeddings, const at::Tensor& labels,
                                       const at::Tensor& dist, double margin, c10::string_view metric) {
  check_batch(embeddings, labels);
  check_saved("semi_hard_loss", grad, 1, dist, embeddings, at::kDouble, c10::DeviceType::CPU);
  const at::Tensor grad_dist = semi_hard_grad_dist(grad, dist, labels, margin);
  auto [gx, unused] = pairwise_distance_backward_cpu(grad_dist, embeddings.to(at::kDouble), c10::nullopt, dist, metric);
  return gx.to(embeddings.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> contrastive_loss_cpu(const at::Tensor& embeddings, const at::Tensor& labels,
                                                        double pos_margin, double neg_margin, c10::string_view metric,
                                                        c10::string_view reduction_name) {
  check_batch(embeddings, labels);
  check_margin(pos_margin, "pos_margin");
  check_margin(neg_margin, "neg_margin");
  const Reduction reduction = parse_reduction(reduction_name);
  const at::Tensor x = embeddings.to(compute_dtype(embeddings.scalar_type()));
  at::Tensor dist = pairwise_distance_cpu(x, c10::nullopt, metric);
  const std::vector<uint8_t> fin = finite_rows(x);
  const at::Tensor lab = pack_labels(labels);
  const int64_t B = x.size(0);
  at::Tensor loss;
  AT_DISPATCH_FLOATING_TYPES(dist.scalar_type(), "contrastive_loss_cpu", [&] {
    using T = scalar_t;
    const T* d = dist.data_ptr<T>();
    const Labels l = labels_view(lab);
    if (reduction == Reduction::None) {
      loss = at::empty({B * (B - 1) / 2}, dist.options());
      T* out = loss.data_ptr<T>();
      for (int64_t i = 0, k = 0; i < B; ++i)
        for (int64_t j = i + 1; j < B; ++j, ++k)
          out[k] = contrastive_term(d[i * B + j], l.shares(i, l, j), fin[i] && fin[j], pos_margin, neg_margin).value;
      return;
    }
    const auto [sum, den] = contrastive_total(d, l, fin.data(), B, pos_margin, neg_margin, reduction);
    loss = loss_scalar(den > 0 ? sum / den : (sum != sum ? sum : 0.0), dist.scalar_type());
  });
  return {loss.to(embeddings.scalar_type()), dist};
}

at::Tensor contrastive_loss_backward_cpu(const at::Tensor& grad, const at::Tensor& embeddings,
                                         const at::Tensor& labels, const at::Tensor& dist, double pos_margin,
                                         double neg_margin, c10::string_view metric, c10::string_view reduction_name) {
  check_batch(embeddings, labels);
  const Reduction reduction = parse_reduction(reduction_name);
  const int64_t B = embeddings.size(0);
  const at::Tensor x = embeddings.to(compute_dtype(embeddings.scalar_type()));
  check_saved("contrastive_loss", grad, reduction == Reduction::None ? B * (B - 1) / 2 : 1, dist, embeddings,
              x.scalar_type(), c10::DeviceType::CPU);
  const std::vector<uint8_t> fin = finite_rows(x);
  const at::Tensor lab = pack_labels(labels);
  const at::Tensor d_c = dist.contiguous();
  const at::Tensor g = grad.to(at::kDouble).contiguous();
  at::Tensor grad_dist = at::zeros({B, B}, dist.options());
  AT_DISPATCH_FLOATING_TYPES(dist.scalar_type(), "contrastive_loss_backward_cpu", [&] {
    using T = scalar_t;
    const T* d = d_c.data_ptr<T>();
    const Labels l = labels_view(lab);
    const double* gp = g.data_ptr<double>();
    T* w = grad_dist.data_ptr<T>();
    // The reduction's scale (its denominator is a count, held constant, as autograd would).
    double scale = 1.0;
    if (reduction != Reduction::None) {
      const double den = contrastive_total(d, l, fin.data(), B, pos_margin, neg_margin, reduction).second;
      scale = den > 0 ? gp[0] / den : 0.0;
    }
    for (int64_t i = 0, k = 0; i < B; ++i)
      for (int64_t j = i + 1; j < B; ++j, ++k) {
        const T slope = contrastive_term(d[i * B + j], l.shares(i, l, j), fin[i] && fin[j], pos_margin, neg_margin).slope;
        w[i * B + j] = T(double(slope) * (reduction == Reduction::None ? gp[k] : scale));
      }
  });
  auto [gx, unused] = pairwise_distance_backward_cpu(grad_dist, x, c10::nullopt, dist, metric);
  return gx.to(embeddings.scalar_type());
}

}  // namespace
}  // namespace cpu
}  // namespace tripletops

TORCH_LIBRARY_IMPL(tripletops, CPU, m) {
  m.impl("batch_all_loss", &tripletops::cpu::batch_all_loss_cpu);
  m.impl("batch_all_loss_backward", &tripletops::cpu::batch_all_loss_backward_cpu);
  m.impl("semi_hard_loss", &tripletops::cpu::semi_hard_loss_cpu);
  m.impl("semi_hard_loss_backward", &tripletops::cpu::semi_hard_loss_backward_cpu);
  m.impl("contrastive_loss", &tripletops::cpu::contrastive_loss_cpu);
  m.impl("contrastive_loss_backward", &tripletops::cpu::contrastive_loss_backward_cpu);
}
