"""W5: the data path, raw file -> encoded arrays, and encoded arrays -> CSR training batches.

Run: ``OMP_WAIT_POLICY=PASSIVE python -m pytest benchmarks/bench_data.py --benchmark-only -q``.
Rows/s go to ``benchmark.extra_info["rows_per_s"]``. The batch path must stay far below a DeepFM
step (~10-100 ms at B=4096): the per-batch time is in ``extra_info["ms_per_batch"]``.
"""


import pytest
import torch

from deepfm_fast.data import CriteoFormat, LibFMFormat, iterate_batches, make_synthetic, prepare_data, to_csr
from testing import shared_data_file


@pytest.mark.parametrize("name,fmt,rel", [
    ("criteo_csv_gz", CriteoFormat(layout="csv"), "criteo_sample_10k/criteo_sampled_data_10k.csv.gz"),
    ("frappe_libfm", LibFMFormat(fields="position"), "frappe/frappe.validation.libfm"),
])
def test_raw_to_arrays(benchmark, name, fmt, rel):
    path = shared_data_file(rel)
    data = benchmark.pedantic(prepare_data, args=(fmt, path), rounds=3, iterations=1)
    rows = len(data.train)
    assert rows > 0 and torch.isin(data.train.labels, torch.tensor([0.0, 1.0])).all()
    benchmark.extra_info["rows"] = rows
    benchmark.extra_info["rows_per_s"] = rows / benchmark.stats.stats.median


@pytest.mark.parametrize("batch_size", [4096])
def test_arrays_to_csr_batches(benchmark, batch_size):
    torch.set_num_threads(1)
    data = make_synthetic(60_000, seed=0).train
    fields = data.fields
    first = next(iterate_batches(data, batch_size, shuffle=True, seed=0))
    idx, off, w = to_csr(first, fields)
    assert off.shape == (batch_size * len(fields) + 1,) and off[-1] == idx.numel() == w.numel()

    def epoch():
        n = 0
        for batch in iterate_batches(data, batch_size, shuffle=True, seed=1):
            to_csr(batch, fields)
            n += 1
        return n

    batches = benchmark.pedantic(epoch, rounds=5, iterations=1, warmup_rounds=1)
    median = benchmark.stats.stats.median
    benchmark.extra_info["threads"] = 1
    benchmark.extra_info["rows_per_s"] = len(data) / median
    benchmark.extra_info["ms_per_batch"] = 1e3 * median / batches
    assert 1e3 * median / batches < 10.0, "the batch path must be far below a training step"
