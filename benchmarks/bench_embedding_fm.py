"""W2 and W4 (benchmarks/README.md): the fused embedding_fm op against the reference, plain
PyTorch (nn.EmbeddingBag(sparse=True)) and FBGEMM's TBE forward. One process, one thread, the
implementations of a case alternating round by round after their outputs are checked against each
other; the alternating medians and ratios are in each benchmark's extra_info.

    OMP_WAIT_POLICY=PASSIVE python -m pytest benchmarks/bench_embedding_fm.py --benchmark-only \
        --benchmark-json benchmarks/results/embedding_fm_cpu.json -q

DEEPFM_FAST_BENCH_DEVICE=cuda runs W2 (forward and step) on the GPU (W4 stays on the CPU).
"""
import functools
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import workloads as W
from conftest import alternating_medians, synchronize
from deepfm_fast import EmbeddingFM, ops, reference
from recording import alternating_info

DEVICE = os.environ.get("DEEPFM_FAST_BENCH_DEVICE", "cpu")
ON = "" if DEVICE == "cpu" else f" {DEVICE}"  # suffix of the benchmark groups
B, K = 4096, 16
CASES = [(t, d) for t in W.TABLE_ROWS for d in ("uniform", "zipf")]


def assert_close(a, b):
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def record(benchmark, group, impls, rounds, **info):
    """Alternating medians of {name: fn} into extra_info; pytest-benchmark times the first (fused)."""
    medians = alternating_medians(impls, rounds=rounds, device=DEVICE)
    fused = next(iter(impls))
    benchmark.group = group + ON
    benchmark.extra_info.update(device=DEVICE, **info, **alternating_info(medians))
    benchmark.pedantic(lambda: (impls[fused](), synchronize(DEVICE)), rounds=10, warmup_rounds=1)


@functools.lru_cache(maxsize=1)
def w2_model(table):
    torch.manual_seed(0)
    model = EmbeddingFM([W.TABLE_ROWS[table]] * W.FIELDS, K, sparse=True, init_std=0.05)
    nn.init.normal_(model.linear_weight, 0, 0.05)
    return model.to(DEVICE)


@functools.lru_cache(maxsize=4)
def w2_batch(table, dist):
    (local, labels), = W.make_batches(W.TABLE_ROWS[table], dist, B, count=1)
    return w2_model(table).to_global(local.to(DEVICE)), labels.to(DEVICE)


class EmbeddingBagFM(nn.Module):
    """Plain PyTorch: one nn.EmbeddingBag(sparse=True) for V, one [N, 1] for w, the FM expression."""

    def __init__(self, model):
        super().__init__()
        n = model.weight.shape[0]
        # Shares the fused model's parameters (no second 10.4 M-row copy).
        self.emb = nn.EmbeddingBag(n, K, mode="sum", sparse=True, _weight=model.weight)
        self.lin = nn.EmbeddingBag(n, 1, mode="sum", sparse=True, _weight=model.linear_weight.detach().view(-1, 1))
        self.bias = model.bias

    def forward(self, ids):
        batch, fields = ids.shape
        offsets = torch.arange(0, batch * fields, dtype=ids.dtype, device=ids.device)
        emb = self.emb(ids.reshape(-1), offsets).view(batch, fields, -1)
        return W.fm_logit(emb, self.lin(ids).squeeze(1), self.bias)


def tbe_forward(model, table):
    """FBGEMM TBE (one table per field) holding the fused model's rows, + the FM expression."""
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        ComputeDevice,
        SplitTableBatchedEmbeddingBagsCodegen,
    )

    rows = W.TABLE_ROWS[table]
    tbe = SplitTableBatchedEmbeddingBagsCodegen(
        [(rows, K, EmbeddingLocation.HOST, ComputeDevice.CPU) for _ in range(W.FIELDS)])
    with torch.no_grad():
        tbe.weights_host.copy_(model.weight.reshape(-1))

    def forward(global_ids):
        local = global_ids - model.field_offsets
        indices = local.t().reshape(-1)  # table-major
        offsets = torch.arange(W.FIELDS * B + 1, dtype=torch.long)
        emb = tbe(indices, offsets).view(B, W.FIELDS, K)
        return 0.5 * (emb.sum(1).pow(2) - emb.pow(2).sum(1)).sum(1)

    return forward


