// Small helpers shared by the CUDA kernels. Only ATen core and c10 CUDA headers: a .cu that
// includes torch/extension.h takes minutes to compile.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>

#include "bounds_check.h"

namespace deepfm_fast {
namespace cuda {

constexpr int kThreadsPerBlock = 256;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// A grid-stride loop's blocks for n items (at most 4096 blocks).
inline int64_t grid_for(int64_t n) { return std::min<int64_t>(std::max<int64_t>(ceil_div(n, kThreadsPerBlock), 1), 4096); }

// The bounds-check mode of this call; must run after the device guard (it asks the current stream).
inline int bounds_check_mode() {
  const int mode = cuda_bounds_check();
  if (mode == kBoundsError && c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None)
    return kBoundsOff;  // a graph being captured cannot sync; the kernels stay in bounds
  return mode;
}

// Threads that cooperate on one sample: the power of two >= K, capped at a warp, so that the
// threads of a sample read consecutive addresses of each embedding row and reduce with shuffles.
inline int lanes_for_dim(int64_t dim) {
  int lanes = 1;
  while (lanes < dim && lanes < 32) lanes *= 2;
  return lanes;
}

template <typename Fn>
void dispatch_lanes(int lanes, Fn&& fn) {
  switch (lanes) {
    case 1: return fn(std::integral_constant<int, 1>{});
    case 2: return fn(std::integral_constant<int, 2>{});
    case 4: return fn(std::integral_constant<int, 4>{});
    case 8: return fn(std::integral_constant<int, 8>{});
    case 16: return fn(std::integral_constant<int, 16>{});
    default: return fn(std::integral_constant<int, 32>{});
  }
}

// A group of kLanes consecutive threads (a power of two <= 32) cooperates on one item (a sample,
// a row): the item's index, and the group's lanes inside its warp as a shuffle mask.
template <int kLanes>
__device__ __forceinline__ int64_t group_index() {
  return static_cast<int64_t>(blockIdx.x) * (blockDim.x / kLanes) + threadIdx.x / kLanes;
}

// Shuffles use the group's mask, not the whole warp's: the groups of one warp may run loops of
// different lengths (bag sizes) and so never meet at a shuffle, and a group past the end may
// return early.
template <int kLanes>
__device__ __forceinline__ unsigned group_mask() {
  if constexpr (kLanes == 32) {
    return 0xffffffffu;
  } else {
    const unsigned first_lane = (threadIdx.x % 32u) / kLanes * kLanes;
    return ((1u << kLanes) - 1u) << first_lane;
  }
}

// Sum over the kLanes lanes of the caller's group (a fixed butterfly: deterministic).
template <int kLanes, typename T>
__device__ __forceinline__ T group_sum(T value) {
  const unsigned mask = group_mask<kLanes>();
#pragma unroll
  for (int offset = kLanes / 2; offset > 0; offset /= 2) value += __shfl_xor_sync(mask, value, offset, kLanes);
  return value;
}

// Lane 0's value in every lane of the caller's group.
template <int kLanes, typename T>
__device__ __forceinline__ T group_broadcast(T value) {
  return __shfl_sync(group_mask<kLanes>(), value, 0, kLanes);
}

}  // namespace cuda
}  // namespace deepfm_fast
