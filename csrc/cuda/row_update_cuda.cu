// CUDA kernel of fused_row_update: a group of lanes per touched row (the ids are unique, so no two
// groups write one row and no atomics are needed; the update is deterministic). Row-wise Adagrad
// reduces the row's squared gradient with shuffles.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include "cuda/cuda_utils.cuh"
#include "cuda/kernels.h"
#include "row_update_checks.h"

namespace deepfm_fast {
namespace {

template <int64_t kOptimizer, int kLanes, typename scalar_t, typename acc_t>
__global__ void update_rows_kernel(scalar_t* __restrict__ weight, acc_t* __restrict__ state0,
                                   acc_t* __restrict__ state1, const int64_t* __restrict__ ids,
                                   const scalar_t* __restrict__ row_grads, int64_t num_ids, int64_t num_rows,
                                   int64_t dim, RowUpdateParams<acc_t> params) {
  const int lane = threadIdx.x % kLanes;
  const int64_t u = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kLanes) + threadIdx.x / kLanes;
  // Out-of-range ids (only possible from a caller that skipped the CPU-side checks) are skipped:
  // never a write outside the table.
  const bool active = u < num_ids && ids[u] >= 0 && ids[u] < num_rows;
  const int64_t row = active ? ids[u] : 0;
  scalar_t* value = weight + row * dim;
  const scalar_t* grad = row_grads + (active ? u : 0) * dim;
  if constexpr (kOptimizer == kRowWiseAdagrad) {
    acc_t sum_sq = acc_t(0);
    if (active) {
      for (int64_t k = lane; k < dim; k += kLanes) {
        const acc_t g = decayed_grad<acc_t>(grad[k], value[k], params);
        sum_sq += g * g;
      }
    }
    sum_sq = cuda::group_sum<kLanes>(sum_sq);  // all lanes of the warp take part
    if (!active) return;
    acc_t multiplier = acc_t(0);
    if (lane == 0) multiplier = rowwise_adagrad_multiplier<acc_t>(state0 + row, sum_sq, dim, params);
    multiplier = __shfl_sync(0xffffffffu, multiplier, 0, kLanes);
    for (int64_t k = lane; k < dim; k += kLanes) {
      const acc_t v = value[k];
      value[k] = static_cast<scalar_t>(v - multiplier * decayed_grad<acc_t>(grad[k], v, params));
    }
  } else {
    if (!active) return;
    for (int64_t k = lane; k < dim; k += kLanes) {
      const acc_t v = value[k];
      const acc_t g = decayed_grad<acc_t>(grad[k], v, params);
      acc_t* s0 = state0 ? state0 + row * dim + k : nullptr;
      acc_t* s1 = state1 ? state1 + row * dim + k : nullptr;
      value[k] = static_cast<scalar_t>(update_element<kOptimizer, acc_t>(v, g, s0, s1, params));
    }
  }
}

}  // namespace

void fused_row_update_cuda(const at::Tensor& weight, at::TensorList state, const at::Tensor& ids_in,
                           const at::Tensor& row_grads_in, int64_t optimizer, double lr, double eps, double beta1,
                           double beta2, double weight_decay, int64_t step) {
  check_fused_row_update_args(weight, state, ids_in, row_grads_in, optimizer, step);
  const c10::cuda::CUDAGuard device_guard(weight.device());
  const at::Tensor ids = ids_in.contiguous();
  const at::Tensor row_grads = row_grads_in.contiguous();
  const int64_t num_ids = ids.numel(), num_rows = weight.size(0), dim = weight.size(1);
  if (num_ids == 0 || dim == 0) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int lanes = cuda::lanes_for_dim(dim);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "fused_row_update_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto params = make_row_update_params<acc_t>(lr, eps, beta1, beta2, weight_decay, optimizer, step);
    acc_t* s0 = state.size() > 0 ? state[0].mutable_data_ptr<acc_t>() : nullptr;
    acc_t* s1 = state.size() > 1 ? state[1].mutable_data_ptr<acc_t>() : nullptr;
    cuda::dispatch_lanes(lanes, [&](auto kLanes) {
      const auto grid = cuda::ceil_div(num_ids, cuda::kThreadsPerBlock / kLanes.value);
      auto launch = [&](auto kernel) {
        kernel<<<grid, cuda::kThreadsPerBlock, 0, stream>>>(weight.mutable_data_ptr<scalar_t>(), s0, s1,
                                                            ids.const_data_ptr<int64_t>(),
                                                            row_grads.const_data_ptr<scalar_t>(), num_ids, num_rows,
                                                            dim, params);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      switch (optimizer) {
        case kSGD: return launch(update_rows_kernel<kSGD, kLanes.value, scalar_t, acc_t>);
        case kRowWiseAdagrad: return launch(update_rows_kernel<kRowWiseAdagrad, kLanes.value, scalar_t, acc_t>);
        case kAdagrad: return launch(update_rows_kernel<kAdagrad, kLanes.value, scalar_t, acc_t>);
        default: return launch(update_rows_kernel<kAdam, kLanes.value, scalar_t, acc_t>);
      }
    });
  });
}

}  // namespace deepfm_fast
