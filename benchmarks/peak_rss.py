"""Peak resident memory of each W2/W3 training-step variant, each run alone in its own process.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/peak_rss.py --out benchmarks/results/peak_rss_cpu.json

For every variant of benchmarks/workloads.py this runs `/usr/bin/time -v python peak_rss.py --run
NAME` (a few training steps on the large tables) and reads "Maximum resident set size". The target
of the fused-optimizer work: at most 1.3 x (tables + optimizer state) + 0.3 GB for the interpreter.
"""
import argparse
import json
import os
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
GB = 1e9


def run_variant(name, dim, batch, steps, table):
    import torch

    sys.path.insert(0, HERE)
    import workloads as W

    torch.set_num_threads(1)
    variants = {**W.W2_VARIANTS, **W.W3_VARIANTS}
    variant = variants[name](W.TABLE_ROWS[table], dim)
    batches = W.make_batches(W.TABLE_ROWS[table], "uniform", batch, count=2)
    for i in range(steps):
        variant.step(*batches[i % len(batches)])
    print(json.dumps({"state_bytes": variant.state_bytes()}))


def measure(name, args):
    cmd = ["/usr/bin/time", "-v", sys.executable, os.path.abspath(__file__), "--run", name, "--dim", str(args.dim),
           "--batch", str(args.batch), "--steps", str(args.steps), "--table", args.table]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        return {"variant": name, "error": result.stderr.strip().splitlines()[-1]}
    state = json.loads(result.stdout.strip().splitlines()[-1])["state_bytes"]
    peak = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr).group(1)) * 1024
    target = 1.3 * state + 0.3 * GB
    return {"variant": name, "peak_rss_gb": round(peak / GB, 3), "tables_and_state_gb": round(state / GB, 3),
            "target_gb": round(target / GB, 3), "within_target": peak <= target}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="(internal) run one variant in this process")
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--table", default="large", choices=["small", "large"])
    parser.add_argument("--variants", default="", help="comma-separated subset (default: all)")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    if args.run:
        return run_variant(args.run, args.dim, args.batch, args.steps, args.table)
    sys.path.insert(0, HERE)
    import workloads as W

    names = [n for n in list(W.W2_VARIANTS) + list(W.W3_VARIANTS) if not args.variants or n in args.variants.split(",")]
    if not W.has_fbgemm():
        names = [n for n in names if not n.startswith("fbgemm")]
    results = []
    for name in names:
        results.append(measure(name, args))
        print(json.dumps(results[-1]), flush=True)
    if args.out:
        import recording

        with open(args.out, "w") as f:
            json.dump({"dim": args.dim, "batch": args.batch, "steps": args.steps, "table": args.table,
                       "machine": recording.machine(), "command": recording.command(sys.argv),
                       "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
