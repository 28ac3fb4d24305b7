"""W2 and W4 (shared/docs/benchmarks.md): the fused embedding_fm op against the reference and against
plain PyTorch with nn.EmbeddingBag(sparse=True). One process, one thread; every case is checked
against the reference before it is timed; fused and baseline share a pytest-benchmark group.

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

from conftest import synchronize
from deepfm_fast import EmbeddingFM, ops, reference

torch.set_num_threads(1)
DEVICE = os.environ.get("DEEPFM_FAST_BENCH_DEVICE", "cpu")
ON = "" if DEVICE == "cpu" else f" {DEVICE}"  # suffix of the benchmark groups

B, FIELDS, K = 4096, 26, 16
TABLES = {"small": 10_000, "large": 400_000}  # rows per field
DISTS = ["uniform", "zipf"]


def assert_close(a, b):
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def sample_ids(rows, dist, n, gen):
    if dist == "uniform":
        return torch.randint(0, rows, (n,), generator=gen)
    rank = torch.arange(1, rows + 1, dtype=torch.float64)
    ranks = torch.multinomial(rank.pow(-1.05), n, replacement=True, generator=gen)
    return (ranks * 2654435761) % rows  # scatter the hot ids over the field's rows


@functools.lru_cache(maxsize=1)
def w2_model(table):
    torch.manual_seed(0)
    model = EmbeddingFM([TABLES[table]] * FIELDS, K, sparse=True, init_std=0.05)
    nn.init.normal_(model.linear_weight, 0, 0.05)
    return model.to(DEVICE)


@functools.lru_cache(maxsize=4)
def w2_batch(table, dist):
    gen = torch.Generator().manual_seed(1)
    local = torch.stack([sample_ids(TABLES[table], dist, B, gen) for _ in range(FIELDS)], 1)
    labels = torch.randint(0, 2, (B,), generator=gen).float()
    return w2_model(table).to_global(local.to(DEVICE)), labels.to(DEVICE)


class BaselineFM(nn.Module):
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
        e = self.emb(ids.reshape(-1), offsets).view(batch, fields, -1)
        fm = 0.5 * (e.sum(1).pow(2) - e.pow(2).sum(1)).sum(1)
        return self.bias + self.lin(ids).squeeze(1) + fm


def step(model, ids, labels, optimizer):
    optimizer.zero_grad(set_to_none=True)
    loss = F.binary_cross_entropy_with_logits(model(ids, global_ids=True) if isinstance(model, EmbeddingFM)
                                              else model(ids), labels)
    loss.backward()
    optimizer.step()
    return loss


CASES = [(t, d) for t in TABLES for d in DISTS]


@pytest.mark.parametrize("table,dist", CASES)
@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_w2_forward(benchmark, table, dist, impl):
    model = w2_model(table)
    ids, _ = w2_batch(table, dist)
    fn = ops.embedding_fm if impl == "fused" else reference.embedding_fm
    with torch.no_grad():
        expected = reference.embedding_fm(model.weight, ids, linear_weight=model.linear_weight)
        got = fn(model.weight, ids, linear_weight=model.linear_weight)
        assert_close(got.fm, expected.fm)
        assert_close(got.linear, expected.linear)
        benchmark.group = f"W2 forward {table} {dist}{ON}"
        benchmark.pedantic(lambda: (fn(model.weight, ids, linear_weight=model.linear_weight), synchronize(DEVICE)),
                           rounds=30, warmup_rounds=3)


@pytest.mark.parametrize("table,dist", CASES)
@pytest.mark.parametrize("impl", ["fused", "embedding_bag"])
def test_w2_step_sparse_sgd(benchmark, table, dist, impl):
    model = w2_model(table)
    ids, labels = w2_batch(table, dist)
    baseline = BaselineFM(model)
    with torch.no_grad():
        assert_close(model(ids, global_ids=True), baseline(ids))
    net = model if impl == "fused" else baseline
    # lr=0: the tables stay as they are across rounds (the update still runs over every touched row).
    optimizer = torch.optim.SGD(net.parameters(), lr=0.0)
    benchmark.group = f"W2 step (fwd, BCE, bwd, sparse SGD) {table} {dist}{ON}"
    benchmark.pedantic(lambda: (step(net, ids, labels, optimizer), synchronize(DEVICE)), rounds=15, warmup_rounds=2)
    assert (model.weight if impl == "fused" else baseline.emb.weight).grad.is_sparse


@functools.lru_cache(maxsize=1)
def w4_data():
    gen = torch.Generator().manual_seed(2)
    fields, rows = 8, 10_000
    counts = torch.randint(1, 9, (B * fields,), generator=gen)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    nnz = int(offsets[-1])
    indices = torch.randint(0, rows * fields, (nnz,), generator=gen)
    weight = torch.randn(rows * fields, K, generator=gen) * 0.05
    psw = torch.rand(nnz, generator=gen)
    return weight, indices, offsets, psw, fields


def w4_fwd_bwd(fn, weight, indices, offsets, psw, fields, pooling):
    w = weight.detach().requires_grad_(True)
    out = fn(w, indices, offsets, psw, num_fields=fields, pooling=pooling, return_pooled=True, sparse=True)
    (out.fm.sum() + out.pooled.sum()).backward()
    return w.grad


@pytest.mark.parametrize("pooling,weighted", [(p, w) for p in ("sum", "mean") for w in (False, True)])
@pytest.mark.parametrize("impl", ["fused", "reference"])
@pytest.mark.parametrize("what", ["forward", "fwd+bwd"])
def test_w4_multi_hot(benchmark, what, impl, pooling, weighted):
    weight, indices, offsets, psw, fields = w4_data()
    psw = psw if weighted else None
    fn = ops.embedding_fm if impl == "fused" else reference.embedding_fm
    kwargs = dict(num_fields=fields, pooling=pooling, return_pooled=True)
    with torch.no_grad():
        got, expected = fn(weight, indices, offsets, psw, **kwargs), reference.embedding_fm(weight, indices, offsets,
                                                                                          psw, **kwargs)
        for a, e in zip(got, expected):
            assert_close(a, e)
    benchmark.group = f"W4 {what} bags 1-8, {pooling}, {'weighted' if weighted else 'unweighted'}"
    if what == "forward":
        with torch.no_grad():
            benchmark.pedantic(fn, args=(weight, indices, offsets, psw), kwargs=kwargs, rounds=20, warmup_rounds=2)
    else:
        torch.testing.assert_close(w4_fwd_bwd(fn, weight, indices, offsets, psw, fields, pooling).to_dense(),
                                   w4_fwd_bwd(reference.embedding_fm, weight, indices, offsets, psw, fields,
                                              pooling).to_dense(), atol=1e-4, rtol=1e-4)
        benchmark.pedantic(w4_fwd_bwd, args=(fn, weight, indices, offsets, psw, fields, pooling), rounds=10,
                           warmup_rounds=1)


def test_fbgemm_tbe_forward(benchmark):
    pytest.importorskip("fbgemm_gpu", reason="fbgemm-gpu-cpu==1.8.0 is not installed (optional bench dependency)")
    pytest.skip("FBGEMM TBE comparison not written yet")
