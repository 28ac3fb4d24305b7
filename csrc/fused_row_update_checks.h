// Argument checks of fused_row_update, shared by the CPU and CUDA kernels.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <string>
#include <utility>
#include <vector>

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

// The width of a table: [N] (one value per row, e.g. the first-order weights) or [N, D].
inline int64_t table_width(const at::Tensor& table) { return table.dim() == 1 ? 1 : table.size(1); }

// `step`: the step counter, a CPU int64 scalar that the op increments (no device sync to read it).
inline int64_t* check_step(const char* op, const at::Tensor& step) {
  TORCH_CHECK(step.device().is_cpu() && step.scalar_type() == at::kLong && step.numel() == 1, op,
              ": step must be a CPU int64 tensor with one element (the step counter), got ", step.scalar_type(),
              " of shape ", step.sizes(), " on ", step.device());
  TORCH_CHECK(step.is_contiguous(), op, ": step must be contiguous (it is incremented in place)");
  const int64_t steps_taken = step.const_data_ptr<int64_t>()[0];
  TORCH_CHECK(steps_taken >= 0, op, ": step must be >= 0 (the number of steps taken), got ", steps_taken);
  return step.mutable_data_ptr<int64_t>();
}

// tables: 1 to kMaxRowUpdateTables [N] or [N, D_t] tables (strided records, see checks.h) of one dtype and device;
// state: `states_per_table` tensors per table, in turn, shaped like the table (state `row_state`:
// [N], one value per row) in the state dtype.
inline void check_tables_and_state(const char* op, at::TensorList tables, at::TensorList state,
                                   int64_t states_per_table, int64_t row_state) {
  TORCH_CHECK(!tables.empty() && static_cast<int64_t>(tables.size()) <= kMaxRowUpdateTables, op,
              ": tables must hold 1 to ", kMaxRowUpdateTables, " tensors, got ", tables.size());
  const at::Tensor& first = tables[0];
  for (size_t t = 0; t < tables.size(); ++t) {
    const at::Tensor& table = tables[t];
    const std::string name = "tables[" + std::to_string(t) + "]";
    TORCH_CHECK(table.dim() == 1 || table.dim() == 2, op, ": ", name, " must be a 1-D [num_rows] or 2-D ",
                "[num_rows, dim] tensor, got a ", table.dim(), "-D tensor of shape ", table.sizes());
    check_floating(op, name.c_str(), table);
    check_strided_records(op, name.c_str(), table);
    check_same_device(op, name.c_str(), table, "tables[0]", first);
    check_same_dtype(op, name.c_str(), table, "tables[0]", first);
    TORCH_CHECK(table.size(0) == first.size(0), op, ": every table must have the rows of tables[0] (",
                first.size(0), "), but ", name, " has ", table.size(0));
  }
  TORCH_CHECK(static_cast<int64_t>(state.size()) == states_per_table * static_cast<int64_t>(tables.size()), op,
              ": this optimizer takes ", states_per_table, " state tensors per table, so ",
              states_per_table * static_cast<int64_t>(tables.size()), " for ", tables.size(), " tables, got ",
              state.size());
  const auto state_dtype = row_state_dtype(first.scalar_type());
  for (size_t t = 0; t < tables.size(); ++t) {
    const at::Tensor& table = tables[t];
    const std::string name = "tables[" + std::to_string(t) + "]";
    for (int64_t i = 0; i < states_per_table; ++i) {
      const int64_t index = static_cast<int64_t>(t) * states_per_table + i;
      const at::Tensor& s = state[index];
      check_same_device(op, "state", s, "tables[0]", first);
      TORCH_CHECK(s.scalar_type() == state_dtype, op, ": state[", index, "] must have dtype ", state_dtype,
                  " for a ", first.scalar_type(), " table, got ", s.scalar_type());
      check_strided_records(op, ("state[" + std::to_string(index) + "]").c_str(), s);
      const at::IntArrayRef expected = i == row_state ? table.sizes().slice(0, 1) : table.sizes();
      TORCH_CHECK(s.sizes() == expected, op, ": state[", index, "] (of ", name, ") must have shape ", expected,
                  ", got ", s.sizes());
    }
  }
}

