"""A small timing harness for the GPU check (benchmarks/gpu_check.sh): figures written as measured.

- `time_per_call(fn, device)`: median seconds per call over back-to-back calls. On CUDA, events
  bracket `calls` calls queued back to back (no synchronize between them, so microsecond kernels
  are not timed as launch + sync latency); on the CPU, `time.perf_counter` brackets the same loop.
- `alternating(fns, device)`: every function timed once per round, in turn, so that drift (clocks,
  other load) hits them alike; medians per function.
- `FigureLog(path)`: one JSON object per line, flushed and fsynced at once, each carrying the
  environment (GPU name, driver, torch and CUDA versions): a stage cut at its time limit keeps every
  figure it had written.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from typing import Callable, Dict, Optional

import torch

__all__ = ["environment", "time_per_call", "alternating", "FigureLog"]


def _driver_version() -> Optional[str]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
        return out.strip().splitlines()[0] if out.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


_ENVIRONMENT: Dict[str, Dict] = {}


def environment(device: str) -> Dict:
    """What a figure was measured on (computed once per device)."""
    if device not in _ENVIRONMENT:
        env = {"device": device, "torch": torch.__version__, "cuda": torch.version.cuda,
               "python": platform.python_version(), "host": platform.node(), "cpu_threads": torch.get_num_threads()}
        if torch.device(device).type == "cuda":
            props = torch.cuda.get_device_properties(device)
            env.update(gpu=props.name, sm_count=props.multi_processor_count,
                       capability=f"{props.major}.{props.minor}", gpu_memory_gib=round(props.total_memory / 2**30, 1),
                       driver=_driver_version())
        else:
            env.update(gpu=None, driver=None, cpu=platform.processor() or platform.machine())
        _ENVIRONMENT[device] = env
    return _ENVIRONMENT[device]


def _is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def synchronize(device) -> None:
    if _is_cuda(device):
        torch.cuda.synchronize(device)


def _time_once(fn: Callable[[], object], device, calls: int) -> float:
    """Seconds per call of `calls` calls back to back."""
    if _is_cuda(device):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / calls
    begin = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - begin) / calls


def calls_for(fn: Callable[[], object], device, target_s: float = 2e-3, max_calls: int = 100) -> int:
    """Calls per timed repetition so that one repetition lasts about `target_s` (at least 1)."""
    fn()
    synchronize(device)
    once = _time_once(fn, device, 1)
    return max(1, min(max_calls, int(target_s / max(once, 1e-7))))


def time_per_call(fn: Callable[[], object], device, reps: int = 7, warmup: int = 2,
                  calls: Optional[int] = None) -> Dict:
    """Median (and min, max) seconds per call over `reps` repetitions of `calls` back-to-back calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    calls = calls or calls_for(fn, device)
    samples = [_time_once(fn, device, calls) for _ in range(reps)]
    return {"median_s": statistics.median(samples), "min_s": min(samples), "max_s": max(samples), "reps": reps,
            "calls_per_rep": calls}


def alternating(fns: Dict[str, Callable[[], object]], device, rounds: int = 7, warmup: int = 2,
                on_result: Optional[Callable[[str, Dict], None]] = None) -> Dict[str, Dict]:
    """`time_per_call` of every function, alternating round by round; `on_result(name, timing)` is
    called for each function as soon as its figure is known (after the last round)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    synchronize(device)
    calls = {name: calls_for(fn, device) for name, fn in fns.items()}
    samples: Dict[str, list] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name].append(_time_once(fn, device, calls[name]))
    results = {}
    for name, values in samples.items():
        results[name] = {"median_s": statistics.median(values), "min_s": min(values), "max_s": max(values),
                         "reps": rounds, "calls_per_rep": calls[name]}
        if on_result is not None:
            on_result(name, results[name])
    return results


class FigureLog:
    """Appends one JSON line per figure to `path`, each with the environment of its device."""

    def __init__(self, path: str, device: str, **common):
        self.path, self.device, self.common = path, device, common
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def write(self, **figure) -> Dict:
        record = {"time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  **self.common, **figure, "env": environment(self.device)}
        with open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return record
