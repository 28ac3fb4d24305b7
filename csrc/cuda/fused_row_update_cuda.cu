// CUDA kernels of fused_row_update and adam_catch_up: a group of lanes per touched row updates that
// row in every table (the ids are unique, so no two groups write one row and no atomics are needed;
// the update is deterministic). A row-wise state's update reduces the row's squared gradient with shuffles.
// Adam catches a row up before its step, advances the catch-up table (one thread per entry, from a
// copy) and then catches up the step's slice of rows (fused_row_update.h).
//
// The ids are checked like the CPU checks them, under the bounds-check mode of bounds_check.h:
// "error" checks them on the device and raises the CPU's error after one device->host sync,
// before any row is written; "clamp" and "off" skip the check and the sync: an out-of-range id is
// then skipped (never a write outside the tables) and repeated ids race (lost updates).
//
// Adam: a row further behind than the catch-up window (last_step or the table replaced) cannot be
// raised on inside a kernel: the kernels clamp its gap and record the first such row in the device
// error word (cuda_utils.cuh); the next device->host copy an op makes anyway raises the CPU's error.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>

#include <algorithm>
#include <vector>

#include "bounds_check.h"
#include "cuda/cuda_utils.cuh"
#include "cuda/kernels.h"
#include "fused_row_update_checks.h"

namespace deepfm_fast {
namespace {

// The tables of one update, passed to the kernel by value. Row r of a table (or of a state) starts
// at r * its row stride: a packed record, or a plain contiguous table.
template <typename scalar_t, typename acc_t>
struct DeviceTables {
  scalar_t* weight[kMaxRowUpdateTables];
  acc_t* state0[kMaxRowUpdateTables];  // per element, or per row (the rule's kRowState)
  acc_t* state1[kMaxRowUpdateTables];
  const scalar_t* grads[kMaxRowUpdateTables];
  int64_t dim[kMaxRowUpdateTables];
  int64_t stride[kMaxRowUpdateTables];
  int64_t state0_stride[kMaxRowUpdateTables];
  int64_t state1_stride[kMaxRowUpdateTables];
  int count;
  cuda::DeviceError error;  // where Adam records a row beyond the catch-up window