// Adam's catch-up state: last_step [N] int64 (the step after which each row is up to date) and the
// catch-up table [P + 1, kCatchUpColumns] float64, both on the tables' device.
inline void check_catch_up_state(const char* op, const at::Tensor& table, const c10::optional<at::Tensor>& last_step,
                                 const c10::optional<at::Tensor>& catchup) {
  TORCH_CHECK(last_step.has_value() && catchup.has_value(), op, ": Adam (optimizer ", optim::Adam::kCode,
              ") needs last_step and catchup ",
              "(deepfm_fast.optim.Adam.new_row_state creates them)");
  const at::Tensor& last = *last_step;
  const at::Tensor& table_coefficients = *catchup;
  check_same_device(op, "last_step", last, "tables[0]", table);
  check_same_device(op, "catchup", table_coefficients, "tables[0]", table);
  TORCH_CHECK(last.scalar_type() == at::kLong && last.dim() == 1 && last.size(0) == table.size(0), op,
              ": last_step must be an int64 tensor of shape [", table.size(0), "], got ", last.scalar_type(),
              " of shape ", last.sizes());
  check_strided_records(op, "last_step", last);
  TORCH_CHECK(table_coefficients.scalar_type() == at::kDouble && table_coefficients.dim() == 2 &&
                  table_coefficients.size(0) >= 2 && table_coefficients.size(1) == kCatchUpColumns &&
                  table_coefficients.is_contiguous(),
              op, ": catchup must be a contiguous float64 tensor of shape [window + 1, ", int(kCatchUpColumns),
              "] with window >= 1, got ", table_coefficients.scalar_type(), " of shape ", table_coefficients.sizes());
}

// The arguments adam_catch_up and adam_rows share; returns the step to bring the rows up to.
inline int64_t check_catch_up_args(const char* op, at::TensorList tables, at::TensorList state,
                                   const at::Tensor& last_step, const at::Tensor& catchup,
                                   const at::Tensor& step_counter) {
  check_tables_and_state(op, tables, state, optim::Adam::kStates, optim::Adam::kRowState);
  check_catch_up_state(op, tables[0], last_step, catchup);
  return *check_step(op, step_counter);
}

// Returns the step counter, which the update increments.
inline int64_t* check_fused_row_update_args(at::TensorList tables, at::TensorList state, const at::Tensor& ids,
                                            at::TensorList row_grads, const at::Tensor& step_counter,
                                            int64_t optimizer, const c10::optional<at::Tensor>& last_step,
                                            const c10::optional<at::Tensor>& catchup) {
  constexpr const char* op = "fused_row_update";
  const RowOptimizerLayout layout = row_optimizer_layout(optimizer);  // an error for an unknown code
  check_tables_and_state(op, tables, state, layout.states, layout.row_state);
  TORCH_CHECK(ids.scalar_type() == at::kLong, op, ": ids must be an int64 tensor, got ", ids.scalar_type());
  check_dim(op, "ids", ids, 1, "[num_unique]");
  check_same_device(op, "ids", ids, "tables[0]", tables[0]);
  TORCH_CHECK(row_grads.size() == tables.size(), op, ": row_grads must hold one tensor per table (",
              tables.size(), "), got ", row_grads.size());
  for (size_t t = 0; t < tables.size(); ++t) {
    const at::Tensor& grads = row_grads[t];
    check_same_device(op, "row_grads", grads, "tables[0]", tables[0]);
    check_same_dtype(op, "row_grads", grads, "tables[0]", tables[0]);
    const bool ok = tables[t].dim() == 1 ? grads.dim() == 1 && grads.size(0) == ids.size(0)
                                         : grads.dim() == 2 && grads.size(0) == ids.size(0) &&
                                               grads.size(1) == tables[t].size(1);
    TORCH_CHECK(ok, op, ": row_grads[", t, "] must have the shape of tables[", t, "] with one row per id ([",
                ids.size(0), tables[t].dim() == 2 ? ", " + std::to_string(tables[t].size(1)) : std::string(),
                "]), got ", grads.sizes());
  }
  if (layout.catches_up) check_catch_up_state(op, tables[0], last_step, catchup);
  return check_step(op, step_counter);
}

