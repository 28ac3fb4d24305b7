// CUDA kernels of embedding_fm and embedding_fm_backward; the CPU kernels in
// cpu/embedding_fm_cpu.cpp are the contract they match, output for output.
//
// Forward: ONE launch. A group of kLanes threads (a power of two <= 32) handles one sample; lane l
// owns the dimensions k = k0 + l + j * kLanes (j < kPer) of each chunk of kLanes * kPer dimensions,
// so that the lanes of a group read consecutive addresses of every table row. The group walks the
// sample's F bags: gathers the rows, pools them (sum or mean per field), accumulates S = sum and
// Q = sum of squares of the field vectors (field mode) or of every x_i V[j_i] (feature mode) in
// float32 (float64 for double), writes the pooled vectors when asked, and reduces
// 0.5 * sum_k(S^2 - Q) over the lanes with shuffles. Lane 0 sums the first order w[j_i] x_i.
//
// Backward: deterministic by construction, with or without torch.use_deterministic_algorithms:
// no floating-point atomics anywhere; every float output element is summed by ONE thread in a
// fixed order.
//   (a) occurrence_grads_kernel, a group per sample: the gradient of every occurrence's row
//       x_i * D_i into a float32 (float64) [nnz, K] buffer, dL/dx_i and g_lin * x_i per occurrence,
//       and the occurrence's row as a sort key (D_i as in the CPU kernel, mean scaling included);
//   (b) cub's radix sort of (key, position) pairs over the bits the keys use (stable, 64-bit item
//       counts: nnz >= 2^31 is sorted too): the occurrences of each row, in position order;
//   (c) segment heads (a flag kernel + at::cumsum over int32 flags) give each unique row its
//       index u and its first sorted position; one device->host copy reads U (and, in "error"
//       mode, the result of the argument checks: one sync in all);
//   (d) chunk_reduce_kernel / long_segment_kernel, a group per chunk of <= 64 occurrences of one
//       row, then a group per row with several chunks: sums the row's occurrence gradients in
//       sorted (= position) order, writes row_grads[u] and linear_row_grads[u].
// The only atomics are integer atomicMin in the argument check (order-independent results).
//
// Bounds checks (FBGEMM-style), chosen process-wide by deepfm_fast.ops.set_cuda_bounds_check
// (bounds_check.h); inside a fused training step the forward's "error" check is deferred to the
// step's backward, which checks the same indices and offsets at its one sync before any update:
//   error (default): the values of indices and offsets are checked on the device, then one
//          device->host copy raises the CPU kernel's error (argument, value, position);
//   clamp: no check, no sync; a bad id reads (and gets the gradient of) the nearest valid row;
//   off:   no check, no sync; a bad id reads as a zero row and gets no gradient.
// In every mode the kernels never read out of bounds: an id outside [0, N) is never used as a
// row, a bag whose offsets are negative, decreasing or past nnz is read as empty. (Malformed
// offsets in clamp/off mode give unspecified, but memory-safe, results.) During CUDA graph capture
// "error" cannot sync and behaves as "off".
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/cumsum.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>

#include <cub/device/device_radix_sort.cuh>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>

#include "bounds_check.h"
#include "checks.h"
#include "cuda/cuda_utils.cuh"
#include "cuda/kernels.h"

namespace deepfm_fast {
namespace {

// ---- device helpers -----------------------------------------------------------------------------

// The row an id reads: itself when in [0, rows); otherwise the nearest row in clamp mode, else -1
// (read as a zero row, no gradient).
__device__ __forceinline__ int64_t row_of(int64_t id, int64_t rows, bool clamp) {
  if (id >= 0 && id < rows) return id;
  if (clamp && rows > 0) return id < 0 ? 0 : rows - 1;
  return -1;
}

// The occurrences [start, stop) of bag `bag`; a malformed bag (negative, decreasing or past-nnz
// offsets) is empty. Valid CSR input never takes that branch.
template <typename index_t>
__device__ __forceinline__ void bag_range(const index_t* offsets, int64_t bag, int64_t nnz, int64_t& start,
                                          int64_t& stop) {
  start = static_cast<int64_t>(offsets[bag]);
  stop = static_cast<int64_t>(offsets[bag + 1]);
  if (start < 0 || start > stop || stop > nnz) start = stop = 0;
}

// Per-field pooling, passed by value in the kernels' arguments (no copy to the device, so a call
// can be captured in a CUDA graph): one flag for all fields, or a bitmask of up to
// kPoolingMaskFields fields. Beyond that (mixed pooling over > 1024 fields) the flags are copied
// to the device with a blocking copy, which a CUDA graph cannot capture.
constexpr int64_t kPoolingMaskWords = 16;
constexpr int64_t kPoolingMaskFields = 64 * kPoolingMaskWords;
struct PoolingFlags {
  int uniform;                       // 0: every field sums, 1: every field averages, -1: per field (below)
  uint64_t bits[kPoolingMaskWords];  // bit f % 64 of word f / 64: field f averages (flags == nullptr)
  const uint8_t* flags;              // [num_fields] on the device, 1 = average (num_fields > kPoolingMaskFields)
  __device__ __forceinline__ bool is_mean(int64_t f) const {
    if (uniform >= 0) return uniform != 0;
    if (flags != nullptr) return flags[f] != 0;
    return ((bits[f >> 6] >> (f & 63)) & 1u) != 0;
  }
};

template <typename scalar_t, typename index_t>
struct Inputs {
  const scalar_t* weight;  // [rows, dim], row r at r * stride (a packed record: stride > dim)
  const index_t* indices;  // [nnz]
  const index_t* offsets;  // [batch * fields + 1]
  const scalar_t* psw;     // [nnz] or nullptr (every x_i = 1)
  const scalar_t* lw;      // [rows] or nullptr (no first order)
  int64_t rows, dim, nnz, batch, fields;
  int64_t stride, lw_stride;
  bool feature_mode, clamp;
  PoolingFlags pooling;

