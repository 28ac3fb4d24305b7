"""DeepFM / FM / LR: fused vs reference, the exact FM formula, L2 on used rows, sparse gradients."""

import pytest
import torch
import torch.nn.functional as F

from deepfm_fast.data import iterate_batches, make_synthetic, to_csr
from deepfm_fast.data.dataset import field_offsets
from deepfm_fast.features import MultiHotField, NumericField, SparseField
from deepfm_fast.models import FM, LR, DeepFM, build_model
from testing import requires_compiled

FIELDS = [SparseField("user", 40), SparseField("item", 60), MultiHotField("genres", 12, pooling="mean"),
          MultiHotField("tags", 9, pooling="sum"), NumericField("age"), NumericField("price")]


@pytest.fixture(scope="module")
def data():
    return make_synthetic(1200, fields=FIELDS, seed=3, max_bag=3)


def _batch(data, n=128):
    return next(iterate_batches(data.train, n))


def _grads(model):
    return {k: (p.grad.to_dense() if p.grad.is_sparse else p.grad) for k, p in model.named_parameters()
            if p.grad is not None}


@requires_compiled
@pytest.mark.parametrize("name", ["deepfm", "fm", "lr"])
def test_fused_equals_reference_logits_and_grads(data, name):
    torch.manual_seed(0)
    kw = dict(embedding_dim=8, hidden_units=(32, 16), batch_norm=True, l2_embedding=0.3, init_std=0.1)
    fused = build_model(name, data.fields, **kw)
    ref = build_model(name, data.fields, use_reference=True, **kw)
    with torch.no_grad():  # non-zero first-order weights, so that term is compared too
        fused.embedding.linear_weight.normal_(0, 0.1)
    ref.load_state_dict(fused.state_dict())
    batch = _batch(data)
    results = []
    for model in (fused, ref):
        logits, penalty = model(batch, return_penalty=True)
        loss = F.binary_cross_entropy_with_logits(logits, batch.labels) + penalty
        loss.backward()
        results.append((logits.detach(), penalty.detach(), _grads(model)))
    (lf, pf, gf), (lr_, pr, gr) = results
    torch.testing.assert_close(lf, lr_, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pf, pr)
    assert gf.keys() == gr.keys() and "embedding.linear_weight" in gf
    for k in gf:
        torch.testing.assert_close(gf[k], gr[k], atol=1e-5, rtol=1e-4, msg=k)
    if name == "lr":
        assert "embedding.weight" not in gf  # the LR table is frozen at zero


def test_fm_logit_matches_the_formula(data):
    """bias + sum w x + FM over field vectors, with mean fields averaged (embeddings and w)."""
    torch.manual_seed(1)
    model = FM(data.fields, 4, init_std=0.3)
    with torch.no_grad():
        model.embedding.linear_weight.normal_()
        model.embedding.bias.fill_(0.7)
    batch = _batch(data, 16)
    got = model(batch)
    V, w, b = model.embedding.weight.detach(), model.embedding.linear_weight.detach(), 0.7
    off = field_offsets(data.fields)
    expect = torch.zeros(16)
    for r in range(16):
        vecs, lin = [], 0.0
        sp, mh, nu = 0, 0, 0
        for f, spec in enumerate(data.fields):
            if isinstance(spec, SparseField):
                ids, x = [int(batch.sparse[r, sp])], [1.0]
                sp += 1
            elif isinstance(spec, MultiHotField):
                ids = [int(i) for i in batch.multi_hot[mh][r] if i >= 0]
                x = [1.0 / max(len(ids), 1) if spec.pooling == "mean" else 1.0] * len(ids)
                mh += 1
            else:
                ids, x = [0], [float(batch.numeric[r, nu])]
                nu += 1
            rows = [int(off[f]) + i for i in ids]
            vecs.append(sum((xi * V[j] for xi, j in zip(x, rows)), torch.zeros(4)))
            lin += sum(xi * float(w[j]) for xi, j in zip(x, rows))
        e = torch.stack(vecs)
        expect[r] = b + lin + 0.5 * float((e.sum(0) ** 2 - (e ** 2).sum(0)).sum())
    torch.testing.assert_close(got.detach(), expect, atol=1e-4, rtol=1e-4)


