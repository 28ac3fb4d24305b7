"""The training loop: exact resume, determinism, BARS early stopping and lr decay, checkpoints."""

import math

import pytest
import torch

from deepfm_fast.data import make_synthetic
from deepfm_fast.features import MultiHotField, NumericField, SparseField
from deepfm_fast.models import FM, DeepFM
from deepfm_fast.train import TrainConfig, Trainer, atomic_save, evaluate, load_checkpoint, predict, seed_everything

FIELDS = [SparseField("u", 60), SparseField("i", 90), MultiHotField("g", 10, pooling="mean"), NumericField("x")]


@pytest.fixture(scope="module")
def data():
    return make_synthetic(3000, fields=FIELDS, seed=5, model="fm", signal=3.0)


def _model(seed=0, **kw):
    seed_everything(seed)
    hp = dict(hidden_units=(32, 32), dropout=0.3, batch_norm=True, l2_embedding=1e-3, init_std=0.01)
    hp.update(kw)
    return DeepFM(FIELDS, 8, **hp)


def _cfg(tmp=None, **kw):
    base = dict(epochs=2, batch_size=256, lr=3e-3, seed=11, progress=False, patience=5,
                checkpoint_dir=None if tmp is None else str(tmp))
    base.update(kw)
    return TrainConfig(**base)


def _same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_continues_exactly(tmp_path, data):
    straight = _model()
    Trainer(straight, _cfg(tmp_path / "a")).fit(data.train, data.valid)

    first = _model()
    Trainer(first, _cfg(tmp_path / "b", epochs=1)).fit(data.train, data.valid)
    # A fresh process would rebuild the model with other random weights: resume must not care.
    resumed = _model(seed=123)
    r = Trainer(resumed, _cfg(tmp_path / "b", resume=True)).fit(data.train, data.valid)
    assert r.epochs_run == 2 and [h["epoch"] for h in r.history] == [1, 2]
    _same_state(straight.state_dict(), resumed.state_dict())
    la, lb = load_checkpoint(tmp_path / "a" / "last.pt"), load_checkpoint(tmp_path / "b" / "last.pt")
    _same_state(la["model"], lb["model"])              # the epoch-2 weights, not just the best ones
    assert la["history"][-1]["valid_auc"] == lb["history"][-1]["valid_auc"]
    assert la["optimizers"][0]["state"][0]["step"] == lb["optimizers"][0]["state"][0]["step"]
    # Resuming a finished run trains nothing more.
    again = _model(seed=7)
    r2 = Trainer(again, _cfg(tmp_path / "b", resume=True)).fit(data.train, data.valid)
    assert r2.epochs_run == 2
    _same_state(again.state_dict(), straight.state_dict())
    assert not list(tmp_path.rglob("*.tmp"))           # atomic writes leave no temporaries


class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("cannot pickle this")


def test_atomic_save_keeps_the_old_file_on_error(tmp_path):
    path = tmp_path / "x.pt"
    atomic_save({"a": torch.ones(2)}, path)
    with pytest.raises(RuntimeError, match="cannot pickle"):
        atomic_save({"a": _Unpicklable()}, path)        # fails half-way through writing
    assert torch.equal(load_checkpoint(path)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]


def test_same_seed_same_result_other_seed_differs(data):
    a, b, c = _model(), _model(), _model()
    ra = Trainer(a, _cfg(epochs=1)).fit(data.train, data.valid)
    rb = Trainer(b, _cfg(epochs=1)).fit(data.train, data.valid)
    Trainer(c, _cfg(epochs=1, seed=12)).fit(data.train, data.valid)
    _same_state(a.state_dict(), b.state_dict())
    assert ra.history[0]["loss"] == rb.history[0]["loss"]
    assert not torch.equal(a.dnn.net[0].weight, c.dnn.net[0].weight)


