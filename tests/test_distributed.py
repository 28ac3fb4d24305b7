"""Data-parallel training (deepfm_fast.distributed): every table mode stays equal on 2 ranks (gloo,
loopback) and equals one process trained on the concatenated global batches; bad setups raise on
every rank instead of hanging or drifting apart."""
import pytest
import torch
import torch.nn.functional as F

from deepfm_fast import EmbeddingFM, distributed, optim
from deepfm_fast.data import iterate_batches, make_synthetic
from deepfm_fast.models import LR, TABLE_OPTIMIZERS, DeepFM
from testing import run_ranks

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")

MODES = list(TABLE_OPTIMIZERS)  # dense, sparse_adam and every fused optimizer
STEPS, ROWS_PER_RANK = 4, 32


def _data():
    return make_synthetic(600, seed=3, embedding_dim=4)


def _model(mode, fields):
    torch.manual_seed(0)
    model = DeepFM(fields, 6, hidden_units=(16, 8), batch_norm=True, l2_embedding=0.01, init_std=0.1,
                   table_optimizer=mode, table_lr=0.01).double()
    return model


def _optimizers(model, mode):
    dense = torch.optim.Adam(model.dense_parameters(), lr=0.01)
    if mode == "sparse_adam":
        return [torch.optim.SparseAdam(model.sparse_parameters(), lr=0.01), dense]
    return [dense]


def _step(module, model, batch, optimizers):
    logits, penalty = module(batch, return_penalty=True)
    loss = F.binary_cross_entropy_with_logits(logits, batch.labels.double()) + penalty
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    loss.backward()
    for opt in optimizers:
        opt.step()


def _global_batches(data, shard=None):
    generator = torch.Generator().manual_seed(1)
    return [b for _, b in zip(range(STEPS), iterate_batches(data.train, 2 * ROWS_PER_RANK, shuffle=True,
                                                             generator=generator, shard=shard))]


def _final_state(model):
    model.eval()  # flushes the fused Adam: every row up to date
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _train_ranks(rank, world_size, modes):
    """Each mode: STEPS steps of the wrapped model, this rank on its half of each global batch."""
    data = _data()
    states = {}
    for mode in modes:
        model = _model(mode, data.fields)
        if rank == 1:  # a different init: wrap must broadcast rank 0's tables (DDP: its parameters)
            with torch.no_grad():
                model.embedding.weight.mul_(2.0)
        ddp = distributed.wrap(model, sync_batch_norm=True)
        optimizers = _optimizers(model, mode)
        for batch in _global_batches(data, shard=(rank, world_size)):
            _step(ddp, model, batch, optimizers)
        states[mode] = _final_state(model)
    return states


def test_every_table_mode_stays_equal_across_ranks_and_equals_one_process():
    results = run_ranks(_train_ranks, 2, args=(MODES,))
    for r in results:
        assert "error" not in r, r
    data = _data()
    for mode in MODES:
        model = _model(mode, data.fields)
        optimizers = _optimizers(model, mode)
        for batch in _global_batches(data):
            _step(model, model, batch, optimizers)
        single = _final_state(model)
        rank0, rank1 = results[0][mode], results[1][mode]
        assert rank0.keys() == rank1.keys()
        for key in rank0:
            key_single = key.replace("module.", "")
            # The replicas: bitwise equal (the same merged update, in the same order, on both).
            assert torch.equal(rank0[key], rank1[key]), (mode, key)
            # One process on the global batches: equal to float round-off (sums in another order);
            # the DNN less tightly, as the gradient of a bias before batch norm is float noise
            # (~1e-17), which Adam scales up to steps of ~1e-12.
            if rank0[key].is_floating_point():
                tolerance = dict(atol=1e-12, rtol=1e-10) if key.startswith("embedding.") else dict(atol=1e-8, rtol=1e-6)
                torch.testing.assert_close(rank0[key], single[key_single], **tolerance,
                                           msg=lambda m, k=key, mode=mode: f"{mode} {k}: {m}")
            else:
                assert torch.equal(rank0[key], single[key_single]), (mode, key)