  __device__ __forceinline__ at::opmath_type<scalar_t> x(int64_t p) const {
    using acc_t = at::opmath_type<scalar_t>;
    return psw != nullptr ? static_cast<acc_t>(psw[p]) : acc_t(1);
  }
  __device__ __forceinline__ int64_t row(int64_t p) const {
    return row_of(static_cast<int64_t>(indices[p]), rows, clamp);
  }
  __device__ __forceinline__ at::opmath_type<scalar_t> value(int64_t row, int64_t k) const {
    using acc_t = at::opmath_type<scalar_t>;
    return row >= 0 && k < dim ? static_cast<acc_t>(weight[row * stride + k]) : acc_t(0);
  }
  // 1/n for a mean-pooled bag of n > 1 ids, else 1 (an empty bag pools to 0 either way).
  __device__ __forceinline__ at::opmath_type<scalar_t> scale(int64_t f, int64_t n) const {
    using acc_t = at::opmath_type<scalar_t>;
    return pooling.is_mean(f) && n > 1 ? acc_t(1) / static_cast<acc_t>(n) : acc_t(1);
  }
};

// ---- forward ------------------------------------------------------------------------------------

template <typename scalar_t, typename index_t, int kLanes, int kPer>
__global__ void forward_kernel(const Inputs<scalar_t, index_t> in, scalar_t* __restrict__ fm,
                               scalar_t* __restrict__ linear, scalar_t* __restrict__ pooled) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t b = cuda::group_index<kLanes>();
  if (b >= in.batch) return;  // the whole group leaves together
  const int lane = threadIdx.x % kLanes;
  constexpr int64_t kChunk = int64_t(kLanes) * kPer;
  const int64_t chunks = in.dim > kChunk ? (in.dim + kChunk - 1) / kChunk : 1;  // one pass even for dim 0
  acc_t fm_part = acc_t(0), lin = acc_t(0);
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t k0 = c * kChunk + lane;
    acc_t sum[kPer], sq[kPer];
#pragma unroll
    for (int j = 0; j < kPer; ++j) sum[j] = sq[j] = acc_t(0);
    for (int64_t f = 0; f < in.fields; ++f) {
      const int64_t bag = b * in.fields + f;
      int64_t start, stop;
      bag_range(in.offsets, bag, in.nnz, start, stop);
      acc_t e[kPer];
#pragma unroll
      for (int j = 0; j < kPer; ++j) e[j] = acc_t(0);
      for (int64_t p = start; p < stop; ++p) {
        const int64_t row = in.row(p);
        const acc_t x = in.x(p);
        if (c == 0 && lane == 0 && in.lw != nullptr && row >= 0) lin += static_cast<acc_t>(in.lw[row * in.lw_stride]) * x;
#pragma unroll
        for (int j = 0; j < kPer; ++j) {
          const acc_t u = x * in.value(row, k0 + j * kLanes);
          e[j] += u;
          if (in.feature_mode) {
            sum[j] += u;
            sq[j] += u * u;
          }
        }
      }
      const acc_t s = in.scale(f, stop - start);
#pragma unroll
      for (int j = 0; j < kPer; ++j) {
        e[j] *= s;
        if (!in.feature_mode) {
          sum[j] += e[j];
          sq[j] += e[j] * e[j];
        }
        const int64_t k = k0 + j * kLanes;
        if (pooled != nullptr && k < in.dim) pooled[bag * in.dim + k] = static_cast<scalar_t>(e[j]);
      }
    }
#pragma unroll
    for (int j = 0; j < kPer; ++j) fm_part += acc_t(0.5) * (sum[j] * sum[j] - sq[j]);
  }
  fm_part = cuda::group_sum<kLanes>(fm_part);
  if (lane == 0) {
    fm[b] = static_cast<scalar_t>(fm_part);
    if (linear != nullptr) linear[b] = static_cast<scalar_t>(lin);
  }
}

// ---- backward -----------------------------------------------------------------------------------

// Step (a). For each occurrence p of sample b (in bag f): occ[p] = x_p * D_p with
//   field mode:   D_p = s_f * (g_fm * (S - e_f) + g_pooled[f])
//   feature mode: D_p = g_fm * (S - x_p V_p) + s_f * g_pooled[f]
// grad_x[p] = V_p . D_p + g_lin * w[j_p], lin_occ[p] = g_lin * x_p and key[p] = the row (or
// `rows`, a sentinel that sorts last and is dropped, for an id that reads as a zero row).
// Occurrences outside every valid bag keep the sentinel key set by the host and a zero grad_x.
// e[j] = sum over the occurrences [start, stop) of a bag of x_p * V[row_p, k0 + j * kLanes].
template <int kPer, int kLanes, typename scalar_t, typename index_t>
__device__ __forceinline__ void pool_bag(const Inputs<scalar_t, index_t>& in, int64_t start, int64_t stop, int64_t k0,
                                         at::opmath_type<scalar_t> (&e)[kPer]) {
#pragma unroll
  for (int j = 0; j < kPer; ++j) e[j] = 0;
  for (int64_t p = start; p < stop; ++p) {
    const int64_t row = in.row(p);
    const auto x = in.x(p);
#pragma unroll
    for (int j = 0; j < kPer; ++j) e[j] += x * in.value(row, k0 + j * kLanes);
  }
}

