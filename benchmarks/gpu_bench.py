"""The GPU check's workloads (benchmarks/gpu_check.sh), each figure a JSON line written as measured.

    python benchmarks/gpu_bench.py {copy,w1,w2,w3,syncs} --device cuda --out DIR [--small]

- copy: a device-to-device copy (bytes read + written per second): the memory ceiling.
- w1: the FM layer on [B, F, K] (fused op, eager reference, torch.compile of the reference at the
  headline shape), forward and forward+backward, with the same-run limit `limit_copy` (read the
  input once, write a gradient once): W1's target is fused fwd+bwd >= 70 % of that copy's speed.
- w2: the FM-only training step on 26 x 400,000 rows, K = 16: fused SGD and row-wise Adagrad against
  what the GPU image has (nn.Embedding / nn.EmbeddingBag with sparse gradients + torch.optim.SGD).
- w3: the DeepFM step (DNN 400x3): fused Adam and LazyAdam against sparse gradients + SparseAdam and
  dense gradients + Adam.
- syncs: device->host synchronisations inside one fused training step per optimizer and bounds
  mode (torch.cuda.set_sync_debug_mode), the one allowed sync, then a step under "error" with it
  excused (CUDA only; on the CPU the steps run and the count is recorded as not applicable).

Tables are built on the device (no CPU table of 10.4 M rows); every variant of a case starts from
the same tables and the first logits are compared before timing. `--small` is the CPU rehearsal
(--dry-run of gpu_check.sh): the same code at sizes that run in seconds.
"""
from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import sys
import traceback
import types
import warnings

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_timing as T  # noqa: E402
import workloads as W  # noqa: E402
from bench_fm_interaction import step_fn  # noqa: E402
from deepfm_fast import EmbeddingFM, ops, optim, reference  # noqa: E402


def log_error(log, **where):
    """A failed case is a figure too: its error, and the script goes on with the next case."""
    log.write(error=traceback.format_exc(limit=6), **where)
    traceback.print_exc()


# ---- copy: the memory ceiling ---------------------------------------------------------------------

def run_copy(args, log):
    numel = (16 << 20 if args.small else 1 << 30) // 4
    src = torch.randn(numel, device=args.device)
    dst = torch.empty_like(src)
    timing = T.time_per_call(lambda: dst.copy_(src), args.device)
    log.write(workload="copy", bytes=2 * src.nbytes, gbytes_per_s=2 * src.nbytes / timing["median_s"] / 1e9, **timing)


# ---- W1: the FM layer -------------------------------------------------------------------------------

def run_w1(args, log):
    if args.small:
        headline = (4096, 39, 16)
        cases = [(torch.float32, headline), (torch.bfloat16, (512, 26, 16))]
    else:
        headline = (65536, 39, 16)  # first, in both dtypes: a stage cut at its limit loses the others
        cases = [(dtype, shape) for shape in [headline, (4096, 39, 16), (65536, 26, 64)]
                 for dtype in (torch.float32, torch.bfloat16)]
    for dtype, shape in cases:
        try:
            emb = torch.randn(shape, device=args.device, dtype=dtype, requires_grad=True)
            impls = {"fused": ops.fm_interaction, "reference": reference.fm_interaction}
            # One compile per dtype (headline shape, static): a cold inductor build costs seconds.
            if shape == headline and str(dtype).replace("torch.", "") in args.compile_dtypes:
                torch._dynamo.reset()
                impls["compiled_reference"] = torch.compile(reference.fm_interaction, dynamic=False)
            expected = reference.fm_interaction(emb.detach().double())
            tolerance = 1e-3 if dtype == torch.float32 else 5e-2
            for name, fn in impls.items():
                torch.testing.assert_close(fn(emb).detach().double(), expected, rtol=tolerance,
                                           atol=tolerance * max(1.0, float(expected.abs().max())),
                                           msg=lambda m, name=name: f"{name}: {m}")
            gradient = torch.empty_like(emb)
            for backward in (False, True):
                steps = {name: step_fn(fn, emb, backward) for name, fn in impls.items()}
                if backward:
                    steps["limit_copy"] = lambda gradient=gradient, emb=emb: gradient.copy_(emb.detach())
                phase = "fwd+bwd" if backward else "fwd"
                results = T.alternating(steps, args.device, rounds=args.rounds)
                fused = results["fused"]["median_s"]
                for name, timing in results.items():
                    extra = {}
                    if name != "fused":
                        extra["fused_speedup"] = timing["median_s"] / fused
                    if backward and name == "fused":
                        extra["fraction_of_copy_limit"] = results["limit_copy"]["median_s"] / fused
                    log.write(workload="W1", phase=phase, shape=list(shape), dtype=str(dtype).replace("torch.", ""),
                              impl=name, **timing, **extra)
        except Exception:
            log_error(log, workload="W1", shape=list(shape), dtype=str(dtype))
        finally:
            gc.collect()


