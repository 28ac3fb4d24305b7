"""Learning curves of a training run as a PNG: what ``deepfm-fast train`` writes beside its metrics.

Three panels over the epochs of :attr:`deepfm_fast.train.TrainResult.history`: the training loss;
the validation AUC (left axis) and logloss (right axis); the learning rates of the DNN and of the
table (log scale). A dotted line marks the best epoch, whose weights the run kept.

matplotlib is optional (``pip install 'deepfm_fast[plot]'``). It is used through its Agg canvas
and never through ``pyplot``, so this works without a display and leaves the caller's backend
alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Union

from ._io import atomic_write

__all__ = ["write_learning_curves", "MISSING_MATPLOTLIB"]

MISSING_MATPLOTLIB = "matplotlib is not installed (pip install 'deepfm_fast[plot]')"


def _series(history: Sequence[Dict[str, Any]], key: str):
    return [float("nan") if h.get(key) is None else float(h[key]) for h in history]


def write_learning_curves(history: Sequence[Dict[str, Any]], path: Union[str, Path],
                          best_epoch: Optional[int] = None, title: Optional[str] = None) -> Path:
    """Plot ``history`` (one dict per epoch) to the PNG ``path``, written atomically.

    Args:
        history: records with ``epoch``, ``loss``, ``lr`` and, where present, ``table_lr``,
            ``valid_auc``, ``valid_logloss`` (the keys of ``TrainResult.history``).
        path: the PNG to write; its directory is created.
        best_epoch: epoch to mark (None: no mark).
        title: figure title.

    Returns:
        ``path``.

    Raises:
        ImportError: matplotlib is missing (the message says how to install it).
    """
    try:
        import matplotlib  # noqa: F401  (fails first and clearly when matplotlib is missing)
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(MISSING_MATPLOTLIB) from None

    epochs = [int(h["epoch"]) for h in history]
    fig = Figure(figsize=(13, 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    loss_ax, valid_ax, lr_ax = fig.subplots(1, 3)

    loss_ax.plot(epochs, _series(history, "loss"), "o-", color="C0")
    loss_ax.set(title="training loss (epoch mean)", xlabel="epoch", ylabel="loss")

    auc, logloss = _series(history, "valid_auc"), _series(history, "valid_logloss")
    valid_ax.set(title="validation", xlabel="epoch")
    if any(v == v for v in auc + logloss):  # not all NaN: there was a validation set
        valid_ax.plot(epochs, auc, "o-", color="C1", label="AUC")
        valid_ax.set_ylabel("AUC", color="C1")
        ll_ax = valid_ax.twinx()
        ll_ax.plot(epochs, logloss, "s--", color="C2", label="logloss")
        ll_ax.set_ylabel("logloss", color="C2")
    else:
        valid_ax.text(0.5, 0.5, "no validation set", ha="center", va="center", transform=valid_ax.transAxes)

    lr_ax.plot(epochs, _series(history, "lr"), "o-", color="C3", label="DNN (Adam)")
    if any("table_lr" in h for h in history):
        lr_ax.plot(epochs, _series(history, "table_lr"), "s--", color="C4", label="table")
    lr_ax.set(title="learning rate", xlabel="epoch", ylabel="lr", yscale="log")

    for ax in (loss_ax, valid_ax, lr_ax):
        ax.xaxis.get_major_locator().set_params(integer=True)
        if best_epoch:
            ax.axvline(best_epoch, color="grey", linestyle=":", linewidth=1.5, label=f"best epoch {best_epoch}")
    for ax in (loss_ax, lr_ax):
        ax.legend(loc="best", fontsize="small")
    if title:
        fig.suptitle(title)
    with atomic_write(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=100)
    return Path(path)
