// Autograd for every differentiable op, in C++ at the Autograd dispatch key (the way
// torchvision/csrc/ops/autograd does it), for the `tripletops` library and for the
// emulator's test-only `tripletops_emu` one (Lib names the library).
//
// Why C++: torch.library.register_autograd wraps each call in a Python
// autograd.Function, fills in the schema's defaults and redispatches, which cost more
// than the whole forward+backward of a small batch (profiled in the issue-11 note).
// Here the forward calls the op below autograd through a cached operator handle, and the
// backward calls the `*_backward` op the same way, so torch.compile still sees two
// registered ops with fake kernels (tripletops/_ops.py) and no graph break.
//
// Second derivatives are not implemented: each `*_backward` op gets an Autograd kernel
// whose own backward raises, naming the op, so create_graph=True never gives a silently
// wrong (zero) second derivative.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <functional>
#include <optional>
#include <string>
#include <tuple>

namespace tripletops {
namespace autograd {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<Tensor>;
using Str = c10::string_view;

using PairwiseSig = Tensor(const Tensor&, const OptTensor&, Str);
using PairwiseBackwardSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&,
                                                       const Tensor&, Str);
using BatchHardSig = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&,
                                                                        const OptTensor&, const OptTensor&, double,
                                                                        Str, bool, Str);
using BatchHardBackwardSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&,
                                                        const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                        double, Str, bool, Str, bool);
using TripletSig = std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, double,
                                                              Str, bool, Str);
using TripletBackwardSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                              const Tensor&, const Tensor&, const Tensor&,
                                                              const Tensor&, double, Str, bool, Str);
// The pair losses: (embeddings, labels, margins..., metric[, soft_margin, reduction]) -> (loss, dist).
using BatchAllSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, double, Str, bool, Str);
using BatchAllBackwardSig = Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, double, Str, bool, Str);
using SemiHardSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, double, Str);
using SemiHardBackwardSig = Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, double, Str);
using ContrastiveSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, double, double, Str, Str);
using ContrastiveBackwardSig = Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, double, double, Str,
                                      Str);

// The operator `<Lib::kName>::<name>`, looked up on first use.
template <typename Sig>
c10::TypedOperatorHandle<Sig> find_op(const char* ns, const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow((std::string(ns) + "::" + name).c_str(), "").typed<Sig>();
}

#define TRIPLETOPS_OP_HANDLE(fn, name, Sig)                                 \
  static const c10::TypedOperatorHandle<Sig>& fn() {                       \
    static const c10::TypedOperatorHandle<Sig> handle = find_op<Sig>(Lib::kName, name); \
    return handle;                                                          \
  }

template <typename Lib>
struct Ops {
  TRIPLETOPS_OP_HANDLE(pairwise_distance, "pairwise_distance", PairwiseSig)
  TRIPLETOPS_OP_HANDLE(pairwise_distance_backward, "pairwise_distance_backward", PairwiseBackwardSig)
  TRIPLETOPS_OP_HANDLE(batch_hard_loss, "batch_hard_loss", BatchHardSig)
  TRIPLETOPS_OP_HANDLE(batch_hard_loss_backward, "batch_hard_loss_backward", BatchHardBackwardSig)
  TRIPLETOPS_OP_HANDLE(triplet_margin_loss, "triplet_margin_loss", TripletSig)
  TRIPLETOPS_OP_HANDLE(triplet_margin_loss_backward, "triplet_margin_loss_backward", TripletBackwardSig)
  TRIPLETOPS_OP_HANDLE(batch_all_loss, "batch_all_loss", BatchAllSig)
  TRIPLETOPS_OP_HANDLE(batch_all_loss_backward, "batch_all_loss_backward", BatchAllBackwardSig)
  TRIPLETOPS_OP_HANDLE(semi_hard_loss, "semi_hard_loss", SemiHardSig)
  TRIPLETOPS_OP_HANDLE(semi_hard_loss_backward, "semi_hard_loss_backward", SemiHardBackwardSig)
  TRIPLETOPS_OP_HANDLE(contrastive_loss, "contrastive_loss", ContrastiveSig)
  TRIPLETOPS_OP_HANDLE(contrastive_loss_backward, "contrastive_loss_backward", ContrastiveBackwardSig)
};
#undef TRIPLETOPS_OP_HANDLE