# ---- W2 / W3: training steps --------------------------------------------------------------------------

def _bag_embed(self, ids):
    """PlainFM.embed through F.embedding_bag (what nn.EmbeddingBag(sparse=True) runs): one bag per
    (sample, field) for V, one bag per sample for the first order."""
    rows = ids + self.field_offsets
    emb = F.embedding_bag(rows.reshape(-1, 1), self.emb.weight, mode="sum", sparse=True)
    linear = F.embedding_bag(rows, self.lin.weight, mode="sum", sparse=True).view(-1)
    return emb.view(ids.shape[0], W.FIELDS, -1), linear


def embedding_bag_sparse_sgd(rows, dim):
    """workloads' nn.Embedding(sparse=True) + SGD step with the rows gathered as bags instead."""
    variant = W.plain_fm_sparse_sgd(rows, dim)
    variant.model.embed = types.MethodType(_bag_embed, variant.model)
    variant.name = "embedding_bag_sparse_SGD"
    return variant


W2 = {
    "fused_SGD": W.W2_VARIANTS["fused_SGD"],
    "fused_RowWiseAdagrad": W.W2_VARIANTS["fused_RowWiseAdagrad"],
    "embedding_sparse_SGD": W.plain_fm_sparse_sgd,
    "embedding_bag_sparse_SGD": embedding_bag_sparse_sgd,
}
W3 = {name: W.W3_VARIANTS[name] for name in
      ["fused_Adam", "fused_LazyAdam", "plain_sparse_SparseAdam", "plain_dense_Adam"]}
# The ratios the issue sets targets for (baseline / fused).
TARGETS = {"W2": ("embedding_sparse_SGD", "fused_SGD", 3.0), "W3": ("plain_sparse_SparseAdam", "fused_LazyAdam", 2.0)}


def build_on(device, factory, rows, dim):
    """A variant built where it runs: factories allocate on `device` (no CPU copy of the tables);
    `.to(device)` then moves what must live on the host back there (the fused step counter)."""
    with torch.device(device):
        variant = factory(rows, dim)
    variant.model.to(device)
    for module in variant.model.modules():
        if isinstance(module, EmbeddingFM) and module.optimizer is not None:
            assert module.optimizer_step.device.type == "cpu", module.optimizer_step.device
    return variant


def copy_into(variant, fused_table, fused_net):
    W.copy_tables(fused_table.weight, fused_table.linear_weight, variant)
    if fused_net is not None:
        variant.model[1].load_state_dict(fused_net.state_dict())


def device_batches(rows, dist, batch, device, count=4, seed=1):
    """`count` batches of local ids [B, 26] and labels, drawn on the device."""
    g = torch.Generator(device=device).manual_seed(seed)
    out = []
    for _ in range(count):
        if dist == "uniform":
            ids = torch.randint(0, rows, (batch, W.FIELDS), device=device, generator=g)
        else:  # Zipf(1.05) ranks scattered over the field's rows, as workloads.sample_ids
            weights = torch.arange(1, rows + 1, device=device, dtype=torch.float64).pow(-1.05)
            ranks = torch.multinomial(weights, batch * W.FIELDS, replacement=True, generator=g) + 1
            ids = ((ranks * 2654435761) % rows).view(batch, W.FIELDS)
        out.append((ids, torch.randint(0, 2, (batch,), device=device, generator=g).float()))
    return out


