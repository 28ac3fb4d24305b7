// CPU kernels of embedding_fm: one pass over the table rows of each sample (gather, pool, FM
// second order, first order, pooled output), parallel over the batch, explicit SIMD over K.
//
// Backward, in two steps:
//   1. per sample (parallel over the batch): recompute the field vectors and S = sum of the
//      sample's vectors (the rows are hot in cache again), and write for every occurrence i the
//      gradient of its row, x_i * D_i, into a [nnz, K] buffer, plus dL/dx_i and g_lin * x_i;
//        field mode:   D_i = s_f * (g_fm * (S - e_f) + g_pooled[f])
//        feature mode: D_i = g_fm * (S - x_i V_i) + s_f * g_pooled[f]
//      with s_f = 1/n_f for a mean-pooled field and 1 otherwise; dL/dx_i = V_i . D_i + g_lin w_i.
//   2. coalesce the ids (stable radix sort, cpu/coalesce.h) and sum each id's occurrences in
//      position order (parallel over unique ids: no two threads write one row; deterministic).
// The result (unique ids, row gradients) is what the dense and sparse gradients and the fused
// optimizers consume.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "checks.h"
#include "cpu/coalesce.h"
#include "cpu/parallel.h"
#include "cpu/prefetch.h"
#include "cpu/simd.h"
#include "dispatch.h"

namespace deepfm_fast {
namespace {

// The smallest i in [0, n) with bad(i), or n; parallel and deterministic.
template <typename Pred>
int64_t first_failure(int64_t n, const Pred& bad) {
  std::atomic<int64_t> first{n};
  at::parallel_for(0, n, 16384, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      if (bad(i)) {
        int64_t current = first.load();
        while (i < current && !first.compare_exchange_weak(current, i)) {
        }
        return;
      }
    }
  });
  return first.load();
}

// offsets[0] == 0, offsets[-1] == nnz, non-decreasing; every id in [0, rows). After this no
// kernel can read out of bounds.
template <typename index_t>
void check_csr_values(const char* op, const index_t* indices, int64_t nnz, const index_t* offsets,
                      int64_t num_offsets, int64_t rows) {
  TORCH_CHECK(offsets[0] == 0, op, ": offsets[0] must be 0, got ", offsets[0]);
  TORCH_CHECK(offsets[num_offsets - 1] == nnz, op, ": offsets[-1] must equal the number of indices (nnz = ", nnz,
              "), got offsets[-1] = offsets[", num_offsets - 1, "] = ", offsets[num_offsets - 1]);
  const int64_t bad_offset = first_failure(num_offsets - 1, [&](int64_t i) { return offsets[i] > offsets[i + 1]; });
  TORCH_CHECK(bad_offset == num_offsets - 1, op, ": offsets must be non-decreasing, but offsets[", bad_offset,
              "] = ", offsets[bad_offset], " > offsets[", bad_offset + 1, "] = ", offsets[bad_offset + 1]);
  const int64_t bad_id = first_failure(nnz, [&](int64_t i) {
    const int64_t id = static_cast<int64_t>(indices[i]);
    return id < 0 || id >= rows;
  });
  TORCH_CHECK(bad_id == nnz, op, ": indices[", bad_id, "] = ", bad_id < nnz ? static_cast<int64_t>(indices[bad_id]) : 0,
              " is out of range for weight with ", rows, " rows (valid ids are 0..", rows - 1, ")");
}

template <typename scalar_t, typename index_t>
struct Inputs {
  const scalar_t* weight;
  int64_t dim;
  int64_t stride;     // of weight's rows (> dim in a packed record)
  int64_t lw_stride;  // of linear_weight's rows
  const index_t* indices;
  const index_t* offsets;
  const scalar_t* psw;  // nullptr: every x_i = 1
  const scalar_t* lw;   // nullptr: no first order
  int64_t batch, fields;
  bool feature_mode;
  const uint8_t* mean;  // [fields], 1 where the field is mean-pooled

  const scalar_t* row(int64_t id) const { return weight + id * stride; }
  scalar_t linear_weight(int64_t id) const { return lw[id * lw_stride]; }
};

// Random rows of a large table are bound by memory latency (one miss per row): the gathers
// prefetch the row of the occurrence kPrefetchAhead positions ahead (and its first-order weight),
// which keeps that many misses in flight instead of the few the out-of-order core finds itself.
constexpr int64_t kPrefetchAhead = 16;

