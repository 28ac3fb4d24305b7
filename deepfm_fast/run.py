"""What the commands of ``deepfm-fast`` do, given their options: train, evaluate, predict.

:func:`train` takes a :class:`~deepfm_fast.config.RunConfig` (however it was filled) and runs it:
reads the data (every rank of a ``torchrun`` job), builds the model, trains it with
:class:`~deepfm_fast.train.Trainer`, prints and writes the metrics and the learning curves.
:func:`evaluate_file` and :func:`predict_file` score a file with a checkpoint of such a run.
Problems of use raise :class:`~deepfm_fast.config.RunError` (one line, no traceback on the
command line).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from ._io import atomic_write, write_json
from .config import PROG, RunConfig, RunError

__all__ = ["train", "evaluate_file", "predict_file", "load_train_data", "load_for_inference", "set_threads"]


def set_threads(n: Optional[int]) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


def _check_file(path: Optional[str], what: str) -> None:
    if path is not None and not Path(path).is_file():
        raise RunError(f"{what} file {path} not found")


def _nan_to_none(x):
    return None if isinstance(x, float) and x != x else x


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------
def _hold_out(ds, fraction: float, cfg: RunConfig):
    if cfg.split == "ordered":
        return ds.ordered_split(fraction, by=cfg.split_by)
    return ds.random_split(fraction, seed=cfg.seed)


def load_train_data(cfg: RunConfig):
    """prepare_data + hold-outs; returns (prepared, train, valid, test, format spec)."""
    from .data import prepare_data
    from .data.formats import FORMATS, format_spec, make_format, trained_spec

    if cfg.train is None:
        raise RunError("--train is required")
    for what in ("train", "valid", "test"):
        _check_file(getattr(cfg, what), what)
    if cfg.format is None:
        raise RunError(f"--format is required ({', '.join(FORMATS)})")
    if cfg.format == "csv" and cfg.schema is None:
        raise RunError("--format csv needs --schema (a JSON/YAML file, or a built-in schema name)")
    spec = format_spec(cfg.format, schema=cfg.schema, min_count=cfg.min_count, hash_buckets=cfg.hash_buckets)
    fmt = make_format(spec)
    data = prepare_data(fmt, cfg.train, cfg.valid, cfg.test, cache_dir=cfg.cache_dir,
                        skip_bad_lines=cfg.skip_bad_lines, progress=cfg.progress)
    spec = trained_spec(spec, fmt)
    train, valid, test = data.train, data.valid, data.test
    if cfg.max_rows is not None and len(train) > cfg.max_rows:
        import torch

        train = train.subset(torch.arange(cfg.max_rows))
    if test is None and cfg.test_fraction:
        train, test = _hold_out(train, cfg.test_fraction, cfg)
    if valid is None and cfg.valid_fraction:
        train, valid = _hold_out(train, cfg.valid_fraction, cfg)
    return data, train, valid, test, spec


def _load_train_data_on_every_rank(cfg: RunConfig, rank: int, world_size: int):
    """`load_train_data` on each rank of a torchrun job. With --cache-dir rank 0 reads the files and
    fills the cache first, then the others read its cache; without, every rank parses them at once.
    After each turn the ranks share their errors: a rank that failed raises its own, the others a
    RunError naming it, so that all stop at once instead of waiting for a rank that has left."""
    import dataclasses

    if world_size == 1:
        return load_train_data(cfg)
    import torch.distributed

    turns = [rank == 0, rank > 0] if cfg.cache_dir else [True]
    loaded = None
    for my_turn in turns:
        error = None
        if my_turn:
            try:
                loaded = load_train_data(cfg if rank == 0 else dataclasses.replace(cfg, progress=False))
            except Exception as exc:  # raised below, once the other ranks know
                error = exc
        errors: List[Optional[str]] = [None] * world_size
        torch.distributed.all_gather_object(errors, None if error is None else str(error))
        if error is not None:
            raise error
        failed = next((r for r, message in enumerate(errors) if message is not None), None)
        if failed is not None:
            raise RunError(f"rank {failed} could not load the data: {errors[failed]}")
    return loaded


# ----------------------------------------------------------------------------------------------
# train
# ----------------------------------------------------------------------------------------------
def _table_mode(cfg: RunConfig):
    """The run's TableMode: --table-optimizer, or sparse_adam for the deprecated --sparse (with a warning)."""
    from .models import TableMode

    if not cfg.sparse:
        return TableMode.parse(cfg.table_optimizer, "--table-optimizer")
    print(f"{PROG} train: warning: --sparse is deprecated and will be removed; write --table-optimizer "
          "sparse_adam (in a config file: table_optimizer: sparse_adam)", file=sys.stderr)
    return TableMode.parse(TableMode.SPARSE)


