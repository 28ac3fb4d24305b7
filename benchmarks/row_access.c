/* The physical limit of the embedding update on this machine: random-row gathers and random-row
 * read-modify-writes of a large table, in plain C, with software prefetch (the fastest way we know
 * to issue them). Built and called by bench_memory_limit.py through ctypes. */
#include <stdint.h>

#define PREFETCH_DISTANCE 8

static void prefetch_row(const float* row, int64_t dim, int write) {
  for (int64_t k = 0; k < dim; k += 16) {
    if (write) __builtin_prefetch(row + k, 1, 1);
    else __builtin_prefetch(row + k, 0, 1);
  }
}

/* out[k] += table[ids[i], k] for every i: reads only. */
void gather_rows(const float* table, const int64_t* ids, int64_t n, int64_t dim, float* out) {
  for (int64_t i = 0; i < n; ++i) {
    if (i + PREFETCH_DISTANCE < n) prefetch_row(table + ids[i + PREFETCH_DISTANCE] * dim, dim, 0);
    const float* row = table + ids[i] * dim;
    for (int64_t k = 0; k < dim; ++k) out[k] += row[k];
  }
}

/* table[ids[i], :] -= lr * grads[i, :] for every i: read, modify, write. */
void update_rows(float* table, const int64_t* ids, const float* grads, int64_t n, int64_t dim, float lr) {
  for (int64_t i = 0; i < n; ++i) {
    if (i + PREFETCH_DISTANCE < n) prefetch_row(table + ids[i + PREFETCH_DISTANCE] * dim, dim, 1);
    float* row = table + ids[i] * dim;
    const float* grad = grads + i * dim;
    for (int64_t k = 0; k < dim; ++k) row[k] -= lr * grad[k];
  }
}