  __device__ __forceinline__ scalar_t* row(int t, int64_t r) const { return weight[t] + r * stride[t]; }
  __device__ __forceinline__ acc_t* row_state0(int t, int64_t r) const { return state0[t] + r * state0_stride[t]; }
  __device__ __forceinline__ acc_t* row_state1(int t, int64_t r) const { return state1[t] + r * state1_stride[t]; }
};

template <typename scalar_t, typename acc_t>
DeviceTables<scalar_t, acc_t> device_tables(at::TensorList tables, at::TensorList state,
                                            const std::vector<at::Tensor>& row_grads, int64_t states_per_table) {
  DeviceTables<scalar_t, acc_t> args{};
  args.count = static_cast<int>(tables.size());
  args.error = cuda::device_error();
  for (size_t t = 0; t < tables.size(); ++t) {
    args.weight[t] = tables[t].mutable_data_ptr<scalar_t>();
    args.grads[t] = row_grads.empty() ? nullptr : row_grads[t].const_data_ptr<scalar_t>();
    args.dim[t] = table_width(tables[t]);
    args.stride[t] = tables[t].stride(0);
    args.state0[t] = states_per_table > 0 ? state[t * states_per_table].mutable_data_ptr<acc_t>() : nullptr;
    args.state1[t] = states_per_table > 1 ? state[t * states_per_table + 1].mutable_data_ptr<acc_t>() : nullptr;
    args.state0_stride[t] = states_per_table > 0 ? state[t * states_per_table].stride(0) : 0;
    args.state1_stride[t] = states_per_table > 1 ? state[t * states_per_table + 1].stride(0) : 0;
  }
  return args;
}

// Adam: every lane of the group catches its elements of row `row` of table t up with `entry`.
template <int kLanes, typename scalar_t, typename acc_t>
__device__ __forceinline__ void catch_up_row(const DeviceTables<scalar_t, acc_t>& tables, int t, int64_t row,
                                             const double* entry, int lane) {
  const CatchUp<acc_t> c = catch_up_coefficients<acc_t>(entry);
  const int64_t dim = tables.dim[t];
  scalar_t* value = tables.row(t, row);
  acc_t* m = tables.row_state0(t, row);
  acc_t* v = tables.row_state1(t, row);
  for (int64_t k = lane; k < dim; k += kLanes)
    value[k] = static_cast<scalar_t>(catch_up_element<acc_t>(static_cast<acc_t>(value[k]), m + k, v + k, c));
}

// One step of row `row` of table t by the lanes of a group: weight decay, the row factor of a
// row-wise state (reduced over the group), then the rule on every element (fused_row_update.h).
template <class Rule, int kLanes, typename scalar_t, typename acc_t>
__device__ __forceinline__ void update_row_lanes(const DeviceTables<scalar_t, acc_t>& tables, int t, int64_t row,
                                           const scalar_t* grad, const RowUpdateParams<acc_t>& params, int lane) {
  const int64_t dim = tables.dim[t];
  scalar_t* value = tables.row(t, row);
  acc_t factor = acc_t(0);
  if constexpr (Rule::kRowState >= 0) {
    acc_t sum_sq = acc_t(0);
    for (int64_t k = lane; k < dim; k += kLanes) {
      const acc_t g = decayed_grad<acc_t>(grad[k], value[k], params);
      sum_sq += g * g;
    }
    sum_sq = cuda::group_sum<kLanes>(sum_sq);
    if (lane == 0) {
      acc_t* row_state = Rule::kRowState == 0 ? tables.row_state0(t, row) : tables.row_state1(t, row);
      factor = Rule::row_factor(row_state, sum_sq, dim, params);
    }
    factor = cuda::group_broadcast<kLanes>(factor);
  }
  for (int64_t k = lane; k < dim; k += kLanes) {
    const acc_t v = value[k];
    acc_t* s0 = nullptr;
    acc_t* s1 = nullptr;
    if constexpr (per_element_state<Rule>(0)) s0 = tables.row_state0(t, row) + k;
    if constexpr (per_element_state<Rule>(1)) s1 = tables.row_state1(t, row) + k;
    value[k] = static_cast<scalar_t>(Rule::update(v, decayed_grad<acc_t>(grad[k], v, params), s0, s1, factor, params));
  }
}

// Adam: the steps row `row` (last updated after step `last`) missed by step `target`, at most the
// window; a gap beyond it is recorded (first finding wins) for the host to raise the CPU's error.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ int64_t missed_steps(const DeviceTables<scalar_t, acc_t>& tables, const CatchUpState& adam,
                                                int64_t op, int64_t row, int64_t last, int64_t target) {
  if (target - last > adam.window) tables.error.record(cuda::kCatchUpBeyondWindow, op, row, last, target, adam.window);
  return clamped_missed_steps(last, target, adam.window);
}

template <class Rule, int kLanes, typename scalar_t, typename acc_t>
__global__ void update_rows_kernel(DeviceTables<scalar_t, acc_t> tables, const int64_t* __restrict__ ids,
                                   int64_t num_ids, int64_t num_rows, RowUpdateParams<acc_t> params,
                                   CatchUpState adam, int64_t step) {
  const int lane = threadIdx.x % kLanes;
  const int64_t u = cuda::group_index<kLanes>();
  if (u >= num_ids) return;  // the whole group leaves together
  const int64_t row = ids[u];
  if (row < 0 || row >= num_rows) return;  // only in "clamp"/"off" mode: never a write outside the tables
  int64_t missed = 0;
  if constexpr (Rule::kCatchesUp)
    missed = missed_steps(tables, adam, cuda::kOpFusedRowUpdate, row, adam.last_step[row * adam.last_step_stride],
                          step - 1);
  for (int t = 0; t < tables.count; ++t) {
    if constexpr (Rule::kCatchesUp) {
      if (missed > 0) catch_up_row<kLanes>(tables, t, row, adam.table + missed * kCatchUpColumns, lane);
    }
    update_row_lanes<Rule, kLanes>(tables, t, row, tables.grads[t] + u * tables.dim[t], params, lane);
  }
  if constexpr (Rule::kCatchesUp) {
    __syncwarp(cuda::group_mask<kLanes>());  // every lane has read last_step[row]
    if (lane == 0) adam.last_step[row * adam.last_step_stride] = step;
  }
}

// Adam: the rows of [begin, end) behind step `target`, caught up to it.
template <int kLanes, typename scalar_t, typename acc_t>
__global__ void catch_up_rows_kernel(DeviceTables<scalar_t, acc_t> tables, CatchUpState adam, int64_t target,
                                     int64_t begin, int64_t end, int64_t op) {
  const int lane = threadIdx.x % kLanes;
  const int64_t row = begin + cuda::group_index<kLanes>();
  if (row >= end) return;
  int64_t* last = adam.last_step + row * adam.last_step_stride;
  const int64_t missed = missed_steps(tables, adam, op, row, *last, target);
  if (missed <= 0) return;
  for (int t = 0; t < tables.count; ++t) catch_up_row<kLanes>(tables, t, row, adam.table + missed * kCatchUpColumns, lane);
  __syncwarp(cuda::group_mask<kLanes>());
  if (lane == 0) *last = target;
}

// The outputs of adam_rows, one per table, passed to the kernel by value.
template <typename scalar_t>
struct RowOutputs {
  scalar_t* ptr[kMaxRowUpdateTables];
};

// Adam: out[t][u] = row rows[u] of table t as dense Adam has it after step `target` (copies). An
// id out of range reads the nearest row in "clamp" mode, as embedding_fm does, else a zero row (in
// "error" mode the host raises after this kernel, never a read outside the tables).
template <int kLanes, typename scalar_t, typename acc_t>
__global__ void adam_rows_kernel(DeviceTables<scalar_t, acc_t> tables, RowOutputs<scalar_t> out, CatchUpState adam,
                                 int64_t target, const int64_t* __restrict__ rows, int64_t num, int64_t num_rows,
                                 bool clamp) {
  const int lane = threadIdx.x % kLanes;
  const int64_t u = cuda::group_index<kLanes>();
  if (u >= num) return;
  int64_t row = rows[u];
  if (clamp) row = row < 0 ? 0 : (row >= num_rows ? num_rows - 1 : row);  // (no rows: -1, a zero row)
  if (row < 0 || row >= num_rows) {
    for (int t = 0; t < tables.count; ++t)
      for (int64_t k = lane; k < tables.dim[t]; k += kLanes) out.ptr[t][u * tables.dim[t] + k] = scalar_t(0);
    return;
  }
  const int64_t missed =
      missed_steps(tables, adam, cuda::kOpAdamRows, row, adam.last_step[row * adam.last_step_stride], target);
  for (int t = 0; t < tables.count; ++t) {
    const int64_t dim = tables.dim[t];
    const scalar_t* src = tables.row(t, row);
    scalar_t* dst = out.ptr[t] + u * dim;
    if (missed <= 0) {
      for (int64_t k = lane; k < dim; k += kLanes) dst[k] = src[k];
      continue;
    }
    const CatchUp<acc_t> c = catch_up_coefficients<acc_t>(adam.table + missed * kCatchUpColumns);
    const acc_t* m0 = tables.row_state0(t, row);
    const acc_t* v0 = tables.row_state1(t, row);
    for (int64_t k = lane; k < dim; k += kLanes) {
      acc_t m = m0[k], v = v0[k];  // copies
      dst[k] = static_cast<scalar_t>(catch_up_element<acc_t>(static_cast<acc_t>(src[k]), &m, &v, c));
    }
  }
}

// The table after step `step` (out) from the table after step - 1 (prev, a copy).
__global__ void advance_catch_up_kernel(const double* __restrict__ prev, double* __restrict__ out, int64_t window,
                                        CatchUpStep s) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j > window) return;
  const double jd = static_cast<double>(j);
  advance_catch_up_entry(j > 0 ? prev + (j - 1) * kCatchUpColumns : nullptr, out + j * kCatchUpColumns, j, s,
                         pow(s.beta1, jd), pow(s.beta2, jd), pow(s.beta2, -0.5 * jd));
}