def test_learns_the_planted_model(data):
    model = FM(FIELDS, 8, init_std=0.01)
    trainer = Trainer(model, _cfg(epochs=8, lr=1e-2))
    result = trainer.fit(data.train, data.valid)
    test = trainer.evaluate(data.test)
    assert test["auc"] > 0.70 and test["auc"] <= data.best_auc + 0.02, (test, data.best_auc)
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert result.train_rows_per_second > 0 and result.seconds_per_epoch > 0
    probs = predict(model, data.test)
    assert probs.shape == (len(data.test),) and bool(((probs > 0) & (probs < 1)).all())


def test_bars_early_stopping_lr_decay_and_best_restore(tmp_path, data):
    model = _model()
    trainer = Trainer(model, _cfg(tmp_path, epochs=10, patience=2, lr=1e-3))
    aucs = iter([0.70, 0.72, 0.71, 0.72, 0.715])       # best at epoch 2; two epochs without gain
    real_evaluate = trainer.evaluate
    snapshots = {}

    def fake_evaluate(ds):
        snapshots[len(snapshots) + 1] = {k: v.clone() for k, v in model.state_dict().items()}
        real_evaluate(ds)
        return {"auc": next(aucs), "logloss": 0.5, "rows": len(ds)}

    trainer.evaluate = fake_evaluate
    r = trainer.fit(data.train, data.valid)
    assert r.epochs_run == 4 and r.stopped_early and r.best_epoch == 2
    assert [h["lr"] for h in r.history] == pytest.approx([1e-3, 1e-3, 1e-3, 1e-4])  # lr used in each epoch
    assert r.history[2]["lr_after"] == pytest.approx(1e-4) and "lr_after" not in r.history[1]
    assert trainer.lr == pytest.approx(1e-5)
    _same_state(model.state_dict(), snapshots[2])          # the best epoch's weights are back
    best = load_checkpoint(tmp_path / "best.pt")
    assert best["epoch"] == 2 and best["valid"]["auc"] == 0.72
    # A resume after an early stop does not train on.
    again = _model(seed=9)
    r2 = Trainer(again, _cfg(tmp_path, epochs=10, patience=2, resume=True)).fit(data.train, data.valid)
    assert r2.epochs_run == 4
    _same_state(again.state_dict(), snapshots[2])


def test_sparse_model_uses_sparse_adam(data):
    model = _model(sparse=True)
    trainer = Trainer(model, _cfg(epochs=1))
    kinds = [type(o).__name__ for o in trainer.optimizers]
    assert kinds == ["SparseAdam", "Adam"]
    before = model.embedding.weight.detach().clone()
    trainer.fit(data.train, data.valid)
    assert not torch.equal(before, model.embedding.weight)


def test_evaluate_and_bad_config(data):
    m = evaluate(_model(), data.valid)
    assert set(m) == {"auc", "logloss", "rows"} and 0 <= m["auc"] <= 1 and m["rows"] == len(data.valid)
    one_class = data.valid.subset(torch.nonzero(data.valid.labels == 1).flatten())
    assert math.isnan(evaluate(_model(), one_class)["auc"])
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)


def test_unlabelled_data_predicts_but_does_not_evaluate_or_train(data):
    """NaN labels (a file read without labels) can be scored, not evaluated or trained on."""
    unlabelled = data.valid.subset(torch.arange(len(data.valid)))
    unlabelled.labels = torch.full_like(unlabelled.labels, float("nan"))
    assert not unlabelled.has_labels and data.valid.has_labels
    model = _model()
    assert torch.equal(predict(model, unlabelled), predict(model, data.valid))
    with pytest.raises(ValueError, match="no labels"):
        evaluate(model, unlabelled)
    with pytest.raises(ValueError, match="training set has no labels"):
        Trainer(model, _cfg()).fit(unlabelled)
    with pytest.raises(ValueError, match="validation set has no labels"):
        Trainer(model, _cfg()).fit(data.train, unlabelled)


def _scripted(trainer, metrics):
    """Replace the validation metrics by a script of (auc, logloss) per epoch."""
    it = iter(metrics)
    trainer.evaluate = lambda ds: dict(zip(("auc", "logloss"), next(it)), rows=len(ds))
    return trainer


