"""What every benchmark result records, written in one place.

benchmarks/README.md asks each result in results/ to name the machine, CPU model, torch
version, thread count and command, and the comparisons to give their alternating medians and
ratios. The pieces:

* :func:`machine`: platform, CPU model, cores, Python, torch, OMP_WAIT_POLICY. conftest.py adds it
  (and :func:`command`) to pytest-benchmark's ``machine_info``; quality_table.py and peak_rss.py,
  which write their own JSON, put it in theirs.
* :func:`command`: the command line that reproduces a run, with the environment it depends on.
* :func:`alternating_info`: a comparison's ``extra_info``: threads, medians in ms, and how many
  times faster the fused implementation is than each other one (what summarize.py tabulates).
* :func:`machine_line`: one line naming the machine of a results file, for the Markdown summaries.
"""
import os
import platform
import shlex
from typing import Dict, Optional, Sequence

import torch


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> Dict[str, object]:
    """The machine and the versions a result was measured with."""
    return {"platform": platform.platform(), "processor": cpu_model(), "cpus_visible": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}


def command(args: Sequence[str], program: str = "python") -> str:
    """``program args``, preceded by the settings the benchmarks read from the environment."""
    env = [f"{k}={shlex.quote(v)}" for k, v in sorted(os.environ.items())
           if k == "OMP_WAIT_POLICY" or k.startswith("DEEPFM_FAST_")]
    return " ".join(env + [program] + [shlex.quote(str(a)) for a in args])


def alternating_info(medians: Dict[str, float], fused: Optional[str] = None, digits: int = 3) -> Dict[str, object]:
    """``extra_info`` of a comparison from its alternating medians (seconds, fused first unless named)."""
    fused = next(iter(medians)) if fused is None else fused
    return {"threads": torch.get_num_threads(),
            "alternating_median_ms": {name: round(m * 1e3, digits) for name, m in medians.items()},
            "speedup_of_fused_vs": {name: round(m / medians[fused], 2) for name, m in medians.items() if name != fused}}


def machine_line(info: Dict[str, object], when: Optional[str] = None) -> str:
    """One line naming the machine of ``info`` (:func:`machine`, or pytest-benchmark's ``machine_info``)."""
    cpu = info.get("cpu") or {}
    line = (f"Machine: {info.get('processor') or cpu.get('brand_raw', '?')}, "
            f"{info.get('cpus_visible') or cpu.get('count', '?')} cores, "
            f"{info.get('platform') or str(info.get('system', '?')) + ' ' + str(info.get('release', ''))}, "
            f"Python {info.get('python') or info.get('python_version', '?')}")
    if info.get("torch"):
        line += f", torch {info['torch']}"
    if when:
        line += f"; run {when}"
    if info.get("command"):
        line += f"; command: `{info['command']}`"
    return line
