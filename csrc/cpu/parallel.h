// Work splitting shared by the CPU kernels.
#pragma once

#include <algorithm>
#include <cstdint>

#include "cpu/simd.h"

namespace deepfm_fast {

// Items (samples, rows) per parallel task: about 32k elements of work, as ATen's own kernels use.
inline int64_t grain_size(int64_t work_per_item) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, work_per_item));
}

// Vectors per tile of K: the whole of K when it is a compile-time constant of at most 4 vectors,
// else 4 (8 of the 16 vector registers hold a tile's two sets of accumulators).
template <typename acc_t, int64_t kStaticDim>
constexpr int tile_vectors() {
  constexpr int64_t whole = kStaticDim / simd::lanes<simd::vec_t<acc_t>>();
  return whole >= 1 && whole <= 4 ? static_cast<int>(whole) : 4;
}

}  // namespace deepfm_fast
