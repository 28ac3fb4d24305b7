// Small helpers shared by the CUDA kernels. Only ATen core and c10 CUDA headers: a .cu that
// includes torch/extension.h takes minutes to compile.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>

namespace deepfm_fast {
namespace cuda {

constexpr int kThreadsPerBlock = 256;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

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

// Sum over the kLanes consecutive lanes of a group (deterministic: a fixed butterfly).
template <int kLanes, typename T>
__device__ __forceinline__ T group_sum(T value) {
#pragma unroll
  for (int offset = kLanes / 2; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset, kLanes);
  return value;
}

}  // namespace cuda
}  // namespace deepfm_fast
