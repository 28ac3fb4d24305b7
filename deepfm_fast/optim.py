"""Fused sparse optimizers: the embedding-table update applied inside the backward pass.

With ``EmbeddingFM(..., optimizer=deepfm_fast.optim.Adam(lr=1e-3))`` the backward of the fused op
computes the coalesced gradient of the rows the batch touched and updates exactly those rows of
the table ``V`` and the first-order weights ``w`` in place (FBGEMM's TBE does the same). There is
no dense ``[N, K]`` gradient and no ``O(N)`` work per step, which is what makes 10-million-row
tables trainable on a CPU. The bias and every other parameter (the DNN) stay with any ordinary
``torch.optim`` optimizer.

Semantics, per touched row ``r`` with summed gradient ``g_r`` (duplicate ids are coalesced first):

- ``Adam(lr=1e-3, betas=(0.9, 0.999), eps=1e-8)``: ``torch.optim.Adam`` on the dense gradient,
  at sparse cost. Dense Adam moves every row at every step: a row no batch touched still moves by
  its momentum, and its second moment decays so that its next step is larger. This optimizer
  applies those missed steps in closed form when the row is next touched (the moments decay
  exactly; the movement is a 2-node Gauss rule, see ``csrc/fused_row_update.h``), and catches up a
  ``1 / catch_up_window`` slice of the rows every step so no row falls further behind. Before
  evaluation, export or a checkpoint every row is brought up to date (`EmbeddingFM.flush`; done
  automatically by ``eval()`` and ``state_dict()``). Rows are also caught up before a forward
  reads them, so the gradients are those of dense Adam's parameters. Tested against
  ``torch.optim.Adam`` in float64 over 1,050 steps with gaps of 1 to 1,000 steps and a learning-rate
  change: equal to 1e-12 of the rows' movement (float64 round-off) where gradients are well above
  ``eps``; where they are so small that ``sqrt(v) ~ eps``, the closed form is an approximation,
  within 1e-4 of the movement (measured 5e-6). The best model quality; the default of
  ``deepfm-fast train``.
- ``LazyAdam(lr=1e-3, betas, eps)``: Adam moments of the touched rows only, with bias correction
  from a step count shared by the table; equals ``torch.optim.SparseAdam``. Untouched rows stay
  frozen, which trains measurably worse CTR models than ``Adam`` (``benchmarks/results/quality.md``).
- ``SGD(lr)``: ``V_r -= lr * g_r``; equals ``torch.optim.SGD`` on the sparse gradient.
- ``RowWiseAdagrad(lr, eps=1e-8)``: one accumulator per row, ``G_r += mean_k(g_rk^2)``,
  ``V_r -= lr * g_r / (sqrt(G_r) + eps)`` (FBGEMM's ``EXACT_ROWWISE_ADAGRAD``).
- ``RowWiseAdam(lr=1e-3, betas, eps)``: FBGEMM's ``PARTIAL_ROWWISE_ADAM``: a first moment per
  element, ONE second moment per row, ``m = beta1 m + (1 - beta1) g``,
  ``v_r = beta2 v_r + (1 - beta2) mean_k(g_rk^2)``,
  ``V_r -= lr / (1 - beta1^t) * m / (sqrt(v_r / (1 - beta2^t)) + eps)``, on the touched rows only
  (like ``LazyAdam``), with the table's step count ``t``. Its state is about half of Adam's.
- ``Adagrad(lr, eps=1e-10)``: per element, ``G += g^2``, ``V -= lr * g / (sqrt(G) + eps)``; equals
  ``torch.optim.Adagrad`` on the sparse gradient.

``weight_decay`` (default 0) adds ``weight_decay * V_r`` to ``g_r`` of the TOUCHED rows only: the
gradient of an L2 penalty on the rows a batch uses (FBGEMM's row-wise Adam decays the weight
after the step instead, AdamW-style; equal at ``weight_decay=0``). (For ``Adam`` the untouched rows then have
zero gradient, which is what makes their catch-up exact.)

Optimizer state is float32 (float64 for a float64 table), lives in the module's buffers, is saved
in ``state_dict()``, and a reloaded module continues exactly. Every backward is one optimizer step
of the tables: accumulating gradients over several backward calls is not possible for them.

Each optimizer is one class here (its op code, op arguments and state layout), one rule in
``csrc/fused_row_update.h`` (the CPU and CUDA kernels dispatch through it), and its reference rule
in `deepfm_fast.reference`.
"""

import math
from typing import Dict, List, NamedTuple, Tuple

