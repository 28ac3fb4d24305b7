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
#include <limits>
#include <utility>

#include "bounds_check.h"

namespace deepfm_fast {
namespace cuda {

constexpr int kThreadsPerBlock = 256;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// A grid-stride loop's blocks for n items (at most 4096 blocks).
inline int64_t grid_for(int64_t n) { return std::min<int64_t>(std::max<int64_t>(ceil_div(n, kThreadsPerBlock), 1), 4096); }

// The one place a grid size leaves int64: a grid's x dimension holds at most 2^31 - 1 blocks.
inline unsigned checked_blocks(int64_t blocks) {
  TORCH_CHECK(blocks >= 1 && blocks <= std::numeric_limits<int32_t>::max(), "deepfm_fast: a CUDA launch needs ",
              blocks, " blocks; a grid holds 1 to 2^31 - 1 (the input is too large for one launch)");
  return static_cast<unsigned>(blocks);
}

// kernel<<<blocks, threads, 0, stream>>>(args...) with the grid checked, then the launch checked.
// (Every launch goes through here: no int64 block count is narrowed unchecked.)
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), int64_t blocks, int threads, cudaStream_t stream, Args&&... args) {
  kernel<<<checked_blocks(blocks), threads, 0, stream>>>(std::forward<Args>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Whether this call checks its ids with a sync of its own: "error" mode, not deferred to the step's
// backward (bounds_check.h).
inline bool checks_now(int mode) { return mode == kBoundsError && !cuda_checks_deferred(); }

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

// ---- errors found inside a kernel -----------------------------------------------------------------
// A kernel cannot raise. What only a kernel can see (a row further behind than Adam's catch-up
// window) it records in a per-device word, first finding wins: {code, op, then four values}. The
// host copies the word in with the one device->host copy that an op makes anyway (the bounds check
// of "error" mode, the backward's count of unique rows), raises the CPU kernel's message, and
// clears it. The kernel meanwhile stays in bounds (it clamps).
enum DeviceErrorCode : int64_t { kNoDeviceError = 0, kCatchUpBeyondWindow = 1, kRowOutOfRange = 2 };
enum DeviceErrorOp : int64_t { kOpFusedRowUpdate = 0, kOpAdamCatchUp = 1, kOpAdamRows = 2 };
constexpr int kDeviceErrorWords = 6;

struct DeviceError {
  unsigned long long* word;  // kDeviceErrorWords words on the device, or nullptr (not recorded)
  __device__ __forceinline__ void record(int64_t code, int64_t op, int64_t a, int64_t b, int64_t c, int64_t d) const {
    if (word == nullptr || atomicCAS(word, 0ull, static_cast<unsigned long long>(code)) != 0ull) return;
    word[1] = static_cast<unsigned long long>(op);
    word[2] = static_cast<unsigned long long>(a);
    word[3] = static_cast<unsigned long long>(b);
    word[4] = static_cast<unsigned long long>(c);
    word[5] = static_cast<unsigned long long>(d);
  }
};

// The word of the current device (allocated and zeroed on first use, never freed; nullptr when
// first asked for during CUDA graph capture, where nothing may be allocated: then not recorded).
DeviceError device_error();
// Queues a copy of the current device's word to dst[0, kDeviceErrorWords) (int64, on the device).
void copy_device_error(int64_t* dst, cudaStream_t stream);
// After the sync: raises the recorded error (host copy of the words) once its word is cleared.
void raise_device_error(const int64_t* words, cudaStream_t stream);

}  // namespace cuda
}  // namespace deepfm_fast
