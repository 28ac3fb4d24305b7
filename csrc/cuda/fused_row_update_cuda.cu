// CUDA kernel of fused_row_update: a group of lanes per touched row updates that row in every table
// (the ids are unique, so no two groups write one row and no atomics are needed; the update is
// deterministic). Row-wise Adagrad reduces each row's squared gradient with shuffles.
//
// The ids are checked like the CPU checks them, under the bounds-check mode of bounds_check.h:
// "error" checks them on the device and raises the CPU's error after one device->host sync,
// before any row is written; "clamp" and "off" skip the check and the sync: an out-of-range id is
// then skipped (never a write outside the tables) and repeated ids race (lost updates).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/full.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>

#include <algorithm>

#include "bounds_check.h"
#include "cuda/cuda_utils.cuh"
#include "cuda/kernels.h"
#include "fused_row_update_checks.h"

namespace deepfm_fast {
namespace {

// The tables of one update, passed to the kernel by value.
template <typename scalar_t, typename acc_t>
struct DeviceTables {
  scalar_t* weight[kMaxRowUpdateTables];
  acc_t* state0[kMaxRowUpdateTables];  // per element, or per row for row-wise Adagrad
  acc_t* state1[kMaxRowUpdateTables];
  const scalar_t* grads[kMaxRowUpdateTables];
  int64_t dim[kMaxRowUpdateTables];
  int count;
};

template <int64_t kOptimizer, int kLanes, typename scalar_t, typename acc_t>
__global__ void update_rows_kernel(DeviceTables<scalar_t, acc_t> tables, const int64_t* __restrict__ ids,
                                   int64_t num_ids, int64_t num_rows, RowUpdateParams<acc_t> params) {
  const int lane = threadIdx.x % kLanes;
  const int64_t u = cuda::group_index<kLanes>();
  if (u >= num_ids) return;  // the whole group leaves together
  const int64_t row = ids[u];
  if (row < 0 || row >= num_rows) return;  // only in "clamp"/"off" mode: never a write outside the tables
  for (int t = 0; t < tables.count; ++t) {
    const int64_t dim = tables.dim[t];
    scalar_t* value = tables.weight[t] + row * dim;
    const scalar_t* grad = tables.grads[t] + u * dim;
    if constexpr (kOptimizer == kRowWiseAdagrad) {
      acc_t sum_sq = acc_t(0);
      for (int64_t k = lane; k < dim; k += kLanes) {
        const acc_t g = decayed_grad<acc_t>(grad[k], value[k], params);
        sum_sq += g * g;
      }
      sum_sq = cuda::group_sum<kLanes>(sum_sq);
      acc_t multiplier = acc_t(0);
      if (lane == 0) multiplier = rowwise_adagrad_multiplier<acc_t>(tables.state0[t] + row, sum_sq, dim, params);
      multiplier = cuda::group_broadcast<kLanes>(multiplier);
      for (int64_t k = lane; k < dim; k += kLanes) {
        const acc_t v = value[k];
        value[k] = static_cast<scalar_t>(v - multiplier * decayed_grad<acc_t>(grad[k], v, params));
      }
    } else {
      for (int64_t k = lane; k < dim; k += kLanes) {
        const acc_t v = value[k];
        const acc_t g = decayed_grad<acc_t>(grad[k], v, params);
        acc_t* s0 = tables.state0[t] ? tables.state0[t] + row * dim + k : nullptr;
        acc_t* s1 = tables.state1[t] ? tables.state1[t] + row * dim + k : nullptr;
        value[k] = static_cast<scalar_t>(update_element<kOptimizer, acc_t>(v, g, s0, s1, params));
      }
    }
  }
}

// first_bad (uint64, pre-filled with all ones): the first position u whose id is out of range or
// does not exceed ids[u - 1].
__global__ void check_ids_kernel(const int64_t* __restrict__ ids, int64_t num_ids, int64_t num_rows,
                                 unsigned long long* __restrict__ first_bad) {
  for (int64_t u = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; u < num_ids;
       u += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t id = ids[u];
    if (id < 0 || id >= num_rows || (u > 0 && id <= ids[u - 1])) atomicMin(first_bad, static_cast<unsigned long long>(u));
  }
}

// "error" mode: raises the CPU kernel's error for the first bad id (one sync; more copies on the
// error path only).
void check_ids(const at::Tensor& ids, int64_t num_rows, cudaStream_t stream) {
  const int64_t num_ids = ids.numel();
  const at::Tensor first_bad = at::full({1}, -1, ids.options());
  const int64_t grid = std::min<int64_t>(std::max<int64_t>(cuda::ceil_div(num_ids, cuda::kThreadsPerBlock), 1), 4096);
  check_ids_kernel<<<grid, cuda::kThreadsPerBlock, 0, stream>>>(
      ids.const_data_ptr<int64_t>(), num_ids, num_rows,
      reinterpret_cast<unsigned long long*>(first_bad.mutable_data_ptr<int64_t>()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t u = first_bad.cpu().const_data_ptr<int64_t>()[0];
  if (u < 0) return;
  const at::Tensor pair = ids.narrow(0, std::max<int64_t>(u - 1, 0), std::min<int64_t>(u, 1) + 1).cpu();
  const int64_t* v = pair.const_data_ptr<int64_t>();
  check_row_id(u, v[u > 0 ? 1 : 0], u > 0 ? v[0] : 0, num_rows);
}

}  // namespace

void fused_row_update_cuda(at::TensorList tables, at::TensorList state, const at::Tensor& ids_in,
                           at::TensorList row_grads_in, int64_t optimizer, double lr, double eps, double beta1,
                           double beta2, double weight_decay, int64_t step) {
  check_fused_row_update_args(tables, state, ids_in, row_grads_in, optimizer, step);
  const c10::cuda::CUDAGuard device_guard(tables[0].device());
  const at::Tensor ids = ids_in.contiguous();
  std::vector<at::Tensor> row_grads;
  int64_t max_dim = 1;
  for (size_t t = 0; t < tables.size(); ++t) {
    row_grads.push_back(row_grads_in[t].contiguous());
    max_dim = std::max<int64_t>(max_dim, tables[t].size(1));
  }
  const int64_t num_ids = ids.numel(), num_rows = tables[0].size(0);
  if (num_ids == 0) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // A graph being captured cannot sync: "error" then behaves as "off" (the kernel stays in bounds).
  if (cuda_bounds_check() == kBoundsError &&
      c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None)
    check_ids(ids, num_rows, stream);
  const int64_t states_per_table = row_optimizer_states(optimizer);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tables[0].scalar_type(), "fused_row_update_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto params = make_row_update_params<acc_t>(lr, eps, beta1, beta2, weight_decay, optimizer, step);
    DeviceTables<scalar_t, acc_t> args{};
    args.count = static_cast<int>(tables.size());
    for (size_t t = 0; t < tables.size(); ++t) {
      args.weight[t] = tables[t].mutable_data_ptr<scalar_t>();
      args.grads[t] = row_grads[t].const_data_ptr<scalar_t>();
      args.dim[t] = tables[t].size(1);
      args.state0[t] = states_per_table > 0 ? state[t * states_per_table].mutable_data_ptr<acc_t>() : nullptr;
      args.state1[t] = states_per_table > 1 ? state[t * states_per_table + 1].mutable_data_ptr<acc_t>() : nullptr;
    }
    cuda::dispatch_lanes(cuda::lanes_for_dim(max_dim), [&](auto kLanes) {
      const auto grid = cuda::ceil_div(num_ids, cuda::kThreadsPerBlock / kLanes.value);
      auto launch = [&](auto kernel) {
        kernel<<<grid, cuda::kThreadsPerBlock, 0, stream>>>(args, ids.const_data_ptr<int64_t>(), num_ids, num_rows,
                                                            params);
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