// first_bad (uint64, pre-filled with all ones): the first position u whose id is out of range or,
// with `increasing`, does not exceed ids[u - 1].
__global__ void check_ids_kernel(const int64_t* __restrict__ ids, int64_t num_ids, int64_t num_rows, bool increasing,
                                 unsigned long long* __restrict__ first_bad) {
  for (int64_t u = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; u < num_ids;
       u += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t id = ids[u];
    if (id < 0 || id >= num_rows || (increasing && u > 0 && id <= ids[u - 1]))
      atomicMin(first_bad, static_cast<unsigned long long>(u));
  }
}

// Queues the id check; returns {first bad position (-1: none), then room for the device error
// word} on the device, for the caller's one copy to the host.
at::Tensor queue_id_check(const at::Tensor& ids, int64_t num_rows, bool increasing, cudaStream_t stream) {
  const int64_t num_ids = ids.numel();
  const at::Tensor found = at::full({1 + cuda::kDeviceErrorWords}, -1, ids.options().dtype(at::kLong));
  if (num_ids > 0)
    cuda::launch(check_ids_kernel, cuda::grid_for(num_ids), cuda::kThreadsPerBlock, stream,
                 ids.const_data_ptr<int64_t>(), num_ids, num_rows, increasing,
                 reinterpret_cast<unsigned long long*>(found.mutable_data_ptr<int64_t>()));
  return found;
}