def test_resume_exact_with_fused_table_optimizer_and_decayed_lr(tmp_path, data):
    """Fused Adam table: 3 epochs straight == 2 epochs + resume; the decayed table lr comes back too."""
    script = [(0.70, 0.5), (0.69, 0.5), (0.71, 0.5)]   # epoch 2 does not improve: both lrs x0.1
    kw = dict(table_optimizer="adam")
    straight = _model(**kw)
    t = _scripted(Trainer(straight, _cfg(tmp_path / "a", epochs=3, table_lr=0.02)), script)
    r = t.fit(data.train, data.valid)
    assert [h["table_lr"] for h in r.history] == pytest.approx([0.02, 0.02, 0.002])
    assert [h["lr"] for h in r.history] == pytest.approx([3e-3, 3e-3, 3e-4])
    assert straight.embedding.optimizer.lr == pytest.approx(0.002)
    assert [type(o).__name__ for o in t.optimizers] == ["Adam"]        # DNN, BN, bias only
    assert not any(p is straight.embedding.weight for g in t.optimizers[0].param_groups for p in g["params"])

    first = _model(**kw)
    _scripted(Trainer(first, _cfg(tmp_path / "b", epochs=2, table_lr=0.02)), script[:2]).fit(data.train, data.valid)
    resumed = _model(seed=99, **kw)
    t2 = _scripted(Trainer(resumed, _cfg(tmp_path / "b", epochs=3, table_lr=0.02, resume=True)), script[2:])
    assert resumed.embedding.optimizer.lr == pytest.approx(0.02)
    r2 = t2.fit(data.train, data.valid)
    assert r2.epochs_run == 3 and resumed.embedding.optimizer.lr == pytest.approx(0.002)
    la, lb = load_checkpoint(tmp_path / "a" / "last.pt"), load_checkpoint(tmp_path / "b" / "last.pt")
    _same_state(la["model"], lb["model"])               # includes the Adam moments and the step counter
    assert int(la["model"]["embedding.optimizer_step"]) == 3 * math.ceil(len(data.train) / 256)
    assert la["table_lr"] == lb["table_lr"] == pytest.approx(0.002)
    _same_state(straight.state_dict(), resumed.state_dict())


def test_monitor_auc_minus_logloss(data):
    """BARS monitor: AUC - logloss. An epoch whose AUC rises but logloss rises more is no improvement."""
    script = [(0.80, 0.40), (0.81, 0.60), (0.805, 0.70), (0.9, 0.3)]
    r_bars = _scripted(Trainer(_model(), _cfg(epochs=4, patience=2)), script).fit(data.train, data.valid)
    assert r_bars.best_epoch == 1 and r_bars.stopped_early and r_bars.epochs_run == 3
    assert r_bars.history[1]["valid_score"] == pytest.approx(0.21)
    r_auc = _scripted(Trainer(_model(), _cfg(epochs=4, patience=2, monitor="auc")), script).fit(data.train, data.valid)
    assert r_auc.best_epoch == 4 and not r_auc.stopped_early and r_auc.history[2]["lr_after"] == pytest.approx(3e-4)
    with pytest.raises(ValueError, match="monitor"):
        TrainConfig(monitor="logloss")


def test_table_optimizers_train_and_differ_in_speed_path(data):
    """Every table optimizer trains the table; sparse_adam gets SparseAdam, fused ones no torch table optimizer."""
    kinds = {}
    for name in ("adam", "rowwise_adagrad", "adagrad", "sgd", "sparse_adam", "dense"):
        model = _model(table_optimizer=name, hidden_units=(8,))
        before = model.embedding.weight.detach().clone()
        trainer = Trainer(model, _cfg(epochs=1, table_lr=0.05))
        kinds[name] = [type(o).__name__ for o in trainer.optimizers]
        trainer.fit(data.train, data.valid)
        assert not torch.equal(before, model.embedding.weight), name
    assert kinds["sparse_adam"] == ["SparseAdam", "Adam"] and kinds["dense"] == ["Adam"] and kinds["adam"] == ["Adam"]
