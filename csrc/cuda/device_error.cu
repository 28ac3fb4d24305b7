// The per-device error word of cuda_utils.cuh: what a kernel found and could not raise.
#include <c10/cuda/CUDAFunctions.h>

#include <mutex>
#include <vector>

#include "cuda/cuda_utils.cuh"
#include "fused_row_update_checks.h"

namespace deepfm_fast {
namespace cuda {

namespace {
constexpr size_t kWordBytes = kDeviceErrorWords * sizeof(int64_t);

unsigned long long* word_of_current_device(bool allocate) {
  static std::mutex mutex;
  static std::vector<unsigned long long*> words;  // never freed: it may be read until the process ends
  const std::lock_guard<std::mutex> lock(mutex);
  const auto device = static_cast<size_t>(c10::cuda::current_device());
  if (words.size() <= device) words.resize(device + 1, nullptr);
  if (words[device] == nullptr && allocate) {
    // Not from the caching allocator: a block allocated during graph capture would belong to the graph.
    void* ptr = nullptr;
    C10_CUDA_CHECK(cudaMalloc(&ptr, kWordBytes));
    C10_CUDA_CHECK(cudaMemset(ptr, 0, kWordBytes));  // once per device and process
    words[device] = static_cast<unsigned long long*>(ptr);
  }
  return words[device];
}

bool capturing() { return c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None; }
}  // namespace

DeviceError device_error() { return DeviceError{word_of_current_device(!capturing())}; }

void copy_device_error(int64_t* dst, cudaStream_t stream) {
  unsigned long long* word = word_of_current_device(!capturing());
  if (word == nullptr) {
    C10_CUDA_CHECK(cudaMemsetAsync(dst, 0, kWordBytes, stream));
    return;
  }
  C10_CUDA_CHECK(cudaMemcpyAsync(dst, word, kWordBytes, cudaMemcpyDeviceToDevice, stream));
}

void raise_device_error(const int64_t* words, cudaStream_t stream) {
  if (words[0] == kNoDeviceError) return;
  unsigned long long* word = word_of_current_device(false);
  if (word != nullptr) C10_CUDA_CHECK(cudaMemsetAsync(word, 0, kWordBytes, stream));  // raised once
  static const char* const ops[] = {"fused_row_update", "adam_catch_up", "adam_rows"};
  const char* op = words[1] >= 0 && words[1] <= kOpAdamRows ? ops[words[1]] : "deepfm_fast";
  if (words[0] == kCatchUpBeyondWindow) {
    // {row, last step, target step, window}: the CPU kernel's message.
    checked_missed_steps(op, words[2], words[3], words[4], words[5]);
  }
  // {position, id, rows}: adam_rows' check deferred to the step's backward; the CPU's message.
  TORCH_CHECK(words[0] != kRowOutOfRange, op, ": rows[", words[2], "] = ", words[3],
              " is out of range for tables with ", words[4], " rows");
  TORCH_CHECK(false, op, ": a CUDA kernel recorded error ", words[0], " (", words[2], ", ", words[3], ", ", words[4],
              ", ", words[5], ")");
}

}  // namespace cuda
}  // namespace deepfm_fast
