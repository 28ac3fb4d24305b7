"""Shared benchmark settings: one thread (the CPU comparisons of benchmarks/README.md).

Implementations are timed ALTERNATING in one process, so that noise on these shared machines hits
all of them alike; compare medians and ratios, not single runs. The timing helper is
``deepfm_fast.timing`` (``deepfm-fast demo`` uses it too); the bench files import it from here."""
import os

import pytest
import torch

import recording
from deepfm_fast.timing import alternating_medians, synchronize  # noqa: F401  (re-exported)


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    if os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE":
        # libgomp's spin-wait makes 2-thread ops several times slower on a busy machine.
        pytest.exit("set OMP_WAIT_POLICY=PASSIVE for benchmarks (see benchmarks/README.md)", returncode=2)
    threads = int(os.environ.get("DEEPFM_FAST_BENCH_THREADS", "1"))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    yield threads
    torch.set_num_threads(previous)


def pytest_benchmark_update_machine_info(config, machine_info):
    """The --benchmark-json files name the torch version and the command too (recording.py)."""
    args = ["-m", "pytest", *config.invocation_params.args]
    machine_info.update(recording.machine(), command=recording.command(args))
