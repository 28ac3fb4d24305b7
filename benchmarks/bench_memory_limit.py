"""The physical limit: random-row gather and read-modify-write rates of this machine.

A 10.4 M-row table (26 x 400,000, Criteo-sized) of 64-byte (K=16) or 256-byte (K=64) float32
rows, or of the packed records of EmbeddingFM (80 bytes: K=16 with SGD or row-wise Adagrad; 224:
with Adam); 106,496 random rows per call (= B*F of a B=4096, 26-field step), one thread, plain C with
software prefetch (benchmarks/row_access.c, built with gcc -O3 here). Ids in random order, and
sorted unique (the order in which the fused optimizers update rows). Rates go to extra_info;
benchmarks/results/fused_optim_cpu.md relates the fused FM step to them.

    OMP_WAIT_POLICY=PASSIVE python -m pytest benchmarks/bench_memory_limit.py --benchmark-only \
        --benchmark-json benchmarks/results/memory_limit_cpu.json
"""
import numpy as np
import pytest

import row_access as R

ROWS = 26 * 400_000
ACCESSES = 4096 * 26


@pytest.fixture(scope="module")
def row_access():
    return R.library()


ptr = R.ptr


@pytest.mark.parametrize("order", ["random", "sorted_unique"])
@pytest.mark.parametrize("access", ["gather", "read_modify_write"])
# 80 and 224 bytes: the packed records of a K=16 table with SGD or row-wise Adagrad, and with Adam.
@pytest.mark.parametrize("dim", [16, 20, 56, 64], ids=["64B_rows", "80B_records", "224B_records", "256B_rows"])
def test_random_row_rate(benchmark, row_access, dim, access, order):
    rng = np.random.default_rng(0)
    table = rng.standard_normal((ROWS, dim), dtype=np.float32)
    ids = rng.integers(0, ROWS, ACCESSES, dtype=np.int64)
    if order == "sorted_unique":
        ids = np.unique(ids)
    grads = rng.standard_normal((len(ids), dim), dtype=np.float32)
    out = np.zeros(dim, dtype=np.float32)
    if access == "gather":
        expected = table[ids].sum(0)
        row_access.gather_rows(ptr(table), ptr(ids), len(ids), dim, ptr(out))
        np.testing.assert_allclose(out, expected, rtol=1e-3, atol=1e-2)
        run = lambda: row_access.gather_rows(ptr(table), ptr(ids), len(ids), dim, ptr(out))  # noqa: E731
    else:
        before = table[ids[:3]].copy()
        row_access.update_rows(ptr(table), ptr(ids), ptr(grads), len(ids), dim, 0.5)
        if order == "sorted_unique":
            np.testing.assert_allclose(table[ids[:3]], before - 0.5 * grads[:3], rtol=1e-5, atol=1e-5)
        run = lambda: row_access.update_rows(ptr(table), ptr(ids), ptr(grads), len(ids), dim, 0.0)  # noqa: E731
    benchmark.group = f"memory limit {dim * 4}-byte rows"
    benchmark.pedantic(run, rounds=20, warmup_rounds=2)
    seconds = benchmark.stats.stats.median
    benchmark.extra_info.update(rows_per_call=len(ids), row_bytes=dim * 4, table_rows=ROWS,
                                million_rows_per_second=round(len(ids) / seconds / 1e6, 2),
                                gb_per_second=round(len(ids) * dim * 4 / seconds / 1e9, 2))
