// CPU kernels of fm_interaction: parallel over the batch, explicit SIMD over the embedding
// dimension. Each sample's [F, K] block is read once from memory; the backward recomputes the
// per-sample sum S from that block while it is in L1, instead of keeping a [B, K] tensor around.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>

#include "checks.h"
#include "cpu/parallel.h"
#include "cpu/simd.h"
#include "dispatch.h"

namespace deepfm_fast {
namespace {

// Sums over the F rows of a sample, for the dimensions [k0, k0 + kVectors * lanes) of a tile.
template <typename V, int kVectors, bool kSquares, typename scalar_t>
inline void sum_rows(const scalar_t* block, int64_t fields, int64_t dim, int64_t k0, V (&sum)[kVectors],
                     V (&sq)[kVectors]) {
  constexpr int lanes = simd::lanes<V>();
  for (int j = 0; j < kVectors; ++j) sum[j] = sq[j] = V{};
  for (int64_t f = 0; f < fields; ++f) {
    const scalar_t* row = block + f * dim + k0;
    for (int j = 0; j < kVectors; ++j) {
      const V v = simd::load<V>(row + j * lanes);
      sum[j] += v;
      if constexpr (kSquares) sq[j] += v * v;
    }
  }
}

// out[b] = 0.5 * sum_k(S_k^2 - Q_k), or out[b, k] = 0.5 * (S_k^2 - Q_k) without the reduction,
// where S = sum_f e[b, f, :] and Q = sum_f e[b, f, :]^2.
template <typename scalar_t, int64_t kStaticDim, bool kReduce>
void fm_forward(const scalar_t* emb, scalar_t* out, int64_t batch, int64_t fields, int64_t dynamic_dim) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t dim = kStaticDim > 0 ? kStaticDim : dynamic_dim;
  at::parallel_for(0, batch, grain_size(fields * dim), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const scalar_t* block = emb + b * fields * dim;
      acc_t total = acc_t(0);
      simd::for_each_tile<acc_t, tile_vectors<acc_t, kStaticDim>()>(dim, [&](int64_t k0, auto vectors, auto tag) {
        using V = typename decltype(tag)::type;
        constexpr int lanes = simd::lanes<V>();
        V sum[vectors.value], sq[vectors.value];
        sum_rows<V, vectors.value, true>(block, fields, dim, k0, sum, sq);
        V terms = V{};
        for (int j = 0; j < vectors.value; ++j) {
          const V term = acc_t(0.5) * (sum[j] * sum[j] - sq[j]);
          if constexpr (kReduce) terms += term;
          else simd::store(out + b * dim + k0 + j * lanes, term);
        }
        if constexpr (kReduce) total += simd::horizontal_sum(terms);
      });
      if constexpr (kReduce) out[b] = static_cast<scalar_t>(total);
    }
  });
}

// grad_emb[b, f, k] = grad_out[b, k] * (S_k - e[b, f, k]); with a [B] grad_out (the forward reduced
// over K) the same gradient applies to every k, so one kernel serves both forms.
template <typename scalar_t, int64_t kStaticDim>
void fm_backward(const scalar_t* grad_out, bool per_dim_grad, const scalar_t* emb, scalar_t* grad_emb,
                 int64_t batch, int64_t fields, int64_t dynamic_dim) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t dim = kStaticDim > 0 ? kStaticDim : dynamic_dim;
  at::parallel_for(0, batch, grain_size(2 * fields * dim), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const scalar_t* block = emb + b * fields * dim;
      scalar_t* grad_block = grad_emb + b * fields * dim;
      simd::for_each_tile<acc_t, tile_vectors<acc_t, kStaticDim>()>(dim, [&](int64_t k0, auto vectors, auto tag) {
        using V = typename decltype(tag)::type;
        constexpr int lanes = simd::lanes<V>();
        V sum[vectors.value], unused[vectors.value], grad[vectors.value];
        sum_rows<V, vectors.value, false>(block, fields, dim, k0, sum, unused);
        for (int j = 0; j < vectors.value; ++j)
          grad[j] = per_dim_grad ? simd::load<V>(grad_out + b * dim + k0 + j * lanes)
                                 : V{} + static_cast<acc_t>(grad_out[b]);
        for (int64_t f = 0; f < fields; ++f) {
          const int64_t at = f * dim + k0;
          for (int j = 0; j < vectors.value; ++j)
            simd::store(grad_block + at + j * lanes, grad[j] * (sum[j] - simd::load<V>(block + at + j * lanes)));
        }
      });
    }
  });
}

at::Tensor fm_interaction_cpu(const at::Tensor& emb_in, bool reduce_sum) {
  check_fm_interaction_args(emb_in);
  const at::Tensor emb = emb_in.contiguous();
  const int64_t batch = emb.size(0), fields = emb.size(1), dim = emb.size(2);
  at::Tensor out = reduce_sum ? at::empty({batch}, emb.options()) : at::empty({batch, dim}, emb.options());
  if (out.numel() == 0) return out;
  if (fields == 0) return out.zero_();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, emb.scalar_type(), "fm_interaction_cpu", [&] {
    dispatch_embedding_dim(dim, [&](auto static_dim) {
      const scalar_t* in = emb.const_data_ptr<scalar_t>();
      scalar_t* result = out.mutable_data_ptr<scalar_t>();
      if (reduce_sum) fm_forward<scalar_t, static_dim.value, true>(in, result, batch, fields, dim);
      else fm_forward<scalar_t, static_dim.value, false>(in, result, batch, fields, dim);
    });
  });
  return out;
}

at::Tensor fm_interaction_backward_cpu(const at::Tensor& grad_out_in, const at::Tensor& emb_in) {
  check_fm_interaction_backward_args(grad_out_in, emb_in);
  const at::Tensor emb = emb_in.contiguous();
  const at::Tensor grad_out = grad_out_in.contiguous();
  const int64_t batch = emb.size(0), fields = emb.size(1), dim = emb.size(2);
  at::Tensor grad_emb = at::empty({batch, fields, dim}, emb.options());
  if (grad_emb.numel() == 0) return grad_emb;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, emb.scalar_type(), "fm_interaction_backward_cpu", [&] {
    dispatch_embedding_dim(dim, [&](auto static_dim) {
      fm_backward<scalar_t, static_dim.value>(grad_out.const_data_ptr<scalar_t>(), grad_out.dim() == 2,
                                              emb.const_data_ptr<scalar_t>(),
                                              grad_emb.mutable_data_ptr<scalar_t>(), batch, fields, dim);
    });
  });
  return grad_emb;
}

}  // namespace

TORCH_LIBRARY_IMPL(deepfm_fast, CPU, m) {
  m.impl("fm_interaction", &fm_interaction_cpu);
  m.impl("fm_interaction_backward", &fm_interaction_backward_cpu);
}

}  // namespace deepfm_fast