template <typename scalar_t, typename index_t>
inline __attribute__((always_inline)) void prefetch_row(const Inputs<scalar_t, index_t>& in, int64_t id,
                                                        bool with_linear = false) {
  prefetch_lines(in.row(id), in.dim * static_cast<int64_t>(sizeof(scalar_t)));
  if (with_linear && in.lw != nullptr) prefetch_lines(&in.lw[id * in.lw_stride], sizeof(scalar_t));
}

template <typename scalar_t, typename index_t, int64_t kStaticDim>
void forward_kernel(const Inputs<scalar_t, index_t>& in, scalar_t* fm, scalar_t* linear, scalar_t* pooled) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t dim = kStaticDim > 0 ? kStaticDim : in.dim;
  const int64_t fields = in.fields;
  const int64_t nnz = static_cast<int64_t>(in.offsets[in.batch * fields]);
  at::parallel_for(0, in.batch, grain_size(fields * dim), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const index_t* off = in.offsets + b * fields;
      acc_t total = 0;
      simd::for_each_tile<acc_t, tile_vectors<acc_t, kStaticDim>()>(dim, [&](int64_t k0, auto vectors, auto tag) {
        using V = typename decltype(tag)::type;
        constexpr int nv = vectors.value;
        constexpr int lanes = simd::lanes<V>();
        V sum[nv], sq[nv];
        for (int j = 0; j < nv; ++j) sum[j] = sq[j] = V{};
        for (int64_t f = 0; f < fields; ++f) {
          const int64_t start = off[f], stop = off[f + 1];
          V e[nv];
          for (int j = 0; j < nv; ++j) e[j] = V{};
          for (int64_t p = start; p < stop; ++p) {
            if (k0 == 0 && p + kPrefetchAhead < nnz) prefetch_row(in, in.indices[p + kPrefetchAhead], true);
            const acc_t x = in.psw ? static_cast<acc_t>(in.psw[p]) : acc_t(1);
            const scalar_t* row = in.row(static_cast<int64_t>(in.indices[p])) + k0;
            for (int j = 0; j < nv; ++j) {
              const V u = x * simd::load<V>(row + j * lanes);
              e[j] += u;
              if (in.feature_mode) {
                sum[j] += u;
                sq[j] += u * u;
              }
            }
          }
          if (in.mean[f] && stop - start > 1) {
            const acc_t scale = acc_t(1) / static_cast<acc_t>(stop - start);
            for (int j = 0; j < nv; ++j) e[j] *= scale;
          }
          if (!in.feature_mode) {
            for (int j = 0; j < nv; ++j) {
              sum[j] += e[j];
              sq[j] += e[j] * e[j];
            }
          }
          if (pooled != nullptr) {
            scalar_t* out = pooled + (b * fields + f) * dim + k0;
            for (int j = 0; j < nv; ++j) simd::store(out + j * lanes, e[j]);
          }
        }
        V terms = V{};
        for (int j = 0; j < nv; ++j) terms += acc_t(0.5) * (sum[j] * sum[j] - sq[j]);
        total += simd::horizontal_sum(terms);
      });
      fm[b] = static_cast<scalar_t>(total);
      // After the gathers, which prefetched these first-order weights.
      if (in.lw != nullptr) {
        acc_t lin = 0;
        for (int64_t p = off[0]; p < off[fields]; ++p)
          lin += static_cast<acc_t>(in.linear_weight(in.indices[p])) * (in.psw ? static_cast<acc_t>(in.psw[p]) : acc_t(1));
        linear[b] = static_cast<scalar_t>(lin);
      }
    }
  });
}