def _empty_batch_on_rank_1(rank, world_size):
    data = _data()
    torch.manual_seed(0)
    model = DeepFM(data.fields, 6, hidden_units=(16,), table_optimizer="adam").double()  # no batch norm
    ddp = distributed.wrap(model)
    # A global batch of one row: rank 1's share is empty.
    batch = next(iterate_batches(data.train, 1, shard=(rank, world_size)))
    _step(ddp, model, batch, _optimizers(model, "adam"))
    return {}


def _different_models(rank, world_size):
    data = _data()
    torch.manual_seed(0)
    model = DeepFM(data.fields, 6 if rank == 0 else 8, hidden_units=(16,), table_optimizer="adam")
    distributed.wrap(model)
    return {}


def _plain_ddp(rank, world_size):
    data = _data()
    model = _model("adam", data.fields)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    _step(ddp, model, next(iter(iterate_batches(data.train, 8))), _optimizers(model, "adam"))
    return {}


@pytest.mark.parametrize("worker,message", [
    (_empty_batch_on_rank_1, r"rank\(s\) \[1\] had an empty batch"),
    (_different_models, r"rank 1 has a different model than rank 0 \(differs in: parameters, tables\)"),
    (_plain_ddp, r"would let the replicas' tables drift apart: wrap the model with deepfm_fast.distributed.wrap"),
], ids=["empty-batch", "different-models", "ddp-without-wrap"])
def test_bad_setups_raise_on_every_rank(worker, message):
    results = run_ranks(worker, 2, timeout_s=90)
    for rank, result in enumerate(results):
        assert "error" in result, (rank, result)
        assert __import__("re").search(message, result["error"]), (rank, result["error"])


def _independent_table(use_reference):
    torch.manual_seed(0)
    return EmbeddingFM([5, 7], 4, optimizer=optim.Adam(lr=0.1), use_reference=use_reference).double()


def _train_own_rows(table, rank):
    """Two fused steps on rows that differ between the ranks."""
    ids = torch.tensor([[rank, 2 * rank], [rank + 2, 6 - rank]])
    for _ in range(2):
        F.binary_cross_entropy_with_logits(table(ids), torch.ones(2, dtype=torch.float64)).backward()
    table.eval()  # flushes Adam: every row up to date
    return {"weight": table.weight.detach().clone(), "linear_weight": table.linear_weight.detach().clone()}


def _independent_ranks(rank, world_size, use_reference):
    return _train_own_rows(distributed.independent(_independent_table(use_reference)), rank)


@pytest.mark.parametrize("use_reference", [False, True], ids=["compiled", "reference"])
def test_independent_fused_tables_train_alone_on_each_rank(use_reference):
    results = run_ranks(_independent_ranks, 2, args=(use_reference,), timeout_s=90)
    for rank, result in enumerate(results):
        assert "error" not in result, (rank, result)
        alone = _train_own_rows(_independent_table(use_reference), rank)  # one process, no group
        for key in alone:
            assert torch.equal(result[key], alone[key]), (rank, key)
    assert not torch.equal(results[0]["weight"], results[1]["weight"])


def _root_table(variant):
    """An `EmbeddingFM` as the whole model: DDP then names its parameters without a prefix."""
    torch.manual_seed(0)
    return EmbeddingFM([5, 7], 4, sparse=variant.startswith("root-sparse"), use_reference=variant.endswith("reference"),
                       optimizer=optim.Adam(lr=0.1) if variant == "root-fused" else None).double()


def _root_optimizers(table):
    """SparseAdam for the sparse gradients, Adam for the dense ones (none for the fused tables)."""
    sparse = table.sparse_parameters()
    fused = [table.weight, table.linear_weight] if table.optimizer is not None else []
    dense = [p for p in table.parameters() if all(p is not q for q in sparse + fused)]
    return ([torch.optim.SparseAdam(sparse, lr=0.1)] if sparse else []) + [torch.optim.Adam(dense, lr=0.1)]