def test_l2_applies_to_used_rows_only_once_each(data):
    torch.manual_seed(2)
    model = DeepFM(data.fields, 6, hidden_units=(8,), l2_embedding=0.5, init_std=0.2)
    with torch.no_grad():
        model.embedding.linear_weight.normal_()
    batch = _batch(data, 32)
    _, penalty = model(batch, return_penalty=True)
    indices, _, _ = to_csr(batch, data.fields)
    used = torch.unique(indices)
    assert used.numel() < indices.numel()          # duplicates exist and must count once
    V, w = model.embedding.weight, model.embedding.linear_weight
    expect = 0.25 * (V[used].pow(2).sum() + w[used].pow(2).sum())
    torch.testing.assert_close(penalty, expect)
    penalty.backward()
    unused = torch.ones(V.shape[0], dtype=torch.bool)
    unused[used] = False
    assert unused.any()
    assert torch.all(V.grad[unused] == 0) and torch.all(w.grad[unused] == 0)
    torch.testing.assert_close(V.grad[used], 0.5 * V[used].detach())
    # No penalty without l2_embedding, and the logits do not depend on it.
    model0 = DeepFM(data.fields, 6, hidden_units=(8,))
    model0.load_state_dict(model.state_dict())
    logits0, p0 = model0(batch, return_penalty=True)
    assert float(p0) == 0.0
    torch.testing.assert_close(logits0, model(batch))


def test_all_sparse_fields_take_the_dense_id_path():
    fields = [SparseField("a", 30), SparseField("b", 50), SparseField("c", 7)]
    data = make_synthetic(600, fields=fields, seed=1)
    torch.manual_seed(0)
    model = DeepFM(fields, 4, hidden_units=(8,), l2_embedding=0.1, init_std=0.1)
    batch = _batch(data, 64)
    ids, offsets, weights = model._inputs(batch)
    assert offsets is None and ids.shape == (64, 3)
    logit_ids, pen_ids = model(batch, return_penalty=True)
    # The same batch as CSR through the embedding directly.
    idx, off, _ = to_csr(batch, fields)
    logit_csr, pooled = model.embedding(idx, off, return_pooled=True, global_ids=True)
    torch.testing.assert_close(logit_ids, logit_csr + model.dnn(pooled.flatten(1)))
    torch.testing.assert_close(pen_ids, model.penalty(idx, off))


def test_sparse_gradients_and_sparse_adam_step(data):
    torch.manual_seed(0)
    model = DeepFM(data.fields, 8, hidden_units=(16,), table_optimizer="sparse_adam", l2_embedding=0.1)
    batch = _batch(data)
    logits, penalty = model(batch, return_penalty=True)
    (F.binary_cross_entropy_with_logits(logits, batch.labels) + penalty).backward()
    assert model.embedding.weight.grad.is_sparse and model.embedding.linear_weight.grad.is_sparse
    assert set(map(id, model.sparse_parameters())) == {id(model.embedding.weight), id(model.embedding.linear_weight)}
    before = model.embedding.weight.detach().clone()
    torch.optim.SparseAdam(model.sparse_parameters(), lr=0.01).step()
    changed = (model.embedding.weight != before).any(1)
    used = torch.unique(to_csr(batch, data.fields)[0])
    assert torch.equal(changed.nonzero().flatten(), used)


def test_build_model_and_config_roundtrip(data):
    hp = dict(embedding_dim=5, hidden_units=[16, 8], dropout=0.1, batch_norm=True, l2_embedding=0.01)
    for name, cls in (("deepfm", DeepFM), ("fm", FM), ("lr", LR)):
        model = build_model(name, data.fields, **hp)
        assert type(model) is cls and model.name == name
        cfg = model.config()
        again = build_model(cfg.pop("name"), cfg.pop("fields"), **cfg)
        again.load_state_dict(model.state_dict())
        assert again.config() == model.config()
    assert isinstance(build_model("deepfm", data.fields, **hp).dnn.net[1], torch.nn.BatchNorm1d)
    with pytest.raises(ValueError, match="unknown model 'xdeepfm'"):
        build_model("xdeepfm", data.fields)
    with pytest.raises(ValueError, match="activation"):
        DeepFM(data.fields, 4, activation="swish2")
    with pytest.raises(ValueError, match="l2_embedding"):
        FM(data.fields, 4, l2_embedding=-1)


def _double(model):
    return model.double()


def _step(model, batch, opt_fn):
    """One training step: BCE + the model's penalty, backward (fused tables update here), torch step."""
    params = [p for p in model.parameters() if p.requires_grad]
    opts = opt_fn(model)
    logits, penalty = model(batch, return_penalty=True)
    loss = F.binary_cross_entropy_with_logits(logits, batch.labels.to(logits.dtype)) + penalty
    for o in opts:
        o.zero_grad(set_to_none=True)
    loss.backward()
    for o in opts:
        o.step()
    return params