@pytest.mark.parametrize("table,dist", CASES)
def test_w2_forward(benchmark, table, dist):
    model = w2_model(table)
    ids, _ = w2_batch(table, dist)
    kwargs = dict(linear_weight=model.linear_weight)
    impls = {"fused": lambda: ops.embedding_fm(model.weight, ids, **kwargs),
             "reference": lambda: reference.embedding_fm(model.weight, ids, **kwargs)}
    with torch.no_grad():
        expected = impls["reference"]()
        got = impls["fused"]()
        assert_close(got.fm, expected.fm)
        assert_close(got.linear, expected.linear)
        if DEVICE == "cpu" and W.has_fbgemm():
            tbe = tbe_forward(model, table)
            assert_close(tbe(ids), expected.fm)
            impls["fbgemm_tbe_forward_no_first_order"] = lambda: tbe(ids)
        record(benchmark, f"W2 forward {table} {dist}", impls, rounds=20, table=table, dist=dist)


def sgd_step(model, ids, labels, optimizer):
    optimizer.zero_grad(set_to_none=True)
    logit = model(ids, global_ids=True) if isinstance(model, EmbeddingFM) else model(ids)
    F.binary_cross_entropy_with_logits(logit, labels).backward()
    optimizer.step()
    return logit


@pytest.mark.parametrize("table,dist", CASES)
def test_w2_step_sparse_sgd(benchmark, table, dist):
    model = w2_model(table)
    ids, labels = w2_batch(table, dist)
    baseline = EmbeddingBagFM(model)
    with torch.no_grad():
        assert_close(model(ids, global_ids=True), baseline(ids))
    # lr=0: the tables stay as they are across rounds (the update still runs over every touched row).
    fused_opt = torch.optim.SGD(model.parameters(), lr=0.0)
    baseline_opt = torch.optim.SGD(baseline.parameters(), lr=0.0)
    impls = {"fused_sparse_grad": lambda: sgd_step(model, ids, labels, fused_opt),
             "embedding_bag_sparse_grad": lambda: sgd_step(baseline, ids, labels, baseline_opt)}
    record(benchmark, f"W2 step (fwd, BCE, bwd, sparse SGD) {table} {dist}", impls, rounds=15, table=table,
           dist=dist)
    assert model.weight.grad.is_sparse and baseline.emb.weight.grad.is_sparse


@functools.lru_cache(maxsize=1)
def w4_data():
    generator = torch.Generator().manual_seed(2)
    fields, rows = 8, 10_000
    counts = torch.randint(1, 9, (B * fields,), generator=generator)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    indices = torch.randint(0, rows * fields, (int(offsets[-1]),), generator=generator)
    weight = torch.randn(rows * fields, K, generator=generator) * 0.05
    psw = torch.rand(indices.numel(), generator=generator)
    return weight, indices, offsets, psw, fields


def w4_fwd_bwd(fn, weight, indices, offsets, psw, fields, pooling):
    w = weight.detach().requires_grad_(True)
    out = fn(w, indices, offsets, psw, num_fields=fields, pooling=pooling, return_pooled=True, sparse=True)
    (out.fm.sum() + out.pooled.sum()).backward()
    return w.grad


@pytest.mark.skipif(DEVICE != "cpu", reason="W4 runs on the CPU")
@pytest.mark.parametrize("what", ["forward", "fwd+bwd"])
@pytest.mark.parametrize("pooling,weighted", [(p, w) for p in ("sum", "mean") for w in (False, True)])
def test_w4_multi_hot(benchmark, what, pooling, weighted):
    weight, indices, offsets, psw, fields = w4_data()
    psw = psw if weighted else None
    kwargs = dict(num_fields=fields, pooling=pooling, return_pooled=True)
    with torch.no_grad():
        for a, e in zip(ops.embedding_fm(weight, indices, offsets, psw, **kwargs),
                        reference.embedding_fm(weight, indices, offsets, psw, **kwargs)):
            assert_close(a, e)
    if what == "forward":
        impls = {name: (lambda fn=fn: fn(weight, indices, offsets, psw, **kwargs))
                 for name, fn in (("fused", ops.embedding_fm), ("reference", reference.embedding_fm))}
        with torch.no_grad():
            record(benchmark, f"W4 forward, bags of 1-8, {pooling}, weighted={weighted}", impls, rounds=15)
        return
    torch.testing.assert_close(w4_fwd_bwd(ops.embedding_fm, weight, indices, offsets, psw, fields, pooling).to_dense(),
                               w4_fwd_bwd(reference.embedding_fm, weight, indices, offsets, psw, fields,
                                          pooling).to_dense(), atol=1e-4, rtol=1e-4)
    impls = {name: (lambda fn=fn: w4_fwd_bwd(fn, weight, indices, offsets, psw, fields, pooling))
             for name, fn in (("fused", ops.embedding_fm), ("reference", reference.embedding_fm))}
    record(benchmark, f"W4 fwd+bwd, bags of 1-8, {pooling}, weighted={weighted}", impls, rounds=10)