// Deferred "error" mode (a fused training step): the first bad position that queue_id_check found,
// recorded in the device error word, which the step's backward raises.
__global__ void record_bad_row_kernel(const int64_t* __restrict__ found, const int64_t* __restrict__ ids,
                                      int64_t num_rows, int64_t op, cuda::DeviceError error) {
  const int64_t u = found[0];
  if (u >= 0) error.record(cuda::kRowOutOfRange, op, u, ids[u], num_rows, 0);
}

// "error" mode: raises the CPU kernel's error for the first bad id, or an error a kernel recorded
// earlier (one sync; more copies on the error path only).
void check_ids(const at::Tensor& ids, int64_t num_rows, cudaStream_t stream) {
  at::Tensor found = queue_id_check(ids, num_rows, /*increasing=*/true, stream);
  cuda::copy_device_error(found.mutable_data_ptr<int64_t>() + 1, stream);
  found = found.cpu();
  cuda::raise_device_error(found.const_data_ptr<int64_t>() + 1, stream);
  const int64_t u = found.const_data_ptr<int64_t>()[0];
  if (u < 0) return;
  const at::Tensor pair = ids.narrow(0, std::max<int64_t>(u - 1, 0), std::min<int64_t>(u, 1) + 1).cpu();
  const int64_t* v = pair.const_data_ptr<int64_t>();
  check_row_id(u, v[u > 0 ? 1 : 0], u > 0 ? v[0] : 0, num_rows);
}

template <typename scalar_t, typename acc_t>
void launch_catch_up_rows(const DeviceTables<scalar_t, acc_t>& args, int64_t max_dim, const CatchUpState& adam,
                          int64_t target, int64_t begin, int64_t end, int64_t op, cudaStream_t stream) {
  if (end <= begin) return;
  cuda::dispatch_lanes(cuda::lanes_for_dim(max_dim), [&](auto kLanes) {
    cuda::launch(catch_up_rows_kernel<kLanes.value, scalar_t, acc_t>,
                 cuda::ceil_div(end - begin, cuda::kThreadsPerBlock / kLanes.value), cuda::kThreadsPerBlock, stream,
                 args, adam, target, begin, end, op);
  });
}

int64_t max_width(at::TensorList tables) {
  int64_t width = 1;
  for (const auto& t : tables) width = std::max<int64_t>(width, table_width(t));
  return width;
}

}  // namespace

void fused_row_update_cuda(const RowUpdateArgs& call) {
  const at::TensorList tables = call.tables, state = call.state;
  const double lr = call.lr, eps = call.eps, beta1 = call.beta1, beta2 = call.beta2;
  const c10::cuda::CUDAGuard device_guard(tables[0].device());
  const at::Tensor& ids = call.ids;
  const std::vector<at::Tensor>& row_grads = call.row_grads;
  const int64_t num_ids = call.num_ids, num_rows = call.num_rows, max_dim = max_width(tables);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (call.check_ids && num_ids > 0 && cuda::bounds_check_mode() == kBoundsError) check_ids(ids, num_rows, stream);
  // The update's grid (at most this many blocks, at a warp per id) fits a launch.
  cuda::checked_blocks(std::max<int64_t>(cuda::ceil_div(num_ids, cuda::kThreadsPerBlock / 32), 1));
  const int64_t step = ++*call.counter;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tables[0].scalar_type(), "fused_row_update_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dispatch_row_optimizer(call.optimizer, [&](auto rule) {
      using Rule = decltype(rule);
      const auto params = make_row_update_params<Rule, acc_t>(lr, eps, beta1, beta2, call.weight_decay, step);
      const auto args = device_tables<scalar_t, acc_t>(tables, state, row_grads, Rule::kStates);
      const CatchUpState adam = catch_up_state<Rule>(call.last_step, call.catchup);
      if (num_ids > 0) {
        cuda::dispatch_lanes(cuda::lanes_for_dim(max_dim), [&](auto kLanes) {
          update_rows_kernel<Rule, kLanes.value, scalar_t, acc_t>
              <<<cuda::ceil_div(num_ids, cuda::kThreadsPerBlock / kLanes.value), cuda::kThreadsPerBlock, 0, stream>>>(
                  args, ids.const_data_ptr<int64_t>(), num_ids, num_rows, params, adam, step);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      }
      if constexpr (Rule::kCatchesUp) {
        const at::Tensor previous = call.catchup->clone();
        cuda::launch(advance_catch_up_kernel, cuda::ceil_div(adam.window + 1, cuda::kThreadsPerBlock),
                     cuda::kThreadsPerBlock, stream, previous.const_data_ptr<double>(), adam.table, adam.window,
                     make_catch_up_step(lr, eps, beta1, beta2, step));
        const auto [begin, end] = sweep_rows(num_rows, adam.window, step);
        launch_catch_up_rows(args, max_dim, adam, step, begin, end, cuda::kOpFusedRowUpdate, stream);
      }
    });
  });
}

