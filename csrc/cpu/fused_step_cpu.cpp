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
// Deduplication: the ids are split between P partitions by a hash (P = the intra-op threads);
// each partition owns an open-addressing table id -> slot, numbers its rows in order of first
// occurrence and accumulates its own rows' occurrences in position order. The result does not
// depend on P or on scheduling (each row's sum has one order), and no two threads write one row.
// The rows are updated in slot order: each row's update is independent of the others'.
//
// Workspaces: the hash tables and the accumulators live in a thread_local Workspace of the
// calling thread that only grows (no allocation, hence no page faults, once warm). Safe for
// threads (each caller has its own), for autograd (nothing it holds outlives a call) and for
// re-entrancy (the only op called while it is in use is fused_row_update, which never calls back).
// The memory (about nnz * (K + 6) floats) stays with the thread until it exits.
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
#include "dispatch.h"

namespace deepfm_fast {
namespace {

constexpr const char* kOp = "embedding_fm_step_update";

// One partition's id -> slot table (linear probing; keys -1 when free, restored after each call).
struct Partition {
  std::vector<int64_t> keys;
  std::vector<int32_t> slots;
  std::vector<int64_t> filled;  // the buckets used in this call, to free them again
  std::vector<int64_t> ids;     // this call's distinct ids, in slot order
  int64_t base = 0;             // first slot of the partition in the concatenated rows
};

struct Workspace {
  std::vector<Partition> parts;
  std::vector<int32_t> slot_of;  // [nnz] the occurrence's slot in its partition
  std::vector<uint8_t> part_of;  // [nnz] the occurrence's partition
  std::vector<double> sums;      // [B, K] the samples' S (as float or double)
  std::vector<double> grads;     // [U, K] the rows' summed gradients
  std::vector<double> linear;    // [U]
  std::vector<int64_t> ids;      // [U]
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

inline uint64_t mix(int64_t id) { return static_cast<uint64_t>(id) * 0x9E3779B97F4A7C15ull; }

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

// Numbers the distinct ids of partition t in order of first occurrence (slot_of, part.ids).
template <typename index_t>
void number_rows(Workspace& ws, int t, const index_t* ids, int64_t nnz) {
  Partition& part = ws.parts[t];
  int64_t owned = 0;
  for (int64_t p = 0; p < nnz; ++p) owned += ws.part_of[p] == t;
  int bits = 4;
  while ((int64_t(1) << bits) < 2 * owned) ++bits;  // load factor <= 1/2
  const int64_t capacity = int64_t(1) << bits, mask = capacity - 1;
  if (static_cast<int64_t>(part.keys.size()) < capacity) {
    part.keys.assign(capacity, -1);
    part.slots.resize(capacity);
  }
  part.ids.clear();
  part.filled.clear();
  int64_t* keys = part.keys.data();
  int32_t* slots = part.slots.data();
  for (int64_t p = 0; p < nnz; ++p) {
    if (ws.part_of[p] != t) continue;
    const int64_t id = static_cast<int64_t>(ids[p]);
    int64_t b = static_cast<int64_t>(mix(id) >> (64 - bits));
    while (keys[b] != id && keys[b] >= 0) b = (b + 1) & mask;
    if (keys[b] < 0) {
      keys[b] = id;
      slots[b] = static_cast<int32_t>(part.ids.size());
      part.ids.push_back(id);
      part.filled.push_back(b);
    }
    ws.slot_of[p] = slots[b];
  }
}

// Partition t's rows: ids (mapped through `rows` when the forward read a subset) and gradients,
// summed over the occurrences in position order exactly as embedding_fm_backward sums them.
template <typename scalar_t, int64_t kStaticDim>
void accumulate_rows(Workspace& ws, int t, int64_t nnz, int64_t fields, int64_t dynamic_dim, const scalar_t* pooled,
                     const scalar_t* sums, const scalar_t* g_fm, const scalar_t* g_lin, const scalar_t* g_pooled,
                     const int64_t* rows, scalar_t* grads, scalar_t* linear, int64_t* out_ids) {
  const int64_t dim = kStaticDim > 0 ? kStaticDim : dynamic_dim;
  Partition& part = ws.parts[t];
  const int64_t count = static_cast<int64_t>(part.ids.size());
  std::fill(grads + part.base * dim, grads + (part.base + count) * dim, scalar_t(0));
  std::fill(linear + part.base, linear + part.base + count, scalar_t(0));
  for (int64_t u = 0; u < count; ++u) out_ids[part.base + u] = rows ? rows[part.ids[u]] : part.ids[u];
  for (int64_t p = 0; p < nnz; ++p) {
    if (ws.part_of[p] != t) continue;
    const int64_t b = p / fields, slot = part.base + ws.slot_of[p];
    const scalar_t g = g_fm[b];
    const scalar_t* s = sums + b * dim;
    const scalar_t* e = pooled + p * dim;
    scalar_t* acc = grads + slot * dim;
    if (g_pooled != nullptr) {
      const scalar_t* gp = g_pooled + p * dim;
      for (int64_t k = 0; k < dim; ++k) acc[k] += g * (s[k] - e[k]) + gp[k];
    } else {
      for (int64_t k = 0; k < dim; ++k) acc[k] += g * (s[k] - e[k]) + scalar_t(0);
    }
    linear[slot] += g_lin[b];
  }
  for (const int64_t b : part.filled) part.keys[b] = -1;
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
  bool one_pass = has_pooled && float_table;
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
  TORCH_CHECK(nnz < (int64_t(1) << 31), kOp, ": more than 2^31 ids in one batch");
  // A reference: inside the parallel regions the name of a thread_local would be the worker's own.
  thread_local Workspace workspace;
  Workspace& ws = workspace;
  const int parts = static_cast<int>(std::clamp<int64_t>(at::get_num_threads(), 1, 64));
  if (static_cast<int>(ws.parts.size()) < parts) ws.parts.resize(parts);
  grow(ws.slot_of, nnz);
  grow(ws.part_of, nnz);
  const at::Tensor pooled = pooled_in->contiguous();
  const at::Tensor grad_fm = grad_fm_in.contiguous(), grad_linear = grad_linear_in.contiguous();
  const bool has_grad_pooled = grad_pooled_in.has_value() && grad_pooled_in->numel() > 0;
  const at::Tensor grad_pooled = has_grad_pooled ? grad_pooled_in->contiguous() : at::Tensor();
  at::Tensor ids, row_grads, linear_row_grads;
  AT_DISPATCH_FLOATING_TYPES(p.weight.scalar_type(), kOp, [&] {
    AT_DISPATCH_INDEX_TYPES(p.indices.scalar_type(), kOp, [&] {
      const index_t* id = p.indices.const_data_ptr<index_t>();
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
      at::parallel_for(0, nnz, 16384, [&](int64_t begin, int64_t end) {
        for (int64_t q = begin; q < end; ++q)
          ws.part_of[q] = static_cast<uint8_t>(parts == 1 ? 0 : (mix(static_cast<int64_t>(id[q])) >> 32) % parts);
      });
      at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t) number_rows(ws, static_cast<int>(t), id, nnz);
      });
      int64_t unique = 0;
      for (int t = 0; t < parts; ++t) {
        ws.parts[t].base = unique;
        unique += static_cast<int64_t>(ws.parts[t].ids.size());
      }
      grow(ws.ids, unique);
      scalar_t* grads = grown<scalar_t>(ws.grads, unique * dim);
      scalar_t* linear = grown<scalar_t>(ws.linear, unique);
      dispatch_embedding_dim(dim, [&](auto static_dim) {
        at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
          for (int64_t t = begin; t < end; ++t)
            accumulate_rows<scalar_t, static_dim.value>(
                ws, static_cast<int>(t), nnz, num_fields, dim, e, sums, grad_fm.const_data_ptr<scalar_t>(),
                grad_linear.const_data_ptr<scalar_t>(),
                has_grad_pooled ? grad_pooled.const_data_ptr<scalar_t>() : nullptr,
                rows_in ? rows.const_data_ptr<int64_t>() : nullptr, grads, linear, ws.ids.data());
        });
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
