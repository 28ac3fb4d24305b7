"""The physical limit: random-row gather and read-modify-write rates of this machine.

A 10.4 M-row table (26 x 400,000, Criteo-sized) of 64-byte (K=16) or 256-byte (K=64) float32
rows; 106,496 random rows per call (= B*F of a B=4096, 26-field step), one thread, plain C with
software prefetch (benchmarks/row_access.c, built with gcc -O3 here). Ids in random order, and
sorted unique (the order in which the fused optimizers update rows). Rates go to extra_info;
benchmarks/results/fused_optim_cpu.md relates the fused FM step to them.

    OMP_WAIT_POLICY=PASSIVE python -m pytest benchmarks/bench_memory_limit.py --benchmark-only \
        --benchmark-json benchmarks/results/memory_limit_cpu.json
"""
import ctypes
import os
import subprocess
import tempfile

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROWS = 26 * 400_000
ACCESSES = 4096 * 26


@pytest.fixture(scope="module")
def row_access():
    build_dir = tempfile.mkdtemp(prefix="deepfm_fast_row_access_")
    library = os.path.join(build_dir, "row_access.so")
    subprocess.run(["gcc", "-O3", "-shared", "-fPIC", "-o", library, os.path.join(HERE, "row_access.c")], check=True)
    lib = ctypes.CDLL(library)
    pointer, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.gather_rows.argtypes = [pointer, pointer, i64, i64, pointer]
    lib.update_rows.argtypes = [pointer, pointer, pointer, i64, i64, ctypes.c_float]
    return lib


def ptr(array):
    return array.ctypes.data_as(ctypes.c_void_p)


@pytest.mark.parametrize("order", ["random", "sorted_unique"])
@pytest.mark.parametrize("access", ["gather", "read_modify_write"])
@pytest.mark.parametrize("dim", [16, 64], ids=["64B_rows", "256B_rows"])
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