// Step 1 of the backward: per-occurrence row gradients occ_grad [nnz, dim], dL/dx grad_x [nnz]
// (or nullptr) and first-order row gradients lin_occ [nnz] (or nullptr). occ_grad and lin_occ are
// written in sorted-id order (row rank[p] for occurrence p), so that step 2 reads them sequentially:
// scattered stores do not stall the way scattered loads do. With the forward's `pooled` (field mode,
// full-precision tables) the field vectors are read from it, and the table rows are not read at
// all unless dL/dx is wanted: on a large table each row read is a cache miss.
template <typename scalar_t, typename index_t, int64_t kStaticDim>
void occurrence_grads_kernel(const Inputs<scalar_t, index_t>& in, const scalar_t* g_fm, const scalar_t* g_lin,
                             const scalar_t* g_pooled, const scalar_t* pooled, at::opmath_type<scalar_t>* occ_grad,
                             at::opmath_type<scalar_t>* grad_x, at::opmath_type<scalar_t>* lin_occ,
                             const int64_t* rank) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t dim = kStaticDim > 0 ? kStaticDim : in.dim;
  const int64_t fields = in.fields;
  const int64_t nnz = static_cast<int64_t>(in.offsets[in.batch * fields]);
  at::parallel_for(0, in.batch, grain_size(2 * fields * dim), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> field_vectors(in.feature_mode ? 0 : fields * dim);
    for (int64_t b = begin; b < end; ++b) {
      const index_t* off = in.offsets + b * fields;
      const acc_t g = static_cast<acc_t>(g_fm[b]);
      const acc_t gl = static_cast<acc_t>(g_lin[b]);
      for (int64_t p = off[0]; p < off[fields]; ++p) {
        const acc_t x = in.psw ? static_cast<acc_t>(in.psw[p]) : acc_t(1);
        if (lin_occ != nullptr) lin_occ[rank[p]] = gl * x;
        if (grad_x != nullptr) grad_x[p] = in.lw ? gl * static_cast<acc_t>(in.linear_weight(in.indices[p])) : acc_t(0);
      }
      simd::for_each_tile<acc_t, tile_vectors<acc_t, kStaticDim>()>(dim, [&](int64_t k0, auto vectors, auto tag) {
        using V = typename decltype(tag)::type;
        constexpr int nv = vectors.value;
        constexpr int lanes = simd::lanes<V>();
        auto row_of = [&](int64_t p) { return in.row(static_cast<int64_t>(in.indices[p])) + k0; };
        auto scale_of = [&](int64_t f) {
          const int64_t n = off[f + 1] - off[f];
          return in.mean[f] && n > 1 ? acc_t(1) / static_cast<acc_t>(n) : acc_t(1);
        };
        V sum[nv];
        for (int j = 0; j < nv; ++j) sum[j] = V{};
        for (int64_t f = 0; f < fields; ++f) {
          V e[nv];
          if (pooled != nullptr) {  // the forward's e_f, already scaled for mean pooling
            for (int j = 0; j < nv; ++j) {
              e[j] = simd::load<V>(pooled + (b * fields + f) * dim + k0 + j * lanes);
              simd::store(field_vectors.data() + f * dim + k0 + j * lanes, e[j]);
              sum[j] += e[j];
            }
            continue;
          }
          for (int j = 0; j < nv; ++j) e[j] = V{};
          for (int64_t p = off[f]; p < off[f + 1]; ++p) {
            if (k0 == 0 && p + kPrefetchAhead < nnz) prefetch_row(in, in.indices[p + kPrefetchAhead]);
            const acc_t x = in.psw ? static_cast<acc_t>(in.psw[p]) : acc_t(1);
            const scalar_t* row = row_of(p);
            for (int j = 0; j < nv; ++j) e[j] += x * simd::load<V>(row + j * lanes);
          }
          if (!in.feature_mode) {
            const acc_t s = scale_of(f);
            for (int j = 0; j < nv; ++j) {
              e[j] *= s;
              simd::store(field_vectors.data() + f * dim + k0 + j * lanes, e[j]);
            }
          }
          for (int j = 0; j < nv; ++j) sum[j] += e[j];
        }
        for (int64_t f = 0; f < fields; ++f) {
          const acc_t s = scale_of(f);
          V gp[nv];
          for (int j = 0; j < nv; ++j)
            gp[j] = g_pooled ? simd::load<V>(g_pooled + (b * fields + f) * dim + k0 + j * lanes) : V{};
          V d[nv] = {};  // field mode: D_f; feature mode computes D per occurrence below
          if (!in.feature_mode) {
            for (int j = 0; j < nv; ++j)
              d[j] = s * (g * (sum[j] - simd::load<V>(field_vectors.data() + f * dim + k0 + j * lanes)) + gp[j]);
          }
          for (int64_t p = off[f]; p < off[f + 1]; ++p) {
            const acc_t x = in.psw ? static_cast<acc_t>(in.psw[p]) : acc_t(1);
            acc_t* out = occ_grad + rank[p] * dim + k0;
            if (pooled != nullptr && grad_x == nullptr) {  // field mode: x * D_f needs no table row
              for (int j = 0; j < nv; ++j) simd::store(out + j * lanes, x * d[j]);
              continue;
            }
            const scalar_t* row = row_of(p);
            V dot = V{};
            for (int j = 0; j < nv; ++j) {
              const V v = simd::load<V>(row + j * lanes);
              const V dj = in.feature_mode ? g * (sum[j] - x * v) + s * gp[j] : d[j];
              simd::store(out + j * lanes, x * dj);
              dot += v * dj;
            }
            if (grad_x != nullptr) grad_x[p] += simd::horizontal_sum(dot);
          }
        }
      });
    }
  });
}

