"""``deepfm-fast demo``: train a DeepFM on data with a known best AUC, then time its step fused vs plain.

Two questions in one short run, with nothing to download (its output and time on the project's
machine: README, Numbers):

1. Does it learn? :func:`~deepfm_fast.data.make_synthetic` draws labels from a planted DeepFM, so
   the best achievable test AUC and logloss are known; the trained model should come within
   ~0.02 AUC of them.
2. Is it faster? The trained model's training step (forward + backward + update, the trainer's
   own step) with the fused ops and a fused table optimizer, against the same weights on the
   reference ops with dense table gradients and torch Adam: what plain PyTorch users write. The
   two alternate step by step on the same batches (:mod:`deepfm_fast.timing`); medians.

Example::

    from deepfm_fast.demo import run_demo

    numbers = run_demo(rows=200_000, epochs=2)   # prints as it goes; returns the numbers
    print(numbers["speedup"])
"""

from __future__ import annotations

import copy
import itertools
import time
from typing import Any, Dict, Sequence

__all__ = ["run_demo", "DEMO_DEFAULTS"]

# Sized to end within ~0.02 AUC of the planted truth on the default make_synthetic data (1M rows,
# 3,851 Zipf ids, planted rank-4 DeepFM) in a short run.
DEMO_DEFAULTS: Dict[str, Any] = {"rows": 1_000_000, "epochs": 4, "batch_size": 4096, "lr": 3e-3, "table_lr": 2e-2,
                                 "init_std": 1e-2, "embedding_dim": 10, "hidden_units": [256, 256], "dropout": 0.0}


def run_demo(rows: int = DEMO_DEFAULTS["rows"], epochs: int = DEMO_DEFAULTS["epochs"],
             batch_size: int = DEMO_DEFAULTS["batch_size"], lr: float = DEMO_DEFAULTS["lr"],
             table_lr: float = DEMO_DEFAULTS["table_lr"], init_std: float = DEMO_DEFAULTS["init_std"],
             embedding_dim: int = DEMO_DEFAULTS["embedding_dim"],
             hidden_units: Sequence[int] = tuple(DEMO_DEFAULTS["hidden_units"]),
             dropout: float = DEMO_DEFAULTS["dropout"], table_optimizer: str = "adam", seed: int = 0,
             timing_steps: int = 10, timing_batch_size: int = 4096, progress: bool = True) -> Dict[str, Any]:
    """Train, report and time (printing to stdout); returns the numbers as a JSON-able dict.

    Args:
        rows: synthetic rows (train + valid + test).
        epochs, batch_size, lr: training of the DNN and bias (Adam); early stopping, patience 2.
        table_lr, table_optimizer: the fused optimizer of the table and its learning rate.
        init_std, embedding_dim, hidden_units, dropout: the DeepFM (batch norm on).
        seed: data, weights and batch order.
        timing_steps, timing_batch_size: timed steps per model, and their batch.
        progress: tqdm bars while training.
    """
    import torch

    from . import backend
    from .data import iterate_batches, make_synthetic
    from .models import DeepFM
    from .timing import alternating_medians
    from .train import TrainConfig, Trainer, seed_everything

    t_start = time.perf_counter()
    print(f"deepfm_fast demo: backend {backend()}, {torch.get_num_threads()} CPU thread(s)")
    data = make_synthetic(rows, seed=seed)
    print(f"synthetic data: {len(data.train):,} train / {len(data.valid):,} valid / {len(data.test):,} test rows, "
          f"{len(data.fields)} fields ({sum(f.vocab_size for f in data.fields):,} ids, Zipf), "
          f"positive rate {data.positive_rate:.3f}; labels drawn from a planted DeepFM")
    hidden = tuple(hidden_units)
    hp = dict(embedding_dim=embedding_dim, hidden_units=hidden, batch_norm=True, dropout=dropout, l2_embedding=0.0)
    seed_everything(seed)
    model = DeepFM(data.fields, **hp, init_std=init_std, table_optimizer=table_optimizer)  # table_lr: the trainer's
    trainer = Trainer(model, TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, table_lr=table_lr,
                                         seed=seed, patience=2, progress=progress))
    result = trainer.fit(data.train, data.valid)
    test = trainer.evaluate(data.test)
    dnn = "x".join(map(str, hidden)) if len(set(hidden)) > 1 else f"{hidden[0]}x{len(hidden)}"
    print(f"DeepFM (emb {embedding_dim}, DNN {dnn}, batch norm; DNN: Adam lr {lr:g}; table: fused "
          f"{table_optimizer} lr {table_lr:g}), {result.epochs_run} epoch(s), best epoch {result.best_epoch}, "
          f"{result.seconds_per_epoch:.1f} s/epoch, {result.train_rows_per_second:,.0f} train rows/s")
    print(f"  test AUC     {test['auc']:.4f}   (best achievable {data.best_auc:.4f}, "
          f"gap {data.best_auc - test['auc']:.4f})")
    print(f"  test logloss {test['logloss']:.4f}   (best achievable {data.best_logloss:.4f})")

    # Step time: the same weights with the fused op + fused table optimizer, and on the reference
    # ops with dense table gradients + torch Adam on everything; each runs the trainer's step with
    # the trainer's optimizers (Adam on whatever has a gradient), in turn on the same batches.
    fused = copy.deepcopy(model).train()
    ref = DeepFM(data.fields, **hp, use_reference=True, table_optimizer="dense").train()
    ref.load_state_dict(fused.state_dict(), strict=False)  # strict=False: no fused-optimizer buffers
    step_cfg = TrainConfig(lr=lr, table_lr=table_lr, progress=False)  # the lrs do not change the step time
    gen = torch.Generator().manual_seed(seed)
    batches = [b for _, b in zip(range(4), iterate_batches(data.train, timing_batch_size, shuffle=True,
                                                            generator=gen))]

    def stepper(m):
        step_trainer, cycle = Trainer(m, step_cfg), itertools.cycle(batches)
        return lambda: step_trainer.train_step(next(cycle))

    medians = alternating_medians({"fused": stepper(fused), "reference": stepper(ref)}, rounds=timing_steps,
                                  warmup=2)
    mf, mr = medians["fused"] * 1e3, medians["reference"] * 1e3
    print(f"training step, batch {timing_batch_size} (forward + backward + update), median of "
          f"{timing_steps} alternating steps, same model and weights:")
    print(f"  fused ops ({backend()}), table: fused {table_optimizer} in the backward, "
          f"DNN: torch Adam: {mf:8.1f} ms")
    print(f"  reference ops, table: dense gradient + torch Adam (plain PyTorch):    {mr:8.1f} ms")
    print(f"  speed-up: {mr / mf:.2f}x  (this table has {sum(f.vocab_size for f in data.fields):,} rows, so the "
          f"DNN dominates both; the gap grows with the table: benchmarks/results)")
    big = big_table_step()
    total = time.perf_counter() - t_start
    print(f"total {total:.0f} s")
    return {
        "test_auc": test["auc"], "test_logloss": test["logloss"], "best_auc": data.best_auc,
        "best_logloss": data.best_logloss, "best_epoch": result.best_epoch, "epochs_run": result.epochs_run,
        "seconds_per_epoch": result.seconds_per_epoch, "train_rows_per_second": result.train_rows_per_second,
        "step_ms_fused": mf, "step_ms_reference": mr, "speedup": mr / mf, "backend": backend(),
        "table_optimizer_fused": table_optimizer, "table_optimizer_reference": "dense gradient + Adam",
        "timing_batch_size": timing_batch_size, "total_seconds": total, "big_table_step": big,
        "rows": {"train": len(data.train), "valid": len(data.valid), "test": len(data.test)},
    }


