// Portable SIMD for the CPU kernels: GCC/Clang vector extensions of the widest registers the build
// targets (16-byte SSE2 by default, 32-byte with -mavx). Measured here (B=4096, F=39, K=16, one
// thread): plain loops over K auto-vectorise 6x slower, and 32-byte vectors lowered to SSE2 3x.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace deepfm_fast {
namespace simd {

#if defined(__AVX__)
constexpr int kVectorBytes = 32;
#else
constexpr int kVectorBytes = 16;
#endif

template <typename T>
struct VecOf {
  typedef T type __attribute__((vector_size(kVectorBytes)));
};

// The vector of accumulators for element type T (4 floats or 2 doubles with SSE2).
template <typename T>
using vec_t = typename VecOf<T>::type;

// Lanes of V: a vec_t, or a plain scalar (1 lane) for the last few dimensions of a row.
template <typename V>
constexpr int lanes() {
  if constexpr (std::is_arithmetic<V>::value) return 1;
  else return static_cast<int>(sizeof(V) / sizeof(V{}[0]));
}

template <typename V, typename scalar_t>
inline V load(const scalar_t* p) {
  if constexpr (std::is_arithmetic<V>::value) {
    return static_cast<V>(*p);
  } else {
    V v;
    using acc_t = std::remove_reference_t<decltype(v[0])>;
    if constexpr (std::is_same<acc_t, scalar_t>::value) {
      std::memcpy(&v, p, sizeof(v));
    } else {
      for (int i = 0; i < lanes<V>(); ++i) v[i] = static_cast<acc_t>(p[i]);
    }
    return v;
  }
}

template <typename V, typename scalar_t>
inline void store(scalar_t* p, const V& v) {
  if constexpr (std::is_arithmetic<V>::value) {
    *p = static_cast<scalar_t>(v);
  } else {
    using acc_t = std::remove_const_t<std::remove_reference_t<decltype(v[0])>>;
    if constexpr (std::is_same<acc_t, scalar_t>::value) {
      std::memcpy(p, &v, sizeof(v));
    } else {
      for (int i = 0; i < lanes<V>(); ++i) p[i] = static_cast<scalar_t>(v[i]);
    }
  }
}

template <typename V>
inline auto horizontal_sum(const V& v) {
  if constexpr (std::is_arithmetic<V>::value) {
    return v;
  } else {
    std::remove_const_t<std::remove_reference_t<decltype(v[0])>> total = 0;
    for (int i = 0; i < lanes<V>(); ++i) total += v[i];
    return total;
  }
}

template <typename V>
struct Tag {
  using type = V;
};

// Splits [0, dim) into tiles and calls tile(k0, vectors, Tag<V>{}) for each, with `vectors` a
// compile-time count of V's: up to kMaxVectors vec_t's (few enough to keep the accumulators of a
// tile in registers), then single vec_t's, then scalars for the last dim % lanes dimensions.
// (Partial vectors assembled lane by lane stall on store forwarding; scalars do not.)
template <typename acc_t, int kMaxVectors, typename TileFn>
inline void for_each_tile(int64_t dim, TileFn&& tile) {
  using vec = vec_t<acc_t>;
  constexpr int64_t kLanes = lanes<vec>();
  int64_t k0 = 0;
  for (; k0 + kMaxVectors * kLanes <= dim; k0 += kMaxVectors * kLanes)
    tile(k0, std::integral_constant<int, kMaxVectors>{}, Tag<vec>{});
  for (; k0 + kLanes <= dim; k0 += kLanes) tile(k0, std::integral_constant<int, 1>{}, Tag<vec>{});
  for (; k0 < dim; ++k0) tile(k0, std::integral_constant<int, 1>{}, Tag<acc_t>{});
}

}  // namespace simd
}  // namespace deepfm_fast
