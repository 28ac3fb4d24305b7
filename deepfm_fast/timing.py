"""Time implementations against each other on a busy machine: alternate them, compare medians.

On shared machines the load changes from one second to the next, so timing A for a while and
then B measures each on a different machine. :func:`alternating_medians` runs every
implementation once per round, in turn, so that noise hits them alike; compare the medians and
their ratios, never single runs. Warm-up rounds (allocator, caches, lazy initialisation) are not
timed. CUDA work is asynchronous: on a GPU each timed call ends with a synchronize, so that the
time is that of the work and not of its launch (as FBGEMM's ``bench/bench_utils.py`` does).

Used by ``deepfm-fast demo`` and by the benchmarks (``benchmarks/``)::

    medians = alternating_medians({"fused": lambda: fused_step(batch), "reference": lambda: ref_step(batch)},
                                  rounds=30)
    print(f"speed-up {medians['reference'] / medians['fused']:.2f}x")
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, Union

import torch

__all__ = ["alternating_medians", "synchronize"]


def synchronize(device: Union[str, torch.device]) -> None:
    """Wait for the queued work of ``device`` (a no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def alternating_medians(fns: Dict[str, Callable[[], object]], rounds: int = 30, warmup: int = 3,
                        device: Union[str, torch.device] = "cpu") -> Dict[str, float]:
    """Median seconds per call of each function, timed alternating.

    Args:
        fns: name -> function of no arguments; called in this order in every round. A function
            that steps through batches (e.g. ``itertools.cycle``) sees the same batch as the
            others in the same round.
        rounds: timed calls of each function.
        warmup: untimed rounds first.
        device: where the functions queue their work; CUDA is synchronised inside each timed call.

    Returns:
        ``{name: median seconds}``.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    synchronize(device)
    times: Dict[str, list] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(samples) for name, samples in times.items()}