template <typename scalar_t, typename index_t, int kLanes, int kPer>
__global__ void occurrence_grads_kernel(const Inputs<scalar_t, index_t> in, const scalar_t* __restrict__ g_fm,
                                        const scalar_t* __restrict__ g_lin, const scalar_t* __restrict__ g_pooled,
                                        at::opmath_type<scalar_t>* __restrict__ occ,
                                        at::opmath_type<scalar_t>* __restrict__ grad_x,
                                        at::opmath_type<scalar_t>* __restrict__ lin_occ, int32_t* __restrict__ keys32,
                                        int64_t* __restrict__ keys64) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t b = cuda::group_index<kLanes>();
  if (b >= in.batch) return;
  const int lane = threadIdx.x % kLanes;
  const acc_t g = static_cast<acc_t>(g_fm[b]);
  const acc_t gl = static_cast<acc_t>(g_lin[b]);
  constexpr int64_t kChunk = int64_t(kLanes) * kPer;
  const int64_t chunks = in.dim > kChunk ? (in.dim + kChunk - 1) / kChunk : 1;  // one pass even for dim 0
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t k0 = c * kChunk + lane;
    // Pass 1: S, the sum of the sample's vectors (scaled field vectors, or every x_i V_i).
    acc_t S[kPer];
#pragma unroll
    for (int j = 0; j < kPer; ++j) S[j] = acc_t(0);
    for (int64_t f = 0; f < in.fields; ++f) {
      int64_t start, stop;
      bag_range(in.offsets, b * in.fields + f, in.nnz, start, stop);
      acc_t e[kPer];
      pool_bag<kPer, kLanes>(in, start, stop, k0, e);
      const acc_t s = in.feature_mode ? acc_t(1) : in.scale(f, stop - start);
#pragma unroll
      for (int j = 0; j < kPer; ++j) S[j] += s * e[j];
    }
    // Pass 2: the gradient of every occurrence (the rows come from cache the second time).
    for (int64_t f = 0; f < in.fields; ++f) {
      const int64_t bag = b * in.fields + f;
      int64_t start, stop;
      bag_range(in.offsets, bag, in.nnz, start, stop);
      const acc_t s = in.scale(f, stop - start);
      acc_t gp[kPer], D[kPer];
#pragma unroll
      for (int j = 0; j < kPer; ++j) {
        const int64_t k = k0 + j * kLanes;
        gp[j] = g_pooled != nullptr && k < in.dim ? static_cast<acc_t>(g_pooled[bag * in.dim + k]) : acc_t(0);
        D[j] = acc_t(0);
      }
      if (!in.feature_mode) {
        acc_t e[kPer];
        pool_bag<kPer, kLanes>(in, start, stop, k0, e);
#pragma unroll
        for (int j = 0; j < kPer; ++j) D[j] = s * (g * (S[j] - s * e[j]) + gp[j]);
      }
      for (int64_t p = start; p < stop; ++p) {
        const int64_t row = in.row(p);
        const acc_t x = in.x(p);
        acc_t dot = acc_t(0);
#pragma unroll
        for (int j = 0; j < kPer; ++j) {
          const int64_t k = k0 + j * kLanes;
          // The row again only where it is needed: feature mode's D, or the dot product of grad_x.
          const acc_t v = in.feature_mode || grad_x != nullptr ? in.value(row, k) : acc_t(0);
          const acc_t d = in.feature_mode ? g * (S[j] - x * v) + s * gp[j] : D[j];
          if (k < in.dim) occ[p * in.dim + k] = x * d;
          dot += v * d;  // v is 0 for k >= dim
        }
        if (grad_x != nullptr) {
          dot = cuda::group_sum<kLanes>(dot);  // every lane of the group is here: same p loop
          if (lane == 0) {
            const acc_t first = in.lw != nullptr && row >= 0 ? gl * static_cast<acc_t>(in.lw[row * in.lw_stride]) : acc_t(0);
            grad_x[p] = (c == 0 ? first : grad_x[p]) + dot;  // the same thread wrote it in chunk c - 1
          }
        }
        if (c == 0 && lane == 0) {
          if (lin_occ != nullptr) lin_occ[p] = gl * x;
          const int64_t key = row >= 0 ? row : in.rows;
          if (keys32 != nullptr) keys32[p] = static_cast<int32_t>(key);
          else keys64[p] = key;
        }
      }
    }
  }
}

// Step (c): head[q] = 1 where sorted position q starts the segment of a valid row.
template <typename key_t>
__global__ void mark_segments_kernel(const key_t* __restrict__ sorted, int64_t nnz, int64_t sentinel,
                                     int32_t* __restrict__ head) {
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; q < nnz;
       q += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t key = static_cast<int64_t>(sorted[q]);
    head[q] = key != sentinel && (q == 0 || key != static_cast<int64_t>(sorted[q - 1])) ? 1 : 0;
  }
}

