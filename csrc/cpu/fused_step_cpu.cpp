// The backward of embedding_fm_step on the CPU in one pass over the occurrences, for inputs with
// one id per bag (the [B, F] layout, or CSR whose every bag holds one id) and no per-sample weights.
//
// With one id per bag the forward's field vector is the row itself, e_f = V[id] (pooled), so the
// gradient of an occurrence is D = g_fm * (S - e_f) + g_pooled[f] (S the sample's sum of field
// vectors) and its first-order gradient g_lin: no table row is read. Each occurrence's D is added
// into the accumulator of its row, in position order, so the summed gradient of a row is the very
// sum that embedding_fm_backward gives (same operations, same order: bitwise equal), without its
// [nnz, K] intermediate or its sort. The rows are then updated by fused_row_update (one
// read-modify-write of each touched record, the optimizer's single definition), so Adam's
// catch-up and every optimizer behave exactly as on the general path.
//
// Deduplication: a stable radix sort of (id, position) keys (cpu/coalesce.h) into workspaces, so
// that the rows are updated in id order (sorted rows are read-modify-written up to 2.5x faster
// than the same rows in a random order on a large table) and each row's occurrences are summed in
// position order. The sums run in parallel over the distinct rows: no two threads write one row,
// and the result does not depend on the number of threads.
//
// Workspaces: the sort's arrays and the accumulators live in a thread_local Workspace of the
// calling thread that only grows (no allocation, hence no page faults, once warm). Safe for
// threads (each caller has its own), for autograd (nothing it holds outlives a call) and for
// re-entrancy (the only op called while it is in use is fused_row_update, which never calls back).
// The memory (about nnz * (K + 5) floats) stays with the thread until it exits.
//
// Anything else (multi-id or empty bags, no pooled) takes the general path: embedding_fm_backward,
// then fused_row_update.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/from_blob.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "checks.h"
#include "cpu/coalesce.h"
#include "cpu/parallel.h"
#include "dispatch.h"