def curves_path(cfg: RunConfig) -> Optional[Path]:
    """--curves-out, else the --metrics-out file with the suffix .png, else None."""
    if cfg.curves_out:
        return Path(cfg.curves_out)
    if cfg.metrics_out:
        metrics = Path(cfg.metrics_out)
        return metrics.with_suffix(".png" if metrics.suffix != ".png" else ".curves.png")
    return None


def _write_curves(path: Path, result, title: str) -> None:
    from .plots import write_learning_curves

    try:
        write_learning_curves(result.history, path, best_epoch=result.best_epoch, title=title)
    except ImportError as exc:  # matplotlib is optional; the run itself succeeded
        print(f"{PROG} train: no learning-curve plot: {exc}", file=sys.stderr)
        return
    print(f"learning curves: {path}", file=sys.stderr)


def train(cfg: RunConfig) -> int:
    """Runs ``cfg``; under ``torchrun --nproc_per_node=N`` data parallel: every rank builds the same
    model and reads the same data, each trains on its share of every global batch of
    ``cfg.batch_size`` rows, and rank 0 alone evaluates, checkpoints, prints and writes the metrics
    (:class:`deepfm_fast.train.Trainer`). Returns the exit status."""
    from . import distributed

    rank, world_size, device = distributed.init_from_environment(cfg.device, cfg.dist_timeout)
    try:
        return _train(cfg, rank, world_size, device)
    finally:
        if world_size > 1:
            import torch.distributed

            torch.distributed.destroy_process_group()


def _train(cfg: RunConfig, rank: int, world_size: int, device) -> int:
    from . import backend, distributed
    from .models import build_model
    from .train import TrainConfig, Trainer, evaluate, seed_everything

    def say(*what, **kw):
        if rank == 0:
            print(*what, **kw)

    set_threads(cfg.threads)
    if cfg.resume and not cfg.checkpoint_dir:
        raise RunError("--resume needs --checkpoint-dir")
    mode = _table_mode(cfg)
    data, train, valid, test, spec = _load_train_data_on_every_rank(cfg, rank, world_size)
    for split, n in data.bad_lines.items():
        if n:
            say(f"skipped {n} bad line(s) in {split}", file=sys.stderr)
    # The table's learning rate reaches the model through the trainer alone (model.optimizers).
    table_lr = cfg.table_lr if cfg.table_lr is not None else cfg.lr
    hparams = {"embedding_dim": cfg.embedding_dim, "hidden_units": cfg.hidden_units, "activation": cfg.activation,
               "dropout": cfg.dropout, "batch_norm": cfg.batch_norm, "l2_embedding": cfg.l2_embedding,
               "l2_scope": cfg.l2_scope, "init_std": cfg.init_std, "dnn_init": cfg.dnn_init}
    if cfg.table_file:
        hparams["table_file"] = str(cfg.table_file)
    seed_everything(cfg.seed)
    model = build_model(cfg.model, data.fields, table_optimizer=mode, **hparams).to(device)
    config = TrainConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, table_lr=table_lr,
                         patience=cfg.patience, monitor=cfg.monitor, seed=cfg.seed,
                         precise_bn_batches=cfg.precise_bn_batches, checkpoint_dir=cfg.checkpoint_dir,
                         resume=cfg.resume, progress=cfg.progress)
    parallel = f", {world_size} ranks x {cfg.batch_size // world_size} rows" if world_size > 1 else ""
    say(f"{cfg.model}: {len(data.fields)} fields, {sum(f.vocab_size for f in data.fields):,} table rows, "
        f"{sum(p.numel() for p in model.parameters()):,} parameters; train {len(train):,} rows, "
        f"valid {len(valid) if valid is not None else 0:,}, test {len(test) if test is not None else 0:,}; "
        f"backend {backend()}, table optimizer {mode.name} (lr {table_lr:g}), monitor {cfg.monitor}{parallel}",
        file=sys.stderr)
    trained = model
    if world_size > 1:
        ids = [device.index] if device.type == "cuda" else None
        trained = distributed.wrap(model, sync_batch_norm=cfg.sync_batch_norm, device_ids=ids)
    trainer = Trainer(trained, config, meta=None)
    # The checkpoint's model config, with the table lr the trainer gave the model.
    trainer.meta.update(model=model.config(), format=spec, encoder=data.encoder.to_dict())
    model = trainer.module  # synchronised batch norms, if asked, live in it
    result = trainer.fit(train, valid)
    if rank > 0:
        return 0
    metrics: Dict[str, Any] = {
        "model": cfg.model, "backend": backend(),
        "hparams": {**hparams, "table_optimizer": mode.name, "table_lr": table_lr}, "seed": cfg.seed,
        "lr": cfg.lr, "batch_size": cfg.batch_size, "monitor": cfg.monitor,
        "precise_bn_batches": cfg.precise_bn_batches, "world_size": world_size,
        "sync_batch_norm": bool(cfg.sync_batch_norm) and world_size > 1,
        "best_epoch": result.best_epoch, "epochs_run": result.epochs_run, "stopped_early": result.stopped_early,
        "seconds_per_epoch": result.seconds_per_epoch, "train_rows_per_second": result.train_rows_per_second,
        "valid_auc": result.best_valid.get("auc"), "valid_logloss": result.best_valid.get("logloss"),
        "rows": {"train": len(train), "valid": len(valid) if valid is not None else 0,
                 "test": len(test) if test is not None else 0},
        "bad_lines": data.bad_lines, "history": result.history,
        "test_auc": None, "test_logloss": None,
    }
    if test is not None and len(test):
        m = evaluate(model, test, config.eval_batch_size)
        metrics["test_auc"], metrics["test_logloss"] = _nan_to_none(m["auc"]), m["logloss"]
        print(f"test AUC {m['auc']:.4f}  logloss {m['logloss']:.4f}  (best epoch {result.best_epoch}, "
              f"{result.seconds_per_epoch:.1f} s/epoch, {result.train_rows_per_second:,.0f} rows/s)")
    else:
        print(f"no test set; best epoch {result.best_epoch}, valid {result.best_valid}")
    if cfg.metrics_out:
        write_json(cfg.metrics_out, metrics)
    curves = curves_path(cfg)
    if curves is not None:
        _write_curves(curves, result, f"{cfg.model} on {Path(cfg.train).name}")
    return 0


