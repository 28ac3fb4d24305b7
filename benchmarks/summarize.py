"""Markdown tables from a pytest-benchmark JSON written by this project's benchmarks.

    python benchmarks/summarize.py benchmarks/results/fused_optim_cpu.json

Each benchmark's extra_info holds the alternating medians of every implementation (ms) and the
speed-up of the fused one over each other; this prints them, with the machine they ran on.
"""
import json
import sys

from recording import machine_line


def table(data):
    lines = ["| benchmark | medians, ms (alternating) | fused is faster by |", "|---|---|---|"]
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        medians = info.get("alternating_median_ms")
        speedups = info.get("speedup_of_fused_vs", {})
        if medians is None:
            stats = bench["stats"]
            lines.append(f"| {bench['name']} | median {stats['median'] * 1e3:.3f} | |")
            continue
        med = ", ".join(f"{name} {value:g}" for name, value in medians.items())
        ups = ", ".join(f"{value:g}x vs {name}" for name, value in speedups.items())
        lines.append(f"| {bench['name']} | {med} | {ups} |")
    return "\n".join(lines)


def main(paths):
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        print(f"### {path}\n\n{machine_line(data.get('machine_info', {}), data.get('datetime', '?'))}\n\n"
              f"{table(data)}\n")


if __name__ == "__main__":
    main(sys.argv[1:])