inline Tensor value_or_undefined(const OptTensor& t) { return t.has_value() ? *t : Tensor(); }
inline OptTensor as_optional(const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }
inline std::string str(AutogradContext* ctx, const char* key) { return ctx->saved_data[key].toStringRef(); }

// ---- forward ops ------------------------------------------------------------------

template <typename Self, typename Lib>
struct PairwiseDistanceFn : torch::autograd::Function<Self> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const OptTensor& y, Str metric) {
    at::AutoDispatchBelowADInplaceOrView below;
    Tensor dist = Ops<Lib>::pairwise_distance().call(x, y, metric);
    ctx->save_for_backward({x, value_or_undefined(y), dist});
    ctx->saved_data["metric"] = std::string(metric);
    return dist;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    const OptTensor y = as_optional(s[1]);
    auto [gx, gy] = Ops<Lib>::pairwise_distance_backward().call(grads[0], s[0], y, s[2], str(ctx, "metric"));
    return {gx, y.has_value() ? gy : Tensor(), Tensor()};
  }
};

template <typename Self, typename Lib>
struct BatchHardLossFn : torch::autograd::Function<Self> {
  static variable_list forward(AutogradContext* ctx, const Tensor& embeddings, const Tensor& labels,
                               const OptTensor& ref_embeddings, const OptTensor& ref_labels, double margin,
                               Str metric, bool soft_margin, Str reduction) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [loss, pos_idx, neg_idx, pos_dist, neg_dist] = Ops<Lib>::batch_hard_loss().call(
        embeddings, labels, ref_embeddings, ref_labels, margin, metric, soft_margin, reduction);
    ctx->mark_non_differentiable({pos_idx, neg_idx, pos_dist, neg_dist});
    ctx->set_materialize_grads(false);  // no zero gradients for the four non-differentiable outputs
    ctx->save_for_backward({embeddings, value_or_undefined(ref_embeddings), pos_idx, neg_idx, pos_dist, neg_dist});
    ctx->saved_data["margin"] = margin;
    ctx->saved_data["metric"] = std::string(metric);
    ctx->saved_data["soft_margin"] = soft_margin;
    ctx->saved_data["reduction"] = std::string(reduction);
    return {loss, pos_idx, neg_idx, pos_dist, neg_dist};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    const OptTensor ref = as_optional(s[1]);
    // Edges are the tensor inputs present: embeddings, labels[, ref_embeddings, ref_labels].
    const bool want_emb = ctx->needs_input_grad(0);
    const bool want_ref = ref.has_value() && ctx->needs_input_grad(2);
    variable_list out(8);
    if (!grads[0].defined() || !(want_emb || want_ref)) return out;
    auto [grad_emb, grad_ref] = Ops<Lib>::batch_hard_loss_backward().call(
        grads[0], s[0], ref, s[2], s[3], s[4], s[5], ctx->saved_data["margin"].toDouble(), str(ctx, "metric"),
        ctx->saved_data["soft_margin"].toBool(), str(ctx, "reduction"), want_ref);
    out[0] = grad_emb;
    if (want_ref) out[2] = grad_ref;
    return out;
  }
};