def run_steps(args, log, workload, variants, cases, rows):
    for dim, batch, dist in cases:
        built = {}
        try:
            for name, factory in variants.items():
                built[name] = build_on(args.device, factory, rows, dim)
            fused = next(iter(built.values()))
            deepfm = isinstance(fused.model, nn.ModuleList)
            table = fused.model[0] if deepfm else fused.model
            for variant in list(built.values())[1:]:
                copy_into(variant, table, fused.model[1] if deepfm else None)
            batches = device_batches(rows, dist, batch, args.device)
            logits = {name: v.step(*batches[0]).detach() for name, v in built.items()}
            first = logits[next(iter(logits))]
            agree = {name: bool(torch.allclose(logit, first, atol=1e-4, rtol=1e-4)) for name, logit in logits.items()}
            cycles = {name: itertools.cycle(batches) for name in built}
            steps = {name: (lambda v=v, c=cycles[name]: v.step(*next(c))) for name, v in built.items()}
            common = dict(workload=workload, dim=dim, batch=batch, dist=dist, rows=rows * W.FIELDS)

            def write(name, timing, common=common, agree=agree):
                log.write(**common, impl=name, first_logits_agree=agree[name], **timing)

            results = T.alternating(steps, args.device, rounds=args.rounds, on_result=write)
            baseline, fused_name, target = TARGETS[workload]
            for name in built:
                if name.startswith("fused"):
                    ratios = {other: results[other]["median_s"] / results[name]["median_s"]
                              for other in built if not other.startswith("fused")}
                    log.write(**common, impl=name, speedup_over=ratios,
                              target=f"{baseline} / {fused_name} >= {target}" if name == fused_name else None,
                              target_met=(ratios[baseline] >= target) if name == fused_name else None)
        except Exception:
            log_error(log, workload=workload, dim=dim, batch=batch, dist=dist)
        finally:
            built.clear()
            gc.collect()
            if torch.device(args.device).type == "cuda":
                torch.cuda.empty_cache()


def run_w2(args, log):
    rows = W.TABLE_ROWS["small" if args.small else "large"]
    cases = ([(16, 512, "zipf")] if args.small else
             [(16, 4096, "uniform"), (16, 65536, "uniform"), (16, 65536, "zipf")])
    run_steps(args, log, "W2", W2, cases, rows)


def run_w3(args, log):
    rows = W.TABLE_ROWS["small" if args.small else "large"]
    cases = [(16, 512, "uniform")] if args.small else [(16, 4096, "uniform"), (16, 65536, "uniform")]
    run_steps(args, log, "W3", W3, cases, rows)


# ---- syncs: host synchronisations inside a fused training step --------------------------------------

def count_syncs(fn, device):
    """(result, number of synchronising CUDA calls fn made) under set_sync_debug_mode("warn")."""
    if torch.device(device).type != "cuda":
        return fn(), None
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            result = fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    messages = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    return result, messages


def strict_forward(model, ids, offsets, labels, device):
    """The step's forward and loss under set_sync_debug_mode("error") (any sync raises), then its
    backward, which holds the step's one sync: True, or the error's message (None on the CPU)."""
    if torch.device(device).type != "cuda":
        F.binary_cross_entropy_with_logits(model(ids, offsets), labels).backward()
        return None
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = F.binary_cross_entropy_with_logits(model(ids, offsets), labels)
    except RuntimeError as error:
        return str(error).splitlines()[0]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    loss.backward()
    return True


def run_syncs(args, log):
    rows, batch = (1000, 256) if args.small else (100_000, 4096)
    names = ["SGD", "Adam"] if args.small else ["SGD", "RowWiseAdagrad", "Adagrad", "LazyAdam", "Adam"]
    modes = ["error"] if args.small else ["error", "off"]  # (the CPU kernels ignore the mode)
    for name, mode, layout in itertools.product(names, modes, ["ids", "csr"]):
        previous = ops.get_cuda_bounds_check()
        try:
            with torch.device(args.device):
                model = EmbeddingFM([rows] * W.FIELDS, 16, optimizer=getattr(optim, name)(1e-3))
            model.to(args.device)
            ids = torch.randint(0, rows, (batch, W.FIELDS), device=args.device)
            offsets = None
            if layout == "csr":  # one id per bag, as CSR: the to_global path of multi-hot input
                offsets = torch.arange(batch * W.FIELDS + 1, device=args.device)
                ids = ids.reshape(-1)
            labels = torch.randint(0, 2, (batch,), device=args.device).float()

            def step(model=model, ids=ids, offsets=offsets, labels=labels):
                logit = model(ids, offsets)
                F.binary_cross_entropy_with_logits(logit, labels).backward()
                return logit

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                ops.set_cuda_bounds_check(mode)
            step()  # warm-up: lazy initialisation syncs are not the step's
            _, messages = count_syncs(step, args.device)
            forward_sync_free = strict_forward(model, ids, offsets, labels, args.device)
            log.write(workload="syncs", optimizer=name, bounds_check=mode, layout=layout,
                      syncs=None if messages is None else len(messages), allowed=1,
                      ok=None if messages is None else len(messages) <= 1 and forward_sync_free is True,
                      forward_sync_free=forward_sync_free, steps_taken=int(model.optimizer_step),
                      messages=(messages or [])[:6])
        except Exception:
            log_error(log, workload="syncs", optimizer=name, bounds_check=mode, layout=layout)
        finally:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                ops.set_cuda_bounds_check(previous)


WORKLOADS = {"copy": run_copy, "w1": run_w1, "w2": run_w2, "w3": run_w3, "syncs": run_syncs, "summary": None}