def _root_batch(step, rank):
    g = torch.Generator().manual_seed(10 * step + rank)  # each rank its own rows
    return torch.randint(0, 5, (8, 2), generator=g), torch.randint(0, 2, (8,), generator=g).double()


def _variant_model(variant, data):
    """The model of a wrap variant and its optimizers."""
    if variant.startswith("root-"):
        model = _root_table(variant)
        return model, _root_optimizers(model)
    torch.manual_seed(0)
    model = (DeepFM(data.fields, 6, hidden_units=(16,), table_optimizer="sparse_adam", use_reference=True)
             if variant == "deepfm-sparse-reference" else LR(data.fields, table_optimizer="sparse_adam")).double()
    return model, _optimizers(model, "sparse_adam")


def _train_variant(variant, ranks, shard=None, wrap=False):
    """STEPS steps of a variant on the rows of ``ranks`` (each rank its own, concatenated in rank
    order), wrapped or as one process."""
    data = _data()
    model, optimizers = _variant_model(variant, data)
    module = distributed.wrap(model) if wrap else model
    for step, batch in enumerate(_global_batches(data, shard=shard)):
        if variant.startswith("root-"):
            ids, labels = (torch.cat(parts) for parts in zip(*[_root_batch(step, r) for r in ranks]))
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            F.binary_cross_entropy_with_logits(module(ids), labels).backward()
            for opt in optimizers:
                opt.step()
        else:
            _step(module, model, batch, optimizers)
    fused = [m for m in model.modules() if isinstance(m, EmbeddingFM) and m.optimizer is not None]
    return {"state": _final_state(model),
            "fused_tables_have_grad": any(t.grad is not None for m in fused for t in (m.weight, m.linear_weight))}


def _train_wrapped(rank, world_size, variant):
    """STEPS steps of a wrapped variant, each rank on its own rows."""
    return _train_variant(variant, [rank], shard=(rank, world_size), wrap=True)


@pytest.mark.parametrize("variant", [
    "deepfm-sparse-reference",  # the reference gives w a dense gradient, which only DDP averages
    "root-dense", "root-sparse", "root-sparse-reference", "root-fused",
    "lr-frozen-sparse-table",  # LR's table requires no gradient: no hook to register
])
def test_wrap_keeps_every_parameter_equal_across_ranks(variant):
    """wrap leaves to DDP exactly the parameters it neither hooks nor fuses, under the names DDP
    looks up (an `EmbeddingFM` that is the whole model included); ranks on different rows stay equal
    and equal one process trained on both ranks' rows."""
    results = run_ranks(_train_wrapped, 2, args=(variant,), timeout_s=90)
    for rank, result in enumerate(results):
        assert "error" not in result, (rank, result)
    # Left to DDP, a fused table would get a dense zero gradient, all-reduced at every step.
    assert not results[0]["fused_tables_have_grad"]
    rank0, rank1 = results[0]["state"], results[1]["state"]
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    linear_weight = next(v for k, v in rank0.items() if k.endswith("linear_weight"))
    assert bool(linear_weight.ne(0).any())  # it trained (it starts at zero)
    single = _train_variant(variant, [0, 1])["state"]  # one process on the concatenated batches
    assert rank0.keys() == single.keys()
    for key in rank0:  # equal to float round-off: the ranks' gradients are summed in another order
        if rank0[key].is_floating_point():
            torch.testing.assert_close(rank0[key], single[key], atol=1e-12, rtol=1e-10,
                                       msg=lambda m, k=key: f"{variant} {k}: {m}")
        else:
            assert torch.equal(rank0[key], single[key]), key


def test_wrap_needs_a_process_group():
    model = DeepFM(_data().fields, 4, hidden_units=(8,), table_optimizer="adam")
    with pytest.raises(RuntimeError, match="no process group; call torch.distributed.init_process_group first"):
        distributed.wrap(model)
