"""File-backed tables (EmbeddingFM(table_file=...)) across the RAM boundary: step time, anonymous
memory, swap and major faults of the W2 FM-only training step (row-wise Adagrad, K=16, B=4096,
26 fields), against the same step on an in-memory table, and the disk's own random-read rate.

    # once: the table file (26 x 17.4 M rows x 80 B = 36 GB), streamed to disk
    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_table_file.py create --path /scratch/t36 --rows 17400000
    # the step on the file, its ids drawn from the first --active rows of each field
    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_table_file.py step --path /scratch/t36 --rows 17400000 \\
        --active 17400000 --dist zipf
    # the same step on an in-memory table of 26 x --rows rows
    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_table_file.py step --rows 3000000 --active 3000000 --dist zipf
    # issue 18: the peak RSS of building a packed 10.4 M-row table in memory, today and before
    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_table_file.py build --rows 400000 --how records
    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_table_file.py build --rows 400000 --how separate-then-pack
    # the disk: 4 KiB random reads with O_DIRECT (1 and 16 in flight) on an existing file
    python benchmarks/bench_table_file.py disk --path /scratch/t36

Each command prints one JSON line (collected into results/bigtable_cpu.json by hand or --out).
Every step draws fresh ids (a table larger than RAM must not be measured on a few cycled batches,
which would leave their rows cached): Zipf(1.05) ranks scattered over the field's rows as in
workloads.py, or uniform.
"""
import argparse
import json
import mmap
import os
import random
import resource
import statistics
import sys
import threading
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from deepfm_fast import EmbeddingFM, optim  # noqa: E402

FIELDS, DIM, BATCH = 26, 16, 4096