// unique_ids[u] and seg_start[u] (u = seg[q] - 1 at each head), and seg_start[U] = the end of the
// last valid segment (written by the last position whose key is not the sentinel).
template <typename key_t>
__global__ void segment_starts_kernel(const key_t* __restrict__ sorted, const int32_t* __restrict__ head,
                                      const int64_t* __restrict__ seg, int64_t nnz, int64_t sentinel,
                                      int64_t* __restrict__ unique_ids, int64_t* __restrict__ seg_start) {
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; q < nnz;
       q += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t key = static_cast<int64_t>(sorted[q]);
    if (key == sentinel) continue;
    if (head[q]) {
      unique_ids[seg[q] - 1] = key;
      seg_start[seg[q] - 1] = q;
    }
    if (q + 1 == nnz || static_cast<int64_t>(sorted[q + 1]) == sentinel) seg_start[seg[q]] = q + 1;
  }
}

// Step (d). A segment (the occurrences of one row) is summed in chunks of kSegmentChunk sorted
// positions, a lane group per chunk, so that one very frequent id (a "missing" value in every
// sample) is not summed by one group serially; a row with several chunks then sums its chunk
// partials in order. Chunking is fixed by the sorted positions: the result is deterministic, but a
// row with more than kSegmentChunk occurrences is summed in two levels, so not bit-equal to the
// CPU kernel's single pass in position order.
constexpr int64_t kSegmentChunk = 64;

// chunk_end[u]: inclusive cumsum of the chunk counts ceil(segment length / kSegmentChunk); chunk c
// belongs to the first u with chunk_end[u] > c. long_end[u]: inclusive cumsum of the chunk counts
// of the rows with several chunks, which place their partials at [long_end[u - 1], long_end[u]).
template <typename scalar_t, int kLanes>
__global__ void chunk_reduce_kernel(const at::opmath_type<scalar_t>* __restrict__ occ,
                                    const at::opmath_type<scalar_t>* __restrict__ lin_occ,
                                    const int64_t* __restrict__ order, const int64_t* __restrict__ seg_start,
                                    const int64_t* __restrict__ chunk_end, const int64_t* __restrict__ long_end,
                                    int64_t num_unique, int64_t max_chunks,
                                    int64_t dim, scalar_t* __restrict__ row_grads,
                                    scalar_t* __restrict__ linear_row_grads, at::opmath_type<scalar_t>* __restrict__ partial,
                                    at::opmath_type<scalar_t>* __restrict__ linear_partial) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t c = cuda::group_index<kLanes>();
  if (c >= max_chunks || c >= chunk_end[num_unique - 1]) return;
  int64_t lo = 0, hi = num_unique - 1;  // the first u with chunk_end[u] > c
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (chunk_end[mid] > c) hi = mid;
    else lo = mid + 1;
  }
  const int64_t u = lo;
  const int64_t chunk_begin = u > 0 ? chunk_end[u - 1] : 0;
  const bool whole = chunk_end[u] - chunk_begin == 1;  // one chunk: write the row's gradient directly
  const int64_t first = seg_start[u] + (c - chunk_begin) * kSegmentChunk;
  const int64_t last = first + kSegmentChunk < seg_start[u + 1] ? first + kSegmentChunk : seg_start[u + 1];
  const int64_t slot = (u > 0 ? long_end[u - 1] : 0) + (c - chunk_begin);
  const int lane = threadIdx.x % kLanes;
  for (int64_t k = lane; k < dim; k += kLanes) {
    acc_t acc = acc_t(0);
    for (int64_t q = first; q < last; ++q) acc += occ[order[q] * dim + k];
    if (whole) row_grads[u * dim + k] = static_cast<scalar_t>(acc);
    else partial[slot * dim + k] = acc;
  }
  if (linear_row_grads != nullptr && lane == 0) {
    acc_t acc = acc_t(0);
    for (int64_t q = first; q < last; ++q) acc += lin_occ[order[q]];
    if (whole) linear_row_grads[u] = static_cast<scalar_t>(acc);
    else linear_partial[slot] = acc;
  }
}

// The rows with several chunks: the sum of their chunk partials, in chunk order.
template <typename scalar_t, int kLanes>
__global__ void long_segment_kernel(const at::opmath_type<scalar_t>* __restrict__ partial,
                                    const at::opmath_type<scalar_t>* __restrict__ linear_partial,
                                    const int64_t* __restrict__ long_end, int64_t num_unique, int64_t dim,
                                    scalar_t* __restrict__ row_grads, scalar_t* __restrict__ linear_row_grads) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t u = cuda::group_index<kLanes>();
  if (u >= num_unique) return;
  const int64_t begin = u > 0 ? long_end[u - 1] : 0, end = long_end[u];
  if (begin == end) return;  // one chunk: written by chunk_reduce_kernel
  const int lane = threadIdx.x % kLanes;
  for (int64_t k = lane; k < dim; k += kLanes) {
    acc_t acc = acc_t(0);
    for (int64_t c = begin; c < end; ++c) acc += partial[c * dim + k];
    row_grads[u * dim + k] = static_cast<scalar_t>(acc);
  }
  if (linear_row_grads != nullptr && lane == 0) {
    acc_t acc = acc_t(0);
    for (int64_t c = begin; c < end; ++c) acc += linear_partial[c];
    linear_row_grads[u] = static_cast<scalar_t>(acc);
  }
}