# ----------------------------------------------------------------------------------------------
# evaluate, predict
# ----------------------------------------------------------------------------------------------
def load_for_inference(checkpoint: str, table_file: Optional[str] = None):
    """(model in eval mode, format, encoder) of a checkpoint of ``deepfm-fast train`` (best.pt or its
    directory); ``table_file``: where the table file of a ``--table-file`` run is now."""
    from .data.encode import FeatureEncoder
    from .data.formats import make_format
    from .models import build_model
    from .train import load_checkpoint

    path = Path(checkpoint)
    if path.is_dir():
        path = path / "best.pt"
    if not path.is_file():
        raise RunError(f"checkpoint {path} not found (train with --checkpoint-dir first)")
    ckpt = load_checkpoint(path)
    meta = ckpt.get("meta") or {}
    if "model" not in meta or "encoder" not in meta:
        raise RunError(f"checkpoint {path} was not written by '{PROG} train' (no model/encoder metadata)")
    cfg = dict(meta["model"])
    if table_file:
        cfg["table_file"] = table_file
    model = build_model(cfg.pop("name"), cfg.pop("fields"), **cfg)
    model.load_state_dict(ckpt["model"])
    model.eval()
    return model, make_format(meta["format"]), FeatureEncoder.from_dict(meta["encoder"])


def _encode_input(fmt, encoder, path: str, skip: bool):
    from .data import encode_file

    _check_file(path, "input")
    return encode_file(fmt, encoder, path, skip_bad_lines=skip)


def evaluate_file(checkpoint: str, path: str, *, batch_size: int = 16384, skip_bad_lines: bool = False,
                  metrics_out: Optional[str] = None, table_file: Optional[str] = None) -> Dict[str, Any]:
    """AUC and logloss of a checkpoint on a labelled file; printed, and written to ``metrics_out``."""
    from .train import evaluate

    model, fmt, encoder = load_for_inference(checkpoint, table_file)
    _check_file(path, "input")
    why = fmt.no_label_reason(path)
    if why is not None:
        raise RunError(f"{path}: {why}; evaluate needs labels ('{PROG} predict' scores such a file)")
    m = evaluate(model, _encode_input(fmt, encoder, path, skip_bad_lines), batch_size)
    print(f"AUC {m['auc']:.6f}  logloss {m['logloss']:.6f}  rows {m['rows']}")
    out = {"auc": _nan_to_none(m["auc"]), "logloss": m["logloss"], "rows": m["rows"], "input": str(path),
           "checkpoint": str(checkpoint)}
    if metrics_out:
        write_json(metrics_out, out)
    return out


def predict_file(checkpoint: str, path: str, output: str, *, batch_size: int = 16384,
                 skip_bad_lines: bool = False, table_file: Optional[str] = None) -> int:
    """Writes ``row,probability[,label]`` of every row of ``path`` to the CSV ``output``; returns the rows."""
    from .train import predict

    model, fmt, encoder = load_for_inference(checkpoint, table_file)
    ds = _encode_input(fmt, encoder, path, skip_bad_lines)
    probs = predict(model, ds, batch_size).numpy()
    labelled = ds.has_labels
    with atomic_write(output, newline="") as fh:
        if labelled:
            fh.write("row,probability,label\n")
            fh.writelines(f"{i},{p:.8f},{int(y)}\n" for i, (p, y) in enumerate(zip(probs, ds.labels.numpy())))
        else:
            fh.write("row,probability\n")
            fh.writelines(f"{i},{p:.8f}\n" for i, p in enumerate(probs))
    print(f"wrote {len(probs)} probabilities to {output}" + ("" if labelled else " (the input has no labels)"))
    return len(probs)
