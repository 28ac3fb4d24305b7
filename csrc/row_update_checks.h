// Argument checks of fused_row_update, shared by the CPU and CUDA kernels.
#pragma once

#include <ATen/core/Tensor.h>

#include "checks.h"
#include "row_update.h"

namespace deepfm_fast {

// The accumulation (and optimizer state) dtype of a table: float32 for float16/bfloat16 tables.
inline at::ScalarType row_state_dtype(at::ScalarType weight_dtype) {
  return weight_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_fused_row_update_args(const at::Tensor& weight, at::TensorList state, const at::Tensor& ids,
                                        const at::Tensor& row_grads, int64_t optimizer, int64_t step) {
  constexpr const char* op = "fused_row_update";
  check_dim(op, "weight", weight, 2, "[num_rows, dim]");
  check_floating(op, "weight", weight);
  TORCH_CHECK(weight.is_contiguous(), op, ": weight must be contiguous (it is updated in place)");
  TORCH_CHECK(optimizer >= kSGD && optimizer <= kAdam, op, ": optimizer must be 0 (SGD), 1 (row-wise Adagrad), ",
              "2 (Adagrad) or 3 (Adam), got ", optimizer);
  TORCH_CHECK(ids.scalar_type() == at::kLong, op, ": ids must be an int64 tensor, got ", ids.scalar_type());
  check_dim(op, "ids", ids, 1, "[num_unique]");
  check_same_device(op, "ids", ids, "weight", weight);
  check_same_device(op, "row_grads", row_grads, "weight", weight);
  check_same_dtype(op, "row_grads", row_grads, "weight", weight);
  TORCH_CHECK(row_grads.dim() == 2 && row_grads.size(0) == ids.size(0) && row_grads.size(1) == weight.size(1), op,
              ": row_grads must have shape [", ids.size(0), ", ", weight.size(1), "] (one row per id), got ",
              row_grads.sizes());
  const int64_t expected_states = row_optimizer_states(optimizer);
  TORCH_CHECK(static_cast<int64_t>(state.size()) == expected_states, op, ": optimizer ", optimizer, " takes ",
              expected_states, " state tensors, got ", state.size());
  const auto state_dtype = row_state_dtype(weight.scalar_type());
  for (size_t i = 0; i < state.size(); ++i) {
    const at::Tensor& s = state[i];
    check_same_device(op, "state", s, "weight", weight);
    TORCH_CHECK(s.scalar_type() == state_dtype, op, ": state[", i, "] must have dtype ", state_dtype,
                " for a ", weight.scalar_type(), " weight, got ", s.scalar_type());
    TORCH_CHECK(s.is_contiguous(), op, ": state[", i, "] must be contiguous (it is updated in place)");
    // Row-wise Adagrad keeps one value per row, the others one per element.
    const at::IntArrayRef expected =
        optimizer == kRowWiseAdagrad ? weight.sizes().slice(0, 1) : weight.sizes();
    TORCH_CHECK(s.sizes() == expected, op, ": state[", i, "] must have shape ", expected, ", got ", s.sizes());
  }
  TORCH_CHECK(optimizer != kAdam || step >= 1, op, ": step must be >= 1 for Adam (bias correction), got ", step);
}

template <typename acc_t>
RowUpdateParams<acc_t> make_row_update_params(double lr, double eps, double beta1, double beta2,
                                              double weight_decay, int64_t optimizer, int64_t step) {
  const double step_size =
      optimizer == kAdam ? lr * std::sqrt(1.0 - std::pow(beta2, step)) / (1.0 - std::pow(beta1, step)) : 0.0;
  return RowUpdateParams<acc_t>{static_cast<acc_t>(lr),          static_cast<acc_t>(eps),
                                static_cast<acc_t>(1.0 - beta1), static_cast<acc_t>(1.0 - beta2),
                                static_cast<acc_t>(weight_decay), static_cast<acc_t>(step_size)};
}

}  // namespace deepfm_fast
