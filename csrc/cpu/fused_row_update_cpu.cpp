// CPU kernels of fused_row_update and adam_catch_up: the optimizer step on the touched rows of one
// or more tables that share the ids (the embedding table and the first-order weights), in place.
// The ids are unique (sorted, as embedding_fm_backward returns them), so rows are split between
// threads with no two threads on one row and no atomics. Each id's rows of every table are updated
// in one visit, so that a packed record (EmbeddingFM's layout) is read and written once.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <vector>

#include "cpu/parallel.h"
#include "cpu/prefetch.h"
#include "fused_row_update_checks.h"

namespace deepfm_fast {
namespace {

// Rows of a large table are cache (and TLB) misses: touching the rows a few ids ahead lets their
// loads overlap with the update of the current row instead of stalling one after the other.
constexpr int64_t kPrefetchDistance = 8;

// One table of an update, with its state (per element, or per row: the rule's kRowState). Each is
// read at row * its row stride (a packed record, or a plain contiguous table).
template <typename scalar_t>
struct TableRef {
  scalar_t* weight;
  at::opmath_type<scalar_t>* state0;
  at::opmath_type<scalar_t>* state1;
  int64_t dim;
  int64_t stride, state0_stride, state1_stride;

  scalar_t* row(int64_t r) const { return weight + r * stride; }
  at::opmath_type<scalar_t>* row_state0(int64_t r) const { return state0 + r * state0_stride; }
  at::opmath_type<scalar_t>* row_state1(int64_t r) const { return state1 + r * state1_stride; }
};

template <typename scalar_t>
std::vector<TableRef<scalar_t>> table_refs(at::TensorList tables, at::TensorList state, int64_t states_per_table) {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<TableRef<scalar_t>> refs;
  for (size_t t = 0; t < tables.size(); ++t) {
    const at::TensorList s = state.slice(t * states_per_table, states_per_table);
    refs.push_back({tables[t].mutable_data_ptr<scalar_t>(), s.size() > 0 ? s[0].mutable_data_ptr<acc_t>() : nullptr,
                    s.size() > 1 ? s[1].mutable_data_ptr<acc_t>() : nullptr, table_width(tables[t]),
                    tables[t].stride(0), s.size() > 0 ? s[0].stride(0) : 0, s.size() > 1 ? s[1].stride(0) : 0});
  }
  return refs;
}

// Adam: the elements of row `row` of table `t` after the missed steps of catch-up entry `entry`.
template <typename scalar_t>
void catch_up_row(const TableRef<scalar_t>& t, int64_t row, const double* entry) {
  using acc_t = at::opmath_type<scalar_t>;
  const CatchUp<acc_t> c = catch_up_coefficients<acc_t>(entry);
  scalar_t* value = t.row(row);
  acc_t* m = t.row_state0(row);
  acc_t* v = t.row_state1(row);
  for (int64_t k = 0; k < t.dim; ++k)
    value[k] = static_cast<scalar_t>(catch_up_element<acc_t>(static_cast<acc_t>(value[k]), m + k, v + k, c));
}

// Every table's row of each id in one pass: with the packed layout that is one visit of one record
// per id. grads[t] holds table t's row gradients, one row per id.
template <class Rule, typename scalar_t>
void update_rows(const std::vector<TableRef<scalar_t>>& refs, const std::vector<const scalar_t*>& grads,
                 const int64_t* ids, int64_t num_ids, const RowUpdateParams<at::opmath_type<scalar_t>>& params,
                 const CatchUpState& adam, int64_t step) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, num_ids, grain_size(refs[0].dim), [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      if (u + kPrefetchDistance < end) {
        const int64_t ahead = ids[u + kPrefetchDistance];
        for (const auto& t : refs) {
          prefetch_lines<1>(t.row(ahead), t.dim * sizeof(scalar_t));
          if (t.state0) prefetch_lines<1>(t.row_state0(ahead), (Rule::kRowState == 0 ? 1 : t.dim) * sizeof(acc_t));
          if (t.state1) prefetch_lines<1>(t.row_state1(ahead), (Rule::kRowState == 1 ? 1 : t.dim) * sizeof(acc_t));
        }
        if constexpr (Rule::kCatchesUp)
          prefetch_lines<1>(adam.last_step + ahead * adam.last_step_stride, sizeof(int64_t));
      }
      const int64_t row = ids[u];
      int64_t missed = 0;
      if constexpr (Rule::kCatchesUp)
        missed = checked_missed_steps("fused_row_update", row, adam.last_step[row * adam.last_step_stride], step - 1,
                                      adam.window);
      for (size_t t = 0; t < refs.size(); ++t) {
        const TableRef<scalar_t>& ref = refs[t];
        if (Rule::kCatchesUp && missed > 0) catch_up_row(ref, row, adam.table + missed * kCatchUpColumns);
        update_row<Rule>(ref.row(row), grads[t] + u * ref.dim, ref.state0 ? ref.row_state0(row) : nullptr,
                         ref.state1 ? ref.row_state1(row) : nullptr, ref.dim, params);
      }
      if constexpr (Rule::kCatchesUp) adam.last_step[row * adam.last_step_stride] = step;
    }
  });
}

