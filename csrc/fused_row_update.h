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

// Values of the `optimizer` argument of fused_row_update (deepfm_fast/optim.py mirrors them).
enum RowOptimizer : int64_t {
  kSGD = 0,             // v -= lr * g
  kRowWiseAdagrad = 1,  // G_r += mean_k g^2; v -= lr * g / (sqrt(G_r) + eps)   (FBGEMM EXACT_ROWWISE_ADAGRAD)
  kAdagrad = 2,         // G += g^2; v -= lr * g / (sqrt(G) + eps)            (torch.optim.Adagrad)
  kAdam = 3,            // torch.optim.SparseAdam on the touched rows
};

// Number of state tensors per table (row-wise Adagrad keeps one value per row, the others one per
// element of the table).
DEEPFM_HOST_DEVICE int row_optimizer_states(int64_t optimizer) {
  return optimizer == kSGD ? 0 : optimizer == kAdam ? 2 : 1;
}

template <typename acc_t>
struct RowUpdateParams {
  acc_t lr;
  acc_t eps;
  acc_t one_minus_beta1;  // computed in double on the host and rounded once, as PyTorch does
  acc_t one_minus_beta2;
  acc_t weight_decay;
  acc_t adam_step_size;  // lr * sqrt(1 - beta2^t) / (1 - beta1^t), computed on the host in double
};

// L2 weight decay, on the touched rows only: the gradient the optimizer sees.
template <typename acc_t>
DEEPFM_HOST_DEVICE acc_t decayed_grad(acc_t grad, acc_t value, const RowUpdateParams<acc_t>& p) {
  return grad + p.weight_decay * value;
}

// SGD, Adagrad and Adam: the new value of one element, updating its state in place.
template <int64_t kOptimizer, typename acc_t>
DEEPFM_HOST_DEVICE acc_t update_element(acc_t value, acc_t grad, acc_t* state0, acc_t* state1,
                                        const RowUpdateParams<acc_t>& p) {
  if (kOptimizer == kSGD) {
    return value - p.lr * grad;
  } else if (kOptimizer == kAdagrad) {
    *state0 += grad * grad;
    return value - p.lr * (grad / (std::sqrt(*state0) + p.eps));
  } else {  // kAdam, in the order of torch.optim.SparseAdam
    const acc_t exp_avg = *state0 + (grad - *state0) * p.one_minus_beta1;
    const acc_t exp_avg_sq = *state1 + (grad * grad - *state1) * p.one_minus_beta2;
    *state0 = exp_avg;
    *state1 = exp_avg_sq;
    return value - p.adam_step_size * (exp_avg / (std::sqrt(exp_avg_sq) + p.eps));
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

}  // namespace deepfm_fast
