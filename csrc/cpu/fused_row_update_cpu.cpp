// CPU kernel of fused_row_update: the optimizer step on the touched rows of one or more tables that
// share the ids (the embedding table and the first-order weights), in place. The ids are unique
// (sorted, as embedding_fm_backward returns them), so rows are split between threads with no two
// threads on one row and no atomics. Tables are updated one after the other: measured here, one
// pass over both tables per row was no faster and made the row-wise Adagrad pass 2.5x slower.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/parallel.h"
#include "fused_row_update_checks.h"

namespace deepfm_fast {
namespace {

// Rows of a large table are cache (and TLB) misses: touching the rows a few ids ahead lets their
// loads overlap with the update of the current row instead of stalling one after the other.
constexpr int64_t kPrefetchDistance = 8;

inline void prefetch_for_write(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t offset = 0; offset < bytes; offset += 64) __builtin_prefetch(c + offset, 1, 1);
}

template <int64_t kOptimizer, typename scalar_t>
void update_rows(scalar_t* weight, at::TensorList state, const int64_t* ids, const scalar_t* row_grads,
                 int64_t num_ids, int64_t dim, const RowUpdateParams<at::opmath_type<scalar_t>>& params) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t* state0 = state.size() > 0 ? state[0].mutable_data_ptr<acc_t>() : nullptr;
  acc_t* state1 = state.size() > 1 ? state[1].mutable_data_ptr<acc_t>() : nullptr;
  at::parallel_for(0, num_ids, grain_size(dim), [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      if (u + kPrefetchDistance < end) {
        const int64_t ahead = ids[u + kPrefetchDistance];
        prefetch_for_write(weight + ahead * dim, dim * sizeof(scalar_t));
        if (state0) prefetch_for_write(state0 + ahead * (kOptimizer == kRowWiseAdagrad ? 1 : dim),
                                       (kOptimizer == kRowWiseAdagrad ? 1 : dim) * sizeof(acc_t));
        if (state1) prefetch_for_write(state1 + ahead * dim, dim * sizeof(acc_t));
      }
      const int64_t row = ids[u];
      scalar_t* value = weight + row * dim;
      const scalar_t* grad = row_grads + u * dim;
      if constexpr (kOptimizer == kRowWiseAdagrad) {
        acc_t sum_sq = acc_t(0);
        for (int64_t k = 0; k < dim; ++k) {
          const acc_t g = decayed_grad<acc_t>(grad[k], value[k], params);
          sum_sq += g * g;
        }
        const acc_t multiplier = rowwise_adagrad_multiplier<acc_t>(state0 + row, sum_sq, dim, params);
        for (int64_t k = 0; k < dim; ++k) {
          const acc_t v = value[k];
          value[k] = static_cast<scalar_t>(v - multiplier * decayed_grad<acc_t>(grad[k], v, params));
        }
      } else {
        acc_t* s0 = state0 ? state0 + row * dim : nullptr;
        acc_t* s1 = state1 ? state1 + row * dim : nullptr;
        for (int64_t k = 0; k < dim; ++k) {
          const acc_t v = value[k];
          const acc_t g = decayed_grad<acc_t>(grad[k], v, params);
          value[k] = static_cast<scalar_t>(
              update_element<kOptimizer, acc_t>(v, g, s0 ? s0 + k : nullptr, s1 ? s1 + k : nullptr, params));
        }
      }
    }
  });
}

void fused_row_update_cpu(at::TensorList tables, at::TensorList state, const at::Tensor& ids_in,
                          at::TensorList row_grads, int64_t optimizer, double lr, double eps, double beta1,
                          double beta2, double weight_decay, int64_t step) {
  check_fused_row_update_args(tables, state, ids_in, row_grads, optimizer, step);
  const at::Tensor ids = ids_in.contiguous();
  const int64_t num_ids = ids.numel(), num_rows = tables[0].size(0);
  const int64_t* id = ids.const_data_ptr<int64_t>();
  // Unique and in range: one pass, before any row is written.
  for (int64_t u = 0; u < num_ids; ++u) check_row_id(u, id[u], u > 0 ? id[u - 1] : 0, num_rows);
  if (num_ids == 0) return;
  const int64_t states_per_table = row_optimizer_states(optimizer);
  for (size_t t = 0; t < tables.size(); ++t) {
    const at::Tensor& weight = tables[t];
    const at::Tensor grads = row_grads[t].contiguous();
    const int64_t dim = weight.size(1);
    const at::TensorList table_state = state.slice(t * states_per_table, states_per_table);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "fused_row_update_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const auto params = make_row_update_params<acc_t>(lr, eps, beta1, beta2, weight_decay, optimizer, step);
      scalar_t* w = weight.mutable_data_ptr<scalar_t>();
      const scalar_t* g = grads.const_data_ptr<scalar_t>();
      switch (optimizer) {
        case kSGD: return update_rows<kSGD>(w, table_state, id, g, num_ids, dim, params);
        case kRowWiseAdagrad: return update_rows<kRowWiseAdagrad>(w, table_state, id, g, num_ids, dim, params);
        case kAdagrad: return update_rows<kAdagrad>(w, table_state, id, g, num_ids, dim, params);
        default: return update_rows<kAdam>(w, table_state, id, g, num_ids, dim, params);
      }
    });
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(deepfm_fast, CPU, m) { m.impl("fused_row_update", &fused_row_update_cpu); }

}  // namespace deepfm_fast
