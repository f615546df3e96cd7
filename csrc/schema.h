// Every op's schema, in one place. csrc/tripletops.cpp declares them for the
// `tripletops` library; the emulator build (make cuda-emu) declares the same schemas for
// its test-only `tripletops_emu` library, whose kernels are the emulated CUDA ones.
#pragma once

#include <torch/library.h>

namespace tripletops {

inline void define_ops(torch::Library& m) {
  // (N, D), (M, D) or None (y = x)  ->  (N, M) distances.
  m.def("pairwise_distance(Tensor x, Tensor? y, str metric) -> Tensor");
  // -> (grad_x, grad_y); grad_y is empty when y is None (its gradient is folded into grad_x).
  m.def(
      "pairwise_distance_backward(Tensor grad, Tensor x, Tensor? y, Tensor dist, "
      "str metric) -> (Tensor, Tensor)");

  // -> (pos_idx, neg_idx, pos_dist, neg_dist); distances in the accumulation dtype.
  m.def(
      "batch_hard_mine(Tensor embeddings, Tensor labels, Tensor? ref_embeddings, "
      "Tensor? ref_labels, str metric) -> (Tensor, Tensor, Tensor, Tensor)");
  // -> (loss, pos_idx, neg_idx, pos_dist, neg_dist); the last four are saved for backward.
  m.def(
      "batch_hard_loss(Tensor embeddings, Tensor labels, Tensor? ref_embeddings, "
      "Tensor? ref_labels, float margin, str metric, bool soft_margin, str reduction) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Diagnostics of certified mining (benchmarks, tests): -> int64 (2,): the anchors whose
  // choice settles on exact distances, and those among them whose reference set is
  // rescanned (CPU: every settled anchor's; CUDA: where the kept candidates do not cover
  // the window). Mines as batch_hard_mine does.
  m.def(
      "batch_hard_settle_stats(Tensor embeddings, Tensor labels, Tensor? ref_embeddings, "
      "Tensor? ref_labels, str metric) -> Tensor");
  // -> (grad_embeddings, grad_ref_embeddings); grad_ref is empty unless compute_ref_grad.
  m.def(
      "batch_hard_loss_backward(Tensor grad, Tensor embeddings, Tensor? ref_embeddings, "
      "Tensor pos_idx, Tensor neg_idx, Tensor pos_dist, Tensor neg_dist, float margin, "
      "str metric, bool soft_margin, str reduction, bool compute_ref_grad) "
      "-> (Tensor, Tensor)");

  // Exact k-nearest search: (Q, D) queries against a (G, D) gallery, or against themselves
  // (gallery None). -> (dist, idx), (Q, k) each, nearest first: exact distances in the
  // accumulation dtype (+inf where no neighbour) and int64 gallery rows (-1 where none).
  // exclude_self: query i never finds gallery row i.
  m.def("knn(Tensor queries, Tensor? gallery, int k, str metric, bool exclude_self) -> (Tensor, Tensor)");

  // Explicit triplets, (N, D) each. -> (loss, d_ap, d_an, d_pn); d_pn is empty unless swap.
  m.def(
      "triplet_margin_loss(Tensor anchor, Tensor positive, Tensor negative, float margin, "
      "str metric, bool swap, str reduction) -> (Tensor, Tensor, Tensor, Tensor)");
  // -> (grad_anchor, grad_positive, grad_negative).
  m.def(
      "triplet_margin_loss_backward(Tensor grad, Tensor anchor, Tensor positive, "
      "Tensor negative, Tensor d_ap, Tensor d_an, Tensor d_pn, float margin, str metric, "
      "bool swap, str reduction) -> (Tensor, Tensor, Tensor)");

  // Losses over every triplet / anchor-positive pair / pair of a batch, fused with its
  // (B, B) distance matrix: -> (loss, dist). dist is saved for the backward; float64 for
  // batch-all and semi-hard (they sum small differences of distances), the compute dtype
  // for contrastive. Each backward -> grad_embeddings.
  m.def(
      "batch_all_loss(Tensor embeddings, Tensor labels, float margin, str metric, bool soft_margin, "
      "str reduction) -> (Tensor, Tensor)");
  m.def(
      "batch_all_loss_backward(Tensor grad, Tensor embeddings, Tensor labels, Tensor dist, float margin, "
      "str metric, bool soft_margin, str reduction) -> Tensor");
  m.def("semi_hard_loss(Tensor embeddings, Tensor labels, float margin, str metric) -> (Tensor, Tensor)");
  m.def(
      "semi_hard_loss_backward(Tensor grad, Tensor embeddings, Tensor labels, Tensor dist, float margin, "
      "str metric) -> Tensor");
  // reduction "none" gives the B(B-1)/2 pair losses in torch.triu_indices(B, B, 1) order.
  m.def(
      "contrastive_loss(Tensor embeddings, Tensor labels, float pos_margin, float neg_margin, str metric, "
      "str reduction) -> (Tensor, Tensor)");
  m.def(
      "contrastive_loss_backward(Tensor grad, Tensor embeddings, Tensor labels, Tensor dist, float pos_margin, "
      "float neg_margin, str metric, str reduction) -> Tensor");
}

}  // namespace tripletops
