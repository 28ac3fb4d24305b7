"""The TorchRec integration: 2 CPU processes (gloo on loopback) against 1 unsharded process.

The 2-process jobs run in two worker processes spawned once for this module (importing torchrec
costs seconds per process); each job gets a fresh process group on a free port. Every collective
has a timeout (``init_process_group(timeout=...)``), and so does every wait for a worker, so a
bug fails the test instead of hanging CI; after a failure the workers are replaced.

The whole module is skipped, with the reason, where torchrec / fbgemm-gpu-cpu cannot be imported
or gloo is missing.
"""

import math
import os
import queue
import socket
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

try:
    from deepfm_fast.integrations import torchrec as trc
except ImportError as exc:
    pytest.skip(f"TorchRec integration unavailable: {exc}", allow_module_level=True)
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is unavailable", allow_module_level=True)

from torchrec.optim import RowWiseAdagrad  # noqa: E402

from deepfm_fast import reference  # noqa: E402
from deepfm_fast.data import Batch, iterate_batches, make_synthetic  # noqa: E402
from deepfm_fast.features import MultiHotField, NumericField, SparseField  # noqa: E402

WORLD = 2
COLLECTIVE_TIMEOUT_S = 30    # any collective (all-to-all, allreduce, ...) that waits longer fails
STARTUP_TIMEOUT_S = 120      # spawn + import torch, torchrec, deepfm_fast
JOB_TIMEOUT_S = 90
# Float32 training: the sharded sums (all-to-all, reduce-scatter, DDP allreduce) run in another order.
TOL = dict(atol=1e-5, rtol=1e-5)   # measured: at most 1e-6

# Weighted (a numeric field) with a mean-pooled bag; an unweighted set uses native mean pooling.
FIELDS = [SparseField("user", 41), SparseField("item", 23), MultiHotField("tags", 12, pooling="mean"),
          NumericField("x")]
FIELDS_UNWEIGHTED = [SparseField("user", 41), MultiHotField("tags", 12, pooling="mean"),
                     MultiHotField("genres", 7, pooling="sum")]
EMBEDDING_DIM = 6            # rows of 8 columns: V (6) | w (1) | padding (1)
HIDDEN = (16,)
LR = 0.05
EPS = 1e-8
GLOBAL_BATCH = 32
STEPS = 4


# -- problems and helpers shared by the test process and the workers -------------------------------
def _data(fields, rows=400, seed=0):
    return make_synthetic(rows, fields=fields, seed=seed, model="fm", signal=3.0, max_bag=3)


def _model(fields, seed=0, **kw):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return trc.TorchRecDeepFM(fields, EMBEDDING_DIM, hidden_units=HIDDEN, init_std=0.1, **kw)


def _rows(batch: Batch, lo: int, hi: int) -> Batch:
    """Rows ``lo:hi`` of a batch."""
    take = lambda t: None if t is None else t[lo:hi]  # noqa: E731
    return Batch(take(batch.sparse), tuple(take(t) for t in batch.multi_hot), take(batch.numeric),
                 take(batch.labels), take(batch.sparse_weights), tuple(take(t) for t in batch.multi_hot_weights))


def _share(batch: Batch, rank: int, world: int) -> Batch:
    """This rank's contiguous share of a global batch; the shares concatenate to the batch."""
    n = batch.labels.shape[0] // world
    return _rows(batch, rank * n, (rank + 1) * n)


def _global_batches(data):
    batches = list(iterate_batches(data.train, GLOBAL_BATCH, shuffle=True, seed=1, drop_last=True))
    return batches[:STEPS], batches[STEPS]          # training batches, one held-out batch