@pytest.mark.parametrize("name", ["deepfm", "lr"])
def test_fused_weight_decay_is_the_penalty_gradient(data, name):
    """l2_embedding as the fused optimizer's weight_decay == the penalty lambda/2 ||V_j||^2 on used rows.

    One SGD step (lr 0.5) in float64: fused SGD with weight_decay vs dense gradients of BCE + penalty
    and torch SGD. Rows the batch does not use must not move in either.
    """
    kw = dict(embedding_dim=6, hidden_units=(16,), l2_embedding=0.7, init_std=0.3, table_lr=0.5)
    torch.manual_seed(4)
    dense = _double(build_model(name, data.fields, table_optimizer="dense", **kw))
    fused = _double(build_model(name, data.fields, table_optimizer="sgd", **kw))
    nodecay = _double(build_model(name, data.fields, table_optimizer="sgd", **{**kw, "l2_embedding": 0.0}))
    with torch.no_grad():
        dense.embedding.linear_weight.normal_(0, 0.5)
    fused.load_state_dict(dense.state_dict(), strict=False)
    nodecay.load_state_dict(dense.state_dict(), strict=False)
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    batch = _batch(data, 64)
    _, pen = fused(batch, return_penalty=True)
    assert float(pen) == 0.0 and fused.embedding.optimizer.weight_decay == 0.7   # L2 moved into the optimizer
    sgd = lambda m: [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)]  # noqa: E731
    for m in (dense, fused, nodecay):
        _step(m, batch, sgd)
    assert fused.embedding.weight.grad is None and int(fused.embedding.optimizer_step) == 1
    for k in ("embedding.weight", "embedding.linear_weight", "embedding.bias"):
        torch.testing.assert_close(fused.state_dict()[k], dense.state_dict()[k], atol=1e-12, rtol=1e-10, msg=k)
    used = torch.unique(to_csr(batch, data.fields)[0])
    moved = (dense.embedding.linear_weight != before["embedding.linear_weight"])
    assert torch.equal(moved.nonzero().flatten(), used)         # only the used rows, each decayed once
    # Without weight decay the used rows land elsewhere: the decay did something.
    diff = (nodecay.embedding.linear_weight - fused.embedding.linear_weight)[used]
    torch.testing.assert_close(diff, 0.5 * 0.7 * before["embedding.linear_weight"][used])
    if name == "lr":
        assert torch.all(fused.embedding.weight == 0)          # the LR table stays zero
    else:
        torch.testing.assert_close(fused.dnn.net[0].weight, dense.dnn.net[0].weight, atol=1e-12, rtol=1e-10)


def _same_model_two_ways(data, fused_name, other_name, table_lr):
    """A float64 DeepFM with batch norm and L2 twice, with the same weights: a fused table optimizer and
    the plain-PyTorch way it should equal."""
    kw = dict(embedding_dim=6, hidden_units=(16, 8), batch_norm=True, l2_embedding=0.05, init_std=0.1,
              table_lr=table_lr)
    torch.manual_seed(5)
    fused = _double(DeepFM(data.fields, table_optimizer=fused_name, **kw))
    other = _double(DeepFM(data.fields, table_optimizer=other_name, **kw))
    other.load_state_dict(fused.state_dict(), strict=False)
    return fused, other


def _train_both(fused, other, opt_f, opt_o, batches):
    start = fused.embedding.weight.detach().clone()
    for batch in batches:
        _step(fused, batch, lambda m: opt_f)
        _step(other, batch, lambda m: opt_o)
    fused.eval()  # a fused Adam flushes: every row up to date
    other.eval()
    assert int(fused.embedding.optimizer_step) == len(batches)
    assert not torch.equal(start, fused.embedding.weight)


def test_fused_lazy_adam_equals_sparse_adam(data):
    """Fused lazy Adam on the table (inside the backward) == sparse gradients + torch SparseAdam, 4 steps, float64."""
    fused, sparse = _same_model_two_ways(data, "lazy_adam", "sparse_adam", 0.02)
    assert fused.fused and not sparse.fused and sparse.sparse
    opt_f = [torch.optim.Adam([p for p in fused.parameters() if p.requires_grad], lr=0.01)]
    opt_s = [torch.optim.SparseAdam(sparse.sparse_parameters(), lr=0.02),
             torch.optim.Adam(sparse.dense_parameters(), lr=0.01)]
    _train_both(fused, sparse, opt_f, opt_s, [b for _, b in zip(range(4), iterate_batches(data.train, 100))])
    sd_s = sparse.state_dict()
    for k, v in fused.state_dict().items():
        if "optimizer" not in k:
            torch.testing.assert_close(v, sd_s[k], atol=1e-10, rtol=1e-8, msg=k)