// Adam: every row of [begin, end) that is behind step `target` is caught up to it with the table
// after that step (entry target - last_step[row] <= window).
template <typename scalar_t>
void catch_up_rows(const std::vector<TableRef<scalar_t>>& refs, const CatchUpState& adam, int64_t target,
                   int64_t begin, int64_t end) {
  at::parallel_for(begin, end, grain_size(8 * refs[0].dim), [&](int64_t lo, int64_t hi) {
    for (int64_t row = lo; row < hi; ++row) {
      int64_t& last = adam.last_step[row * adam.last_step_stride];
      const int64_t missed = checked_missed_steps("adam_catch_up", row, last, target, adam.window);
      if (missed <= 0) continue;
      for (const auto& t : refs) catch_up_row(t, row, adam.table + missed * kCatchUpColumns);
      last = target;
    }
  });
}

// The table after step `step` from the table after step - 1, in place: entry j reads the old entry
// j - 1, kept aside before it is overwritten. The powers of the betas by running products.
void advance_catch_up_table(double* catchup, int64_t window, const CatchUpStep& s) {
  std::array<double, kCatchUpColumns> prev{}, old{};
  const double inv_sqrt_beta2 = 1.0 / std::sqrt(s.beta2);
  double beta1_j = 1.0, beta2_j = 1.0, inv_sqrt_beta2_j = 1.0;
  for (int64_t j = 0; j <= window; ++j) {
    double* entry = catchup + j * kCatchUpColumns;
    std::copy(entry, entry + kCatchUpColumns, old.begin());
    advance_catch_up_entry(j > 0 ? prev.data() : nullptr, entry, j, s, beta1_j, beta2_j, inv_sqrt_beta2_j);
    prev = old;
    beta1_j *= s.beta1;
    beta2_j *= s.beta2;
    inv_sqrt_beta2_j *= inv_sqrt_beta2;
  }
}

void fused_row_update_cpu(const RowUpdateArgs& call) {
  const at::TensorList tables = call.tables, state = call.state;
  const double lr = call.lr, eps = call.eps, beta1 = call.beta1, beta2 = call.beta2;
  const int64_t num_ids = call.num_ids, num_rows = call.num_rows;
  const int64_t* id = call.ids.const_data_ptr<int64_t>();
  // Unique and in range: one pass, before any row is written.
  if (call.check_ids)
    for (int64_t u = 0; u < num_ids; ++u) check_row_id(u, id[u], u > 0 ? id[u - 1] : 0, num_rows);
  const int64_t step = ++*call.counter;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tables[0].scalar_type(), "fused_row_update_cpu", [&] {
    std::vector<const scalar_t*> grad_ptr;
    for (const auto& g : call.row_grads) grad_ptr.push_back(g.const_data_ptr<scalar_t>());
    dispatch_row_optimizer(call.optimizer, [&](auto rule) {
      using Rule = decltype(rule);
      const auto params =
          make_row_update_params<Rule, at::opmath_type<scalar_t>>(lr, eps, beta1, beta2, call.weight_decay, step);
      const auto refs = table_refs<scalar_t>(tables, state, Rule::kStates);
      const CatchUpState adam = catch_up_state<Rule>(call.last_step, call.catchup);
      update_rows<Rule>(refs, grad_ptr, id, num_ids, params, adam, step);
      if constexpr (Rule::kCatchesUp) {
        advance_catch_up_table(adam.table, adam.window, make_catch_up_step(lr, eps, beta1, beta2, step));
        const auto [begin, end] = sweep_rows(num_rows, adam.window, step);
        catch_up_rows(refs, adam, step, begin, end);
      }
    });
  });
}

