// CUDA kernels of fm_interaction. A group of kLanes threads (a power of two <= 32) handles one
// sample: lane l owns dimensions k = l, l + kLanes, ..., loops over the F rows (consecutive lanes
// read consecutive addresses, so loads coalesce), and the group reduces over k with shuffles.
// One launch forward, one backward; float16/bfloat16 accumulate in float32.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>

#include "checks.h"
#include "cuda/cuda_utils.cuh"
#include "cuda/kernels.h"

namespace deepfm_fast {
namespace {

template <typename scalar_t, int kLanes, bool kReduce>
__global__ void fm_forward_kernel(const scalar_t* __restrict__ emb, scalar_t* __restrict__ out,
                                  int64_t batch, int64_t fields, int64_t dim) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = threadIdx.x % kLanes;
  const int64_t b = cuda::group_index<kLanes>();
  acc_t partial = acc_t(0);
  if (b < batch) {
    const scalar_t* block = emb + b * fields * dim;
    for (int64_t k = lane; k < dim; k += kLanes) {
      acc_t sum = acc_t(0), sq = acc_t(0);
      for (int64_t f = 0; f < fields; ++f) {
        const acc_t v = static_cast<acc_t>(block[f * dim + k]);
        sum += v;
        sq += v * v;
      }
      const acc_t term = acc_t(0.5) * (sum * sum - sq);
      if constexpr (kReduce) partial += term;
      else out[b * dim + k] = static_cast<scalar_t>(term);
    }
  }
  if constexpr (kReduce) {
    partial = cuda::group_sum<kLanes>(partial);
    if (b < batch && lane == 0) out[b] = static_cast<scalar_t>(partial);
  }
}

// grad_emb[b, f, k] = grad_out[b, k or 0] * (S_k - e[b, f, k]); S is recomputed per sample (the
// second read of the sample's rows comes from cache).
template <typename scalar_t, int kLanes>
__global__ void fm_backward_kernel(const scalar_t* __restrict__ grad_out, bool per_dim_grad,
                                   const scalar_t* __restrict__ emb, scalar_t* __restrict__ grad_emb,
                                   int64_t batch, int64_t fields, int64_t dim) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = threadIdx.x % kLanes;
  const int64_t b = cuda::group_index<kLanes>();
  if (b >= batch) return;
  const scalar_t* block = emb + b * fields * dim;
  scalar_t* grad_block = grad_emb + b * fields * dim;
  for (int64_t k = lane; k < dim; k += kLanes) {
    const acc_t g = static_cast<acc_t>(per_dim_grad ? grad_out[b * dim + k] : grad_out[b]);
    acc_t sum = acc_t(0);
    for (int64_t f = 0; f < fields; ++f) sum += static_cast<acc_t>(block[f * dim + k]);
    for (int64_t f = 0; f < fields; ++f)
      grad_block[f * dim + k] = static_cast<scalar_t>(g * (sum - static_cast<acc_t>(block[f * dim + k])));
  }
}

int64_t blocks_for(int64_t batch, int lanes) {
  return cuda::ceil_div(batch, cuda::kThreadsPerBlock / lanes);
}

}  // namespace

at::Tensor fm_interaction_cuda(const at::Tensor& emb_in, bool reduce_sum) {
  check_fm_interaction_args(emb_in);
  const c10::cuda::CUDAGuard device_guard(emb_in.device());
  const at::Tensor emb = emb_in.contiguous();
  const int64_t batch = emb.size(0), fields = emb.size(1), dim = emb.size(2);
  at::Tensor out = reduce_sum ? at::empty({batch}, emb.options()) : at::empty({batch, dim}, emb.options());
  if (out.numel() == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int lanes = cuda::lanes_for_dim(dim);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, emb.scalar_type(), "fm_interaction_cuda", [&] {
    cuda::dispatch_lanes(lanes, [&](auto kLanes) {
      const auto grid = blocks_for(batch, kLanes.value);
      if (reduce_sum)
        cuda::launch(fm_forward_kernel<scalar_t, kLanes.value, true>, grid, cuda::kThreadsPerBlock, stream,
                     emb.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), batch, fields, dim);
      else
        cuda::launch(fm_forward_kernel<scalar_t, kLanes.value, false>, grid, cuda::kThreadsPerBlock, stream,
                     emb.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), batch, fields, dim);
    });
  });
  return out;
}

at::Tensor fm_interaction_backward_cuda(const at::Tensor& grad_out_in, const at::Tensor& emb_in) {
  check_fm_interaction_backward_args(grad_out_in, emb_in);
  const c10::cuda::CUDAGuard device_guard(emb_in.device());
  const at::Tensor emb = emb_in.contiguous();
  const at::Tensor grad_out = grad_out_in.contiguous();
  const int64_t batch = emb.size(0), fields = emb.size(1), dim = emb.size(2);
  at::Tensor grad_emb = at::empty({batch, fields, dim}, emb.options());
  if (grad_emb.numel() == 0) return grad_emb;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int lanes = cuda::lanes_for_dim(dim);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, emb.scalar_type(), "fm_interaction_backward_cuda", [&] {
    cuda::dispatch_lanes(lanes, [&](auto kLanes) {
      cuda::launch(fm_backward_kernel<scalar_t, kLanes.value>, blocks_for(batch, kLanes.value), cuda::kThreadsPerBlock,
                   stream, grad_out.const_data_ptr<scalar_t>(), grad_out.dim() == 2, emb.const_data_ptr<scalar_t>(),
                   grad_emb.mutable_data_ptr<scalar_t>(), batch, fields, dim);
    });
  });
  return grad_emb;
}

}  // namespace deepfm_fast
