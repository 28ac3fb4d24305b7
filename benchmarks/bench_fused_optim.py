"""W2 and W3 with the fused optimizers: one training step on the large tables.

W2, the FM-only step: fused row-wise Adagrad and SGD (packed rows, and separate tensors as before
packing) against FBGEMM's TBE (EXACT_ROWWISE_ADAGRAD, EXACT_SGD; fbgemm-gpu-cpu==1.8.0, skipped if
not installed) and nn.Embedding(sparse=True) + SGD, with the same-run limit: a read-modify-write of
the step's unique rows in records of the packed size (`workloads.record_update_limit`).
W3, the DeepFM step (DNN 400x3 with batch norm, Adam for the dense parameters): fused Adam (dense-Adam
semantics) and fused LazyAdam (SparseAdam semantics) on the tables against a plain PyTorch DeepFM
with dense gradients + Adam and with sparse gradients + SparseAdam. The batches cycle, so after the
warm-up the touched rows carry Adam state and are a few steps behind: the steps time the catch-up.
One process, one thread, variants alternating round by round; before timing, each variant and its
semantic twin take a few steps from the same tables and must agree (`check_against_twins`). Run:

    OMP_WAIT_POLICY=PASSIVE python -m pytest benchmarks/bench_fused_optim.py --benchmark-only \
        --benchmark-json benchmarks/results/fused_optim_cpu.json

Peak memory of each variant run alone: benchmarks/peak_rss.py. DEEPFM_FAST_BENCH_DEVICE=cuda runs
the same steps on the GPU (without the FBGEMM CPU baselines). DEEPFM_FAST_BENCH_VARIANTS=a,b keeps
only those variants (the dense-gradient DeepFM allocates and frees GBs each step, and on this VM
its page faults slow the variants alternating with it by 1.3-5x: compare the fused ones without it).
"""
import gc
import itertools
import os

import pytest
import torch

import workloads as W
from conftest import alternating_medians
from recording import alternating_info

ROWS = W.TABLE_ROWS[os.environ.get("DEEPFM_FAST_BENCH_TABLE", "large")]
DEVICE = os.environ.get("DEEPFM_FAST_BENCH_DEVICE", "cpu")
ONLY = [n for n in os.environ.get("DEEPFM_FAST_BENCH_VARIANTS", "").split(",") if n]
WITH_LIMITS = not ONLY or "limit" in ONLY  # DEEPFM_FAST_BENCH_VARIANTS=...,limit keeps the same-run limits
if DEVICE == "cuda":  # the GPU workloads of benchmarks/README.md
    W2_CASES = [(16, 4096, "uniform"), (16, 65536, "uniform"), (16, 65536, "zipf"), (64, 65536, "uniform")]
    W3_CASES = [(16, 4096, "uniform"), (16, 65536, "uniform")]
else:
    W2_CASES = [(16, 4096, "uniform"), (16, 4096, "zipf"), (16, 512, "uniform"), (16, 512, "zipf"),
                (64, 4096, "uniform"), (64, 512, "uniform")]
    W3_CASES = [(16, 4096, "uniform"), (16, 512, "uniform"), (64, 4096, "uniform")]
# Every variant of a case lives in memory at once: at K=64 a 10.4 M-row table is 2.7 GB, so the
# K=64 cases compare fewer variants (the dense-gradient DeepFM alone needs 4 copies of the table).
W2_AT_K64 = ["fused_RowWiseAdagrad", "fbgemm_tbe_EXACT_ROWWISE_ADAGRAD",
             "fbgemm_tbe_EXACT_ROWWISE_ADAGRAD_with_first_order", "embedding_sparse_SGD"]
W3_AT_K64 = ["fused_Adam", "plain_sparse_SparseAdam"]