def _table_optimizer(name, params):
    """The torch optimizer equal to FBGEMM's fused one (on dense gradients, untouched rows stay)."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=LR)
    if name == "adagrad":
        return torch.optim.Adagrad(params, lr=LR, eps=EPS)
    return RowWiseAdagrad(params, lr=LR, eps=EPS)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the worker pool --------------------------------------------------------------------------------
def _worker(rank, world, jobs, results):
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    torch.set_num_threads(1)                # two ranks share the cores
    results.put((rank, "ready", None))
    while True:
        job = jobs.get()
        if job is None:
            # The parent has every result; skip the interpreter's seconds-long teardown of torchrec.
            results.close()
            results.join_thread()
            os._exit(0)
        fn, port, args = job
        try:
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                    world_size=world, timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
            results.put((rank, "ok", fn(rank, world, *args)))
        except BaseException:
            results.put((rank, "error", traceback.format_exc()))
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()


class _Ranks:
    """WORLD spawned processes that run a job as the ranks of a fresh gloo process group."""

    def __init__(self):
        ctx = mp.get_context("spawn")
        self.jobs = [ctx.Queue() for _ in range(WORLD)]
        self.results = ctx.Queue()
        self.procs = [ctx.Process(target=_worker, args=(r, WORLD, self.jobs[r], self.results), daemon=True)
                      for r in range(WORLD)]
        for p in self.procs:
            p.start()
        self.broken = False
        self._collect("ready", STARTUP_TIMEOUT_S)

    def _collect(self, what, timeout_s):
        got = {}
        while len(got) < WORLD:
            try:
                rank, status, value = self.results.get(timeout=timeout_s)
            except queue.Empty:
                self.broken = True
                dead = [r for r, p in enumerate(self.procs) if not p.is_alive()]
                raise TimeoutError(f"no {what} from ranks {sorted(set(range(WORLD)) - set(got))} within "
                                   f"{timeout_s} s (dead workers: {dead})") from None
            if status == "error":
                self.broken = True
                raise AssertionError(f"rank {rank} failed:\n{value}")
            got[rank] = value
        return [got[r] for r in range(WORLD)]

    def run(self, fn, *args):
        """``[fn(rank, WORLD, *args) for each rank]``, run concurrently on a free port."""
        port = _free_port()
        for q in self.jobs:
            q.put((fn, port, args))
        return self._collect(f"result of {fn.__name__}", JOB_TIMEOUT_S)

    def close(self):
        for q in self.jobs:
            q.put(None)
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join(timeout=10)


@pytest.fixture(scope="module")
def ranks():
    pool = {"ranks": None}

    def get():
        if pool["ranks"] is None or pool["ranks"].broken:
            if pool["ranks"] is not None:
                pool["ranks"].close()
            pool["ranks"] = _Ranks()
        return pool["ranks"]

    yield get
    if pool["ranks"] is not None:
        pool["ranks"].close()


# -- jobs (run on every rank) -----------------------------------------------------------------------
def _job_train_sharded(rank, world, fields, sharding, optimizer):
    """STEPS steps on this rank's share of each global batch; then the held-out logits and state."""
    data = _data(fields)
    model = _model(fields)
    dmp = trc.shard(model, optimizer=optimizer, lr=LR, eps=EPS, sharding=sharding)
    dense_opt = torch.optim.SGD(dmp.module.dense_parameters(), lr=LR)
    train, held_out = _global_batches(data)
    for batch in train:
        mine = _share(batch, rank, world)
        loss = F.binary_cross_entropy_with_logits(dmp(trc.batch_to_kjt(mine, fields)), mine.labels)
        dense_opt.zero_grad()
        loss.backward()
        dense_opt.step()
    with torch.no_grad():
        logits = dmp(trc.batch_to_kjt(_share(held_out, rank, world), fields))
    plan = {name: opt.sharding_type for name, opt in dmp.plan.plan["embedding_bag_collection"].items()}
    return {"logits": logits, "state": trc.gather_state_dict(dmp), "plan": plan}


def _learns_data():
    return make_synthetic(6000, fields=FIELDS, seed=2, model="fm", signal=3.0, max_bag=3)