__global__ void chunk_count_kernel(const int64_t* __restrict__ seg_start, int64_t num_unique,
                                   int64_t* __restrict__ chunks, int64_t* __restrict__ long_chunks) {
  for (int64_t u = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; u < num_unique;
       u += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = (seg_start[u + 1] - seg_start[u] + kSegmentChunk - 1) / kSegmentChunk;
    chunks[u] = n;
    long_chunks[u] = n > 1 ? n : 0;
  }
}

// ---- argument values ----------------------------------------------------------------------------

// stats (int64, pre-filled with -1 = "none"): [0] first i with offsets[i] > offsets[i + 1],
// [1] first position of an id outside [0, rows), [2] offsets[0], [3] offsets[-1].
template <typename index_t>
__global__ void check_csr_kernel(const index_t* __restrict__ indices, int64_t nnz, const index_t* __restrict__ offsets,
                                 int64_t num_offsets, int64_t rows, int64_t* __restrict__ stats) {
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    stats[2] = static_cast<int64_t>(offsets[0]);
    stats[3] = static_cast<int64_t>(offsets[num_offsets - 1]);
  }
  auto* first_bad = reinterpret_cast<unsigned long long*>(stats);  // -1 reads as the largest value
  const int64_t n = nnz > num_offsets - 1 ? nnz : num_offsets - 1;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (i < num_offsets - 1 && offsets[i] > offsets[i + 1]) atomicMin(first_bad, static_cast<unsigned long long>(i));
    if (i < nnz) {
      const int64_t id = static_cast<int64_t>(indices[i]);
      if (id < 0 || id >= rows) atomicMin(first_bad + 1, static_cast<unsigned long long>(i));
    }
  }
}

// Groups of lanes for an embedding dimension: kLanes >= dim up to a warp, then two dimensions per
// lane (dim <= 64) and chunks of 64 beyond.
template <typename Fn>
void dispatch_group(int64_t dim, Fn&& fn) {
  using std::integral_constant;
  if (dim <= 4) return fn(integral_constant<int, 4>{}, integral_constant<int, 1>{});
  if (dim <= 8) return fn(integral_constant<int, 8>{}, integral_constant<int, 1>{});
  if (dim <= 16) return fn(integral_constant<int, 16>{}, integral_constant<int, 1>{});
  if (dim <= 32) return fn(integral_constant<int, 32>{}, integral_constant<int, 1>{});
  return fn(integral_constant<int, 32>{}, integral_constant<int, 2>{});
}

struct Prepared : EmbeddingFMArgs {
  at::Tensor mean_flags;  // device copy of the per-field pooling, only for > kPoolingMaskFields mixed fields
  PoolingFlags pooling{0, {}, nullptr};
};

// Checks everything that needs no tensor data, then returns contiguous tensors with indices and
// offsets of one dtype (the wider of the two), and the pooling flags.
Prepared prepare(const char* op, const at::Tensor& weight, const at::Tensor& indices, const at::Tensor& offsets,
                 const c10::optional<at::Tensor>& psw, const c10::optional<at::Tensor>& lw, int64_t num_fields,
                 int64_t mode, at::IntArrayRef pooling) {
  Prepared p{prepare_embedding_fm_args(op, weight, indices, offsets, psw, lw, num_fields, mode, pooling), {}, {}};
  const bool uniform = std::all_of(pooling.begin(), pooling.end(), [&](int64_t v) { return v == pooling[0]; });
  if (uniform) {
    p.pooling.uniform = pooling[0] == kPoolMean ? 1 : 0;
  } else if (num_fields <= kPoolingMaskFields) {
    p.pooling.uniform = -1;
    for (int64_t f = 0; f < num_fields; ++f)
      if (pooling[f] == kPoolMean) p.pooling.bits[f >> 6] |= uint64_t(1) << (f & 63);
  } else {
    p.pooling.uniform = -1;
    at::Tensor host = at::empty({num_fields}, at::TensorOptions().dtype(at::kByte));
    uint8_t* flags = host.mutable_data_ptr<uint8_t>();
    for (int64_t f = 0; f < num_fields; ++f) flags[f] = pooling[f] == kPoolMean ? 1 : 0;
    p.mean_flags = host.to(weight.device(), at::kByte);  // blocking: not capturable (see PoolingFlags)
    p.pooling.flags = p.mean_flags.const_data_ptr<uint8_t>();
  }
  return p;
}

template <typename scalar_t, typename index_t>
Inputs<scalar_t, index_t> make_inputs(const Prepared& p, int64_t num_fields, int64_t mode, int bounds) {
  return Inputs<scalar_t, index_t>{p.weight.const_data_ptr<scalar_t>(),
                                   p.indices.const_data_ptr<index_t>(),
                                   p.offsets.const_data_ptr<index_t>(),
                                   p.psw ? p.psw->const_data_ptr<scalar_t>() : nullptr,
                                   p.lw ? p.lw->const_data_ptr<scalar_t>() : nullptr,
                                   p.weight.size(0),
                                   p.weight.size(1),
                                   p.indices.numel(),
                                   p.batch,
                                   num_fields,
                                   p.weight.stride(0),
                                   p.lw ? p.lw->stride(0) : 0,
                                   mode == 1,
                                   bounds == kBoundsClamp,
                                   p.pooling};
}

