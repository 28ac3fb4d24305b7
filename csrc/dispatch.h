// Turns the embedding dimension into a compile-time constant for the common sizes, so that the
// inner loops over K are fully unrolled and vectorised; other sizes take the generic path (0).
// Plain C++17: shared by the CPU and CUDA translation units.
#pragma once

#include <cstdint>
#include <type_traits>

namespace deepfm_fast {

template <typename Fn>
decltype(auto) dispatch_embedding_dim(int64_t dim, Fn&& fn) {
  switch (dim) {
    case 8: return fn(std::integral_constant<int64_t, 8>{});
    case 10: return fn(std::integral_constant<int64_t, 10>{});
    case 16: return fn(std::integral_constant<int64_t, 16>{});
    case 32: return fn(std::integral_constant<int64_t, 32>{});
    case 64: return fn(std::integral_constant<int64_t, 64>{});
    default: return fn(std::integral_constant<int64_t, 0>{});
  }
}

}  // namespace deepfm_fast