# ---- the summary: the figures that matter, read back from the JSON lines and junit XML --------------

def _records(out, name):
    path = os.path.join(out, f"{name}.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def summarize(out) -> str:
    lines = []
    env = next((r["env"] for name in ("w2", "copy", "w1") for r in _records(out, name)), None)
    if env:
        lines.append("environment: " + ", ".join(f"{k}={v}" for k, v in env.items() if v is not None))
    for r in _records(out, "copy"):
        if "gbytes_per_s" in r:
            lines.append(f"copy: {r['gbytes_per_s']:.0f} GB/s (read + write)")
    for name in ("w2", "w3"):
        records = _records(out, name)
        for r in records:
            if "speedup_over" in r:
                ratios = ", ".join(f"{k} {v:.2f}x" for k, v in r["speedup_over"].items())
                target = (f"  [target {r['target']}: {'MET' if r['target_met'] else 'not met'}]"
                          if r.get("target") else "")
                lines.append(f"{r['workload']} K={r['dim']} B={r['batch']} {r['dist']}: {r['impl']} faster than "
                             f"{ratios}{target}")
            elif "median_s" in r:
                lines.append(f"  {r['workload']} K={r['dim']} B={r['batch']} {r['dist']} {r['impl']}: "
                             f"{r['median_s'] * 1e3:.3f} ms/step (first logits agree: {r['first_logits_agree']})")
        if records and records[-1].get("event") != "done":
            lines.append(f"{name}: cut before its end (the figures above are what it measured)")
    for r in _records(out, "w1"):
        if r.get("impl") == "fused" and r.get("phase") == "fwd+bwd":
            lines.append(f"W1 fwd+bwd {r['shape']} {r['dtype']}: fused {r['median_s'] * 1e6:.1f} us = "
                         f"{r['fraction_of_copy_limit'] * 100:.0f} % of the same-run copy limit "
                         "(target >= 70 % at B=65536)")
        elif r.get("impl") in ("reference", "compiled_reference") and r.get("phase") == "fwd+bwd":
            lines.append(f"  W1 fwd+bwd {r['shape']} {r['dtype']}: fused {r['fused_speedup']:.2f}x faster than "
                         f"{r['impl']}")
    syncs = [r for r in _records(out, "syncs") if "syncs" in r]
    if syncs:
        counts = ", ".join(f"{r['optimizer']}/{r['bounds_check']}/{r['layout']}={r['syncs']}" for r in syncs)
        bad = [r for r in syncs if r["ok"] is False]
        lines.append(f"host syncs per fused training step (allowed 1): {counts}"
                     + (f"  -> {len(bad)} over the limit" if bad else ""))
    for name in ("copy", "w1", "w2", "w3", "syncs"):
        for r in _records(out, name):
            if "error" in r:
                where = {k: r[k] for k in r if k in ("shape", "dim", "batch", "optimizer", "bounds_check")}
                lines.append(f"ERROR in {name} {where}: " + r["error"].strip().splitlines()[-1])
    lines += _junit_lines(os.path.join(out, "tests"))
    return "\n".join(lines)


def _junit_lines(folder):
    import xml.etree.ElementTree as ET

    lines = []
    if not os.path.isdir(folder):
        return lines
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".xml"):
            continue
        suite = ET.parse(os.path.join(folder, name)).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        attrs = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        failed = [c.get("name") for c in suite.iter("testcase")
                  if c.find("failure") is not None or c.find("error") is not None]
        lines.append(f"tests {name[:-4]}: {attrs['tests']} run, {attrs['failures']} failed, {attrs['errors']} errors, "
                     f"{attrs['skipped']} skipped" + (f"; failed: {', '.join(failed[:5])}" if failed else ""))
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workload", choices=list(WORKLOADS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", required=True, help="directory of the JSON-lines files (<workload>.jsonl)")
    parser.add_argument("--small", action="store_true", help="the CPU rehearsal's sizes")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--compile-dtypes", default="float32,bfloat16",
                        help="W1: the dtypes whose headline shape is also timed through torch.compile ('' for none)")
    args = parser.parse_args(argv)
    if args.workload == "summary":
        print(summarize(args.out))
        return
    os.makedirs(args.out, exist_ok=True)
    log = T.FigureLog(os.path.join(args.out, f"{args.workload}.jsonl"), args.device,
                      command=" ".join([os.path.basename(sys.argv[0])] + (argv or sys.argv[1:])), small=args.small)
    log.write(workload=args.workload, event="start")
    WORKLOADS[args.workload](args, log)
    log.write(workload=args.workload, event="done")


if __name__ == "__main__":
    main()