// Step 2: row_grads[u] = sum of the (sorted) occ_grad rows of unique id u, in position order.
template <typename scalar_t, int64_t kStaticDim>
void segment_reduce_kernel(const CoalescedIds& c, const at::opmath_type<scalar_t>* occ_grad, int64_t dynamic_dim,
                           const at::opmath_type<scalar_t>* lin_occ, scalar_t* row_grads,
                           scalar_t* linear_row_grads) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t dim = kStaticDim > 0 ? kStaticDim : dynamic_dim;
  at::parallel_for(0, c.num_unique(), grain_size(2 * dim), [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t first = c.segment[u], last = c.segment[u + 1];
      simd::for_each_tile<acc_t, tile_vectors<acc_t, kStaticDim>()>(dim, [&](int64_t k0, auto vectors, auto tag) {
        using V = typename decltype(tag)::type;
        constexpr int nv = vectors.value;
        constexpr int lanes = simd::lanes<V>();
        V acc[nv];
        for (int j = 0; j < nv; ++j) acc[j] = V{};
        for (int64_t q = first; q < last; ++q) {
          const acc_t* src = occ_grad + q * dim + k0;
          for (int j = 0; j < nv; ++j) acc[j] += simd::load<V>(src + j * lanes);
        }
        for (int j = 0; j < nv; ++j) simd::store(row_grads + u * dim + k0 + j * lanes, acc[j]);
      });
      if (linear_row_grads != nullptr) {
        acc_t lin = 0;
        for (int64_t q = first; q < last; ++q) lin += lin_occ[q];
        linear_row_grads[u] = static_cast<scalar_t>(lin);
      }
    }
  });
}

struct Prepared : EmbeddingFMArgs {
  std::vector<uint8_t> mean;  // per field: mean pooling
};

// Checks every argument, values included, then returns contiguous tensors, with indices and
// offsets of one dtype.
Prepared prepare(const char* op, const at::Tensor& weight, const at::Tensor& indices, const at::Tensor& offsets,
                 const c10::optional<at::Tensor>& psw, const c10::optional<at::Tensor>& lw, int64_t num_fields,
                 int64_t mode, at::IntArrayRef pooling) {
  Prepared p{prepare_embedding_fm_args(op, weight, indices, offsets, psw, lw, num_fields, mode, pooling), {}};
  p.mean.resize(num_fields);
  for (int64_t f = 0; f < num_fields; ++f) p.mean[f] = pooling[pooling.size() == 1 ? 0 : f] == kPoolMean;
  AT_DISPATCH_INDEX_TYPES(p.indices.scalar_type(), "embedding_fm_check", [&] {
    check_csr_values(op, p.indices.const_data_ptr<index_t>(), p.indices.numel(), p.offsets.const_data_ptr<index_t>(),
                     p.offsets.numel(), p.weight.size(0));
  });
  return p;
}