import torch
from torch import Tensor

__all__ = ["FusedOptimizer", "StateSpec", "Adam", "LazyAdam", "RowWiseAdam", "SGD", "RowWiseAdagrad", "Adagrad",
           "by_name", "NAMES"]


class StateSpec(NamedTuple):
    """One optimizer state of a table: what it holds and whether it has one value per row
    (``[N]``) or one per element (shaped like the table)."""

    name: str
    per_row: bool = False


class FusedOptimizer:
    """Base of the fused optimizers: the op code, the op arguments and the state layout of one
    optimizer; the update is `ops.fused_row_update` (rule ``code`` of ``csrc/fused_row_update.h``)."""

    code = -1  # the `optimizer` argument of ops.fused_row_update (kCode of its rule in csrc/fused_row_update.h)
    STATES: Tuple[StateSpec, ...] = ()  # per table (the embedding table, then the first-order weights)
    ROW_STATE: Tuple[str, ...] = ()  # state shared by the tables' rows (new_row_state's names)
    RECORD_ROW_STATE: Tuple[str, ...] = ()  # those of ROW_STATE with one value per row (packed in the records)
    catches_up = False  # moves untouched rows when next read (Adam): see flush and ops.adam_rows

    def __init__(self, lr: float, *, eps: float = 0.0, betas: Tuple[float, float] = (0.0, 0.0),
                 weight_decay: float = 0.0):
        name = type(self).__name__
        if not (math.isfinite(lr) and lr >= 0):
            raise ValueError(f"{name}: lr must be a finite number >= 0, got {lr}")
        if not eps >= 0:
            raise ValueError(f"{name}: eps must be >= 0, got {eps}")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"{name}: betas must be two numbers in [0, 1), got {betas}")
        if not weight_decay >= 0:
            raise ValueError(f"{name}: weight_decay must be >= 0, got {weight_decay}")
        self.lr, self.eps, self.betas, self.weight_decay = float(lr), float(eps), tuple(betas), float(weight_decay)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(lr={self.lr}, eps={self.eps}, betas={self.betas}, "
                f"weight_decay={self.weight_decay})")

    def op_args(self) -> Dict[str, float]:
        """The scalar arguments of `ops.fused_row_update` and `ops.embedding_fm_step` (by keyword)."""
        return {"optimizer": self.code, "lr": self.lr, "eps": self.eps, "beta1": self.betas[0],
                "beta2": self.betas[1], "weight_decay": self.weight_decay}

    @property
    def num_states(self) -> int:
        """State tensors per table."""
        return len(self.STATES)

    @staticmethod
    def state_dtype(table_dtype: torch.dtype) -> torch.dtype:
        """The state's dtype for a table of ``table_dtype``: float32, or float64 for a float64 table."""
        return torch.float64 if table_dtype == torch.float64 else torch.float32

    def state_names(self, table: str) -> List[str]:
        """The buffer names (and ``state_dict`` keys) of the states of table ``table`` (``"weight"`` or
        ``"linear"``), in the order of `ops.fused_row_update`."""
        return [f"{table}_optimizer_state{i}" for i in range(self.num_states)]

    def new_state(self, table: Tensor) -> List[Tensor]:
        """Zero state tensors for `table` [N] or [N, D], in `state_dtype`."""
        dtype = self.state_dtype(table.dtype)
        return [torch.zeros(table.shape[:1] if spec.per_row else table.shape, dtype=dtype, device=table.device)
                for spec in self.STATES]

    def new_row_state(self, num_rows: int, device, step: int = 0) -> Dict[str, Tensor]:
        """State shared by the tables of one set of rows (none, but for `Adam`), every row up to date at `step`."""
        return {}


class SGD(FusedOptimizer):
    """``V_r -= lr * g_r`` on the touched rows (``torch.optim.SGD`` on the sparse gradient)."""

    code = 0

    def __init__(self, lr: float, weight_decay: float = 0.0):
        super().__init__(lr, weight_decay=weight_decay)


