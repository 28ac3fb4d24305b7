"""W3 DeepFM step data parallel: 1 process x 2 threads against 2 processes x 1 thread (gloo, loopback).

The same global batch of B rows per step (the 2 ranks take B/2 each), fused Adam on the tables
(deepfm_fast.distributed.wrap: the ranks merge their coalesced rows in the backward), torch Adam on
the DNN (DDP's all-reduce). Reports rows/s of each and the bytes each rank sends per step: the row
merge (all-gathers of the padded ids and row gradients) and the DNN's all-reduce (a ring sends
2 (W - 1) / W of the gradient). The two set-ups are launched alternately REPEATS times each; medians.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_distributed.py --out benchmarks/results/distributed_cpu.json
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import workloads as W  # noqa: E402
from deepfm_fast import _row_merge, distributed, optim  # noqa: E402
from deepfm_fast.embedding import EmbeddingFM  # noqa: E402
from recording import machine  # noqa: E402


def model(rows, dim):
    torch.manual_seed(0)
    table = EmbeddingFM([rows] * W.FIELDS, dim, optimizer=optim.Adam(1e-3), init_std=0.01)
    return torch.nn.ModuleDict({"table": table, "dnn": W.dnn(W.FIELDS * dim)})


class Step(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, ids):
        fm, pooled = self.m["table"](ids, return_pooled=True)
        return fm + self.m["dnn"](pooled.flatten(1)).squeeze(1)


def run(rank, world, args, out_dir):
    torch.set_num_threads(args.threads if world == 1 else 1)
    m = model(args.rows, args.dim)
    step = Step(m)
    if world > 1:
        step = distributed.wrap(step)
    opt = torch.optim.Adam(list(m["dnn"].parameters()) + [m["table"].bias], lr=1e-3)
    batches = W.make_batches(args.rows, "uniform", args.batch)
    unique = []
    if world > 1:  # the rows this rank contributes to the merge
        original = _row_merge._gather_rows

        def counting(handle, ids, values, batch):
            unique.append(ids.numel())
            return original(handle, ids, values, batch)

        _row_merge._gather_rows = counting
    times = []
    for i in range(args.warmup + args.steps):
        ids, labels = batches[i % len(batches)]
        share = torch.tensor_split(torch.arange(args.batch), world)[rank]
        t0 = time.perf_counter()
        logits = step(ids[share])
        F.binary_cross_entropy_with_logits(logits, labels[share]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if world > 1:
            torch.distributed.barrier()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    dnn_params = sum(p.numel() for p in m["dnn"].parameters()) + 1
    result = {"step_s": statistics.median(times), "unique_rows": statistics.mean(unique or [0]),
              "dnn_params": dnn_params}
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")


def _spawned(rank, world, args, out_dir, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        run(rank, world, args, out_dir)
    finally:
        torch.distributed.destroy_process_group()


def launch(world, args):
    with tempfile.TemporaryDirectory() as out_dir:
        if world == 1:
            run(0, 1, args, out_dir)
        else:
            import socket

            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            torch.multiprocessing.spawn(_spawned, args=(world, args, out_dir, port), nprocs=world)
        return [torch.load(Path(out_dir) / f"rank{r}.pt") for r in range(world)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=W.TABLE_ROWS["large"], help="rows per field (26 fields)")
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4096, help="global batch")
    parser.add_argument("--threads", type=int, default=2, help="threads of the 1-process run")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out")
    args = parser.parse_args()
    if os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE":
        sys.exit("set OMP_WAIT_POLICY=PASSIVE (see benchmarks/README.md)")
    one, two = [], []
    for _ in range(args.repeats):  # alternate the set-ups: the machine's noise hits both alike
        one.append(launch(1, args)[0])
        two.append(launch(2, args))
    step_one = statistics.median(r["step_s"] for r in one)
    step_two = statistics.median(max(r["step_s"] for r in ranks) for ranks in two)
    unique = statistics.mean(r["unique_rows"] for ranks in two for r in ranks)
    dnn_params = one[0]["dnn_params"]
    world = 2
    # Per step, each rank contributes its padded (ids int64, row gradients of V and w float32) to
    # the all-gathers, plus 2 counts; a ring all-reduce of the DNN sends 2 (W - 1) / W of it.
    merge_bytes = unique * (8 + 4 * (args.dim + 1)) + 16
    allreduce_bytes = 2 * (world - 1) / world * 4 * dnn_params
    result = {
        "workload": "W3 DeepFM step, fused Adam", "rows": args.rows * W.FIELDS, "dim": args.dim,
        "global_batch": args.batch,
        "one_process": {"threads": args.threads, "step_ms": step_one * 1e3, "rows_per_s": args.batch / step_one},
        "two_processes": {"threads_each": 1, "backend": "gloo", "step_ms": step_two * 1e3,
                          "rows_per_s": args.batch / step_two, "unique_rows_per_rank": unique,
                          "bytes_sent_per_rank_per_step": {"row_merge": merge_bytes, "dnn_allreduce": allreduce_bytes,
                                                           "total": merge_bytes + allreduce_bytes}},
        "speedup_two_processes": step_one / step_two,
        "machine": machine(), "command": " ".join(["python"] + sys.argv),
    }
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
