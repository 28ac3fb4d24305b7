"""DeepFM / FM / LR: fused vs reference, the exact FM formula, L2 on used rows, sparse gradients."""

import pytest
import torch
import torch.nn.functional as F

from deepfm_fast.data import iterate_batches, make_synthetic, to_csr
from deepfm_fast.data.dataset import field_offsets
from deepfm_fast.features import MultiHotField, NumericField, SparseField
from deepfm_fast.models import FM, LR, DeepFM, build_model

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
    model = DeepFM(data.fields, 8, hidden_units=(16,), sparse=True, l2_embedding=0.1)
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