def _held_out(data):
    """The held-out batch: the test split, an even number of rows (two equal shares)."""
    return next(iterate_batches(data.test, 2 * (len(data.test) // 2)))


def _job_learns(rank, world, sharding):
    """A meta-device model (each rank allocates only its shards) learns the planted FM."""
    data = _learns_data()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = trc.TorchRecDeepFM(FIELDS, 8, hidden_units=(16,), init_std=0.01, device=torch.device("meta"))
    dmp = trc.shard(model, optimizer="adagrad", lr=0.1, sharding=sharding)
    init = trc.gather_state_dict(dmp)
    dense_opt = torch.optim.Adagrad(dmp.module.dense_parameters(), lr=0.05)
    mine = data.train.subset(torch.arange(rank, len(data.train), world))
    held = _share(_held_out(data), rank, world)

    def held_out_loss():
        """(this rank's loss on its share, the mean over the ranks)"""
        with torch.no_grad():
            local = F.binary_cross_entropy_with_logits(dmp(trc.batch_to_kjt(held, FIELDS)), held.labels)
        mine = local.item()
        dist.all_reduce(local)
        return mine, local.item() / world

    local_before, before = held_out_loss()
    for _ in range(2):
        for batch in iterate_batches(mine, 128, drop_last=True):
            loss = F.binary_cross_entropy_with_logits(dmp(trc.batch_to_kjt(batch, FIELDS)), batch.labels)
            dense_opt.zero_grad()
            loss.backward()
            dense_opt.step()
    local_after, after = held_out_loss()
    return {"before": before, "after": after, "local_before": local_before, "local_after": local_after,
            "dense": [p.detach().clone() for p in dmp.module.dense_parameters()], "init": init,
            "final": trc.gather_state_dict(dmp)}


def _job_terms(rank, world, sharding):
    """The sharded forward's terms on this rank's share, and the full tables to check them against."""
    data = _data(FIELDS)
    model = _model(FIELDS)
    with torch.no_grad():  # non-zero first-order weights, so that their column is checked too
        for bag in model.embedding_bag_collection.embedding_bags.values():
            bag.weight[:, EMBEDDING_DIM].normal_(0.0, 0.1, generator=torch.Generator().manual_seed(3))
    dmp = trc.shard(model, optimizer="sgd", lr=LR, sharding=sharding)
    batch = _share(next(iterate_batches(data.train, GLOBAL_BATCH)), rank, world)
    with torch.no_grad():
        terms = dmp.module.forward_terms(trc.batch_to_kjt(batch, FIELDS))
    return {"terms": terms._asdict(), "batch": batch, "state": trc.gather_state_dict(dmp)}


# -- tests ------------------------------------------------------------------------------------------
def _pooled_by_hand(model, batch, fields):
    """[B, F, D] rows pooled from the table weights with plain indexing: the oracle of the layout."""
    tables = model.embedding_bag_collection.embedding_bags
    b = batch.labels.shape[0]
    out = []
    i_sp = i_mh = i_num = 0
    for f in fields:
        w = tables[f"t_{f.name}"].weight.detach()
        if isinstance(f, SparseField):
            out.append(w[batch.sparse[:, i_sp]])
            i_sp += 1
        elif isinstance(f, MultiHotField):
            ids = batch.multi_hot[i_mh]
            mask = (ids >= 0).unsqueeze(-1).to(w.dtype)
            pooled = (w[ids.clamp_min(0)] * mask).sum(1)
            if f.pooling == "mean":
                pooled = pooled / mask.sum(1).clamp_min(1)
            out.append(pooled)
            i_mh += 1
        else:
            out.append(batch.numeric[:, i_num:i_num + 1] * w[0].expand(b, -1))
            i_num += 1
    return torch.stack(out, 1)


def _check_terms(model, terms, batch, fields):
    rows = _pooled_by_hand(model, batch, fields)
    torch.testing.assert_close(terms["embeddings"], rows[..., :EMBEDDING_DIM])
    torch.testing.assert_close(terms["first_order"], rows[..., EMBEDDING_DIM].sum(1))
    # The paper's per-field FM on the pooled vectors (not TorchRec's FactorizationMachine).
    torch.testing.assert_close(terms["fm"], reference.fm_interaction(rows[..., :EMBEDDING_DIM].double()).float())
    torch.testing.assert_close(terms["logit"], model.bias.detach() + terms["first_order"] + terms["fm"] + terms["dnn"])


def test_table_layout_and_init():
    for k, d in [(1, 4), (3, 4), (4, 8), (6, 8), (10, 12), (16, 20)]:
        model = trc.TorchRecDeepFM([SparseField("a", 5)], k, hidden_units=(4,))
        assert model.table_dim == d
        w = model.embedding_bag_collection.embedding_bags["t_a"].weight
        assert w.shape == (5, d)
        assert torch.all(w[:, k:] == 0) and torch.all(w[:, :k] != 0)   # w and padding start at 0
    model = _model(FIELDS)
    assert model.weighted and not _model(FIELDS_UNWEIGHTED).weighted
    pooling = {c.name: c.pooling.value for c in model.embedding_bag_collection.embedding_bag_configs()}
    # Weighted: nn.EmbeddingBag takes weights only with sum, so the mean bag is a sum table.
    assert pooling == {"t_user": "SUM", "t_item": "SUM", "t_tags": "SUM", "t_x": "SUM"}
    configs = _model(FIELDS_UNWEIGHTED).embedding_bag_collection.embedding_bag_configs()
    pooling = {c.name: c.pooling.value for c in configs}
    assert pooling == {"t_user": "SUM", "t_tags": "MEAN", "t_genres": "SUM"}
    dense = {id(p) for p in model.dense_parameters()}
    assert dense == {id(p) for n, p in model.named_parameters() if not n.startswith("embedding_bag_collection.")}
    assert len(dense) == 1 + 2 * (len(HIDDEN) + 1)                # the bias, the DNN's weights and biases


def test_batch_to_kjt_layout():
    data = _data(FIELDS, rows=50)
    batch = next(iterate_batches(data.train, 3))
    kjt = trc.batch_to_kjt(batch, FIELDS)
    assert kjt.keys() == ["user", "item", "tags", "x"]
    d = kjt.to_dict()
    assert d["user"].values().tolist() == batch.sparse[:, 0].tolist()
    assert d["item"].values().tolist() == batch.sparse[:, 1].tolist()
    bags = batch.multi_hot[0]
    assert d["tags"].lengths().tolist() == (bags >= 0).sum(1).tolist()
    assert d["tags"].values().tolist() == bags[bags >= 0].tolist()
    lengths = (bags >= 0).sum(1)
    torch.testing.assert_close(d["tags"].weights(), (1.0 / lengths.float()).repeat_interleave(lengths))
    assert d["x"].values().tolist() == [0, 0, 0]
    torch.testing.assert_close(d["x"].weights(), batch.numeric[:, 0])
    torch.testing.assert_close(d["user"].weights(), torch.ones(3))
    unweighted = trc.batch_to_kjt(next(iterate_batches(_data(FIELDS_UNWEIGHTED, rows=50).train, 3)), FIELDS_UNWEIGHTED)
    assert unweighted.weights_or_none() is None


@pytest.mark.parametrize("fields", [FIELDS, FIELDS_UNWEIGHTED], ids=["weighted", "unweighted"])
def test_unsharded_terms_match_the_paper(fields):
    model = _model(fields)
    with torch.no_grad():
        for bag in model.embedding_bag_collection.embedding_bags.values():
            bag.weight[:, EMBEDDING_DIM].normal_(0.0, 0.1)
        model.bias.fill_(0.3)
    batch = next(iterate_batches(_data(fields).train, 64))
    with torch.no_grad():
        terms = model.forward_terms(trc.batch_to_kjt(batch, fields))
    _check_terms(model, terms._asdict(), batch, fields)
    assert torch.equal(model(trc.batch_to_kjt(batch, fields)), terms.logit)


def test_clear_errors():
    with pytest.raises(ValueError, match="NumericField enters as a weighted id"):
        trc.TorchRecDeepFM(FIELDS, 4, weighted=False)
    with pytest.raises(TypeError, match="SparseField, MultiHotField or NumericField"):
        trc.TorchRecDeepFM(["user"], 4)
    with pytest.raises(ValueError, match="unique"):
        trc.TorchRecDeepFM([SparseField("a", 3), SparseField("a", 4)], 4)
    model = _model(FIELDS_UNWEIGHTED, weighted=True)
    batch = next(iterate_batches(_data(FIELDS_UNWEIGHTED, rows=50).train, 4))
    with pytest.raises(ValueError, match="weighted=True"):
        model(trc.batch_to_kjt(batch, FIELDS_UNWEIGHTED, weighted=False))
    assert model(trc.batch_to_kjt(batch, FIELDS_UNWEIGHTED, weighted=True)).shape == (4,)
    with pytest.raises(ValueError, match="no Adam"):
        trc.shard(model, optimizer="adam")
    with pytest.raises(ValueError, match="sharding of 'user'"):
        trc.shard(model, sharding="column_wise")
    with pytest.raises(ValueError, match="unknown fields"):
        trc.shard(model, sharding={"nope": "row_wise"})
    if not dist.is_initialized():
        with pytest.raises(RuntimeError, match="init_process_group"):
            trc.shard(model)


def test_a_field_name_a_table_cannot_take_is_named():
    # nn.ModuleDict (the collection's tables) refuses "." in a key, and sharding names tables by dotted paths.
    with pytest.raises(ValueError, match=r"field name 'user\.id' contains '\.'"):
        trc.TorchRecDeepFM([SparseField("item", 4), SparseField("user.id", 3)], 4)


def test_missing_torchrec_names_the_pip_command():
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import sys
        sys.modules["torchrec"] = None          # what an absent package looks like to import
        try:
            import deepfm_fast.integrations.torchrec
        except ImportError as exc:
            print(exc)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    assert "torchrec 1.8.0 and fbgemm-gpu-cpu 1.8.0" in out.stdout, out.stderr
    assert 'pip install --no-deps torchrec==1.8.0' in out.stdout


COMBOS = [(s, o) for s in ("table_wise", "row_wise") for o in ("sgd", "adagrad", "rowwise_adagrad")]


@pytest.mark.parametrize("sharding,optimizer", COMBOS, ids=[f"{s}-{o}" for s, o in COMBOS])
def test_two_ranks_equal_one_process(ranks, sharding, optimizer):
    _compare_with_one_process(ranks, FIELDS, sharding, optimizer)


def test_two_ranks_equal_one_process_unweighted(ranks):
    # Native mean pooling in FBGEMM (weighted models use sum tables and 1/L weights).
    _compare_with_one_process(ranks, FIELDS_UNWEIGHTED, "row_wise", "rowwise_adagrad")


def _compare_with_one_process(ranks, fields, sharding, optimizer):
    results = ranks().run(_job_train_sharded, fields, sharding, optimizer)
    # A one-row table cannot give both ranks a row: it stays table-wise (see trc.shard).
    assert results[0]["plan"] == {f"t_{f.name}": "table_wise" if f.vocab_size == 1 else sharding for f in fields}

    # One process, the whole global batches, the mean loss over them: what the ranks average to.
    model = _model(fields)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    tables = [p for n, p in model.named_parameters() if n.startswith("embedding_bag_collection.")]
    table_opt = _table_optimizer(optimizer, tables)
    dense_opt = torch.optim.SGD(model.dense_parameters(), lr=LR)
    train, held_out = _global_batches(_data(fields))
    for batch in train:
        loss = F.binary_cross_entropy_with_logits(model(trc.batch_to_kjt(batch, fields)), batch.labels)
        table_opt.zero_grad()
        dense_opt.zero_grad()
        loss.backward()
        table_opt.step()
        dense_opt.step()
    with torch.no_grad():
        expected = model(trc.batch_to_kjt(held_out, fields))

    state = results[0]["state"]
    assert results[1]["state"] is None and state.keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert not torch.equal(value, initial[key]), f"{key} did not train"
        torch.testing.assert_close(state[key], value, **TOL, msg=lambda m, key=key: f"{key}: {m}")
    torch.testing.assert_close(torch.cat([r["logits"] for r in results]), expected, **TOL)


@pytest.mark.parametrize("sharding", ["table_wise", "row_wise"])
def test_sharded_terms_match_the_paper(ranks, sharding):
    # Sharded, the pooled KeyedTensor's keys come in sharding order: the terms must not care.
    results = ranks().run(_job_terms, sharding)
    model = _model(FIELDS)
    model.load_state_dict(results[0]["state"])      # the gathered tables
    for r in results:
        _check_terms(model, r["terms"], r["batch"], FIELDS)


@pytest.mark.parametrize("sharding", ["table_wise", "row_wise"])
def test_sharded_meta_model_learns(ranks, sharding):
    rank0, rank1 = ranks().run(_job_learns, sharding)
    # Each rank's share of the held-out rows, and their mean: both shares learn, not only the mean.
    for r in (rank0, rank1):
        assert r["local_after"] < r["local_before"] - 0.1, (r["local_before"], r["local_after"])
    assert rank0["local_after"] != rank1["local_after"]
    assert math.isclose(rank0["after"], (rank0["local_after"] + rank1["local_after"]) / 2, rel_tol=1e-6)
    # The replicated DNN stays equal on the ranks, bitwise, after 2 epochs of different shares.
    assert len(rank0["dense"]) == len(rank1["dense"]) > 0
    for a, b in zip(rank0["dense"], rank1["dense"]):
        assert torch.equal(a, b)
    # The gathered model, unsharded in this process, gives the sharded model's held-out loss, and every
    # table moved from its initial rows.
    init, final = rank0["init"], rank0["final"]
    assert rank1["final"] is None
    model = trc.TorchRecDeepFM(FIELDS, 8, hidden_units=(16,), init_std=0.01)
    model.load_state_dict(final)
    held = _held_out(_learns_data())
    with torch.no_grad():
        loss = F.binary_cross_entropy_with_logits(model(trc.batch_to_kjt(held, FIELDS)), held.labels).item()
    assert math.isclose(loss, rank0["after"], rel_tol=1e-5), (loss, rank0["after"])
    for name in ("user", "item", "tags", "x"):
        key = f"embedding_bag_collection.embedding_bags.t_{name}.weight"
        assert not torch.equal(final[key], init[key]), key
    for name in ("user", "item", "tags", "x"):
        w = init[f"embedding_bag_collection.embedding_bags.t_{name}.weight"]
        assert torch.all(w[:, 8:] == 0)                             # w and padding start at 0
    v = torch.cat([init[f"embedding_bag_collection.embedding_bags.t_{n}.weight"][:, :8] for n in ("user", "item")])
    assert math.isclose(v.std().item(), 0.01, rel_tol=0.2)          # fresh rows: Normal(0, init_std)
    assert rank0["after"] < rank0["before"] - 0.15, (rank0["before"], rank0["after"])   # ~0.70 -> ~0.39


def test_row_wise_empty_shard_rule_matches_torchrec():
    from torchrec.distributed.sharding_plan import _calculate_rw_shard_sizes_and_offsets

    for rows in range(1, 40):
        for world in range(1, 9):
            sizes, _ = _calculate_rw_shard_sizes_and_offsets(rows, world, 4)
            assert trc._row_wise_leaves_a_rank_empty(rows, world) == (sizes[-1][0] == 0), (rows, world, sizes)


def _job_demo(rank, world):
    return trc._main(["--rows", "30000", "--epochs", "2", "--batch-size", "256", "--embedding-dim", "4"])


def test_torchrun_demo_trains(ranks):
    # What `torchrun --nproc-per-node 2 -m deepfm_fast.integrations.torchrec` runs, smaller.
    history, other = ranks().run(_job_demo)
    assert other == [] and len(history) == 2
    assert history[1]["loss"] < history[0]["loss"], history
    # 2 short epochs on 30k rows: about 0.67 then 0.71 (random: 0.5, the planted truth: 0.88).
    assert 0.65 < history[0]["auc"] < history[1]["auc"] <= history[1]["best_auc"], history