def test_fused_adam_equals_dense_adam(data):
    """Fused Adam on the table == dense gradients of BCE + the penalty on the used rows + torch Adam on
    every parameter, 12 steps of a DeepFM with batch norm, float64 (rows left out of a batch move too)."""
    fused, dense = _same_model_two_ways(data, "adam", "dense", 0.01)
    opt_f = [torch.optim.Adam(fused.dense_parameters(), lr=0.01)]
    opt_d = [torch.optim.Adam(dense.parameters(), lr=0.01)]
    _train_both(fused, dense, opt_f, opt_d, [b for _, b in zip(range(12), iterate_batches(data.train, 50))])
    sd_d = dense.state_dict()
    for k, v in fused.state_dict().items():
        if "optimizer" in k:
            continue
        # The DNN matches less tightly: the gradient of a bias before batch norm is float noise
        # (~1e-17), which Adam scales up to steps of ~1e-12.
        tolerance = dict(atol=1e-12, rtol=1e-10) if k.startswith("embedding.") else dict(atol=1e-8, rtol=1e-6)
        torch.testing.assert_close(v, sd_d[k], **tolerance, msg=k)


def test_table_optimizer_choices(data):
    m = DeepFM(data.fields, 4, hidden_units=(8,), table_optimizer="rowwise_adagrad", table_lr=0.05, l2_embedding=0.1)
    assert type(m.embedding.optimizer).__name__ == "RowWiseAdagrad" and m.embedding.optimizer.lr == 0.05
    assert m.embedding.optimizer.weight_decay == 0.1 and m.fused
    # The fused tables are not for a torch optimizer.
    assert not any(p is m.embedding.weight or p is m.embedding.linear_weight for p in m.dense_parameters())
    assert "embedding.weight_optimizer_state0" in m.state_dict() and "embedding.optimizer_step" in m.state_dict()
    cfg = m.config()
    assert cfg["table_optimizer"] == "rowwise_adagrad" and cfg["table_lr"] == 0.05
    again = build_model(cfg.pop("name"), cfg.pop("fields"), **cfg)
    again.load_state_dict(m.state_dict())
    with pytest.warns(FutureWarning, match="sparse=True is deprecated; use table_optimizer='sparse_adam'"):
        assert DeepFM(data.fields, 4, sparse=True).table_optimizer == "sparse_adam"
    assert DeepFM(data.fields, 4).table_optimizer == "dense" and DeepFM(data.fields, 4).embedding.optimizer is None
    with pytest.raises(ValueError, match="table_optimizer"):
        DeepFM(data.fields, 4, table_optimizer="lamb")
    with pytest.raises(ValueError, match="exclude"), pytest.warns(FutureWarning):
        DeepFM(data.fields, 4, table_optimizer="adam", sparse=True)


def test_table_mode_is_decided_once_and_the_optimizers_follow_it(data):
    """TableMode.parse is the one reading of a table-optimizer name; Optimizers sets and decays the table's
    learning rate in every mode without the caller asking which."""
    from deepfm_fast import optim
    from deepfm_fast.models import TableMode

    assert TableMode.parse(None) == TableMode.parse("dense") == TableMode("dense")
    assert TableMode.parse("sparse_adam").sparse and TableMode.parse("sparse_adam").name == "sparse_adam"
    assert [TableMode.parse(n).optimizer for n in optim.NAMES] == list(optim.NAMES)
    assert all(TableMode.parse(n).fused and TableMode.parse(n).name == n for n in optim.NAMES)
    with pytest.raises(ValueError, match=r"--table-optimizer must be one of \['adam'.*got 'lamb'"):
        TableMode.parse("lamb", "--table-optimizer")
    for name, torch_kinds in (("dense", ["Adam"]), ("sparse_adam", ["SparseAdam", "Adam"]), ("adagrad", ["Adam"])):
        model = DeepFM(data.fields, 4, hidden_units=(8,), table_optimizer=TableMode.parse(name))
        opts = model.optimizers(lr=0.01, table_lr=0.5)
        assert [type(o).__name__ for o in opts.torch_optimizers] == torch_kinds, name
        assert opts.lr == 0.01 and opts.table_lr == (0.01 if name == "dense" else 0.5), name
        assert opts.decay(0.1, floor=0.003) == pytest.approx(0.003)
        assert opts.table_lr == pytest.approx(0.003 if name == "dense" else 0.05), name
        if name == "adagrad":
            assert model.table_lr == model.embedding.optimizer.lr == pytest.approx(0.05)
        opts.set_table_lr(0.2)
        assert opts.table_lr == pytest.approx(0.003 if name == "dense" else 0.2) and opts.lr == pytest.approx(0.003)
