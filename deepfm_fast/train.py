"""Training loop for the CTR models: Adam, BCE + embedding L2, BARS early stopping, exact resume.

The protocol is the one of the BARS benchmark (FuxiCTR v1.1 ``checkpoint_and_earlystop``): after
every epoch the validation metrics are computed and the monitored score (``monitor``: ``"auc"``,
or ``"auc-logloss"`` = AUC - logloss, FuxiCTR's ``monitor: {AUC: 1, logloss: -1}`` used by the
BARS configs, the default) is compared with the best so far; if it did not improve by
``min_delta`` the learning rate of every optimizer (the fused table optimizer included) is
multiplied by ``lr_decay`` (floor ``min_lr``) and a patience counter grows; training stops when
the counter reaches ``patience``; the best epoch's weights are restored at the end.

Optimizers: what the model's table mode asks for (``model.optimizers(lr, table_lr)``, see
:class:`deepfm_fast.models.Optimizers`): torch Adam on every parameter with a gradient (the DNN,
batch norm, bias; the table too for a ``"dense"`` model), ``SparseAdam`` on the table of a
``"sparse_adam"`` model, and for a model with a fused table optimizer (``table_optimizer="adam"``
etc.) the table is updated inside the backward by that optimizer. The table's learning rate is
``table_lr`` (default ``lr``), decayed with the others.

Checkpoints (``checkpoint_dir``) are written to a temporary file and moved into place with
``os.replace``, so a crash never leaves a half-written file:

* ``last.pt``: everything needed to continue exactly (model, with the fused optimizer's state
  and step count in its buffers; the torch optimizers; learning rates, the fused one included; epoch,
  best metric, patience counter, history, the torch / numpy / python RNG states and the state of
  the generator that shuffles the batches). ``resume=True`` continues from it: training 2 epochs
  straight and training 1, stopping, and resuming for the second give the same weights on CPU.
* ``best.pt``: the best model so far plus ``meta`` (what the CLI needs to rebuild model and data).

Both load with ``torch.load(..., weights_only=True)``.

Example::

    from deepfm_fast.data import make_synthetic
    from deepfm_fast.models import DeepFM
    from deepfm_fast.train import TrainConfig, Trainer, seed_everything

    data = make_synthetic(50_000)
    seed_everything(0)
    model = DeepFM(data.fields, 10, hidden_units=(400, 400, 400), batch_norm=True, dropout=0.2)
    trainer = Trainer(model, TrainConfig(epochs=5, batch_size=4096, seed=0))
    result = trainer.fit(data.train, data.valid)
    print(trainer.evaluate(data.test))          # {'auc': ..., 'logloss': ..., 'rows': ...}
"""

from __future__ import annotations

import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from . import distributed
from ._io import atomic_write
from .data.dataset import EncodedDataset, iterate_batches
from .models import Optimizers

__all__ = ["TrainConfig", "TrainResult", "Trainer", "seed_everything", "evaluate", "predict",
           "load_checkpoint", "atomic_save", "monitor_score", "MONITORS"]

CHECKPOINT_VERSION = 1


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to ``path`` atomically (:func:`deepfm_fast._io.atomic_write`)."""
    with atomic_write(path, "wb") as fh:
        torch.save(obj, fh)


def load_checkpoint(path: Path) -> Dict[str, Any]:
    """Load a checkpoint written by :class:`Trainer` (safe: ``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    return torch.load(path, map_location="cpu", weights_only=True)


def _rng_state(gen: torch.Generator) -> Dict[str, Any]:
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        # numpy / python states as tensors and ints, so weights_only loading accepts them.
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "python": [py_state[0], torch.tensor(py_state[1], dtype=torch.int64), py_state[2]],
        "batches": gen.get_state(),
    }


def _set_rng_state(state: Dict[str, Any], gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(int(x) for x in internal.tolist()), gauss))
    gen.set_state(state["batches"])


