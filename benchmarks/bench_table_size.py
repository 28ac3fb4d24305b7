"""The FM-only training step (W2: K=16, B=4096, uniform ids, one thread) against the table size,
100 k to 10.4 M rows (26 fields): fused SGD on packed rows, FBGEMM's TBE EXACT_SGD (skipped without
fbgemm-gpu-cpu), nn.Embedding(sparse=True) + SGD, and the same-run limit (a read-modify-write of the
step's unique rows in 80-byte records). Variants alternate within each size; the medians go to
extra_info, and plot_table_size.py draws them. Run:

    OMP_WAIT_POLICY=PASSIVE python -m pytest benchmarks/bench_table_size.py --benchmark-only \
        --benchmark-json benchmarks/results/table_size_cpu.json
    python benchmarks/plot_table_size.py benchmarks/results/table_size_cpu.json
"""
import gc

import pytest

import workloads as W
from bench_fused_optim import build, run_case

TOTAL_ROWS = [104_000, 312_000, 1_040_000, 3_120_000, 10_400_000]  # multiples of the 26 fields
VARIANTS = ["fused_SGD", "fbgemm_tbe_EXACT_SGD", "embedding_sparse_SGD"]


@pytest.mark.parametrize("total_rows", TOTAL_ROWS)
def test_fm_step_by_table_size(benchmark, total_rows):
    rows = total_rows // W.FIELDS
    variants = build(W.W2_VARIANTS, VARIANTS, 16, rows=rows)
    run_case(benchmark, "W2 FM-only step by table size", variants, 4096, 16, "uniform", rounds=25, rows=rows)
    del variants
    gc.collect()
