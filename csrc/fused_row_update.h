// The fused optimizers' update of one embedding row: one definition per optimizer (a struct in
// namespace optim), and the one dispatch over them (dispatch_row_optimizer) that the CPU and CUDA
// kernels both use. A rule works on one element (or, for its row-wise state, one row) in the
// accumulation type; the kernels decide how a row's elements are spread over threads or lanes.
// deepfm_fast/optim.py holds each optimizer's Python class (the same code, state layout and
// arguments), deepfm_fast/reference.py its reference.
#pragma once

#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <utility>

#if defined(__CUDACC__)
#define DEEPFM_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define DEEPFM_HOST_DEVICE inline
#endif

namespace deepfm_fast {

// The scalar arguments of fused_row_update for step t, computed in double on the host and rounded
// once, as PyTorch does.
template <typename acc_t>
struct RowUpdateParams {
  acc_t lr;
  acc_t eps;
  acc_t beta1;
  acc_t beta2;  // torch.optim.Adam's exp_avg_sq.mul_(beta2).addcmul_(g, g, 1 - beta2)
  acc_t one_minus_beta1;
  acc_t one_minus_beta2;
  acc_t weight_decay;
  acc_t step_size;              // the rule's step_size(lr, 1 - beta1^t, sqrt(1 - beta2^t))
  acc_t bias_correction2_sqrt;  // sqrt(1 - beta2^t)
};

// L2 weight decay, on the touched rows only: the gradient the optimizer sees.
template <typename acc_t>
DEEPFM_HOST_DEVICE acc_t decayed_grad(acc_t grad, acc_t value, const RowUpdateParams<acc_t>& p) {
  return grad + p.weight_decay * value;
}

namespace optim {

// What a rule leaves as it is: no state, no row-wise state, no catch-up, no step size.
struct RowRule {
  static constexpr int kStates = 0;     // state tensors per table
  static constexpr int kRowState = -1;  // the state kept as one value per row (its row_factor's), or -1
  static constexpr bool kCatchesUp = false;  // untouched rows caught up (Adam's last_step and catchup)
  static double step_size(double, double, double) { return 0.0; }
  // The row-wise state's update from the row's sum of squared (decayed) gradients; returns the
  // factor that `update` receives for every element of the row.
  template <typename acc_t>
  static DEEPFM_HOST_DEVICE acc_t row_factor(acc_t*, acc_t, int64_t, const RowUpdateParams<acc_t>&) {
    return acc_t(0);
  }
};

// v -= lr * g
struct SGD : RowRule {
  static constexpr int64_t kCode = 0;
  static constexpr const char* kName = "SGD";
  // The new value of one element; s0, s1: its per-element states (null where the rule has none).
  template <typename acc_t>
  static DEEPFM_HOST_DEVICE acc_t update(acc_t value, acc_t grad, acc_t*, acc_t*, acc_t,
                                         const RowUpdateParams<acc_t>& p) {
    return value - p.lr * grad;
  }
};

// G_r += mean_k g^2; v -= lr * g / (sqrt(G_r) + eps)   (FBGEMM EXACT_ROWWISE_ADAGRAD)
struct RowWiseAdagrad : RowRule {
  static constexpr int64_t kCode = 1;
  static constexpr const char* kName = "row-wise Adagrad";
  static constexpr int kStates = 1;
  static constexpr int kRowState = 0;
  template <typename acc_t>
  static DEEPFM_HOST_DEVICE acc_t row_factor(acc_t* sum, acc_t sum_sq, int64_t dim, const RowUpdateParams<acc_t>& p) {
    *sum += sum_sq / static_cast<acc_t>(dim);
    return p.lr / (std::sqrt(*sum) + p.eps);
  }
  template <typename acc_t>
  static DEEPFM_HOST_DEVICE acc_t update(acc_t value, acc_t grad, acc_t*, acc_t*, acc_t multiplier,
                                         const RowUpdateParams<acc_t>&) {
    return value - multiplier * grad;
  }
};

// G += g^2; v -= lr * g / (sqrt(G) + eps)   (torch.optim.Adagrad)
struct Adagrad : RowRule {
  static constexpr int64_t kCode = 2;
  static constexpr const char* kName = "Adagrad";
  static constexpr int kStates = 1;
  template <typename acc_t>
  static DEEPFM_HOST_DEVICE acc_t update(acc_t value, acc_t grad, acc_t* sum, acc_t*, acc_t,
                                         const RowUpdateParams<acc_t>& p) {
    *sum += grad * grad;
    return value - p.lr * (grad / (std::sqrt(*sum) + p.eps));
  }
};

// torch.optim.SparseAdam, in its order: the moments of the touched rows only.
struct LazyAdam : RowRule {
  static constexpr int64_t kCode = 3;
  static constexpr const char* kName = "lazy Adam";
  static constexpr int kStates = 2;
  static double step_size(double lr, double bias_correction1, double bias_correction2_sqrt) {
    return lr * bias_correction2_sqrt / bias_correction1;
  }
  template <typename acc_t>
  static DEEPFM_HOST_DEVICE acc_t update(acc_t value, acc_t grad, acc_t* exp_avg, acc_t* exp_avg_sq, acc_t,
                                         const RowUpdateParams<acc_t>& p) {
    const acc_t m = *exp_avg + (grad - *exp_avg) * p.one_minus_beta1;
    const acc_t v = *exp_avg_sq + (grad * grad - *exp_avg_sq) * p.one_minus_beta2;
    *exp_avg = m;
    *exp_avg_sq = v;
    return value - p.step_size * (m / (std::sqrt(v) + p.eps));
  }
};

// torch.optim.Adam, in its order (eps added after the bias correction); the rows no batch touched
// are caught up when next touched (below).
struct Adam : RowRule {
  static constexpr int64_t kCode = 4;
  static constexpr const char* kName = "Adam";
  static constexpr int kStates = 2;
  static constexpr bool kCatchesUp = true;
  static double step_size(double lr, double bias_correction1, double) { return lr / bias_correction1; }
  template <typename acc_t>
  static DEEPFM_HOST_DEVICE acc_t update(acc_t value, acc_t grad, acc_t* exp_avg, acc_t* exp_avg_sq, acc_t,
                                         const RowUpdateParams<acc_t>& p) {
    const acc_t m = *exp_avg + (grad - *exp_avg) * p.one_minus_beta1;
    const acc_t v = *exp_avg_sq * p.beta2 + p.one_minus_beta2 * grad * grad;
    *exp_avg = m;
    *exp_avg_sq = v;
    return value - p.step_size * (m / (std::sqrt(v) / p.bias_correction2_sqrt + p.eps));
  }
};

// FBGEMM's PARTIAL_ROWWISE_ADAM: a first moment per element, ONE second moment per row from the
// mean of g^2 over the row, bias corrections by the global step, on the touched rows only.
struct RowWiseAdam : RowRule {
  static constexpr int64_t kCode = 5;
  static constexpr const char* kName = "row-wise Adam";
  static constexpr int kStates = 2;
  static constexpr int kRowState = 1;
  static double step_size(double lr, double bias_correction1, double) { return lr / bias_correction1; }
  // v_r = beta2 v_r + (1 - beta2) mean_k g^2; returns the row's denominator sqrt(v_r / (1 - beta2^t)) + eps.
  template <typename acc_t>
  static DEEPFM_HOST_DEVICE acc_t row_factor(acc_t* exp_avg_sq, acc_t sum_sq, int64_t dim,
                                             const RowUpdateParams<acc_t>& p) {
    *exp_avg_sq = *exp_avg_sq * p.beta2 + p.one_minus_beta2 * (sum_sq / static_cast<acc_t>(dim));
    return std::sqrt(*exp_avg_sq) / p.bias_correction2_sqrt + p.eps;
  }
  template <typename acc_t>
  static DEEPFM_HOST_DEVICE acc_t update(acc_t value, acc_t grad, acc_t* exp_avg, acc_t*, acc_t denom,
                                         const RowUpdateParams<acc_t>& p) {
    const acc_t m = *exp_avg * p.beta1 + p.one_minus_beta1 * grad;
    *exp_avg = m;
    return value - p.step_size * (m / denom);
  }
};

}  // namespace optim

// The optimizers of fused_row_update; dispatch_row_optimizer picks among them by code.
template <typename... Rules>
struct RowRules {};
using AllRowRules = RowRules<optim::SGD, optim::RowWiseAdagrad, optim::Adagrad, optim::LazyAdam, optim::Adam,
                             optim::RowWiseAdam>;

// "0 (SGD), 1 (row-wise Adagrad), ... or 5 (row-wise Adam)"
template <typename... Rules>
std::string row_optimizer_names(RowRules<Rules...>) {
  std::string names;
  size_t i = 0;
  ((names += (i == 0 ? "" : i + 1 == sizeof...(Rules) ? " or " : ", ") + std::to_string(Rules::kCode) + " (" +
             Rules::kName + ")",
    ++i),
   ...);
  return names;
}

template <typename F, typename... Rules>
void dispatch_row_optimizer(int64_t code, F&& f, RowRules<Rules...> rules) {
  const bool found = ((code == Rules::kCode ? (f(Rules{}), true) : false) || ...);
  TORCH_CHECK(found, "fused_row_update: optimizer must be ", row_optimizer_names(rules), ", got ", code);
}

// Calls f(Rule{}) with the rule of optimizer `code` (an error for an unknown code): the one switch
// over the optimizers, for every kernel and check.
template <typename F>
void dispatch_row_optimizer(int64_t code, F&& f) {
  dispatch_row_optimizer(code, std::forward<F>(f), AllRowRules{});
}

// Whether state i of Rule is kept per element (else per row, or absent).
template <class Rule>
constexpr bool per_element_state(int i) {
  return i < Rule::kStates && i != Rule::kRowState;
}

// What the checks and kernels read of optimizer `code` without its rule's type.
struct RowOptimizerLayout {
  int states;     // per table
  int row_state;  // the state kept per row, or -1
  bool catches_up;
};

inline RowOptimizerLayout row_optimizer_layout(int64_t code) {
  RowOptimizerLayout layout{};
  dispatch_row_optimizer(code, [&](auto rule) {
    using Rule = decltype(rule);
    layout = {Rule::kStates, Rule::kRowState, Rule::kCatchesUp};
  });
  return layout;
}

// One step of one row of `dim` elements on one thread (the CPU kernels): weight decay, the row
// factor of a row-wise state, then the rule on every element. state0/state1: the row's states
// (their first element, or their one value for the row-wise state).
template <class Rule, typename scalar_t, typename acc_t>
inline void update_row(scalar_t* value, const scalar_t* grad, acc_t* state0, acc_t* state1, int64_t dim,
                       const RowUpdateParams<acc_t>& p) {
  acc_t factor = acc_t(0);
  if constexpr (Rule::kRowState >= 0) {
    acc_t sum_sq = acc_t(0);
    for (int64_t k = 0; k < dim; ++k) {
      const acc_t g = decayed_grad<acc_t>(grad[k], value[k], p);
      sum_sq += g * g;
    }
    factor = Rule::row_factor(Rule::kRowState == 0 ? state0 : state1, sum_sq, dim, p);
  }
  for (int64_t k = 0; k < dim; ++k) {
    const acc_t v = value[k];
    acc_t* s0 = nullptr;
    acc_t* s1 = nullptr;
    if constexpr (per_element_state<Rule>(0)) s0 = state0 + k;
    if constexpr (per_element_state<Rule>(1)) s1 = state1 + k;
    value[k] = static_cast<scalar_t>(Rule::update(v, decayed_grad<acc_t>(grad[k], v, p), s0, s1, factor, p));
  }
}

// ---- Adam's catch-up of untouched rows -----------------------------------------------------------
//
// Dense Adam moves every row at every step; a row that no batch touched since step t0 has zero
// gradient, so over the missed steps s = t0 + k its moments decay (m0 beta1^k, v0 beta2^k) and it
// moves by
//     sum_k a_s rho^k m0 / (u + eps W_k),   u = sqrt(v0), rho = beta1 / sqrt(beta2),
//     a_s = lr_s sqrt(1 - beta2^s) / (1 - beta1^s),  W_k = sqrt(1 - beta2^s) beta2^(-k/2).
// The sum is F(u) = sum_k beta_k g(W_k) with weights beta_k = a_s rho^k / W_k and g(W) = W / (u + eps W):
// a 2-node Gauss rule for the measure {beta_k at W_k}, from its moments of order 0..3, gives
// F(u) ~ alpha_1 / (u + eps x_1) + alpha_2 / (u + eps x_2) with alpha_i = beta_i x_i. The rule is
// exact at u = 0 and as u grows (moments 0 and 1); in between its error is set by the spread of the
// W_k, which is small once training is past its first steps (tests/test_optim.py measures it).
//
// The table `catchup` [P + 1, kCatchUpColumns] (float64) holds, after step T, one entry per gap
// j = T - t0 in [0, P]: the moments of the missed steps (t0, T] and the coefficients derived from
// them. Each step shifts the entries by one and adds its own term (advance_catch_up_entry). Rows
// are never more than P steps behind: every step also catches up a 1/P slice of the table.
enum CatchUpColumn : int {
  kMoment0 = 0,  // sum of beta_k
  kMoment1,      // sum of beta_k d_k, d_k = W_k - shift
  kMoment2,      // sum of beta_k d_k^2
  kMoment3,      // sum of beta_k d_k^3
  kShift,        // W of the entry's first missed step (moments about it cancel less)
  kAlpha1,
  kEpsX1,  // eps * x_1
  kAlpha2,
  kEpsX2,
  kDecay1,  // beta1^j
  kDecay2,  // beta2^j
  kCatchUpColumns,
};

// The host-side constants of one step T: a_T and sqrt(1 - beta2^T).
struct CatchUpStep {
  double a;            // lr_T sqrt(1 - beta2^T) / (1 - beta1^T)
  double e;            // sqrt(1 - beta2^T)
  double beta1, beta2, eps;
};

// Entry j of the table after step T (`out`), from entry j - 1 of the table after step T - 1
// (`prev`, ignored for j == 0): its moments plus the term of the missed step T, k = j. The powers
// beta1^j, beta2^j and beta2^(-j/2) come from the caller (a loop multiplies; a thread calls pow).
DEEPFM_HOST_DEVICE void advance_catch_up_entry(const double* prev, double* out, int64_t j, const CatchUpStep& s,
                                               double beta1_j, double beta2_j, double inv_sqrt_beta2_j) {
  out[kDecay1] = beta1_j;
  out[kDecay2] = beta2_j;
  if (j == 0) {
    for (int c = 0; c < kDecay1; ++c) out[c] = 0.0;
    return;
  }
  // beta_k = a rho^k / W_k = (a / e) beta1^k; W_k = e beta2^(-k/2).
  const double weight = s.a / s.e * beta1_j;
  const double w = s.e * inv_sqrt_beta2_j;
  const bool first = !(prev[kMoment0] > 0.0);
  const double shift = first ? w : prev[kShift];
  const double d = w - shift;
  double m0 = weight, m1 = weight * d, m2 = weight * d * d, m3 = weight * d * d * d;
  if (!first) {
    m0 += prev[kMoment0];
    m1 += prev[kMoment1];
    m2 += prev[kMoment2];
    m3 += prev[kMoment3];
  }
  out[kMoment0] = m0;
  out[kMoment1] = m1;
  out[kMoment2] = m2;
  out[kMoment3] = m3;
  out[kShift] = shift;
  // The 2-node Gauss rule, in the variable centred on the mean c.
  double alpha1 = 0.0, x1 = 1.0, alpha2 = 0.0, x2 = 1.0;
  if (m0 > 0.0) {
    const double delta = m1 / m0, c = shift + delta;
    const double mu2 = m2 / m0 - delta * delta;
    const double mu3 = m3 / m0 - 3.0 * delta * m2 / m0 + 2.0 * delta * delta * delta;
    // Below a relative spread of 1e-6 one node is exact to 1e-12; two nodes from such moments
    // would be noise.
    bool two_nodes = mu2 > 1e-12 * c * c;
    if (two_nodes) {
      const double ratio = mu3 / mu2;
      const double root = std::sqrt(ratio * ratio + 4.0 * mu2);
      const double y1 = 0.5 * (ratio - root), y2 = 0.5 * (ratio + root);
      x1 = c + y1;
      x2 = c + y2;
      alpha1 = m0 * y2 / (y2 - y1) * x1;
      alpha2 = -m0 * y1 / (y2 - y1) * x2;
      two_nodes = x1 > 0.0 && x2 > 0.0;  // Gauss nodes lie inside the support (W > 0)
    }
    if (!two_nodes) {
      x1 = x2 = c;
      alpha1 = m0 * c;
      alpha2 = 0.0;
    }
  }
  out[kAlpha1] = alpha1;
  out[kEpsX1] = s.eps * x1;
  out[kAlpha2] = alpha2;
  out[kEpsX2] = s.eps * x2;
}

// The coefficients of one gap j, in the accumulation type.
template <typename acc_t>
struct CatchUp {
  acc_t alpha1, eps_x1, alpha2, eps_x2, decay1, decay2;
};

template <typename acc_t>
DEEPFM_HOST_DEVICE CatchUp<acc_t> catch_up_coefficients(const double* entry) {
  return CatchUp<acc_t>{static_cast<acc_t>(entry[kAlpha1]), static_cast<acc_t>(entry[kEpsX1]),
                        static_cast<acc_t>(entry[kAlpha2]), static_cast<acc_t>(entry[kEpsX2]),
                        static_cast<acc_t>(entry[kDecay1]), static_cast<acc_t>(entry[kDecay2])};
}

// The steps a row last updated after step `last` has missed by step `target`, at most the window
// (the CUDA kernels cannot raise; the CPU kernels check instead: checked_missed_steps).
DEEPFM_HOST_DEVICE int64_t clamped_missed_steps(int64_t last, int64_t target, int64_t window) {
  const int64_t missed = target - last;
  return missed < window ? missed : window;
}

// One element after the missed steps of its row: moved by its momentum, moments decayed. No
// branch, so that the loop over a row's elements vectorises. A denominator below the floor needs
// eps = 0 and v < 1e-60, which comes with m = 0 (no movement); the floor keeps alpha / floor finite.
constexpr double kCatchUpFloor = 1e-30;

template <typename acc_t>
DEEPFM_HOST_DEVICE acc_t catch_up_element(acc_t value, acc_t* exp_avg, acc_t* exp_avg_sq, const CatchUp<acc_t>& c) {
  const acc_t kFloor = static_cast<acc_t>(kCatchUpFloor);
  const acc_t m = *exp_avg, v = *exp_avg_sq;
  const acc_t u = std::sqrt(v);
  const acc_t d1 = u + c.eps_x1 > kFloor ? u + c.eps_x1 : kFloor;
  const acc_t d2 = u + c.eps_x2 > kFloor ? u + c.eps_x2 : kFloor;
  *exp_avg = m * c.decay1;
  *exp_avg_sq = v * c.decay2;
  return value - m * (c.alpha1 / d1 + c.alpha2 / d2);
}

}  // namespace deepfm_fast