@dataclass
class TrainConfig:
    """Options of :class:`Trainer`.

    Attributes:
        epochs: most epochs to train (BARS: 100, early stopping ends far sooner).
        batch_size: training rows per step (BARS: 4096).
        lr: Adam learning rate (BARS: 1e-3).
        table_lr: learning rate of the table's optimizer (fused or SparseAdam); None: ``lr``.
        patience: epochs without improvement of the monitored score before stopping (BARS: 2).
        monitor: ``"auc-logloss"`` (BARS / FuxiCTR: AUC - logloss, higher is better) or ``"auc"``.
        lr_decay: factor applied to the learning rate on each epoch without improvement.
        min_lr: floor of the learning rate.
        min_delta: smallest gain of the monitored score that counts as an improvement.
        seed: seeds python/numpy/torch at the start and the batch-shuffling generator.
        checkpoint_dir: where ``last.pt`` / ``best.pt`` go (None: keep the best weights in memory).
        resume: continue from ``checkpoint_dir/last.pt`` when it exists.
        eval_batch_size: rows per evaluation batch.
        precise_bn_batches: before each validation, recompute the batch-norm running statistics
            as the plain average over this many training batches (in order, no gradient, the
            current weights: "PreciseBN", Wu & Johnson 2021). With few steps per epoch (Frappe's
            57k rows are 13 batches of 4096) the usual momentum-0.1 running averages still hold
            much of their initial values (mean 0, variance 1) when the model is evaluated, and the
            eval-mode DNN is miscalibrated. 0 disables it (plain PyTorch behaviour); models
            without batch norm are unaffected.
        progress: show tqdm bars (loss, rows/s) on stderr.
    """

    epochs: int = 10
    batch_size: int = 4096
    lr: float = 1e-3
    table_lr: Optional[float] = None
    patience: int = 2
    monitor: str = "auc-logloss"
    lr_decay: float = 0.1
    min_lr: float = 1e-6
    min_delta: float = 1e-6
    seed: int = 2021
    checkpoint_dir: Optional[str] = None
    resume: bool = False
    eval_batch_size: int = 16384
    precise_bn_batches: int = 16
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "eval_batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"TrainConfig: {name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"TrainConfig: lr must be > 0, got {self.lr}")
        if self.patience < 1:
            raise ValueError(f"TrainConfig: patience must be >= 1, got {self.patience}")
        if self.precise_bn_batches < 0:
            raise ValueError(f"TrainConfig: precise_bn_batches must be >= 0, got {self.precise_bn_batches}")
        if self.table_lr is not None and self.table_lr <= 0:
            raise ValueError(f"TrainConfig: table_lr must be > 0, got {self.table_lr}")
        if self.monitor not in MONITORS:
            raise ValueError(f"TrainConfig: monitor must be one of {list(MONITORS)}, got {self.monitor!r}")


MONITORS = ("auc-logloss", "auc")


def monitor_score(metrics: Dict[str, float], monitor: str) -> float:
    """The early-stopping score of validation ``metrics`` (higher is better)."""
    if monitor == "auc":
        return metrics["auc"]
    return metrics["auc"] - metrics["logloss"]


@dataclass
class TrainResult:
    """What :meth:`Trainer.fit` returns.

    Attributes:
        best_epoch: 1-based epoch with the best monitored validation score (the last epoch without validation).
        best_valid: validation metrics of that epoch (empty without validation).
        epochs_run: epochs completed, including those before a resume.
        stopped_early: patience ran out before ``epochs``.
        history: one dict per epoch: epoch, loss, lr, table_lr, valid_auc, valid_logloss,
            valid_score, train_seconds, eval_seconds, rows.
        seconds_per_epoch: mean wall time per epoch (training + validation) of this run.
        train_rows_per_second: training rows per second of training time, this run.
    """

    best_epoch: int
    best_valid: Dict[str, float]
    epochs_run: int
    stopped_early: bool
    history: List[Dict[str, float]] = field(default_factory=list)
    seconds_per_epoch: float = float("nan")
    train_rows_per_second: float = float("nan")