void adam_catch_up_cuda(const CatchUpArgs& call) {
  const c10::cuda::CUDAGuard device_guard(call.tables[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, call.tables[0].scalar_type(), "adam_catch_up_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch_catch_up_rows(device_tables<scalar_t, acc_t>(call.tables, call.state, {}, optim::Adam::kStates),
                         max_width(call.tables), catch_up_state(call.last_step, call.catchup), call.target, call.begin,
                         call.end, cuda::kOpAdamCatchUp, stream);
  });
}

std::vector<at::Tensor> adam_rows_cuda(const CatchUpArgs& call) {
  constexpr const char* op = "adam_rows";
  const int64_t num = call.rows.numel(), num_rows = call.tables[0].size(0);
  const c10::cuda::CUDAGuard device_guard(call.tables[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int bounds = cuda::bounds_check_mode();
  std::vector<at::Tensor> out;
  for (const auto& table : call.tables) out.push_back(at::empty(rows_shape(table, num), table.options()));
  if (num == 0) return out;
  // "error" mode: the ids' check and the rows' copy queued together, then one sync raises the CPU's
  // error (the first bad position, or a row beyond the catch-up window) before anything is returned.
  const at::Tensor found = bounds == kBoundsError ? queue_id_check(call.rows, num_rows, /*increasing=*/false, stream)
                                                  : at::Tensor();
  if (bounds == kBoundsError && !cuda::checks_now(bounds))  // deferred: the step's backward raises it
    cuda::launch(record_bad_row_kernel, 1, 1, stream, found.const_data_ptr<int64_t>(),
                 call.rows.const_data_ptr<int64_t>(), num_rows, int64_t{cuda::kOpAdamRows}, cuda::device_error());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, call.tables[0].scalar_type(), "adam_rows_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto args = device_tables<scalar_t, acc_t>(call.tables, call.state, {}, optim::Adam::kStates);
    RowOutputs<scalar_t> outputs{};
    for (size_t t = 0; t < out.size(); ++t) outputs.ptr[t] = out[t].mutable_data_ptr<scalar_t>();
    cuda::dispatch_lanes(cuda::lanes_for_dim(max_width(call.tables)), [&](auto kLanes) {
      cuda::launch(adam_rows_kernel<kLanes.value, scalar_t, acc_t>,
                   cuda::ceil_div(num, cuda::kThreadsPerBlock / kLanes.value), cuda::kThreadsPerBlock, stream, args,
                   outputs, catch_up_state(call.last_step, call.catchup), call.target,
                   call.rows.const_data_ptr<int64_t>(), num, num_rows, bounds == kBoundsClamp);
    });
  });
  if (cuda::checks_now(bounds)) {
    cuda::copy_device_error(found.mutable_data_ptr<int64_t>() + 1, stream);  // after the kernel: its findings too
    const at::Tensor host = found.cpu();  // the one sync
    const int64_t u = host.const_data_ptr<int64_t>()[0];
    if (u >= 0) {
      const int64_t id = call.rows.narrow(0, u, 1).cpu().const_data_ptr<int64_t>()[0];
      TORCH_CHECK(false, op, ": rows[", u, "] = ", id, " is out of range for tables with ", num_rows, " rows");
    }
    cuda::raise_device_error(host.const_data_ptr<int64_t>() + 1, stream);
  }
  return out;
}

}  // namespace deepfm_fast