// fused_row_update's arguments as the kernels read them, once checked: the ids and row gradients
// contiguous, and the step counter the update increments.
struct RowUpdateArgs {
  at::TensorList tables, state;
  at::Tensor ids;
  std::vector<at::Tensor> row_grads;
  int64_t* counter;
  int64_t num_ids, num_rows;
  int64_t optimizer;
  double lr, eps, beta1, beta2, weight_decay;
  c10::optional<at::Tensor> last_step, catchup;
  bool check_ids;
};

// fused_row_update as its schema (csrc/ops.cpp) declares it, written once for every device: checks
// and prepares the arguments, then runs the device's kernel `Run` on them. The CPU and CUDA files
// register fused_row_update_op<their Run>.
template <void (*Run)(const RowUpdateArgs&)>
void fused_row_update_op(at::TensorList tables, at::TensorList state, const at::Tensor& ids, at::TensorList row_grads,
                         const at::Tensor& step_counter, int64_t optimizer, double lr, double eps, double beta1,
                         double beta2, double weight_decay, const c10::optional<at::Tensor>& last_step,
                         const c10::optional<at::Tensor>& catchup, bool check_ids) {
  int64_t* counter =
      check_fused_row_update_args(tables, state, ids, row_grads, step_counter, optimizer, last_step, catchup);
  RowUpdateArgs args{tables, state, ids.contiguous(), {}, counter, ids.numel(), tables[0].size(0), optimizer, lr,
                     eps, beta1, beta2, weight_decay, last_step, catchup, check_ids};
  for (const auto& g : row_grads) args.row_grads.push_back(g.contiguous());
  Run(args);
}

// One id of fused_row_update at position u (prev = ids[u - 1]): in range, and the ids strictly
// increasing (sorted and unique, as embedding_fm_backward returns them: no two writers per row).
inline void check_row_id(int64_t u, int64_t id, int64_t prev, int64_t num_rows) {
  TORCH_CHECK(id >= 0 && id < num_rows, "fused_row_update: ids[", u, "] = ", id, " is out of range for tables with ",
              num_rows, " rows");
  TORCH_CHECK(u == 0 || id > prev, "fused_row_update: ids must be sorted and unique (as embedding_fm_backward ",
              "returns them), but ids[", u, "] = ", id, " follows ", prev);
}

// The hyper-parameters of step `step` (>= 1) for Rule, with the bias corrections computed in double once.
template <class Rule, typename acc_t>
RowUpdateParams<acc_t> make_row_update_params(double lr, double eps, double beta1, double beta2,
                                              double weight_decay, int64_t step) {
  const double bias_correction1 = 1.0 - std::pow(beta1, static_cast<double>(step));
  const double bias_correction2_sqrt = std::sqrt(1.0 - std::pow(beta2, static_cast<double>(step)));
  return RowUpdateParams<acc_t>{static_cast<acc_t>(lr),
                                static_cast<acc_t>(eps),
                                static_cast<acc_t>(beta1),
                                static_cast<acc_t>(beta2),
                                static_cast<acc_t>(1.0 - beta1),
                                static_cast<acc_t>(1.0 - beta2),
                                static_cast<acc_t>(weight_decay),
                                static_cast<acc_t>(Rule::step_size(lr, bias_correction1, bias_correction2_sqrt)),
                                static_cast<acc_t>(bias_correction2_sqrt)};
}

// Adam's catch-up state as the kernels use it (nulls and a zero window for the other optimizers);
// row r's last step is last_step[r * last_step_stride].
struct CatchUpState {
  int64_t* last_step;
  int64_t last_step_stride;
  double* table;
  int64_t window;
};

inline CatchUpState catch_up_state(const at::Tensor& last_step, const at::Tensor& catchup) {
  return {last_step.mutable_data_ptr<int64_t>(), last_step.stride(0), catchup.mutable_data_ptr<double>(),
          catchup.size(0) - 1};
}

template <class Rule>
CatchUpState catch_up_state(const c10::optional<at::Tensor>& last_step, const c10::optional<at::Tensor>& catchup) {
  if constexpr (!Rule::kCatchesUp) return {nullptr, 0, nullptr, 0};
  return catch_up_state(*last_step, *catchup);
}