@torch.no_grad()
def predict(model: torch.nn.Module, dataset: EncodedDataset, batch_size: int = 16384) -> torch.Tensor:
    """Probabilities ``[R]`` (float64) of every row, in order, in eval mode."""
    was_training = model.training
    model.eval()
    try:
        out = [torch.sigmoid(model(b).double()).cpu() for b in iterate_batches(dataset, batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def evaluate(model: torch.nn.Module, dataset: EncodedDataset, batch_size: int = 16384) -> Dict[str, float]:
    """``{"auc", "logloss", "rows"}`` of ``model`` on ``dataset`` (scikit-learn metrics).

    AUC is NaN when the labels hold one class only.
    """
    from sklearn.metrics import log_loss, roc_auc_score

    if not dataset.has_labels:
        raise ValueError("evaluate: the dataset has no labels (read from a file without a label column)")
    probs = predict(model, dataset, batch_size).numpy()
    labels = dataset.labels.numpy()
    if len(labels) == 0:
        raise ValueError("evaluate: the dataset is empty")
    if len(np.unique(labels)) < 2:
        auc = float("nan")  # AUC is undefined with one class
    else:
        auc = float(roc_auc_score(labels, probs))
    return {"auc": auc, "logloss": float(log_loss(labels, probs, labels=[0, 1])), "rows": int(len(labels))}


class Trainer:
    """Trains a :mod:`deepfm_fast.models` model (anything with ``forward(batch, return_penalty)``).

    Optimizers: those of ``model.optimizers(config.lr, table_lr)`` (:class:`deepfm_fast.models.Optimizers`:
    Adam, with ``SparseAdam`` on a sparse table, or a fused table optimizer); a model without that
    method gets Adam on every parameter with a gradient.

    Data parallel: give it the model wrapped by :func:`deepfm_fast.distributed.wrap` (one process
    per rank, e.g. under ``torchrun``). Every rank then trains on its share of each batch of
    ``config.batch_size`` rows (the global batch: the same optimisation as one process on the same
    rows), the loss is scaled so that DDP's average is the global batch's mean, the training loss
    is averaged over the ranks, rank 0 alone evaluates, writes checkpoints and reports, and every
    rank takes rank 0's early-stopping decisions. A checkpoint holds every rank's RNG state and
    resumes exactly with the same number of ranks.

    Args:
        model: the model (its parameters are trained in place), or its `distributed.wrap`.
        config: a :class:`TrainConfig`.
        meta: JSON-like dict saved in every checkpoint (e.g. model config, data encoder).
    """

    def __init__(self, model: torch.nn.Module, config: Optional[TrainConfig] = None,
                 meta: Optional[Dict[str, Any]] = None):
        self.model = model  # what the training step calls: the DDP wrapper when data parallel
        self.module = model.module if isinstance(model, DistributedDataParallel) else model
        self.rank, self.world_size = distributed.rank(), distributed.world_size()
        if self.world_size > 1 and self.module is model:
            raise ValueError("Trainer: a process group of several ranks is initialised but the model is not "
                             "wrapped; give Trainer deepfm_fast.distributed.wrap(model)")
        self.config = config or TrainConfig()
        self.meta = dict(meta or {})
        table_lr = self.config.table_lr if self.config.table_lr is not None else self.config.lr
        # What trains the model in its table mode (deepfm_fast.models.CTRModel.optimizers); a model
        # without that method is trained by Adam on every parameter with a gradient.
        if hasattr(self.module, "optimizers"):
            self._optimizers = self.module.optimizers(self.config.lr, table_lr)
        else:
            params = [p for p in getattr(self.module, "dense_parameters", self.module.parameters)() if p.requires_grad]
            self._optimizers = Optimizers(dense=torch.optim.Adam(params, lr=self.config.lr) if params else None)
        self.optimizers = self._optimizers.torch_optimizers
        self.generator = torch.Generator()
        self.ckpt_dir = Path(self.config.checkpoint_dir) if self.config.checkpoint_dir else None
        self._best_state: Optional[Dict[str, torch.Tensor]] = None

    @property
    def lr(self) -> float:
        """Current learning rate of the torch Adam (DNN, bias; the table too for a dense model)."""
        return self._optimizers.lr

    @property
    def current_table_lr(self) -> float:
        """Current learning rate of the table's optimizer (fused, SparseAdam, or the dense Adam)."""
        return self._optimizers.table_lr

    # -- checkpoints -----------------------------------------------------------------------
    def _state(self, epoch: int, best: Dict[str, Any], history: List[Dict[str, float]]) -> Dict[str, Any]:
        """The resumable state; collective when data parallel (every rank's RNG state is gathered)."""
        rng = _rng_state(self.generator)
        if self.world_size > 1:
            ranks: List[Any] = [None] * self.world_size
            torch.distributed.all_gather_object(ranks, rng)
            rng = {"ranks": ranks}
        return {
            "version": CHECKPOINT_VERSION,
            "epoch": epoch,
            "world_size": self.world_size,
            "model": self.module.state_dict(),
            "optimizers": [o.state_dict() for o in self.optimizers],
            "lr": self.lr,
            "table_lr": self.current_table_lr,
            "best": best,
            "history": history,
            "rng": rng,
            "config": asdict(self.config),
            "meta": self.meta,
        }

    def _save_best(self, epoch: int, metrics: Dict[str, float]) -> None:
        if self.ckpt_dir is None:
            self._best_state = {k: v.detach().clone() for k, v in self.module.state_dict().items()}
        elif self.rank == 0:
            atomic_save({"version": CHECKPOINT_VERSION, "epoch": epoch, "model": self.module.state_dict(),
                         "valid": metrics, "meta": self.meta}, self.ckpt_dir / "best.pt")

    def _restore_best(self) -> None:
        if any(getattr(m, "table_file", None) is not None for m in self.module.modules() if hasattr(m, "checkpoint")):
            return  # bigtable: a table file holds its last checkpoint only; the best epoch cannot come back
        if self.world_size > 1:
            torch.distributed.barrier()  # rank 0 has written best.pt
        if self.ckpt_dir is not None and (self.ckpt_dir / "best.pt").is_file():
            self.module.load_state_dict(load_checkpoint(self.ckpt_dir / "best.pt")["model"])
        elif self._best_state is not None:
            self.module.load_state_dict(self._best_state)

    # -- the loop --------------------------------------------------------------------------
    def train_step(self, batch, global_rows: Optional[int] = None) -> float:
        """One optimisation step on ``batch``; returns the loss (BCE + penalty) of its rows.

        Data parallel, ``batch`` is this rank's share of a global batch of ``global_rows`` rows: the
        loss is scaled by ``rows * world_size / global_rows``, so that DDP's average over the ranks
        is the global batch's mean even when the shares differ by a row."""
        logits, penalty = self.model(batch, return_penalty=True)
        bce = F.binary_cross_entropy_with_logits(logits, batch.labels.to(logits.device))
        if self.world_size > 1 and global_rows:
            bce_for_grad = bce * (logits.shape[0] * self.world_size / global_rows)
        else:
            bce_for_grad = bce
        loss = bce + penalty
        loss_for_grad = bce_for_grad + penalty
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        loss_for_grad.backward()
        for opt in self.optimizers:
            opt.step()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"training loss is {value}; lower --lr or check the input values")
        return value

    def evaluate(self, dataset: EncodedDataset) -> Dict[str, float]:
        return evaluate(self.module, dataset, self.config.eval_batch_size)

    @torch.no_grad()
    def recompute_bn_stats(self, train: EncodedDataset, batches: Optional[int] = None) -> int:
        """PreciseBN: set every batch norm's running mean / variance to the average over the first
        ``batches`` training batches (default ``config.precise_bn_batches``) under the current
        weights. Returns the number of batches used (0 without batch norm)."""
        n = self.config.precise_bn_batches if batches is None else batches
        model = self.module
        bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        if not bns or n <= 0:
            return 0
        saved = [m.momentum for m in bns]
        was_training = model.training
        model.eval()  # a fused Adam brings every row up to date first (flush)
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches below
        model.train()
        used = 0
        try:
            for batch in iterate_batches(train, self.config.batch_size, shard=self._shard()):
                if used >= n:
                    break
                model(batch)  # no_grad: no fused table step either; synchronised batch norms sync
                used += 1
        finally:
            for m, mom in zip(bns, saved):
                m.momentum = mom
            model.train(was_training)
        return used

    def _shard(self):
        return (self.rank, self.world_size) if self.world_size > 1 else None

    def _all_sum(self, *values: float) -> List[float]:
        """The sums over the ranks (the values themselves in one process)."""
        if self.world_size == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def _from_rank0(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (``obj`` itself in one process)."""
        if self.world_size == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def predict(self, dataset: EncodedDataset) -> torch.Tensor:
        return predict(self.module, dataset, self.config.eval_batch_size)

    def fit(self, train: EncodedDataset, valid: Optional[EncodedDataset] = None) -> TrainResult:
        """Train with early stopping on the monitored ``valid`` score; restore the best weights at the end.

        Without ``valid`` every epoch runs and the last one counts as best.
        """
        from tqdm import tqdm

        cfg = self.config
        if len(train) == 0:
            raise ValueError("fit: the training set is empty")
        for name, ds in (("training", train), ("validation", valid)):
            if ds is not None and not ds.has_labels:
                raise ValueError(f"fit: the {name} set has no labels")
        start_epoch, history = 0, []
        best = {"epoch": 0, "score": -math.inf, "metrics": {}, "stopping_steps": 0}
        last = self.ckpt_dir / "last.pt" if self.ckpt_dir else None
        if self.ckpt_dir is not None:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        if cfg.resume and last is not None and last.is_file():
            state = load_checkpoint(last)
            if state.get("world_size", 1) != self.world_size:
                raise ValueError(f"resume: {last} was written by {state.get('world_size', 1)} process(es); resume it "
                                 f"with as many (this run has {self.world_size}) to continue exactly")
            self.module.load_state_dict(state["model"])
            if len(state["optimizers"]) != len(self.optimizers):
                raise ValueError(f"resume: {last} holds {len(state['optimizers'])} optimizer state(s), this "
                                 f"model needs {len(self.optimizers)}: was it trained with another table optimizer?")
            for opt, s in zip(self.optimizers, state["optimizers"]):
                opt.load_state_dict(s)
            self._optimizers.set_table_lr(float(state["table_lr"]))  # a fused one's is in no state_dict
            start_epoch, best, history = state["epoch"], state["best"], state["history"]
            rng = state["rng"]
            _set_rng_state(rng["ranks"][self.rank] if "ranks" in rng else rng, self.generator)
            if best["stopping_steps"] >= cfg.patience:
                start_epoch = cfg.epochs  # that run had already stopped early
        else:
            seed_everything(cfg.seed + self.rank)  # dropout differs between ranks; the batches do not
            self.generator.manual_seed(cfg.seed)

        n_batches = math.ceil(len(train) / cfg.batch_size)
        # Data parallel: a last global batch with fewer rows than ranks would leave a rank without
        # rows (which the table merge refuses): it is dropped.
        drop_last = self.world_size > 1 and 0 < len(train) % cfg.batch_size < self.world_size
        report = cfg.progress and self.rank == 0
        train_time = eval_time = 0.0
        rows_run = epochs_here = 0
        stopped = best["stopping_steps"] >= cfg.patience
        for epoch in range(start_epoch + 1, cfg.epochs + 1):
            if stopped:
                break
            self.model.train()
            t0 = time.perf_counter()
            total, seen = 0.0, 0
            batches = iterate_batches(train, cfg.batch_size, shuffle=True, generator=self.generator,
                                      drop_last=drop_last, shard=self._shard())
            bar = tqdm(batches, total=n_batches, desc=f"epoch {epoch}", unit="batch", disable=not report,
                       file=sys.stderr, leave=False, mininterval=0.5)
            for step, batch in enumerate(bar):
                b = batch.labels.shape[0]
                total += self.train_step(batch, min(cfg.batch_size, len(train) - step * cfg.batch_size)) * b
                seen += b
                if report:
                    bar.set_postfix(loss=f"{total / seen:.4f}",
                                    rows_s=f"{seen / (time.perf_counter() - t0):,.0f}", refresh=False)
            bar.close()
            total, seen = self._all_sum(total, seen)
            seen = int(seen)
            t1 = time.perf_counter()
            train_time += t1 - t0
            rows_run += seen
            record = {"epoch": epoch, "loss": total / seen, "lr": self.lr, "table_lr": self.current_table_lr,
                      "train_seconds": t1 - t0, "rows": seen}
            self.recompute_bn_stats(train)
            self.module.eval()  # every rank flushes (a fused Adam); rank 0 then evaluates
            if valid is not None and len(valid):
                m = self._from_rank0(self.evaluate(valid) if self.rank == 0 else None)
                score = monitor_score(m, cfg.monitor)
                record.update(valid_auc=m["auc"], valid_logloss=m["logloss"], valid_score=score)
                improved = score >= best["score"] + cfg.min_delta
            else:
                m, improved = {}, True
            t2 = time.perf_counter()
            eval_time += t2 - t1
            record["eval_seconds"] = t2 - t1
            if improved:
                best = {"epoch": epoch, "score": score if m else -math.inf, "metrics": m, "stopping_steps": 0}
                self._save_best(epoch, m)
            else:
                best["stopping_steps"] += 1
                record["lr_after"] = self._optimizers.decay(cfg.lr_decay, cfg.min_lr)
                stopped = best["stopping_steps"] >= cfg.patience
            history.append(record)
            epochs_here += 1
            if report:
                msg = f"epoch {epoch}: loss {record['loss']:.4f}"
                if m:
                    msg += f", valid AUC {m['auc']:.4f}, logloss {m['logloss']:.4f}"
                msg += f", {seen / (t1 - t0):,.0f} rows/s" + ("" if improved else f", lr -> {self.lr:g}")
                tqdm.write(msg, file=sys.stderr)
            if last is not None:
                state = self._state(epoch, best, history)
                if self.rank == 0:
                    atomic_save(state, last)
        self._restore_best()
        return TrainResult(
            best_epoch=int(best["epoch"]),
            best_valid=dict(best["metrics"]),
            epochs_run=len(history),
            stopped_early=bool(stopped and len(history) < cfg.epochs),
            history=history,
            seconds_per_epoch=(train_time + eval_time) / epochs_here if epochs_here else float("nan"),
            train_rows_per_second=rows_run / train_time if train_time > 0 else float("nan"),
        )
