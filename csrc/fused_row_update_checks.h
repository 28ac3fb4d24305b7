// Argument checks of fused_row_update, shared by the CPU and CUDA kernels.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>

#include "checks.h"
#include "fused_row_update.h"

namespace deepfm_fast {

// The accumulation (and optimizer state) dtype of a table: float32 for float16/bfloat16 tables.
inline at::ScalarType row_state_dtype(at::ScalarType weight_dtype) {
  return weight_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// At most this many tables share one update pass (the embedding table and the first-order weights
// need two); the CUDA kernel takes their pointers by value.
constexpr int64_t kMaxRowUpdateTables = 4;

inline void check_fused_row_update_args(at::TensorList tables, at::TensorList state, const at::Tensor& ids,
                                        at::TensorList row_grads, int64_t optimizer, int64_t step) {
  constexpr const char* op = "fused_row_update";
  TORCH_CHECK(!tables.empty() && static_cast<int64_t>(tables.size()) <= kMaxRowUpdateTables, op,
              ": tables must hold 1 to ", kMaxRowUpdateTables, " tensors, got ", tables.size());
  TORCH_CHECK(optimizer >= kSGD && optimizer <= kAdam, op, ": optimizer must be 0 (SGD), 1 (row-wise Adagrad), ",
              "2 (Adagrad) or 3 (Adam), got ", optimizer);
  TORCH_CHECK(ids.scalar_type() == at::kLong, op, ": ids must be an int64 tensor, got ", ids.scalar_type());
  check_dim(op, "ids", ids, 1, "[num_unique]");
  TORCH_CHECK(row_grads.size() == tables.size(), op, ": row_grads must hold one tensor per table (",
              tables.size(), "), got ", row_grads.size());
  const int64_t states_per_table = row_optimizer_states(optimizer);
  TORCH_CHECK(static_cast<int64_t>(state.size()) == states_per_table * static_cast<int64_t>(tables.size()), op,
              ": optimizer ", optimizer, " takes ", states_per_table, " state tensors per table, so ",
              states_per_table * static_cast<int64_t>(tables.size()), " for ", tables.size(), " tables, got ",
              state.size());
  const at::Tensor& first = tables[0];
  const auto state_dtype = row_state_dtype(first.scalar_type());
  for (size_t t = 0; t < tables.size(); ++t) {
    const at::Tensor& table = tables[t];
    const std::string name = "tables[" + std::to_string(t) + "]";
    check_dim(op, name.c_str(), table, 2, "[num_rows, dim]");
    check_floating(op, name.c_str(), table);
    TORCH_CHECK(table.is_contiguous(), op, ": ", name, " must be contiguous (it is updated in place)");
    check_same_device(op, name.c_str(), table, "tables[0]", first);
    check_same_dtype(op, name.c_str(), table, "tables[0]", first);
    TORCH_CHECK(table.size(0) == first.size(0), op, ": every table must have the rows of tables[0] (",
                first.size(0), "), but ", name, " has ", table.size(0));
    const at::Tensor& grads = row_grads[t];
    check_same_device(op, "row_grads", grads, "tables[0]", first);
    check_same_dtype(op, "row_grads", grads, "tables[0]", first);
    TORCH_CHECK(grads.dim() == 2 && grads.size(0) == ids.size(0) && grads.size(1) == table.size(1), op,
                ": row_grads[", t, "] must have shape [", ids.size(0), ", ", table.size(1), "] (one row per id), got ",
                grads.sizes());
    for (int64_t i = 0; i < states_per_table; ++i) {
      const int64_t index = static_cast<int64_t>(t) * states_per_table + i;
      const at::Tensor& s = state[index];
      check_same_device(op, "state", s, "tables[0]", first);
      TORCH_CHECK(s.scalar_type() == state_dtype, op, ": state[", index, "] must have dtype ", state_dtype,
                  " for a ", first.scalar_type(), " table, got ", s.scalar_type());
      TORCH_CHECK(s.is_contiguous(), op, ": state[", index, "] must be contiguous (it is updated in place)");
      // Row-wise Adagrad keeps one value per row, the others one per element.
      const at::IntArrayRef expected = optimizer == kRowWiseAdagrad ? table.sizes().slice(0, 1) : table.sizes();
      TORCH_CHECK(s.sizes() == expected, op, ": state[", index, "] (of ", name, ") must have shape ", expected,
                  ", got ", s.sizes());
    }
  }
  check_same_device(op, "ids", ids, "tables[0]", first);
  TORCH_CHECK(optimizer != kAdam || step >= 1, op, ": step must be >= 1 for Adam (bias correction), got ", step);
}

// One id of fused_row_update at position u (prev = ids[u - 1]): in range, and the ids strictly
// increasing (sorted and unique, as embedding_fm_backward returns them: no two writers per row).
inline void check_row_id(int64_t u, int64_t id, int64_t prev, int64_t num_rows) {
  TORCH_CHECK(id >= 0 && id < num_rows, "fused_row_update: ids[", u, "] = ", id, " is out of range for tables with ",
              num_rows, " rows");
  TORCH_CHECK(u == 0 || id > prev, "fused_row_update: ids must be sorted and unique (as embedding_fm_backward ",
              "returns them), but ids[", u, "] = ", id, " follows ", prev);
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