// stats (int64 on the device, -1 everywhere): [0..3] the argument checks, [4] the backward's number
// of unique rows, then the device error word (cuda_utils.cuh), read by the same one copy.
constexpr int64_t kStatsErrorWord = 5;
constexpr int64_t kStatsSize = kStatsErrorWord + cuda::kDeviceErrorWords;

// "error" mode: fills stats[0..3] on the device.
void launch_csr_check(const Prepared& p, const at::Tensor& stats, cudaStream_t stream) {
  const int64_t nnz = p.indices.numel(), num_offsets = p.offsets.numel();
  AT_DISPATCH_INDEX_TYPES(p.indices.scalar_type(), "embedding_fm_check_cuda", [&] {
    cuda::launch(check_csr_kernel<index_t>, cuda::grid_for(std::max(nnz, num_offsets - 1)), cuda::kThreadsPerBlock,
                 stream, p.indices.const_data_ptr<index_t>(), nnz, p.offsets.const_data_ptr<index_t>(), num_offsets,
                 p.weight.size(0), stats.mutable_data_ptr<int64_t>());
  });
}

// Step (b): the positions 0..n-1 sorted by key, stably (cub's LSD radix sort, 64-bit item count),
// over the bits up to max_key only (a 10.4 M-row table: 24 bits, not 32 or 64).
template <typename key_t>
void sort_positions(const at::Tensor& keys, int64_t max_key, at::Tensor& sorted, at::Tensor& order,
                    cudaStream_t stream) {
  using bits_t = std::make_unsigned_t<key_t>;  // keys are >= 0: the same order, no sign handling
  const int64_t n = keys.numel();
  int end_bit = 1;
  while (end_bit < static_cast<int>(8 * sizeof(key_t)) && (max_key >> end_bit) != 0) ++end_bit;
  sorted = at::empty_like(keys);
  const at::Tensor positions = at::arange(n, keys.options().dtype(at::kLong));
  order = at::empty_like(positions);
  const auto* keys_in = reinterpret_cast<const bits_t*>(keys.const_data_ptr<key_t>());
  auto* keys_out = reinterpret_cast<bits_t*>(sorted.mutable_data_ptr<key_t>());
  size_t temp_bytes = 0;
  C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, temp_bytes, keys_in, keys_out,
                                                 positions.const_data_ptr<int64_t>(), order.mutable_data_ptr<int64_t>(),
                                                 n, 0, end_bit, stream));
  const at::Tensor temp = at::empty({static_cast<int64_t>(temp_bytes)}, keys.options().dtype(at::kByte));
  C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(temp.mutable_data_ptr(), temp_bytes, keys_in, keys_out,
                                                 positions.const_data_ptr<int64_t>(), order.mutable_data_ptr<int64_t>(),
                                                 n, 0, end_bit, stream));
}