def build(variants, names, dim, rows=ROWS):
    built = {}
    for name in [n for n in names if not ONLY or n in ONLY]:
        if name.startswith("fbgemm") and (DEVICE != "cpu" or not W.has_fbgemm()):
            continue
        built[name] = variants[name](rows, dim)
        built[name].model.to(DEVICE)  # in place: the optimizers keep their parameters
    fused = next(iter(built.values()))
    deepfm = isinstance(fused.model, torch.nn.ModuleList)  # W3: [table, DNN]
    table = fused.model[0] if deepfm else fused.model
    for variant in built.values():
        if variant is not fused and not variant.limit:
            W.copy_tables(table.weight, table.linear_weight, variant)
            if deepfm:
                variant.model[1].load_state_dict(fused.model[1].state_dict())
    if DEVICE == "cpu" and WITH_LIMITS:  # the same-run limit at each packed record size
        tables = [v.model[0] if deepfm else v.model for v in built.values() if v.name.startswith("fused")]
        for floats in sorted({t.weight.stride(0) for t in tables if t.rows_packed}):
            limit = W.record_update_limit(rows, floats)
            built[limit.name] = limit
    return built


def mismatches(table, twin, touched_rows):
    """Elements of `table` not close to `twin`'s (atol 1e-5, rtol 1e-4); AssertionError if more than
    1e-3 of the elements of the touched rows."""
    off = int((~torch.isclose(table, twin, atol=1e-5, rtol=1e-4)).sum())
    allowed = 1e-3 * touched_rows * (table.numel() // table.shape[0])
    if off > allowed:
        raise AssertionError(f"{off} of {table.numel()} elements differ by more than 1e-5 + 1e-4 * |value| "
                             f"(allowed: {allowed:.0f}, 1e-3 of the touched rows' elements)")
    return off


def check_against_twins(variants, batches, dim, rows=ROWS, steps=3):
    """Steps every variant and its semantic twin (`workloads.TWINS`: fused SGD = TBE EXACT_SGD =
    sparse SGD, fused row-wise Adagrad = TBE row-wise, fused LazyAdam = SparseAdam, fused Adam = dense
    Adam) `steps` times from the same tables, first-order weights non-zero, and compares every
    step's logits and the final tables. Removes the variants that disagree (they are not timed) and
    returns {variant: "agrees with <twin>" or the reason it was dropped}."""
    fused = next(v for v in variants.values() if v.name.startswith("fused"))
    deepfm = isinstance(fused.model, torch.nn.ModuleList)  # W3: [table, DNN]
    table = fused.model[0] if deepfm else fused.model
    with torch.no_grad():
        first_order = torch.randn(table.linear_weight.shape, generator=torch.Generator().manual_seed(2))
        table.linear_weight.copy_(first_order * 0.01)
    twins = {}
    for name in variants:
        twin = W.TWINS.get(name)
        if twin is not None and twin not in variants and twin not in twins:
            twins[twin] = W.CHECK_TWINS[twin](rows, dim)
            twins[twin].model.to(DEVICE)
    everyone = {**variants, **twins}
    for variant in everyone.values():
        if variant is fused or variant.limit:
            continue
        W.copy_tables(table.weight, table.linear_weight, variant)
        if deepfm:
            variant.model[1].load_state_dict(fused.model[1].state_dict())
    logits = {name: [v.step(ids.to(DEVICE), labels.to(DEVICE)).detach() for ids, labels in batches[:steps]]
              for name, v in everyone.items() if not v.limit}
    offsets = torch.arange(W.FIELDS, device=DEVICE) * rows
    touched = int(torch.unique(torch.cat([(ids.to(DEVICE) + offsets).flatten() for ids, _ in batches[:steps]])).numel())
    # Tables: atol 1e-5 is 0.1 % of one update (lr 0.01), far below a skipped or mis-scaled update,
    # which moves every touched row. Up to 1e-3 of the touched rows' elements may differ more: Adam
    # moves an element by about lr * g / |g| on its first steps, and row-wise Adagrad a 1-wide row
    # (w) on its first touch, so an element whose summed gradient cancels to rounding level moves
    # by +-lr depending on the summation order.
    verdicts = {}
    for name in list(variants):
        twin = W.TWINS.get(name)
        if twin is None or variants[name].limit:
            continue
        try:
            for ours, theirs in zip(logits[name], logits[twin]):
                torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4, msg=lambda m: f"logits: {m}")
            (v, w), (v_twin, w_twin) = W.table_tensors(everyone[name]), W.table_tensors(everyone[twin])
            outliers = {"V": mismatches(v, v_twin, touched)}
            if w is not None and w_twin is not None:
                outliers["w"] = mismatches(w, w_twin, touched)
            verdicts[name] = f"agrees with {twin} over {steps} steps (elements off: {outliers})"
        except AssertionError as error:
            verdicts[name] = f"NOT TIMED: disagrees with {twin}: {str(error).splitlines()[0]}"
            print(f"{name}: {verdicts[name]}")
            del variants[name]
    del twins, everyone, logits
    gc.collect()
    return verdicts


