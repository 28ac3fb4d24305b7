"""Plot of bench_table_file.py's step lines: step time against the size of the table the ids span
(in memory and in a file), with the machine's RAM marked.

    python benchmarks/plot_table_file.py results/bigtable_cpu.json --out results/bigtable_cpu.png
"""
import argparse
import json
import statistics


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", help="JSON: a list of bench_table_file.py result lines")
    parser.add_argument("--out", required=True)
    parser.add_argument("--ram-gb", type=float, default=24.0)
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    with open(args.results) as f:
        lines = [r for r in json.load(f)["results"] if r["what"] == "step"]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for (table, dist), marker in {("memory", "zipf"): "o", ("file", "zipf"): "s", ("file", "uniform"): "^",
                                  ("memory", "uniform"): "v"}.items():
        points = sorted((r["active_gb"], r["median_ms"]) for r in lines if r["table"] == table and r["dist"] == dist)
        if not points:
            continue
        sizes = sorted({x for x, _ in points})  # repeated runs: every point, the line through their median
        middle = [statistics.median(y for x, y in points if x == size) for size in sizes]
        line, = ax.plot(sizes, middle, marker=marker, label=f"{dist} ids, table in {table}")
        ax.scatter(*zip(*points), marker=marker, color=line.get_color(), alpha=0.4)
    ax.axvline(args.ram_gb, color="grey", linestyle="--", label=f"RAM ({args.ram_gb:g} GB)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xticks([2, 4, 8, 16, 24, 36])
    ax.set_xlabel("records the ids span (GB)")
    ax.set_ylabel("median step (ms), B=4096, 1 thread")
    ax.set_title("W2 step, row-wise Adagrad, K=16: file-backed vs in-memory table")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)


if __name__ == "__main__":
    main()