// Raises the CPU kernel's error for the first problem that stats (on the host) records. Reading
// the offending values costs more copies, on the error path only.
void raise_on_bad_csr(const char* op, const int64_t* stats, const Prepared& p) {
  const int64_t nnz = p.indices.numel(), num_offsets = p.offsets.numel(), rows = p.weight.size(0);
  TORCH_CHECK(stats[2] == 0, op, ": offsets[0] must be 0, got ", stats[2]);
  TORCH_CHECK(stats[3] == nnz, op, ": offsets[-1] must equal the number of indices (nnz = ", nnz,
              "), got offsets[-1] = offsets[", num_offsets - 1, "] = ", stats[3]);
  if (stats[0] >= 0) {
    const at::Tensor pair = p.offsets.narrow(0, stats[0], 2).to(at::kLong).cpu();
    const int64_t* v = pair.const_data_ptr<int64_t>();
    TORCH_CHECK(false, op, ": offsets must be non-decreasing, but offsets[", stats[0], "] = ", v[0], " > offsets[",
                stats[0] + 1, "] = ", v[1]);
  }
  if (stats[1] >= 0) {
    const at::Tensor id = p.indices.narrow(0, stats[1], 1).to(at::kLong).cpu();
    TORCH_CHECK(false, op, ": indices[", stats[1], "] = ", id.const_data_ptr<int64_t>()[0],
                " is out of range for weight with ", rows, " rows (valid ids are 0..", rows - 1, ")");
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> embedding_fm_cuda(
    const at::Tensor& weight_in, const at::Tensor& indices_in, const at::Tensor& offsets_in,
    const c10::optional<at::Tensor>& psw_in, const c10::optional<at::Tensor>& lw_in, int64_t num_fields,
    int64_t mode, at::IntArrayRef pooling, bool return_pooled, bool /*sparse_grad: the autograd's*/) {
  constexpr const char* op = "embedding_fm";
  // Checks first: a table on the CPU gets the error that says so, not the guard's.
  const Prepared p = prepare(op, weight_in, indices_in, offsets_in, psw_in, lw_in, num_fields, mode, pooling);
  const c10::cuda::CUDAGuard device_guard(p.weight.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int bounds = cuda::bounds_check_mode();
  if (cuda::checks_now(bounds)) {  // the one device->host sync of the forward (none in a fused step)
    const at::Tensor stats = at::full({kStatsSize}, -1, p.weight.options().dtype(at::kLong));
    launch_csr_check(p, stats, stream);
    cuda::copy_device_error(stats.mutable_data_ptr<int64_t>() + kStatsErrorWord, stream);
    const at::Tensor host = stats.cpu();
    raise_on_bad_csr(op, host.const_data_ptr<int64_t>(), p);
    cuda::raise_device_error(host.const_data_ptr<int64_t>() + kStatsErrorWord, stream);
  }
  const int64_t batch = p.batch, dim = p.weight.size(1);
  const auto launch = [&](auto scalar, auto index, auto* fm, auto* linear, auto* pooled) {
    using scalar_t = decltype(scalar);
    using index_t = decltype(index);
    const auto in = make_inputs<scalar_t, index_t>(p, num_fields, mode, bounds);
    dispatch_group(dim, [&](auto lanes, auto per) {
      constexpr int kLanes = decltype(lanes)::value, kPer = decltype(per)::value;
      cuda::launch(forward_kernel<scalar_t, index_t, kLanes, kPer>,
                   cuda::ceil_div(batch, cuda::kThreadsPerBlock / kLanes), cuda::kThreadsPerBlock, stream, in, fm,
                   linear, pooled);
    });
  };
  return embedding_fm_outputs(p, num_fields, return_pooled, launch);
}

EmbeddingFMGrads embedding_fm_backward_cuda(const EmbeddingFMBackwardCall& call) {
  const int64_t num_fields = call.num_fields, mode = call.mode;
  constexpr const char* op = "embedding_fm_backward";
  const Prepared p =
      prepare(op, call.weight, call.indices, call.offsets, call.psw, call.lw, num_fields, mode, call.pooling);
  // The forward's pooled output is checked but not used: on the GPU the second gather of the rows
  // mostly hits L2 (see the CPU kernel, where reusing it saves a cache miss per row).
  check_embedding_fm_backward_args(call.grad_fm, call.grad_linear, call.grad_pooled, call.pooled, p.weight, p.batch,
                                   num_fields);
  const c10::cuda::CUDAGuard device_guard(p.weight.device());
  const at::Tensor grad_fm = call.grad_fm.contiguous();
  const at::Tensor grad_linear = call.grad_linear.contiguous();
  const bool has_grad_pooled = call.grad_pooled.has_value() && call.grad_pooled->numel() > 0;
  const at::Tensor grad_pooled = has_grad_pooled ? call.grad_pooled->contiguous() : at::Tensor();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int bounds = cuda::bounds_check_mode();
  const int64_t nnz = p.indices.numel(), dim = p.weight.size(1), rows = p.weight.size(0);
  const auto options = p.weight.options();
  const auto long_options = options.dtype(at::kLong);
  const auto acc_type = at::toOpMathType(p.weight.scalar_type());

  // [0..3] the argument checks ("error" mode), [4] the number of unique rows U, the error word.
  const at::Tensor stats = at::full({kStatsSize}, -1, long_options);
  if (bounds == kBoundsError) launch_csr_check(p, stats, stream);

  const bool want_grad_x = p.psw.has_value() && call.per_sample_weights_grad;
  at::Tensor grad_x = want_grad_x ? at::zeros({nnz}, options.dtype(acc_type)) : at::Tensor();
  at::Tensor occ, lin_occ, order, sorted, head, seg;
  const bool narrow_keys = rows < std::numeric_limits<int32_t>::max();  // the sentinel `rows` fits
  if (nnz > 0) {
    occ = at::empty({nnz, dim}, options.dtype(acc_type));
    lin_occ = p.lw ? at::empty({nnz}, options.dtype(acc_type)) : at::Tensor();
    at::Tensor keys = at::full({nnz}, rows, options.dtype(narrow_keys ? at::kInt : at::kLong));
    if (p.batch > 0) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.weight.scalar_type(), "embedding_fm_backward_cuda",
                                      [&] {
        using scalar = scalar_t;
        using acc_t = at::opmath_type<scalar>;
        AT_DISPATCH_INDEX_TYPES(p.indices.scalar_type(), "embedding_fm_backward_cuda", [&] {
          const auto in = make_inputs<scalar, index_t>(p, num_fields, mode, bounds);
          dispatch_group(dim, [&](auto lanes, auto per) {
            constexpr int kLanes = decltype(lanes)::value, kPer = decltype(per)::value;
            cuda::launch(occurrence_grads_kernel<scalar, index_t, kLanes, kPer>,
                cuda::ceil_div(p.batch, cuda::kThreadsPerBlock / kLanes), cuda::kThreadsPerBlock, stream,
                in, grad_fm.const_data_ptr<scalar>(), grad_linear.const_data_ptr<scalar>(),
                has_grad_pooled ? grad_pooled.const_data_ptr<scalar>() : nullptr, occ.mutable_data_ptr<acc_t>(),
                want_grad_x ? grad_x.mutable_data_ptr<acc_t>() : nullptr, p.lw ? lin_occ.mutable_data_ptr<acc_t>() : nullptr,
                narrow_keys ? keys.mutable_data_ptr<int32_t>() : nullptr,
                narrow_keys ? nullptr : keys.mutable_data_ptr<int64_t>());
          });
        });
      });
    }
    // Stable radix sort (deterministic): the occurrences of each row, in position order.
    head = at::empty({nnz}, options.dtype(at::kInt));
    AT_DISPATCH_INDEX_TYPES(keys.scalar_type(), "embedding_fm_segments_cuda", [&] {
      sort_positions<index_t>(keys, rows, sorted, order, stream);
      cuda::launch(mark_segments_kernel<index_t>, cuda::grid_for(nnz), cuda::kThreadsPerBlock, stream,
                   sorted.const_data_ptr<index_t>(), nnz, rows, head.mutable_data_ptr<int32_t>());
    });
    seg = at::cumsum(head, 0, at::kLong);  // seg[q] = 1 + the index of q's unique row
    stats.narrow(0, 4, 1).copy_(seg.narrow(0, nnz - 1, 1));
  }

  int64_t num_unique = 0;
  if (nnz > 0 || bounds == kBoundsError) {  // the one device->host sync of the backward
    cuda::copy_device_error(stats.mutable_data_ptr<int64_t>() + kStatsErrorWord, stream);
    const at::Tensor host = stats.cpu();
    const int64_t* s = host.const_data_ptr<int64_t>();
    if (bounds == kBoundsError) raise_on_bad_csr(op, s, p);
    cuda::raise_device_error(s + kStatsErrorWord, stream);
    num_unique = nnz > 0 ? s[4] : 0;
  }

  at::Tensor unique_ids = at::empty({num_unique}, long_options);
  at::Tensor row_grads = at::empty({num_unique, dim}, options);
  at::Tensor linear_row_grads = at::empty({p.lw ? num_unique : 0}, options);
  if (num_unique > 0) {
    at::Tensor seg_start = at::empty({num_unique + 1}, long_options);
    AT_DISPATCH_INDEX_TYPES(sorted.scalar_type(), "embedding_fm_segments_cuda", [&] {
      cuda::launch(segment_starts_kernel<index_t>, cuda::grid_for(nnz), cuda::kThreadsPerBlock, stream,
                   sorted.const_data_ptr<index_t>(), head.const_data_ptr<int32_t>(), seg.const_data_ptr<int64_t>(), nnz,
                   rows, unique_ids.mutable_data_ptr<int64_t>(), seg_start.mutable_data_ptr<int64_t>());
    });
    // Bounds known without another sync: at most U + nnz / kSegmentChunk chunks, and the rows with
    // n >= 2 chunks hold at most 2 * (n - 1) of them, so at most 2 * nnz / kSegmentChunk partials.
    const int64_t max_chunks = num_unique + cuda::ceil_div(nnz, kSegmentChunk);
    const int64_t max_partials = 2 * cuda::ceil_div(nnz, kSegmentChunk);
    at::Tensor chunks = at::empty({num_unique}, long_options), long_chunks = at::empty({num_unique}, long_options);
    cuda::launch(chunk_count_kernel, cuda::grid_for(num_unique), cuda::kThreadsPerBlock, stream,
                 seg_start.const_data_ptr<int64_t>(), num_unique, chunks.mutable_data_ptr<int64_t>(),
                 long_chunks.mutable_data_ptr<int64_t>());
    const at::Tensor chunk_end = at::cumsum(chunks, 0), long_end = at::cumsum(long_chunks, 0);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.weight.scalar_type(), "embedding_fm_reduce_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const at::Tensor partial = at::empty({max_partials, dim}, options.dtype(acc_type));
      const at::Tensor linear_partial = at::empty({p.lw ? max_partials : 0}, options.dtype(acc_type));
      cuda::dispatch_lanes(cuda::lanes_for_dim(dim), [&](auto lanes) {
        constexpr int kLanes = decltype(lanes)::value;
        cuda::launch(chunk_reduce_kernel<scalar_t, kLanes>, cuda::ceil_div(max_chunks, cuda::kThreadsPerBlock / kLanes),
                cuda::kThreadsPerBlock, stream, occ.const_data_ptr<acc_t>(),
                p.lw ? lin_occ.const_data_ptr<acc_t>() : nullptr,
                order.const_data_ptr<int64_t>(), seg_start.const_data_ptr<int64_t>(),
                chunk_end.const_data_ptr<int64_t>(), long_end.const_data_ptr<int64_t>(), num_unique, max_chunks, dim,
                row_grads.mutable_data_ptr<scalar_t>(),
                p.lw ? linear_row_grads.mutable_data_ptr<scalar_t>() : nullptr, partial.mutable_data_ptr<acc_t>(),
                p.lw ? linear_partial.mutable_data_ptr<acc_t>() : nullptr);
        cuda::launch(long_segment_kernel<scalar_t, kLanes>, cuda::ceil_div(num_unique, cuda::kThreadsPerBlock / kLanes),
                cuda::kThreadsPerBlock, stream, partial.const_data_ptr<acc_t>(),
                p.lw ? linear_partial.const_data_ptr<acc_t>() : nullptr,
                long_end.const_data_ptr<int64_t>(), num_unique, dim, row_grads.mutable_data_ptr<scalar_t>(),
                p.lw ? linear_row_grads.mutable_data_ptr<scalar_t>() : nullptr);
      });
    });
  }
  at::Tensor grad_psw = want_grad_x ? grad_x.to(p.weight.scalar_type()) : at::empty({0}, options);
  return {unique_ids, row_grads, linear_row_grads, grad_psw};
}

}  // namespace deepfm_fast