def run_case(benchmark, workload, variants, batch, dim, dist, rounds, rows=ROWS):
    batches = [(ids.to(DEVICE), labels.to(DEVICE)) for ids, labels in W.make_batches(rows, dist, batch)]
    # W3: 2 steps, as its DNN's Adam amplifies rounding the same way (logits 1e-2 apart by step 3).
    verdicts = check_against_twins(variants, batches, dim, rows, steps=2 if workload.startswith("W3") else 3)
    cycle = {name: itertools.cycle(batches) for name in variants}
    steps = {name: (lambda v=v, c=cycle[name]: v.step(*next(c))) for name, v in variants.items()}
    medians = alternating_medians(steps, rounds=rounds, warmup=2, device=DEVICE)
    fused = next(iter(variants))
    offsets = torch.arange(W.FIELDS, device=DEVICE) * rows
    unique_rows = sum(int(torch.unique(ids + offsets).numel()) for ids, _ in batches) / len(batches)
    benchmark.group = f"{workload} K={dim} B={batch} {dist} {DEVICE}"
    benchmark.extra_info.update(
        workload=workload, rows=rows * W.FIELDS, dim=dim, batch=batch, dist=dist, device=DEVICE,
        unique_rows_per_step=unique_rows, checks=verdicts, **alternating_info(medians, fused),
    )
    synchronize = (lambda: torch.cuda.synchronize()) if DEVICE == "cuda" else (lambda: None)
    benchmark.pedantic(lambda: (steps[fused](), synchronize()), rounds=5, warmup_rounds=1)


@pytest.mark.parametrize("dim,batch,dist", W2_CASES, ids=lambda v: str(v))
def test_w2_fm_step(benchmark, dim, batch, dist):
    names = list(W.W2_VARIANTS) if dim == 16 else W2_AT_K64
    variants = build(W.W2_VARIANTS, names, dim)
    run_case(benchmark, "W2 FM-only step", variants, batch, dim, dist, rounds=15)
    del variants
    gc.collect()


@pytest.mark.parametrize("dim,batch,dist", W3_CASES, ids=lambda v: str(v))
def test_w3_deepfm_step(benchmark, dim, batch, dist):
    names = list(W.W3_VARIANTS) if dim == 16 else W3_AT_K64
    variants = build(W.W3_VARIANTS, names, dim)
    # The dense-gradient Adam step costs seconds on a 10.4 M-row table: fewer rounds with it.
    rounds = 5 if "plain_dense_Adam" in variants else 15
    run_case(benchmark, "W3 DeepFM step", variants, batch, dim, dist, rounds=rounds)
    del variants
    gc.collect()


@pytest.mark.parametrize("name", ["fused_SGD", "fused_RowWiseAdagrad"])
@pytest.mark.parametrize("dist", ["uniform", "zipf"])
def test_w2_threads(benchmark, name, dist):
    """W2 (K=16, B=4096) on 1 and on 2 intra-op threads, alternating in one process."""
    variant = W.W2_VARIANTS[name](ROWS, 16)
    batches = W.make_batches(ROWS, dist, 4096)
    cycle = itertools.cycle(batches)
    threads = torch.get_num_threads()

    def on(n):
        def step():
            torch.set_num_threads(n)
            variant.step(*next(cycle))
        return step

    try:
        medians = alternating_medians({"2_threads": on(2), "1_thread": on(1)}, rounds=15, warmup=2)
    finally:
        torch.set_num_threads(threads)
    benchmark.group = f"W2 threads K=16 B=4096 {dist} cpu"
    benchmark.extra_info.update(workload="W2 FM-only step", variant=name, rows=ROWS * W.FIELDS, dim=16, batch=4096,
                                dist=dist, **alternating_info(medians, "2_threads"))
    benchmark.pedantic(on(2), rounds=3, warmup_rounds=1)
    torch.set_num_threads(threads)