// The steps a row last updated after step `last` has missed by step `target` (<= 0: none). Rows
// are never more than the window behind (the sweep sees to it); more means last_step or the
// catch-up table were replaced, and reading the table there would be out of bounds.
inline int64_t checked_missed_steps(const char* op, int64_t row, int64_t last, int64_t target, int64_t window) {
  const int64_t missed = target - last;
  TORCH_CHECK(missed <= window, op, ": row ", row, " was last updated at step ", last,
              ", more than the catch-up window (", window, ") before step ", target,
              "; were last_step or the catch-up table replaced?");
  return missed;
}

// The constants of step `step` for the catch-up table.
inline CatchUpStep make_catch_up_step(double lr, double eps, double beta1, double beta2, int64_t step) {
  const double e = std::sqrt(1.0 - std::pow(beta2, static_cast<double>(step)));
  return CatchUpStep{lr * e / (1.0 - std::pow(beta1, static_cast<double>(step))), e, beta1, beta2, eps};
}

// adam_catch_up: the rows [row_begin, row_end) (row_end < 0: to the last row).
inline std::pair<int64_t, int64_t> check_row_range(const char* op, int64_t num_rows, int64_t row_begin,
                                                   int64_t row_end) {
  const int64_t end = row_end < 0 ? num_rows : row_end;
  TORCH_CHECK(row_begin >= 0 && row_begin <= end && end <= num_rows, op, ": rows [", row_begin, ", ", row_end,
              ") are not a range of the ", num_rows, " rows");
  return {row_begin, end};
}

// adam_rows: int64 [U] row ids on the tables' device, contiguous.
inline at::Tensor check_rows(const char* op, const at::Tensor& rows, const at::Tensor& table) {
  TORCH_CHECK(rows.scalar_type() == at::kLong, op, ": rows must be an int64 tensor, got ", rows.scalar_type());
  check_dim(op, "rows", rows, 1, "[num_rows]");
  check_same_device(op, "rows", rows, "tables[0]", table);
  return rows.contiguous();
}

// adam_catch_up's and adam_rows' arguments, once checked: the step the rows catch up to, and the
// rows, a range [begin, end) (adam_catch_up) or a list (adam_rows: contiguous int64).
struct CatchUpArgs {
  at::TensorList tables, state;
  at::Tensor last_step, catchup;
  int64_t target;
  int64_t begin, end;
  at::Tensor rows;
};

// adam_catch_up and adam_rows as their schemas declare them, once for every device (as
// fused_row_update_op): the arguments checked, then the device's `Run`.
template <void (*Run)(const CatchUpArgs&)>
void adam_catch_up_op(at::TensorList tables, at::TensorList state, const at::Tensor& last_step,
                      const at::Tensor& catchup, const at::Tensor& step_counter, int64_t row_begin, int64_t row_end) {
  constexpr const char* op = "adam_catch_up";
  const int64_t target = check_catch_up_args(op, tables, state, last_step, catchup, step_counter);
  const auto [begin, end] = check_row_range(op, tables[0].size(0), row_begin, row_end);
  Run(CatchUpArgs{tables, state, last_step, catchup, target, begin, end, {}});
}

template <std::vector<at::Tensor> (*Run)(const CatchUpArgs&)>
std::vector<at::Tensor> adam_rows_op(at::TensorList tables, at::TensorList state, const at::Tensor& last_step,
                                     const at::Tensor& catchup, const at::Tensor& step_counter,
                                     const at::Tensor& rows) {
  constexpr const char* op = "adam_rows";
  const int64_t target = check_catch_up_args(op, tables, state, last_step, catchup, step_counter);
  return Run(CatchUpArgs{tables, state, last_step, catchup, target, 0, 0, check_rows(op, rows, tables[0])});
}


// The shape of `num` rows of `table`: [num] or [num, D].
inline std::vector<int64_t> rows_shape(const at::Tensor& table, int64_t num) {
  std::vector<int64_t> shape{num};
  if (table.dim() == 2) shape.push_back(table.size(1));
  return shape;
}

// The rows [begin, end) that step `step` catches up, so that every row is caught up at least once
// every `window` steps: slice (step - 1) mod window of `window` slices of ceil(num_rows / window).
inline std::pair<int64_t, int64_t> sweep_rows(int64_t num_rows, int64_t window, int64_t step) {
  const int64_t slice = (num_rows + window - 1) / window;
  const int64_t begin = std::min(num_rows, ((step - 1) % window) * slice);
  return {begin, std::min(num_rows, begin + slice)};
}

}  // namespace deepfm_fast