def status_kb(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def model(args):
    torch.manual_seed(0)
    return EmbeddingFM([args.rows] * FIELDS, DIM, optimizer=optim.RowWiseAdagrad(0.01), table_file=args.path)


class Ids:
    """Fresh [B, 26] local ids per step from the first ``active`` rows of each field."""

    def __init__(self, active, dist, seed=1):
        self.active, self.dist = active, dist
        self.generator = torch.Generator().manual_seed(seed)
        if dist == "zipf":  # workloads.sample_ids' distribution, by inverse CDF (one table of `active`)
            cdf = torch.arange(1, active + 1, dtype=torch.float64).pow_(-1.05).cumsum_(0)
            self.cdf = cdf.div_(cdf[-1].clone())  # 8 B a rank (float32 would merge the tail): 139 MB at 17.4 M

    def batch(self):
        if self.dist == "uniform":
            ids = torch.randint(0, self.active, (BATCH, FIELDS), generator=self.generator)
        else:
            u = torch.rand(BATCH, FIELDS, generator=self.generator, dtype=torch.float64)
            ranks = torch.searchsorted(self.cdf, u).clamp_(max=self.active - 1)
            ids = (ranks * 2654435761) % self.active
        return ids, torch.randint(0, 2, (BATCH,), generator=self.generator).float()


def create(args):
    start = time.perf_counter()
    fm = model(args)
    seconds = time.perf_counter() - start
    size = os.path.getsize(args.path)
    fm.table_file.close()
    return {"what": "create", "rows": args.rows * FIELDS, "file_gb": round(size / 1e9, 2), "seconds": round(seconds, 1),
            "write_gb_per_s": round(size / 1e9 / seconds, 3), "peak_rss_gb": round(status_kb("VmHWM") / 1e6, 3),
            "rss_anon_gb": round(status_kb("RssAnon") / 1e6, 3)}


def build(args):
    """Peak RSS of building a packed in-memory table (issue 18: <= 1.1x its size): in its records
    (today), or as separate tensors packed afterwards (before)."""
    torch.manual_seed(0)
    before = status_kb("VmRSS")
    if args.how == "records":
        fm = EmbeddingFM([args.rows] * FIELDS, DIM, optimizer=optim.RowWiseAdagrad(0.01))
    else:
        fm = EmbeddingFM([args.rows] * FIELDS, DIM, optimizer=optim.RowWiseAdagrad(0.01), pack_rows=False)
        fm.pack_rows = True
        fm._pack()
    assert fm.rows_packed
    table = fm.weight.untyped_storage().nbytes()
    peak = status_kb("VmHWM") - before
    return {"what": "build", "how": args.how, "rows": args.rows * FIELDS, "table_gb": round(table / 1e9, 3),
            "peak_rss_growth_gb": round(peak / 1e6, 3), "peak_over_table": round(peak * 1e3 / table, 3)}


def prefault(fm, active):
    """Reads one record of every page the ids can reach, from the prefetch threads: the steady state
    of a table that fits in the page cache, without waiting for the steps to fault it in."""
    from deepfm_fast.table_file import _gather

    start = time.perf_counter()
    per_page = max(1, mmap.PAGESIZE // (fm.table_file.records.stride(0) * 4))
    for offset in fm.field_offsets.tolist():
        _gather(fm.table_file.records, torch.arange(offset, offset + active, per_page))
    return time.perf_counter() - start


def step(args):
    torch.set_num_threads(args.threads)
    built = time.perf_counter()
    fm = model(args)
    built = time.perf_counter() - built
    ids = Ids(args.active, args.dist)
    prefault_s = prefault(fm, args.active) if args.prefault and fm.table_file else None
    times, anon, major = [], [], []
    for i in range(args.warmup + args.steps):
        x, y = ids.batch()
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_majflt
        start = time.perf_counter()
        torch.nn.functional.binary_cross_entropy_with_logits(fm(x), y).backward()
        elapsed = time.perf_counter() - start
        if i >= args.warmup:
            times.append(elapsed)
            major.append(resource.getrusage(resource.RUSAGE_SELF).ru_majflt - faults)
            anon.append(status_kb("RssAnon"))
        if args.checkpoint_every and (i + 1) % args.checkpoint_every == 0:
            start = time.perf_counter()
            fm.checkpoint()
            checkpoint_s = time.perf_counter() - start
    record_bytes = fm.table_file.records.stride(0) * 4 if fm.table_file else 80
    out = {"what": "step", "table": "file" if args.path else "memory", "dist": args.dist, "rows": args.rows * FIELDS,
           "active_gb": round(args.active * FIELDS * record_bytes / 1e9, 2), "threads": args.threads,
           "steps": args.steps, "warmup": args.warmup, "build_s": round(built, 1),
           "median_ms": round(1e3 * statistics.median(times), 2),
           "p90_ms": round(1e3 * sorted(times)[int(0.9 * len(times))], 2),
           "major_faults_per_step": statistics.median(major), "rss_anon_max_gb": round(max(anon) / 1e6, 3),
           "peak_rss_gb": round(status_kb("VmHWM") / 1e6, 3), "swap_kb": status_kb("VmSwap")}
    if prefault_s is not None:
        out["prefault_s"] = round(prefault_s, 1)
    if args.checkpoint_every:
        out["last_checkpoint_s"] = round(checkpoint_s, 3)
    if fm.table_file:
        out["journal_mb"] = round(fm.table_file._journal_end / 1e6, 1)
        fm.table_file.close()
    return out


def disk(args):
    """4 KiB random reads with O_DIRECT (no page cache) over the file: the disk's IOPS at 1 and 16 in flight."""
    size = os.path.getsize(args.path) // 4096 * 4096
    fd = os.open(args.path, os.O_RDONLY | os.O_DIRECT)
    out = {"what": "disk", "file_gb": round(size / 1e9, 2)}
    try:
        for depth in (1, 16):
            deadline = time.perf_counter() + args.seconds
            counts = [0] * depth

            def reader(k, deadline=deadline, counts=counts):
                buffer = mmap.mmap(-1, 4096)  # page-aligned, as O_DIRECT needs
                rng = random.Random(k)
                while time.perf_counter() < deadline:
                    os.preadv(fd, [buffer], rng.randrange(size // 4096) * 4096)
                    counts[k] += 1

            threads = [threading.Thread(target=reader, args=(k,)) for k in range(depth)]
            start = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            iops = sum(counts) / (time.perf_counter() - start)
            out[f"iops_qd{depth}"] = round(iops)
            out[f"mb_per_s_qd{depth}"] = round(iops * 4096 / 1e6, 1)
    finally:
        os.close(fd)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["create", "step", "disk", "build"])
    parser.add_argument("--how", default="records", choices=["records", "separate-then-pack"], help="build only")
    parser.add_argument("--path", help="the table file (step: none = an in-memory table)")
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows per field (26 fields)")
    parser.add_argument("--active", type=int, help="ids drawn from the first ACTIVE rows of each field (default all)")
    parser.add_argument("--dist", default="zipf", choices=["zipf", "uniform"])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--checkpoint-every", type=int, default=0)
    parser.add_argument("--prefault", action="store_true", help="file: read the active rows' pages in first")
    parser.add_argument("--seconds", type=float, default=10.0, help="disk: seconds per queue depth")
    parser.add_argument("--out", help="append the JSON line to this file")
    args = parser.parse_args()
    args.active = args.active or args.rows
    result = {"create": create, "step": step, "disk": disk, "build": build}[args.what](args)
    import recording

    result.update({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": recording.machine(),
                   "command": recording.command(sys.argv)})
    line = json.dumps(result)
    print(line, flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