def big_table_step(total_rows: int = 2_600_000, batch: int = 4096, steps: int = 10, seed: int = 0) -> Dict[str, Any]:
    """The headline where the table matters: an FM-only training step on ``total_rows`` rows (26
    single-id fields, K=16, uniform ids), fused SGD in the backward against ``nn.Embedding(sparse=True)``
    + ``torch.optim.SGD`` (what plain PyTorch users write), alternating; about 10-20 s. Returns ms."""
    import torch
    import torch.nn.functional as F

    from . import optim
    from .embedding import EmbeddingFM
    from .timing import alternating_medians

    fields, dim = 26, 16
    rows = total_rows // fields
    fused = EmbeddingFM([rows] * fields, dim, optimizer=optim.SGD(0.01))
    v = torch.nn.Embedding(rows * fields, dim, sparse=True)
    w = torch.nn.Embedding(rows * fields, 1, sparse=True)
    with torch.no_grad():
        v.weight.copy_(fused.weight)
        w.weight.copy_(fused.linear_weight.view(-1, 1))
    plain_opt = torch.optim.SGD([v.weight, w.weight], lr=0.01)
    offsets = torch.arange(fields) * rows
    gen = torch.Generator().manual_seed(seed)
    batches = [(torch.randint(0, rows, (batch, fields), generator=gen), torch.randint(0, 2, (batch,), generator=gen)
                .float()) for _ in range(4)]
    cycles = {name: itertools.cycle(batches) for name in ("fused", "plain")}

    def fused_step():
        ids, labels = next(cycles["fused"])
        F.binary_cross_entropy_with_logits(fused(ids), labels).backward()

    def plain_step():
        ids, labels = next(cycles["plain"])
        e = v(ids + offsets)
        logit = w(ids + offsets).sum((1, 2)) + 0.5 * (e.sum(1).pow(2) - e.pow(2).sum(1)).sum(1)
        F.binary_cross_entropy_with_logits(logit, labels).backward()
        plain_opt.step()
        plain_opt.zero_grad(set_to_none=True)

    medians = alternating_medians({"fused": fused_step, "plain": plain_step}, rounds=steps, warmup=2)
    mf, mp = medians["fused"] * 1e3, medians["plain"] * 1e3
    print(f"FM-only training step on a {rows * fields:,}-row table (K={dim}, batch {batch}), median of {steps} "
          f"alternating steps:")
    print(f"  fused op + fused SGD in the backward:              {mf:8.1f} ms")
    print(f"  nn.Embedding(sparse=True) + torch.optim.SGD:       {mp:8.1f} ms")
    print(f"  speed-up: {mp / mf:.2f}x")
    return {"rows": rows * fields, "step_ms_fused": mf, "step_ms_plain": mp, "speedup": mp / mf}
