"""Shared benchmark settings: one thread (the CPU comparisons of ../shared/docs/benchmarks.md), and
a helper that times implementations ALTERNATING in one process, so that noise on these shared
machines hits all of them alike; compare medians and ratios, not single runs."""
import os
import statistics
import time

import pytest
import torch


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


def synchronize(device):
    if device == "cuda":
        torch.cuda.synchronize()


def alternating_medians(fns, rounds=30, warmup=3, device="cpu"):
    """Runs each fn of {name: fn} once per round, in turn; returns {name: median seconds}."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    synchronize(device)
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(samples) for name, samples in times.items()}