class RowWiseAdagrad(FusedOptimizer):
    """One accumulator per row: ``G_r += mean_k(g_rk^2)``, ``V_r -= lr * g_r / (sqrt(G_r) + eps)``."""

    code = 1
    STATES = (StateSpec("sum", per_row=True),)

    def __init__(self, lr: float, eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(lr, eps=eps, weight_decay=weight_decay)


class Adagrad(FusedOptimizer):
    """Per element: ``G += g^2``, ``V -= lr * g / (sqrt(G) + eps)`` (``torch.optim.Adagrad``)."""

    code = 2
    STATES = (StateSpec("sum"),)

    def __init__(self, lr: float, eps: float = 1e-10, weight_decay: float = 0.0):
        super().__init__(lr, eps=eps, weight_decay=weight_decay)


class LazyAdam(FusedOptimizer):
    """Adam moments of the touched rows only, as ``torch.optim.SparseAdam`` (untouched rows stay frozen)."""

    code = 3
    STATES = (StateSpec("exp_avg"), StateSpec("exp_avg_sq"))

    def __init__(self, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        super().__init__(lr, eps=eps, betas=betas, weight_decay=weight_decay)


class RowWiseAdam(FusedOptimizer):
    """FBGEMM's ``PARTIAL_ROWWISE_ADAM``: a first moment per element and ONE second moment per row
    (the mean of ``g^2`` over the row), on the touched rows only, bias-corrected by the table's step
    count (see the module docs). ``w`` gets the same rule with its own two values per row."""

    code = 5
    STATES = (StateSpec("exp_avg"), StateSpec("exp_avg_sq", per_row=True))

    def __init__(self, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        super().__init__(lr, eps=eps, betas=betas, weight_decay=weight_decay)


class Adam(FusedOptimizer):
    """``torch.optim.Adam`` on the dense gradient, at the cost of a sparse update (see the module docs).

    Args:
        lr, betas, eps, weight_decay: as ``torch.optim.Adam`` (``weight_decay`` on the touched rows).
        catch_up_window: ``P``: every step also brings a ``1 / P`` slice of the rows up to date, so
            that no row is more than ``P`` steps behind and the catch-up table has ``P + 1`` entries.
            Larger: a smaller slice per step (``N / P`` rows), a larger table (``88 * P`` bytes).
    """

    code = 4
    STATES = (StateSpec("exp_avg"), StateSpec("exp_avg_sq"))
    ROW_STATE = ("last_step", "catchup")
    RECORD_ROW_STATE = ("last_step",)
    catches_up = True
    CATCH_UP_COLUMNS = 11  # enum CatchUpColumn in csrc/fused_row_update.h

    def __init__(self, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, catch_up_window: int = 8192):
        super().__init__(lr, eps=eps, betas=betas, weight_decay=weight_decay)
        if int(catch_up_window) < 1:
            raise ValueError(f"Adam: catch_up_window must be >= 1, got {catch_up_window}")
        # W_k = sqrt(1 - beta2^s) * beta2^(-k/2) for k <= P must stay finite in float64.
        if betas[1] <= 0.0 or -0.5 * catch_up_window * math.log(betas[1]) > 600:
            raise ValueError(f"Adam: betas[1] = {betas[1]} is too small for catch_up_window = {catch_up_window} "
                             f"(beta2^(-P/2) overflows); use a larger beta2 or a smaller window")
        self.catch_up_window = int(catch_up_window)

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", catch_up_window={self.catch_up_window})"

    @staticmethod
    def swept_rows(num_rows: int, window: int, step: int) -> Tuple[int, int]:
        """``[begin, end)``: the slice of rows that update ``step`` (1-based) brings up to date besides
        the touched ones (``sweep_rows`` of csrc/fused_row_update_checks.h)."""
        per_slice = -(-num_rows // window)
        begin = min(num_rows, (step - 1) % window * per_slice)
        return begin, min(num_rows, begin + per_slice)

    def new_row_state(self, num_rows: int, device, step: int = 0) -> Dict[str, Tensor]:
        # A zero catch-up table composes no missed step: right while no row is behind.
        return {"last_step": torch.full((num_rows,), int(step), dtype=torch.int64, device=device),
                "catchup": torch.zeros(self.catch_up_window + 1, self.CATCH_UP_COLUMNS, dtype=torch.float64,
                                       device=device)}


# The fused optimizers by the names of `deepfm-fast train --table-optimizer`.
NAMES = {"adam": Adam, "lazy_adam": LazyAdam, "rowwise_adam": RowWiseAdam, "rowwise_adagrad": RowWiseAdagrad,
         "adagrad": Adagrad, "sgd": SGD}


def by_name(name: str, lr: float, weight_decay: float = 0.0) -> FusedOptimizer:
    """The fused optimizer called ``name`` (a key of `NAMES`), with its default hyper-parameters."""
    if name not in NAMES:
        raise ValueError(f"unknown fused table optimizer {name!r}; choose from {list(NAMES)}")
    return NAMES[name](lr=lr, weight_decay=weight_decay)