template <typename Self, typename Lib>
struct TripletMarginLossFn : torch::autograd::Function<Self> {
  static variable_list forward(AutogradContext* ctx, const Tensor& anchor, const Tensor& positive,
                               const Tensor& negative, double margin, Str metric, bool swap, Str reduction) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [loss, d_ap, d_an, d_pn] =
        Ops<Lib>::triplet_margin_loss().call(anchor, positive, negative, margin, metric, swap, reduction);
    ctx->mark_non_differentiable({d_ap, d_an, d_pn});
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({anchor, positive, negative, d_ap, d_an, d_pn});
    ctx->saved_data["margin"] = margin;
    ctx->saved_data["metric"] = std::string(metric);
    ctx->saved_data["swap"] = swap;
    ctx->saved_data["reduction"] = std::string(reduction);
    return {loss, d_ap, d_an, d_pn};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    if (!grads[0].defined()) return variable_list(7);
    auto [ga, gp, gn] = Ops<Lib>::triplet_margin_loss_backward().call(
        grads[0], s[0], s[1], s[2], s[3], s[4], s[5], ctx->saved_data["margin"].toDouble(), str(ctx, "metric"),
        ctx->saved_data["swap"].toBool(), str(ctx, "reduction"));
    return {ctx->needs_input_grad(0) ? ga : Tensor(), ctx->needs_input_grad(1) ? gp : Tensor(),
            ctx->needs_input_grad(2) ? gn : Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

// The pair losses: one node each, from the embeddings (the op builds and returns the
// distance matrix, saved for its backward).
template <typename Self, typename Lib>
struct BatchAllLossFn : torch::autograd::Function<Self> {
  static variable_list forward(AutogradContext* ctx, const Tensor& embeddings, const Tensor& labels, double margin,
                               Str metric, bool soft_margin, Str reduction) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [loss, dist] = Ops<Lib>::batch_all_loss().call(embeddings, labels, margin, metric, soft_margin, reduction);
    ctx->mark_non_differentiable({dist});
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({embeddings, labels, dist});
    ctx->saved_data["margin"] = margin;
    ctx->saved_data["metric"] = std::string(metric);
    ctx->saved_data["soft_margin"] = soft_margin;
    ctx->saved_data["reduction"] = std::string(reduction);
    return {loss, dist};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return variable_list(6);
    const variable_list s = ctx->get_saved_variables();
    return {Ops<Lib>::batch_all_loss_backward().call(grads[0], s[0], s[1], s[2], ctx->saved_data["margin"].toDouble(),
                                                     str(ctx, "metric"), ctx->saved_data["soft_margin"].toBool(),
                                                     str(ctx, "reduction")),
            Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

template <typename Self, typename Lib>
struct SemiHardLossFn : torch::autograd::Function<Self> {
  static variable_list forward(AutogradContext* ctx, const Tensor& embeddings, const Tensor& labels, double margin,
                               Str metric) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [loss, dist] = Ops<Lib>::semi_hard_loss().call(embeddings, labels, margin, metric);
    ctx->mark_non_differentiable({dist});
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({embeddings, labels, dist});
    ctx->saved_data["margin"] = margin;
    ctx->saved_data["metric"] = std::string(metric);
    return {loss, dist};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return variable_list(4);
    const variable_list s = ctx->get_saved_variables();
    return {Ops<Lib>::semi_hard_loss_backward().call(grads[0], s[0], s[1], s[2], ctx->saved_data["margin"].toDouble(),
                                                     str(ctx, "metric")),
            Tensor(), Tensor(), Tensor()};
  }
};

template <typename Self, typename Lib>
struct ContrastiveLossFn : torch::autograd::Function<Self> {
  static variable_list forward(AutogradContext* ctx, const Tensor& embeddings, const Tensor& labels,
                               double pos_margin, double neg_margin, Str metric, Str reduction) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [loss, dist] =
        Ops<Lib>::contrastive_loss().call(embeddings, labels, pos_margin, neg_margin, metric, reduction);
    ctx->mark_non_differentiable({dist});
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({embeddings, labels, dist});
    ctx->saved_data["pos_margin"] = pos_margin;
    ctx->saved_data["neg_margin"] = neg_margin;
    ctx->saved_data["metric"] = std::string(metric);
    ctx->saved_data["reduction"] = std::string(reduction);
    return {loss, dist};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return variable_list(6);
    const variable_list s = ctx->get_saved_variables();
    return {Ops<Lib>::contrastive_loss_backward().call(
                grads[0], s[0], s[1], s[2], ctx->saved_data["pos_margin"].toDouble(),
                ctx->saved_data["neg_margin"].toDouble(), str(ctx, "metric"), str(ctx, "reduction")),
            Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

// ---- backward ops: differentiable only in that differentiating them raises ---------

// Runs `compute` (a backward op called below autograd) and, when grad mode is on and an
// input requires grad (create_graph=True), records a node whose backward raises.
struct SecondDerivativeRefused : torch::autograd::Function<SecondDerivativeRefused> {
  static variable_list forward(AutogradContext* ctx, at::TensorList inputs,
                               const std::function<variable_list()>& compute, const char* op) {
    ctx->saved_data["op"] = std::string(op);
    at::AutoDispatchBelowADInplaceOrView below;
    return compute();
  }
  static variable_list backward(AutogradContext* ctx, variable_list) {
    const std::string op = str(ctx, "op");
    TORCH_CHECK(false, "tripletops.", op, ": second derivatives are not implemented (a backward through the ",
                "gradient of ", op, ", as with create_graph=True, cannot be computed)");
  }
};

// The defined tensors among `tensors`. Function::apply finds the inputs to differentiate
// by argument type, so this is passed as an at::TensorList (a std::vector would not count).
struct Present {
  std::vector<Tensor> tensors;
  Present(std::initializer_list<OptTensor> ts) {
    for (const OptTensor& t : ts)
      if (t.has_value() && t->defined()) tensors.push_back(*t);
  }
  at::TensorList list() const { return tensors; }
};

// A backward op's Autograd kernel: without grad mode (every backward pass but
// create_graph=True) no node can be recorded, so the op runs directly below autograd,
// without Function::apply's node, context, std::function and saved string (measured with
// callgrind at B = 8: about 16,000 of a call's ~306,000 instructions, forward + backward).
template <typename Compute>
variable_list refuse_second_derivative(std::initializer_list<OptTensor> inputs, const Compute& compute,
                                       const char* op) {
  if (!at::GradMode::is_enabled()) {
    at::AutoDispatchBelowADInplaceOrView below;
    return compute();
  }
  return SecondDerivativeRefused::apply(Present(inputs).list(), std::function<variable_list()>(compute), op);
}

// ---- registration -------------------------------------------------------------------

// The autograd nodes, named after their op as PyTorch's own are: torch shows the last
// "::" part of a node's demangled name (CppNode<T>), so each library declares them at
// namespace scope in its own file, TRIPLETOPS_AUTOGRAD_NODES(Lib) inside an anonymous
// namespace: grad_fn=<BatchHardLossBackward>> (the last ">" closes CppNode's template;
// a node type that is a template on Lib showed <TripletopsLibrary> >>). The names are
// short on purpose: torch demangles the node's name on every backward call.
#define TRIPLETOPS_AUTOGRAD_NODES(Lib)                                                                        \
  struct PairwiseDistanceBackward : tripletops::autograd::PairwiseDistanceFn<PairwiseDistanceBackward, Lib> {}; \
  struct BatchHardLossBackward : tripletops::autograd::BatchHardLossFn<BatchHardLossBackward, Lib> {};          \
  struct TripletMarginLossBackward                                                                         \
      : tripletops::autograd::TripletMarginLossFn<TripletMarginLossBackward, Lib> {};                      \
  struct BatchAllLossBackward : tripletops::autograd::BatchAllLossFn<BatchAllLossBackward, Lib> {};             \
  struct SemiHardLossBackward : tripletops::autograd::SemiHardLossFn<SemiHardLossBackward, Lib> {};             \
  struct ContrastiveLossBackward : tripletops::autograd::ContrastiveLossFn<ContrastiveLossBackward, Lib> {};    \
  struct Lib##Nodes {                                                                                       \
    using PairwiseDistance = PairwiseDistanceBackward;                                                      \
    using BatchHardLoss = BatchHardLossBackward;                                                            \
    using TripletMarginLoss = TripletMarginLossBackward;                                                    \
    using BatchAllLoss = BatchAllLossBackward;                                                              \
    using SemiHardLoss = SemiHardLossBackward;                                                              \
    using ContrastiveLoss = ContrastiveLossBackward;                                                        \
  };

template <typename Lib, typename Nodes>
void register_autograd(torch::Library& m) {
  using O = Ops<Lib>;
  using PairwiseDistanceBackward = typename Nodes::PairwiseDistance;
  using BatchHardLossBackward = typename Nodes::BatchHardLoss;
  using TripletMarginLossBackward = typename Nodes::TripletMarginLoss;
  using BatchAllLossBackward = typename Nodes::BatchAllLoss;
  using SemiHardLossBackward = typename Nodes::SemiHardLoss;
  using ContrastiveLossBackward = typename Nodes::ContrastiveLoss;
  m.impl("pairwise_distance", [](const Tensor& x, const OptTensor& y, Str metric) {
    return PairwiseDistanceBackward::apply(x, y, metric);
  });
  m.impl("batch_hard_loss", [](const Tensor& e, const Tensor& l, const OptTensor& re, const OptTensor& rl,
                               double margin, Str metric, bool soft, Str reduction) {
    variable_list o = BatchHardLossBackward::apply(e, l, re, rl, margin, metric, soft, reduction);
    return std::make_tuple(o[0], o[1], o[2], o[3], o[4]);
  });
  m.impl("triplet_margin_loss", [](const Tensor& a, const Tensor& p, const Tensor& n, double margin, Str metric,
                                   bool swap, Str reduction) {
    variable_list o = TripletMarginLossBackward::apply(a, p, n, margin, metric, swap, reduction);
    return std::make_tuple(o[0], o[1], o[2], o[3]);
  });
  m.impl("batch_all_loss", [](const Tensor& e, const Tensor& l, double margin, Str metric, bool soft, Str reduction) {
    variable_list o = BatchAllLossBackward::apply(e, l, margin, metric, soft, reduction);
    return std::make_tuple(o[0], o[1]);
  });
  m.impl("semi_hard_loss", [](const Tensor& e, const Tensor& l, double margin, Str metric) {
    variable_list o = SemiHardLossBackward::apply(e, l, margin, metric);
    return std::make_tuple(o[0], o[1]);
  });
  m.impl("contrastive_loss", [](const Tensor& e, const Tensor& l, double pm, double nm, Str metric, Str reduction) {
    variable_list o = ContrastiveLossBackward::apply(e, l, pm, nm, metric, reduction);
    return std::make_tuple(o[0], o[1]);
  });

  m.impl("pairwise_distance_backward",
         [](const Tensor& g, const Tensor& x, const OptTensor& y, const Tensor& d, Str metric) {
           variable_list o = refuse_second_derivative(
               {g, x, y, d},
               [&] {
                 auto [gx, gy] = O::pairwise_distance_backward().call(g, x, y, d, metric);
                 return variable_list{gx, gy};
               },
               "pairwise_distance");
           return std::make_tuple(o[0], o[1]);
         });
  m.impl("batch_hard_loss_backward",
         [](const Tensor& g, const Tensor& e, const OptTensor& re, const Tensor& pi, const Tensor& ni,
            const Tensor& pd, const Tensor& nd, double margin, Str metric, bool soft, Str reduction, bool want_ref) {
           variable_list o = refuse_second_derivative(
               {g, e, re},
               [&] {
                 auto [ge, gr] = O::batch_hard_loss_backward().call(g, e, re, pi, ni, pd, nd, margin, metric, soft,
                                                                    reduction, want_ref);
                 return variable_list{ge, gr};
               },
               "batch_hard_loss");
           return std::make_tuple(o[0], o[1]);
         });
  m.impl("triplet_margin_loss_backward",
         [](const Tensor& g, const Tensor& a, const Tensor& p, const Tensor& n, const Tensor& dap, const Tensor& dan,
            const Tensor& dpn, double margin, Str metric, bool swap, Str reduction) {
           variable_list o = refuse_second_derivative(
               {g, a, p, n},
               [&] {
                 auto [ga, gp, gn] = O::triplet_margin_loss_backward().call(g, a, p, n, dap, dan, dpn, margin,
                                                                            metric, swap, reduction);
                 return variable_list{ga, gp, gn};
               },
               "triplet_margin_loss");
           return std::make_tuple(o[0], o[1], o[2]);
         });
  m.impl("batch_all_loss_backward", [](const Tensor& g, const Tensor& e, const Tensor& l, const Tensor& d,
                                        double margin, Str metric, bool soft, Str reduction) {
    return refuse_second_derivative(
        {g, e},
        [&] {
          return variable_list{O::batch_all_loss_backward().call(g, e, l, d, margin, metric, soft, reduction)};
        },
        "batch_all_loss")[0];
  });
  m.impl("semi_hard_loss_backward", [](const Tensor& g, const Tensor& e, const Tensor& l, const Tensor& d,
                                        double margin, Str metric) {
    return refuse_second_derivative(
        {g, e},
        [&] { return variable_list{O::semi_hard_loss_backward().call(g, e, l, d, margin, metric)}; },
        "semi_hard_loss")[0];
  });
  m.impl("contrastive_loss_backward", [](const Tensor& g, const Tensor& e, const Tensor& l, const Tensor& d,
                                          double pm, double nm, Str metric, Str reduction) {
    return refuse_second_derivative(
        {g, e},
        [&] { return variable_list{O::contrastive_loss_backward().call(g, e, l, d, pm, nm, metric, reduction)}; },
        "contrastive_loss")[0];
  });
}

}  // namespace autograd
}  // namespace tripletops
