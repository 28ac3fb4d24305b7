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
// Fast path (num_rows <= 2^32, nnz < 2^32, the usual case): each pair is packed into one uint64
// (id << 32 | position), and the id bits are split into as few passes as keep the histogram in
// L1/L2 (digits of at most 12 bits: 1 pass up to 4096 rows, 2 passes up to 16.7 M rows, 3 up to
// 2^32), all histograms counted in one read. One 8-byte array moves per pass instead of two.
#pragma once

#include <algorithm>
#include <cstdint>
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

// Stable LSD radix sort of v by bits [lo, lo + bits); tmp is scratch of v's size.
inline void radix_sort_bits(std::vector<uint64_t>& v, std::vector<uint64_t>& tmp, int lo, int bits) {
  constexpr int kMaxDigitBits = 12;
  const int passes = std::max(1, (bits + kMaxDigitBits - 1) / kMaxDigitBits);
  const int digit_bits = (bits + passes - 1) / passes;
  const int64_t buckets = int64_t(1) << digit_bits;
  const uint64_t mask = static_cast<uint64_t>(buckets - 1);
  const int64_t n = static_cast<int64_t>(v.size());
  std::vector<int64_t> count(passes * buckets, 0);
  for (int64_t i = 0; i < n; ++i) {
    const uint64_t x = v[i];
    for (int pass = 0; pass < passes; ++pass) ++count[pass * buckets + ((x >> (lo + pass * digit_bits)) & mask)];
  }
  for (int pass = 0; pass < passes; ++pass) {
    int64_t* c = count.data() + pass * buckets;
    if (c[(v[0] >> (lo + pass * digit_bits)) & mask] == n) continue;  // one digit value: already in order
    int64_t running = 0;
    for (int64_t d = 0; d < buckets; ++d) {
      const int64_t k = c[d];
      c[d] = running;
      running += k;
    }
    const int shift = lo + pass * digit_bits;
    for (int64_t i = 0; i < n; ++i) {
      const uint64_t x = v[i];
      tmp[c[(x >> shift) & mask]++] = x;
    }
    v.swap(tmp);
  }
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
  if (bits <= 32 && nnz <= (int64_t(1) << 32)) {
    std::vector<uint64_t> packed(nnz), tmp(nnz);
    for (int64_t i = 0; i < nnz; ++i) packed[i] = (static_cast<uint64_t>(ids[i]) << 32) | static_cast<uint64_t>(i);
    detail::radix_sort_bits(packed, tmp, 32, bits);
    std::vector<uint64_t>().swap(tmp);
    out.unique.reserve(std::min<int64_t>(nnz, num_rows));
    out.segment.reserve(std::min<int64_t>(nnz, num_rows) + 1);
    uint64_t previous = ~uint64_t(0);
    for (int64_t i = 0; i < nnz; ++i) {
      const uint64_t key = packed[i] >> 32;
      const int64_t position = static_cast<int64_t>(packed[i] & 0xffffffffu);
      out.order[i] = position;
      out.rank[position] = i;
      if (key != previous) {
        if (i > 0) out.segment.push_back(i);
        out.unique.push_back(static_cast<int64_t>(key));
        previous = key;
      }
    }
    out.segment.push_back(nnz);
    return out;
  }
  // General case: sort the ids, carrying the positions, one 11-bit digit per pass.
  constexpr int kDigitBits = 11;
  constexpr int64_t kBuckets = int64_t(1) << kDigitBits;
  const int passes = (bits + kDigitBits - 1) / kDigitBits;
  std::vector<uint64_t> key(nnz), key_tmp(nnz);
  std::vector<int64_t> pos(nnz), pos_tmp(nnz);
  for (int64_t i = 0; i < nnz; ++i) {
    key[i] = static_cast<uint64_t>(ids[i]);
    pos[i] = i;
  }
  std::vector<int64_t> count(kBuckets);
  for (int pass = 0; pass < passes; ++pass) {
    const int shift = pass * kDigitBits;
    std::fill(count.begin(), count.end(), 0);
    for (int64_t i = 0; i < nnz; ++i) ++count[(key[i] >> shift) & (kBuckets - 1)];
    int64_t running = 0;
    for (int64_t d = 0; d < kBuckets; ++d) {
      const int64_t c = count[d];
      count[d] = running;
      running += c;
    }
    for (int64_t i = 0; i < nnz; ++i) {
      const int64_t at = count[(key[i] >> shift) & (kBuckets - 1)]++;
      key_tmp[at] = key[i];
      pos_tmp[at] = pos[i];
    }
    key.swap(key_tmp);
    pos.swap(pos_tmp);
  }
  out.order = std::move(pos);
  for (int64_t q = 0; q < nnz; ++q) out.rank[out.order[q]] = q;
  for (int64_t i = 0; i < nnz; ++i) {
    if (i == 0 || key[i] != key[i - 1]) {
      if (i > 0) out.segment.push_back(i);
      out.unique.push_back(static_cast<int64_t>(key[i]));
    }
  }
  out.segment.push_back(nnz);
  return out;
}

}  // namespace deepfm_fast
