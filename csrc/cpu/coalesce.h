// Coalescing of embedding-row ids on the CPU: the step shared by every table gradient (dense,
// sparse COO, and the fused optimizers that update touched rows in place).
//
//   CoalescedIds c = coalesce_ids(ids, nnz, num_rows);
//   for u in [0, c.num_unique()):  row c.unique[u] was touched by the occurrences
//        c.order[c.segment[u] .. c.segment[u + 1])   (positions into ids, ascending)
//
// A stable LSD radix sort of (id, position) pairs over the nnz keys only (never O(num_rows)
// memory or work): O(nnz) and deterministic, and the positions of one id keep their original
// order, so a segment reduction in that order gives bit-identical results run to run. A consumer
// parallelises over u: no two threads ever write the same row.
//
// The id bits are split into as few passes as keep the histogram in L1/L2 (digits of at most 12
// bits: 1 pass up to 4096 rows, 2 passes up to 16.7 M rows, 3 up to 2^32). In the usual case
// (num_rows <= 2^32, nnz <= 2^32) each pair is packed into one uint64 (id << 32 | position), so one
// 8-byte array moves per pass instead of two.
#pragma once

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

namespace deepfm_fast {

struct CoalescedIds {
  std::vector<int64_t> unique;   // [U] sorted distinct ids
  std::vector<int64_t> segment;  // [U + 1] boundaries into order
  std::vector<int64_t> order;    // [nnz] positions of ids, grouped by id (ascending within a group)
  std::vector<int64_t> rank;     // [nnz] inverse of order: occurrence p sits at rank[p] in the sorted list
  int64_t num_unique() const { return static_cast<int64_t>(unique.size()); }
};

namespace detail {

inline int id_bits(int64_t num_rows) {
  int bits = 1;
  while (bits < 63 && (int64_t(1) << bits) < num_rows) ++bits;
  return bits;
}

// Stable LSD radix sort of `v` by the `bits` low bits of key(item), in as few passes as keep the
// histogram in L1/L2 (digits of at most 12 bits), all histograms counted in one read; tmp is
// scratch of v's size.
template <typename Item, typename Key>
void radix_sort(std::vector<Item>& v, std::vector<Item>& tmp, int bits, Key key) {
  constexpr int kMaxDigitBits = 12;
  const int passes = std::max(1, (bits + kMaxDigitBits - 1) / kMaxDigitBits);
  const int digit_bits = (bits + passes - 1) / passes;
  const int64_t buckets = int64_t(1) << digit_bits;
  const uint64_t mask = static_cast<uint64_t>(buckets - 1);
  const int64_t n = static_cast<int64_t>(v.size());
  std::vector<int64_t> count(passes * buckets, 0);
  for (int64_t i = 0; i < n; ++i) {
    const uint64_t k = key(v[i]);
    for (int pass = 0; pass < passes; ++pass) ++count[pass * buckets + ((k >> (pass * digit_bits)) & mask)];
  }
  for (int pass = 0; pass < passes; ++pass) {
    int64_t* c = count.data() + pass * buckets;
    const int shift = pass * digit_bits;
    if (c[(key(v[0]) >> shift) & mask] == n) continue;  // one digit value: already in order
    int64_t running = 0;
    for (int64_t d = 0; d < buckets; ++d) {
      const int64_t k = c[d];
      c[d] = running;
      running += k;
    }
    for (int64_t i = 0; i < n; ++i) tmp[c[(key(v[i]) >> shift) & mask]++] = v[i];
    v.swap(tmp);
  }
}

// The sorted (id, position) pairs -> CoalescedIds.
template <typename Item, typename Id, typename Position>
void fill_coalesced(const std::vector<Item>& sorted, Id id, Position position, CoalescedIds& out) {
  const int64_t nnz = static_cast<int64_t>(sorted.size());
  for (int64_t i = 0; i < nnz; ++i) {
    const int64_t key = id(sorted[i]), p = position(sorted[i]);
    out.order[i] = p;
    out.rank[p] = i;
    if (i == 0 || key != id(sorted[i - 1])) {
      if (i > 0) out.segment.push_back(i);
      out.unique.push_back(key);
    }
  }
  out.segment.push_back(nnz);
}

}  // namespace detail

// ids must already be validated to lie in [0, num_rows).
template <typename index_t>
CoalescedIds coalesce_ids(const index_t* ids, int64_t nnz, int64_t num_rows) {
  CoalescedIds out;
  out.segment.push_back(0);
  if (nnz == 0) return out;
  const int bits = detail::id_bits(num_rows);
  out.order.resize(nnz);
  out.rank.resize(nnz);
  out.unique.reserve(std::min<int64_t>(nnz, num_rows));
  out.segment.reserve(std::min<int64_t>(nnz, num_rows) + 1);
  if (bits <= 32 && nnz <= (int64_t(1) << 32)) {
    // The usual case: (id << 32 | position) in one uint64, one 8-byte array moved per pass.
    std::vector<uint64_t> packed(nnz), tmp(nnz);
    for (int64_t i = 0; i < nnz; ++i) packed[i] = (static_cast<uint64_t>(ids[i]) << 32) | static_cast<uint64_t>(i);
    detail::radix_sort(packed, tmp, bits, [](uint64_t x) { return x >> 32; });
    detail::fill_coalesced(
        packed, [](uint64_t x) { return static_cast<int64_t>(x >> 32); },
        [](uint64_t x) { return static_cast<int64_t>(x & 0xffffffffu); }, out);
    return out;
  }
  // More than 2^32 rows or ids: the pairs side by side.
  std::vector<std::pair<uint64_t, int64_t>> pairs(nnz), tmp(nnz);
  for (int64_t i = 0; i < nnz; ++i) pairs[i] = {static_cast<uint64_t>(ids[i]), i};
  detail::radix_sort(pairs, tmp, bits, [](const std::pair<uint64_t, int64_t>& x) { return x.first; });
  detail::fill_coalesced(
      pairs, [](const std::pair<uint64_t, int64_t>& x) { return static_cast<int64_t>(x.first); },
      [](const std::pair<uint64_t, int64_t>& x) { return x.second; }, out);
  return out;
}

}  // namespace deepfm_fast