namespace deepfm_fast {
namespace {

constexpr const char* kOp = "embedding_fm_step_update";

struct Workspace {
  std::vector<uint64_t> keys, scratch;  // (id << 32 | position), sorted by id
  std::vector<int64_t> segment;         // [U + 1] the occurrences of distinct row u: keys[segment[u]..segment[u+1])
  std::vector<int64_t> ids;             // [U] the distinct rows (of the tables)
  std::vector<double> sums;             // [B, K] the samples' S (as float or double)
  std::vector<double> grads;            // [U, K] the rows' summed gradients
  std::vector<double> linear;           // [U]
};

template <typename T>
T* grown(std::vector<double>& buffer, int64_t count) {
  const size_t doubles = (static_cast<size_t>(count) * sizeof(T) + sizeof(double) - 1) / sizeof(double);
  if (buffer.size() < doubles) buffer.resize(doubles);
  return reinterpret_cast<T*>(buffer.data());
}

template <typename T>
void grow(std::vector<T>& buffer, int64_t count) {
  if (static_cast<int64_t>(buffer.size()) < count) buffer.resize(count);
}

// Every bag holds exactly one id: offsets == arange(B * F + 1).
template <typename index_t>
bool one_id_per_bag(const index_t* offsets, int64_t count) {
  for (int64_t i = 0; i < count; ++i)
    if (static_cast<int64_t>(offsets[i]) != i) return false;
  return true;
}

template <typename index_t>
void check_ids(const index_t* ids, int64_t nnz, int64_t rows) {
  for (int64_t p = 0; p < nnz; ++p) {
    const int64_t id = static_cast<int64_t>(ids[p]);
    TORCH_CHECK(id >= 0 && id < rows, kOp, ": indices[", p, "] = ", id, " is out of range for weight with ", rows,
                " rows (valid ids are 0..", rows - 1, ")");
  }
}

// Row u's gradient: the gradients of its occurrences summed in position order, exactly as
// embedding_fm_backward sums them; the first-order gradient likewise.
template <typename scalar_t, int64_t kStaticDim>
void accumulate_rows(const Workspace& ws, int64_t unique, uint32_t fields, int64_t dynamic_dim,
                     const scalar_t* pooled, const scalar_t* sums, const scalar_t* g_fm, const scalar_t* g_lin,
                     const scalar_t* g_pooled, scalar_t* grads, scalar_t* linear) {
  constexpr int64_t kAhead = 24;  // the occurrences' pooled rows are scattered: fetch them early
  const int64_t dim = kStaticDim > 0 ? kStaticDim : dynamic_dim;
  const uint64_t* keys = ws.keys.data();
  const int64_t* segment = ws.segment.data();
  const int64_t nnz = segment[unique];
  at::parallel_for(0, unique, grain_size(4 * dim), [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      scalar_t* acc = grads + u * dim;
      for (int64_t k = 0; k < dim; ++k) acc[k] = scalar_t(0);
      scalar_t lin = 0;
      for (int64_t q = segment[u]; q < segment[u + 1]; ++q) {
        if (q + kAhead < nnz) {
          const uint32_t ahead = static_cast<uint32_t>(keys[q + kAhead]);
          __builtin_prefetch(pooled + ahead * dim);
          if (g_pooled != nullptr) __builtin_prefetch(g_pooled + ahead * dim);
        }
        const uint32_t p = static_cast<uint32_t>(keys[q]);
        const uint32_t b = p / fields;
        const scalar_t g = g_fm[b];
        const scalar_t* s = sums + b * dim;
        const scalar_t* e = pooled + int64_t(p) * dim;
        if (g_pooled != nullptr) {
          const scalar_t* gp = g_pooled + int64_t(p) * dim;
          for (int64_t k = 0; k < dim; ++k) acc[k] += g * (s[k] - e[k]) + gp[k];
        } else {
          for (int64_t k = 0; k < dim; ++k) acc[k] += g * (s[k] - e[k]) + scalar_t(0);
        }
        lin += g_lin[b];
      }
      linear[u] = lin;
    }
  });
}

// The distinct ids in order (ws.ids, mapped through `rows` when the forward read a subset) and
// the occurrences of each (ws.segment over ws.keys).
template <typename index_t>
void coalesce_into(Workspace& ws, const index_t* ids, int64_t nnz, int64_t num_rows, const int64_t* rows) {
  ws.keys.resize(nnz);
  ws.scratch.resize(nnz);
  for (int64_t p = 0; p < nnz; ++p) ws.keys[p] = (static_cast<uint64_t>(ids[p]) << 32) | static_cast<uint64_t>(p);
  detail::radix_sort(ws.keys, ws.scratch, detail::id_bits(num_rows), [](uint64_t x) { return x >> 32; });
  ws.segment.clear();
  ws.ids.clear();
  for (int64_t q = 0; q < nnz; ++q) {
    const int64_t id = static_cast<int64_t>(ws.keys[q] >> 32);
    if (q == 0 || id != static_cast<int64_t>(ws.keys[q - 1] >> 32)) {
      ws.segment.push_back(q);
      ws.ids.push_back(rows ? rows[id] : id);
    }
  }
  ws.segment.push_back(nnz);
}

using FusedRowUpdate = void(at::TensorList, at::TensorList, const at::Tensor&, at::TensorList, const at::Tensor&,
                            int64_t, double, double, double, double, double, const c10::optional<at::Tensor>&,
                            const c10::optional<at::Tensor>&, bool);

void embedding_fm_step_update_cpu(const at::Tensor& grad_fm_in, const at::Tensor& grad_linear_in,
                                  const c10::optional<at::Tensor>& grad_pooled_in,
                                  const c10::optional<at::Tensor>& pooled_in, at::Tensor& weight,
                                  at::Tensor& linear_weight, const at::Tensor& indices_in,
                                  const at::Tensor& offsets_in, int64_t num_fields, int64_t mode,
                                  at::IntArrayRef pooling, const c10::optional<at::Tensor>& rows_in,
                                  const c10::optional<at::Tensor>& row_weight,
                                  const c10::optional<at::Tensor>& row_linear_weight, at::TensorList state,
                                  at::Tensor& step, const c10::optional<at::Tensor>& last_step,
                                  const c10::optional<at::Tensor>& catchup, int64_t optimizer, double lr, double eps,
                                  double beta1, double beta2, double weight_decay) {
  TORCH_CHECK(rows_in.has_value() == row_weight.has_value() && rows_in.has_value() == row_linear_weight.has_value(),
              kOp, ": rows, row_weight and row_linear_weight come together or not at all");
  const at::Tensor& read = rows_in ? *row_weight : weight;
  const at::Tensor& read_linear = rows_in ? *row_linear_weight : linear_weight;
  const EmbeddingFMArgs p = prepare_embedding_fm_args(kOp, read, indices_in, offsets_in, c10::nullopt, read_linear,
                                                      num_fields, mode, pooling);
  check_embedding_fm_backward_args(grad_fm_in, grad_linear_in, grad_pooled_in, pooled_in, p.weight, p.batch,
                                   num_fields);
  at::Tensor rows;
  if (rows_in) {
    rows = rows_in->contiguous();
    TORCH_CHECK(rows.scalar_type() == at::kLong && rows.dim() == 1 && rows.numel() == read.size(0), kOp,
                ": rows must be int64 [", read.size(0), "] (one per row of row_weight), got ", rows.scalar_type(), " ",
                rows.sizes());
  }
  static const auto update = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("deepfm_fast::fused_row_update", "")
                                 .typed<FusedRowUpdate>();
  const std::vector<at::Tensor> tables = {weight, linear_weight};
  const int64_t nnz = p.indices.numel(), dim = p.weight.size(1);
  const bool has_pooled = pooled_in.has_value() && pooled_in->numel() > 0;
  const bool float_table = p.weight.scalar_type() == at::kFloat || p.weight.scalar_type() == at::kDouble;
  // (id << 32 | position) keys: up to 2^32 rows and ids.
  bool one_pass = has_pooled && float_table && p.weight.size(0) <= (int64_t(1) << 32) && nnz < (int64_t(1) << 32);
  AT_DISPATCH_INDEX_TYPES(p.indices.scalar_type(), kOp, [&] {
    check_ids(p.indices.const_data_ptr<index_t>(), nnz, p.weight.size(0));
    one_pass = one_pass && one_id_per_bag(p.offsets.const_data_ptr<index_t>(), p.offsets.numel());
  });
  if (!one_pass) {  // the general path
    static const auto backward = c10::Dispatcher::singleton()
                                     .findSchemaOrThrow("deepfm_fast::embedding_fm_backward", "")
                                     .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                                         const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                                         const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&, int64_t,
                                         int64_t, at::IntArrayRef, const c10::optional<at::Tensor>&, bool)>();
    auto [ids, row_grads, linear_row_grads, unused] =
        backward.call(grad_fm_in, grad_linear_in, grad_pooled_in, read, indices_in, offsets_in, c10::nullopt,
                      read_linear, num_fields, mode, pooling, pooled_in, false);
    if (rows_in) ids = rows.index_select(0, ids);
    update.call(tables, state, ids, {row_grads, linear_row_grads}, step, optimizer, lr, eps, beta1, beta2,
                weight_decay, last_step, catchup, false);
    return;
  }
  // A reference: inside the parallel regions the name of a thread_local would be the worker's own.
  thread_local Workspace workspace;
  Workspace& ws = workspace;
  const at::Tensor pooled = pooled_in->contiguous();
  const at::Tensor grad_fm = grad_fm_in.contiguous(), grad_linear = grad_linear_in.contiguous();
  const bool has_grad_pooled = grad_pooled_in.has_value() && grad_pooled_in->numel() > 0;
  const at::Tensor grad_pooled = has_grad_pooled ? grad_pooled_in->contiguous() : at::Tensor();
  at::Tensor ids, row_grads, linear_row_grads;
  AT_DISPATCH_FLOATING_TYPES(p.weight.scalar_type(), kOp, [&] {
    AT_DISPATCH_INDEX_TYPES(p.indices.scalar_type(), kOp, [&] {
      const scalar_t* e = pooled.const_data_ptr<scalar_t>();
      scalar_t* sums = grown<scalar_t>(ws.sums, p.batch * dim);
      // S of each sample, summed over its fields in order as the general backward does.
      at::parallel_for(0, p.batch, std::max<int64_t>(1, 2048 / num_fields), [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          scalar_t* s = sums + b * dim;
          std::fill(s, s + dim, scalar_t(0));
          for (int64_t f = 0; f < num_fields; ++f) {
            const scalar_t* row = e + (b * num_fields + f) * dim;
            for (int64_t k = 0; k < dim; ++k) s[k] += row[k];
          }
        }
      });
      coalesce_into(ws, p.indices.const_data_ptr<index_t>(), nnz, p.weight.size(0),
                    rows_in ? rows.const_data_ptr<int64_t>() : nullptr);
      const int64_t unique = static_cast<int64_t>(ws.ids.size());
      scalar_t* grads = grown<scalar_t>(ws.grads, unique * dim);
      scalar_t* linear = grown<scalar_t>(ws.linear, unique);
      dispatch_embedding_dim(dim, [&](auto static_dim) {
        accumulate_rows<scalar_t, static_dim.value>(
            ws, unique, static_cast<uint32_t>(num_fields), dim, e, sums, grad_fm.const_data_ptr<scalar_t>(),
            grad_linear.const_data_ptr<scalar_t>(), has_grad_pooled ? grad_pooled.const_data_ptr<scalar_t>() : nullptr,
            grads, linear);
      });
      const auto options = p.weight.options();
      ids = at::from_blob(ws.ids.data(), {unique}, options.dtype(at::kLong));
      row_grads = at::from_blob(grads, {unique, dim}, options);
      linear_row_grads = at::from_blob(linear, {unique}, options);
    });
  });
  update.call(tables, state, ids, {row_grads, linear_row_grads}, step, optimizer, lr, eps, beta1, beta2, weight_decay,
              last_step, catchup, false);
}

}  // namespace

TORCH_LIBRARY_IMPL(deepfm_fast, CPU, m) { m.impl("embedding_fm_step_update", &embedding_fm_step_update_cpu); }

}  // namespace deepfm_fast
