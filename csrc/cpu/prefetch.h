// Software prefetch for the random row accesses of the CPU kernels.
#pragma once

#include <cstdint>

namespace deepfm_fast {

// Prefetches every cache line of [p, p + bytes), for reading (kWrite = 0) or writing. Always
// inlined: GCC finds a function whose only effect is a prefetch pure and deletes the calls to it
// (a prefetch is invisible to the language), which once silently removed the gathers' prefetches.
template <int kWrite = 0>
inline __attribute__((always_inline)) void prefetch_lines(const void* p, int64_t bytes) {
  constexpr uintptr_t kLine = 64;
  const uintptr_t end = reinterpret_cast<uintptr_t>(p) + static_cast<uintptr_t>(bytes);
  // From the line p falls in: a packed record need not start on a line.
  for (uintptr_t line = reinterpret_cast<uintptr_t>(p) & ~(kLine - 1); line < end; line += kLine)
    __builtin_prefetch(reinterpret_cast<const void*>(line), kWrite, kWrite ? 1 : 3);
}

}  // namespace deepfm_fast
