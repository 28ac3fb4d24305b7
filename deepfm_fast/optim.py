"""Fused sparse optimizers: the embedding-table update applied inside the backward pass.

With ``EmbeddingFM(..., optimizer=deepfm_fast.optim.RowWiseAdagrad(lr=0.05))`` the backward of the
fused op computes the coalesced gradient of the rows the batch touched and updates exactly those
rows of the table ``V`` and the first-order weights ``w`` in place (FBGEMM's TBE does the same).
There is no dense ``[N, K]`` gradient and no ``O(N)`` work per step, which is what makes
10-million-row tables trainable on a CPU. The bias and every other parameter (the DNN) stay with
any ordinary ``torch.optim`` optimizer.

Semantics, per touched row ``r`` with summed gradient ``g_r`` (duplicate ids are coalesced first):

- ``SGD(lr)``: ``V_r -= lr * g_r``; equals ``torch.optim.SGD`` on the sparse gradient.
- ``RowWiseAdagrad(lr, eps=1e-8)``: one accumulator per row, ``G_r += mean_k(g_rk^2)``,
  ``V_r -= lr * g_r / (sqrt(G_r) + eps)`` (FBGEMM's ``EXACT_ROWWISE_ADAGRAD``).
- ``Adagrad(lr, eps=1e-10)``: per element, ``G += g^2``, ``V -= lr * g / (sqrt(G) + eps)``; equals
  ``torch.optim.Adagrad`` on the sparse gradient.
- ``Adam(lr=1e-3, betas=(0.9, 0.999), eps=1e-8)``: Adam moments of the touched rows only, with
  bias correction from a step count shared by the table; equals ``torch.optim.SparseAdam``.

``weight_decay`` (default 0) adds ``weight_decay * V_r`` to ``g_r`` of the TOUCHED rows only: rows
that a batch does not use are neither decayed nor moved, unlike dense L2 on the whole table.

Optimizer state is float32 (float64 for a float64 table), lives in the module's buffers, is saved
in ``state_dict()``, and a reloaded module continues exactly. Every backward is one optimizer step
of the tables: accumulating gradients over several backward calls is not possible for them.
"""
import math
from typing import List, Tuple

import torch
from torch import Tensor

from . import _args, ops


class FusedOptimizer:
    """Base of the fused optimizers: hyper-parameters and state layout; the update is `ops.fused_row_update`."""

    code = -1  # the `optimizer` argument of ops.fused_row_update
    num_states = 0
    row_wise_state = False  # one state value per row instead of per element

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
        return f"{type(self).__name__}(lr={self.lr}, eps={self.eps}, betas={self.betas}, weight_decay={self.weight_decay})"

    def new_state(self, table: Tensor) -> List[Tensor]:
        """Zero state tensors for `table` [N, D]: float32, or float64 for a float64 table."""
        dtype = torch.float64 if table.dtype == torch.float64 else torch.float32
        shape = table.shape[:1] if self.row_wise_state else table.shape
        return [torch.zeros(shape, dtype=dtype, device=table.device) for _ in range(self.num_states)]

    def update(self, tables, states, ids: Tensor, row_grads, step: int) -> None:
        """Updates the rows `ids` (sorted, unique) of `tables` in place; `step` counts from 1.

        `tables` is a table [N, D] or a list of tables with the same rows (updated in one pass,
        e.g. the embedding table and the first-order weights viewed as [N, 1]); `states` and
        `row_grads` ([U, D] each) follow it: one list of state tensors and one gradient per table.
        """
        tables, states, row_grads = _as_lists(tables, states, row_grads)
        ops.fused_row_update(tables, [s for table_states in states for s in table_states], ids, row_grads, self.code,
                             self.lr, self.eps, self.betas[0], self.betas[1], self.weight_decay, step)


class SGD(FusedOptimizer):
    """``V_r -= lr * g_r`` on the touched rows (``torch.optim.SGD`` on the sparse gradient)."""

    code = _args.SGD

    def __init__(self, lr: float, weight_decay: float = 0.0):
        super().__init__(lr, weight_decay=weight_decay)


class RowWiseAdagrad(FusedOptimizer):
    """One accumulator per row: ``G_r += mean_k(g_rk^2)``, ``V_r -= lr * g_r / (sqrt(G_r) + eps)``."""

    code = _args.ROWWISE_ADAGRAD
    num_states = 1
    row_wise_state = True

    def __init__(self, lr: float, eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(lr, eps=eps, weight_decay=weight_decay)


class Adagrad(FusedOptimizer):
    """Per element: ``G += g^2``, ``V -= lr * g / (sqrt(G) + eps)`` (``torch.optim.Adagrad``)."""

    code = _args.ADAGRAD
    num_states = 1

    def __init__(self, lr: float, eps: float = 1e-10, weight_decay: float = 0.0):
        super().__init__(lr, eps=eps, weight_decay=weight_decay)


class Adam(FusedOptimizer):
    """Adam moments of the touched rows only, as ``torch.optim.SparseAdam``."""

    code = _args.ADAM
    num_states = 2

    def __init__(self, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        super().__init__(lr, eps=eps, betas=betas, weight_decay=weight_decay)


def _as_lists(tables, states, row_grads):
    """One table (a Tensor, its state list, its gradient) -> the list form of several tables."""
    if isinstance(tables, Tensor):
        return [tables], [list(states)], [row_grads]
    return list(tables), [list(s) for s in states], list(row_grads)