template <typename scalar_t, typename index_t>
Inputs<scalar_t, index_t> make_inputs(const Prepared& p, int64_t num_fields, int64_t mode) {
  return Inputs<scalar_t, index_t>{p.weight.const_data_ptr<scalar_t>(),
                                   p.weight.size(1),
                                   p.weight.stride(0),
                                   p.lw ? p.lw->stride(0) : 0,
                                   p.indices.const_data_ptr<index_t>(),
                                   p.offsets.const_data_ptr<index_t>(),
                                   p.psw ? p.psw->const_data_ptr<scalar_t>() : nullptr,
                                   p.lw ? p.lw->const_data_ptr<scalar_t>() : nullptr,
                                   p.batch,
                                   num_fields,
                                   mode == 1,
                                   p.mean.data()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> embedding_fm_cpu(
    const at::Tensor& weight_in, const at::Tensor& indices_in, const at::Tensor& offsets_in,
    const c10::optional<at::Tensor>& psw_in, const c10::optional<at::Tensor>& lw_in, int64_t num_fields,
    int64_t mode, at::IntArrayRef pooling, bool return_pooled, bool /*sparse_grad: the autograd's*/) {
  const Prepared p =
      prepare("embedding_fm", weight_in, indices_in, offsets_in, psw_in, lw_in, num_fields, mode, pooling);
  const int64_t dim = p.weight.size(1);
  const auto launch = [&](auto scalar, auto index, auto* fm, auto* linear, auto* pooled) {
    const auto in = make_inputs<decltype(scalar), decltype(index)>(p, num_fields, mode);
    dispatch_embedding_dim(dim, [&](auto static_dim) {
      forward_kernel<decltype(scalar), decltype(index), static_dim.value>(in, fm, linear, pooled);
    });
  };
  return embedding_fm_outputs(p, num_fields, return_pooled, launch);
}

EmbeddingFMGrads embedding_fm_backward_cpu(const EmbeddingFMBackwardCall& call) {
  const int64_t num_fields = call.num_fields, mode = call.mode;
  const Prepared p = prepare("embedding_fm_backward", call.weight, call.indices, call.offsets, call.psw, call.lw,
                             num_fields, mode, call.pooling);
  check_embedding_fm_backward_args(call.grad_fm, call.grad_linear, call.grad_pooled, call.pooled, p.weight, p.batch,
                                   num_fields);
  // Reused only where it equals the recomputation bit for bit: field mode, float32/float64 tables.
  const bool reuse_pooled = call.pooled.has_value() && call.pooled->numel() > 0 && mode == 0 &&
                            at::toOpMathType(p.weight.scalar_type()) == p.weight.scalar_type();
  const at::Tensor pooled = reuse_pooled ? call.pooled->contiguous() : at::Tensor();
  const at::Tensor grad_fm = call.grad_fm.contiguous();
  const at::Tensor grad_linear = call.grad_linear.contiguous();
  const bool has_grad_pooled = call.grad_pooled.has_value() && call.grad_pooled->numel() > 0;
  const at::Tensor grad_pooled = has_grad_pooled ? call.grad_pooled->contiguous() : at::Tensor();
  const int64_t nnz = p.indices.numel(), dim = p.weight.size(1);
  const auto options = p.weight.options();
  const auto acc_type = at::toOpMathType(p.weight.scalar_type());
  at::Tensor occ_grad = at::empty({nnz, dim}, options.dtype(acc_type));
  const bool want_grad_x = p.psw.has_value() && call.per_sample_weights_grad;
  at::Tensor grad_x = want_grad_x ? at::empty({nnz}, options.dtype(acc_type)) : at::Tensor();
  at::Tensor lin_occ = p.lw ? at::empty({nnz}, options.dtype(acc_type)) : at::Tensor();

  at::Tensor unique_ids, row_grads, linear_row_grads;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.weight.scalar_type(), "embedding_fm_backward_cpu", [&] {
    using scalar = scalar_t;
    using acc_t = at::opmath_type<scalar>;
    AT_DISPATCH_INDEX_TYPES(p.indices.scalar_type(), "embedding_fm_backward_cpu", [&] {
      const auto in = make_inputs<scalar, index_t>(p, num_fields, mode);
      dispatch_embedding_dim(dim, [&](auto static_dim) {
        const CoalescedIds c = coalesce_ids(in.indices, nnz, p.weight.size(0));
        if (p.batch > 0) {
          occurrence_grads_kernel<scalar, index_t, static_dim.value>(
              in, grad_fm.const_data_ptr<scalar>(), grad_linear.const_data_ptr<scalar>(),
              has_grad_pooled ? grad_pooled.const_data_ptr<scalar>() : nullptr,
              reuse_pooled ? pooled.const_data_ptr<scalar>() : nullptr, occ_grad.mutable_data_ptr<acc_t>(),
              want_grad_x ? grad_x.mutable_data_ptr<acc_t>() : nullptr, p.lw ? lin_occ.mutable_data_ptr<acc_t>() : nullptr,
              c.rank.data());
        }
        const int64_t num_unique = c.num_unique();
        unique_ids = at::empty({num_unique}, options.dtype(at::kLong));
        std::copy(c.unique.begin(), c.unique.end(), unique_ids.mutable_data_ptr<int64_t>());
        row_grads = at::empty({num_unique, dim}, options);
        linear_row_grads = at::empty({p.lw ? num_unique : 0}, options);
        segment_reduce_kernel<scalar, static_dim.value>(
            c, occ_grad.const_data_ptr<acc_t>(), dim, p.lw ? lin_occ.const_data_ptr<acc_t>() : nullptr,
            row_grads.mutable_data_ptr<scalar>(), p.lw ? linear_row_grads.mutable_data_ptr<scalar>() : nullptr);
      });
    });
  });
  at::Tensor grad_psw = want_grad_x ? grad_x.to(p.weight.scalar_type()) : at::empty({0}, options);
  return {unique_ids, row_grads, linear_row_grads, grad_psw};
}

}  // namespace

TORCH_LIBRARY_IMPL(deepfm_fast, CPU, m) {
  m.impl("embedding_fm", &embedding_fm_cpu);
  m.impl("embedding_fm_backward", &embedding_fm_backward_op<embedding_fm_backward_cpu>);
}

}  // namespace deepfm_fast