void adam_catch_up_cpu(const CatchUpArgs& call) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, call.tables[0].scalar_type(), "adam_catch_up_cpu", [&] {
    catch_up_rows(table_refs<scalar_t>(call.tables, call.state, optim::Adam::kStates),
                  catch_up_state(call.last_step, call.catchup), call.target, call.begin, call.end);
  });
}

std::vector<at::Tensor> adam_rows_cpu(const CatchUpArgs& call) {
  constexpr const char* op = "adam_rows";
  const int64_t num = call.rows.numel(), num_rows = call.tables[0].size(0);
  const int64_t* row = call.rows.const_data_ptr<int64_t>();
  for (int64_t u = 0; u < num; ++u)
    TORCH_CHECK(row[u] >= 0 && row[u] < num_rows, op, ": rows[", u, "] = ", row[u], " is out of range for tables with ",
                num_rows, " rows");
  std::vector<at::Tensor> out;
  for (const auto& table : call.tables) out.push_back(at::empty(rows_shape(table, num), table.options()));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, call.tables[0].scalar_type(), "adam_rows_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto refs = table_refs<scalar_t>(call.tables, call.state, optim::Adam::kStates);
    const CatchUpState adam = catch_up_state(call.last_step, call.catchup);
    std::vector<scalar_t*> out_ptr;
    for (const auto& o : out) out_ptr.push_back(o.mutable_data_ptr<scalar_t>());
    at::parallel_for(0, num, grain_size(8 * refs[0].dim), [&](int64_t lo, int64_t hi) {
      for (int64_t u = lo; u < hi; ++u) {
        if (u + kPrefetchDistance < hi) {  // each row is a cache miss in every array: overlap them
          const int64_t ahead = row[u + kPrefetchDistance];
          prefetch_lines(adam.last_step + ahead * adam.last_step_stride, sizeof(int64_t));
          for (const auto& ref : refs) {
            prefetch_lines(ref.row(ahead), ref.dim * sizeof(scalar_t));
            prefetch_lines(ref.row_state0(ahead), ref.dim * sizeof(acc_t));
            prefetch_lines(ref.row_state1(ahead), ref.dim * sizeof(acc_t));
          }
        }
        const int64_t r = row[u];
        const int64_t missed =
            checked_missed_steps(op, r, adam.last_step[r * adam.last_step_stride], call.target, adam.window);
        for (size_t t = 0; t < refs.size(); ++t) {
          const auto& ref = refs[t];
          scalar_t* dst = out_ptr[t] + u * ref.dim;
          const scalar_t* src = ref.row(r);
          if (missed <= 0) {
            std::copy(src, src + ref.dim, dst);
            continue;
          }
          const CatchUp<acc_t> c = catch_up_coefficients<acc_t>(adam.table + missed * kCatchUpColumns);
          const acc_t* m0 = ref.row_state0(r);
          const acc_t* v0 = ref.row_state1(r);
          for (int64_t k = 0; k < ref.dim; ++k) {
            acc_t m = m0[k], v = v0[k];  // copies: the call.state stays
            dst[k] = static_cast<scalar_t>(catch_up_element<acc_t>(static_cast<acc_t>(src[k]), &m, &v, c));
          }
        }
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(deepfm_fast, CPU, m) {
  m.impl("fused_row_update", &fused_row_update_op<fused_row_update_cpu>);
  m.impl("adam_catch_up", &adam_catch_up_op<adam_catch_up_cpu>);
  m.impl("adam_rows", &adam_rows_op<adam_rows_cpu>);
}

}  // namespace deepfm_fast
