"""Draws bench_table_size.py's results: FM step time against table size, one line per variant.

    python benchmarks/plot_table_size.py benchmarks/results/table_size_cpu.json [out.png]

Needs matplotlib (``pip install -e '.[bench]'``); used through its Agg canvas, no display needed.
"""
import json
import sys
from collections import defaultdict
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from recording import machine_line

LABELS = {"fused_SGD": "deepfm_fast fused SGD (packed rows)", "fbgemm_tbe_EXACT_SGD": "FBGEMM TBE EXACT_SGD",
          "embedding_sparse_SGD": "nn.Embedding(sparse=True) + SGD",
          "limit_update_80B_records": "limit: read-modify-write of the step's rows"}


def main(json_path: str, png_path: str = "") -> Path:
    results = json.loads(Path(json_path).read_text())
    series = defaultdict(list)
    for bench in results["benchmarks"]:
        info = bench["extra_info"]
        for name, ms in info["alternating_median_ms"].items():
            series[name].append((info["rows"], ms))
    figure = Figure(figsize=(7, 4.5))
    axes = figure.add_subplot()
    for name, points in series.items():
        rows, ms = zip(*sorted(points))
        axes.plot(rows, ms, marker="o", linestyle="--" if name.startswith("limit") else "-",
                  label=LABELS.get(name, name))
    axes.set_xscale("log")
    axes.set_xlabel("table rows (26 fields, K=16, float32)")
    axes.set_ylabel("median step time (ms)")
    axes.set_ylim(bottom=0)
    axes.set_title("FM-only training step, B=4096, uniform ids, 1 thread", fontsize=10)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8)
    figure.text(0.01, 0.01, machine_line(results["machine_info"], results.get("datetime", "")[:10]), fontsize=5,
                wrap=True)
    figure.tight_layout(rect=(0, 0.05, 1, 1))
    out = Path(png_path or Path(json_path).with_suffix(".png"))
    FigureCanvasAgg(figure).print_png(str(out))
    return out


if __name__ == "__main__":
    print(main(*sys.argv[1:]))
