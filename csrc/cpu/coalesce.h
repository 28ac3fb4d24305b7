// Coalescing of embedding-row ids on the CPU: the step shared by every table gradient (dense,
// sparse COO, and the fused optimizers that update touched rows in place).
//
//   CoalescedIds c = coalesce_ids(ids, nnz, num_rows);
//   for u in [0, c.num_unique()):  row c.unique[u] was touched by the occurrences
//        c.order[c.segment[u] .. c.segment[u + 1])   (positions into ids, ascending)
//
// A stable LSD radix sort of (id, position) pairs, with as many 11-bit digits as num_rows needs
// (2 passes up to 4M rows, 3 up to 8G): O(nnz) and deterministic, and the positions of one id keep
// their original order, so a segment reduction in that order gives bit-identical results run to
// run. A consumer parallelises over u: no two threads ever write the same row.
#pragma once

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

// ids must already be validated to lie in [0, num_rows).
template <typename index_t>
CoalescedIds coalesce_ids(const index_t* ids, int64_t nnz, int64_t num_rows) {
  CoalescedIds out;
  out.segment.push_back(0);
  if (nnz == 0) return out;
  constexpr int kDigitBits = 11;
  constexpr int64_t kBuckets = int64_t(1) << kDigitBits;
  int bits = 1;
  while (bits < 63 && (int64_t(1) << bits) < num_rows) ++bits;
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
  out.rank.resize(nnz);
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
