// The fused optimizers' update of one embedding row: one source of truth for the CPU and CUDA
// kernels. Every function works on one element (or, for the row-wise state, one row) in the
// accumulation type; the kernels decide how a row's elements are spread over threads or lanes.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define DEEPFM_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define DEEPFM_HOST_DEVICE inline
#endif

namespace deepfm_fast {

// Values of the `optimizer` argument of fused_row_update (deepfm_fast/_args.py mirrors them).
enum RowOptimizer : int64_t {
  kSGD = 0,             // v -= lr * g
  kRowWiseAdagrad = 1,  // G_r += mean_k g^2; v -= lr * g / (sqrt(G_r) + eps)   (FBGEMM EXACT_ROWWISE_ADAGRAD)
  kAdagrad = 2,         // G += g^2; v -= lr * g / (sqrt(G) + eps)            (torch.optim.Adagrad)
  kLazyAdam = 3,        // torch.optim.SparseAdam: the moments of the touched rows only
  kAdam = 4,            // torch.optim.Adam: untouched rows caught up when next touched (below)
};

// Number of state tensors per table (row-wise Adagrad keeps one value per row, the others one per
// element of the table).
DEEPFM_HOST_DEVICE int row_optimizer_states(int64_t optimizer) {
  return optimizer == kSGD ? 0 : (optimizer == kLazyAdam || optimizer == kAdam) ? 2 : 1;
}

template <typename acc_t>
struct RowUpdateParams {
  acc_t lr;
  acc_t eps;
  acc_t beta2;            // torch.optim.Adam's exp_avg_sq.mul_(beta2).addcmul_(g, g, 1 - beta2)
  acc_t one_minus_beta1;  // computed in double on the host and rounded once, as PyTorch does
  acc_t one_minus_beta2;
  acc_t weight_decay;
  acc_t adam_step_size;  // lazy Adam: lr * sqrt(1 - beta2^t) / (1 - beta1^t); Adam: lr / (1 - beta1^t)
  acc_t bias_correction2_sqrt;  // Adam: sqrt(1 - beta2^t)
};

// L2 weight decay, on the touched rows only: the gradient the optimizer sees.
template <typename acc_t>
DEEPFM_HOST_DEVICE acc_t decayed_grad(acc_t grad, acc_t value, const RowUpdateParams<acc_t>& p) {
  return grad + p.weight_decay * value;
}

// SGD, Adagrad and both Adams: the new value of one element, updating its state in place.
template <int64_t kOptimizer, typename acc_t>
DEEPFM_HOST_DEVICE acc_t update_element(acc_t value, acc_t grad, acc_t* state0, acc_t* state1,
                                        const RowUpdateParams<acc_t>& p) {
  if (kOptimizer == kSGD) {
    return value - p.lr * grad;
  } else if (kOptimizer == kAdagrad) {
    *state0 += grad * grad;
    return value - p.lr * (grad / (std::sqrt(*state0) + p.eps));
  } else if (kOptimizer == kLazyAdam) {  // in the order of torch.optim.SparseAdam
    const acc_t exp_avg = *state0 + (grad - *state0) * p.one_minus_beta1;
    const acc_t exp_avg_sq = *state1 + (grad * grad - *state1) * p.one_minus_beta2;
    *state0 = exp_avg;
    *state1 = exp_avg_sq;
    return value - p.adam_step_size * (exp_avg / (std::sqrt(exp_avg_sq) + p.eps));
  } else {  // kAdam, in the order of torch.optim.Adam (eps added after the bias correction)
    const acc_t exp_avg = *state0 + (grad - *state0) * p.one_minus_beta1;
    const acc_t exp_avg_sq = *state1 * p.beta2 + p.one_minus_beta2 * grad * grad;
    *state0 = exp_avg;
    *state1 = exp_avg_sq;
    return value - p.adam_step_size * (exp_avg / (std::sqrt(exp_avg_sq) / p.bias_correction2_sqrt + p.eps));
  }
}

// Row-wise Adagrad: the row's new accumulator from the sum of its squared gradients, then the
// common multiplier of every element of the row.
template <typename acc_t>
DEEPFM_HOST_DEVICE acc_t rowwise_adagrad_multiplier(acc_t* row_state, acc_t sum_sq, int64_t dim,
                                                    const RowUpdateParams<acc_t>& p) {
  *row_state += sum_sq / static_cast<acc_t>(dim);
  return p.lr / (std::sqrt(*row_state) + p.eps);
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
