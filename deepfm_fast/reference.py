"""Pure-PyTorch versions of every deepfm_fast op: the oracle the tests compare the kernels with.

They are written for clarity, from the formulas in the DeepFM and FM papers, and differentiate
through ordinary autograd. The library falls back to them when the compiled kernels are missing.
"""
import math
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import optim
from ._args import MODES, EmbeddingFMOutput, as_csr, mode_code, pooling_codes
from ._row_merge import merge_rows, merges_across_ranks


def fm_interaction(emb: Tensor, reduce_sum: bool = True) -> Tensor:
    """FM second-order term over pre-gathered field embeddings (Rendle 2010, square-of-sum trick).

    Args:
        emb: ``[B, F, K]`` field embeddings.
        reduce_sum: sum over the embedding dimension.

    Returns:
        ``[B]`` ``0.5 * sum_k((sum_f e)^2 - sum_f e^2)``, or ``[B, K]`` without the sum over ``k``.
    """
    if emb.dim() != 3:
        raise ValueError(f"fm_interaction: emb must be a 3-D tensor [batch, fields, embedding_dim], "
                         f"got shape {tuple(emb.shape)}")
    square_of_sum = emb.sum(dim=1).pow(2)
    sum_of_square = emb.pow(2).sum(dim=1)
    interaction = 0.5 * (square_of_sum - sum_of_square)
    return interaction.sum(dim=1) if reduce_sum else interaction


# ---- embedding_fm -------------------------------------------------------------------------------

def embedding_fm(weight: Tensor, indices: Tensor, offsets: Optional[Tensor] = None,
                 per_sample_weights: Optional[Tensor] = None, linear_weight: Optional[Tensor] = None, *,
                 num_fields: Optional[int] = None, mode: str = "field", pooling="sum",
                 return_pooled: bool = False, sparse: bool = False) -> EmbeddingFMOutput:
    """Embedding lookup + pooling + FM second order + first order, written plainly (the oracle).

    Bag ``b * F + f`` holds the ids of field ``f`` of sample ``b``. Field mode pools each bag,
    ``e_f = sum_i x_i V[j_i]`` (divided by the bag size for mean pooling, zero for an empty bag),
    then ``fm = 0.5 * sum_k((sum_f e_f)^2 - sum_f e_f^2)``. Feature mode applies the same formula
    to every ``x_i V[j_i]`` of the sample. ``linear = sum_i w[j_i] x_i``. With ``sparse=True`` the
    gradient of ``weight`` is sparse (through ``F.embedding(sparse=True)``, as ``nn.Embedding``
    gives it); that of ``linear_weight`` stays dense.
    """
    mcode = mode_code(mode)
    indices, offsets, per_sample_weights, fields = as_csr(indices, offsets, per_sample_weights, num_fields)
    mean = torch.tensor(pooling_codes(pooling, fields), device=weight.device).bool().expand(fields)
    indices = indices.long()
    offsets = offsets.long()
    nnz = indices.numel()
    batch = (offsets.numel() - 1) // fields
    dim = weight.shape[1]
    counts = offsets[1:] - offsets[:-1]                                            # [B*F]
    bag_of = torch.repeat_interleave(torch.arange(batch * fields, device=weight.device), counts, output_size=nnz)
    x = per_sample_weights if per_sample_weights is not None else weight.new_ones(nnz)
    vectors = F.embedding(indices, weight, sparse=sparse) * x.unsqueeze(1)          # [nnz, K]
    bag_sum = weight.new_zeros(batch * fields, dim).index_add(0, bag_of, vectors)
    divisor = torch.where(mean.repeat(batch), counts.clamp(min=1), torch.ones_like(counts)).to(weight.dtype)
    pooled = (bag_sum / divisor.unsqueeze(1)).view(batch, fields, dim)
    if mcode == MODES["field"]:
        fm = fm_interaction(pooled)
    else:
        sample_of = bag_of // fields
        square_of_sum = weight.new_zeros(batch, dim).index_add(0, sample_of, vectors).pow(2)
        sum_of_square = weight.new_zeros(batch, dim).index_add(0, sample_of, vectors.pow(2))
        fm = 0.5 * (square_of_sum - sum_of_square).sum(1)
    if linear_weight is None:
        linear = weight.new_zeros(batch)
    else:
        first = linear_weight[indices] * x  # (a sparse gradient for the 1-D linear_weight: not here)
        linear = weight.new_zeros(batch).index_add(0, bag_of // fields, first)
    return EmbeddingFMOutput(fm, linear, pooled if return_pooled else weight.new_empty(0))


def gather_rows(param: Tensor, rows: Tensor, sparse_grad: bool = False) -> Tensor:
    """``param[rows]`` whose gradient is coalesced sparse COO with ``sparse_grad``, else dense."""
    return _GatherRows.apply(param, rows, sparse_grad)


class _GatherRows(torch.autograd.Function):
    """``param[rows]`` (``rows`` unique) whose gradient is a coalesced sparse tensor when asked."""

    @staticmethod
    def forward(ctx, param, rows, sparse):
        ctx.save_for_backward(rows)
        ctx.shape, ctx.sparse = param.shape, sparse
        return param.index_select(0, rows)

    @staticmethod
    def backward(ctx, grad):
        (rows,) = ctx.saved_tensors
        if ctx.sparse:
            g = torch.sparse_coo_tensor(rows.unsqueeze(0), grad, ctx.shape, is_coalesced=True,
                                        check_invariants=False)
        else:
            g = grad.new_zeros(ctx.shape).index_add_(0, rows, grad)
        return g, None, None


# ---- fused_row_update ---------------------------------------------------------------------------
# Each fused optimizer's rule on the touched rows of one table: (rows, g, old states, t, lr, eps,
# beta1, beta2) -> (new rows, new states), in the accumulation dtype, g with the weight decay in.
# The same rules as csrc/fused_row_update.h, written plainly; their classes are in deepfm_fast.optim.

def _per_row(x: Tensor, like: Tensor) -> Tensor:
    """A [U] value per row, broadcast over the row's elements of ``like`` ([U] or [U, D])."""
    return x.reshape((-1,) + (1,) * (like.dim() - 1))


def _row_mean_square(grad: Tensor) -> Tensor:
    return grad.pow(2).reshape(grad.shape[0], -1).mean(dim=1)


def _sgd(rows, grad, old, t, lr, eps, beta1, beta2):
    return rows - lr * grad, []


def _rowwise_adagrad(rows, grad, old, t, lr, eps, beta1, beta2):  # FBGEMM EXACT_ROWWISE_ADAGRAD
    accumulator = old[0] + _row_mean_square(grad)
    return rows - _per_row(lr / (accumulator.sqrt() + eps), grad) * grad, [accumulator]


def _adagrad(rows, grad, old, t, lr, eps, beta1, beta2):  # torch.optim.Adagrad
    accumulator = old[0] + grad * grad
    return rows - lr * (grad / (accumulator.sqrt() + eps)), [accumulator]


def _lazy_adam(rows, grad, old, t, lr, eps, beta1, beta2):  # torch.optim.SparseAdam, in its order
    exp_avg = old[0] + (grad - old[0]) * (1 - beta1)
    exp_avg_sq = old[1] + (grad * grad - old[1]) * (1 - beta2)
    step_size = lr * math.sqrt(1 - beta2**t) / (1 - beta1**t)
    return rows - step_size * (exp_avg / (exp_avg_sq.sqrt() + eps)), [exp_avg, exp_avg_sq]


def _adam(rows, grad, old, t, lr, eps, beta1, beta2):  # torch.optim.Adam's single-tensor update, in its order
    exp_avg = old[0] + (grad - old[0]) * (1 - beta1)
    exp_avg_sq = old[1] * beta2 + (1 - beta2) * grad * grad
    denom = exp_avg_sq.sqrt() / math.sqrt(1 - beta2**t) + eps
    return rows - lr / (1 - beta1**t) * (exp_avg / denom), [exp_avg, exp_avg_sq]


def _rowwise_adam(rows, grad, old, t, lr, eps, beta1, beta2):  # FBGEMM PARTIAL_ROWWISE_ADAM
    exp_avg = old[0] * beta1 + (1 - beta1) * grad
    exp_avg_sq = old[1] * beta2 + (1 - beta2) * _row_mean_square(grad)
    denom = exp_avg_sq.sqrt() / math.sqrt(1 - beta2**t) + eps
    return rows - lr / (1 - beta1**t) * (exp_avg / _per_row(denom, grad)), [exp_avg, exp_avg_sq]


ROW_RULES = {optim.SGD: _sgd, optim.RowWiseAdagrad: _rowwise_adagrad, optim.Adagrad: _adagrad,
             optim.LazyAdam: _lazy_adam, optim.Adam: _adam, optim.RowWiseAdam: _rowwise_adam}
_BY_CODE = {cls.code: cls for cls in ROW_RULES}


@torch.no_grad()
def fused_row_update(tables: List[Tensor], state: List[Tensor], ids: Tensor, row_grads: List[Tensor], step: Tensor,
                     optimizer: int, lr: float, eps: float, beta1: float, beta2: float, weight_decay: float,
                     last_step: Optional[Tensor] = None, catchup: Optional[Tensor] = None,
                     check_ids: bool = True) -> None:
    """One optimizer step on the rows ``ids`` (sorted, unique) of every table, in place.

    ``step`` (a CPU int64 scalar) is incremented first; its new value ``t`` is the step of the bias
    corrections. ``state`` lists each table's state tensors in turn; ``row_grads[t]`` is ``[U]`` or
    ``[U, D_t]``. Per touched row ``r``, with ``g = row_grads[r] + weight_decay * V_r`` (L2 on the
    touched rows only), the rule of `ROW_RULES` for the class of ``deepfm_fast.optim`` whose
    ``code`` is ``optimizer``. Adam (``catches_up``) first applies the missed steps of the row since
    ``last_step[r]`` (see `adam_catch_up`), then the step; then the step's slice of rows is caught
    up to ``t``.
    """
    if optimizer not in _BY_CODE:
        raise ValueError(f"fused_row_update: unknown optimizer code {optimizer}; the codes are "
                         f"{ {c: cls.__name__ for c, cls in _BY_CODE.items()} }")
    if check_ids and ids.numel() and not (bool((ids[1:] > ids[:-1]).all()) and int(ids.min()) >= 0
                                          and int(ids.max()) < tables[0].shape[0]):
        raise ValueError("fused_row_update: ids must be sorted, unique and in range")
    cls = _BY_CODE[optimizer]
    rule, per_table = ROW_RULES[cls], len(cls.STATES)
    step += 1
    t = int(step)
    if cls.catches_up:
        missed = (t - 1) - last_step[ids]
        _catch_up(tables, state, ids, missed, catchup)
    for n, (table, grads) in enumerate(zip(tables, row_grads)):
        table_state = state[n * per_table:(n + 1) * per_table]
        acc_dtype = torch.float64 if table.dtype == torch.float64 else torch.float32
        rows = table[ids].to(acc_dtype)
        grad = grads.to(acc_dtype).reshape(rows.shape) + weight_decay * rows
        new_rows, new_state = rule(rows, grad, [s[ids] for s in table_state], t, lr, eps, beta1, beta2)
        table[ids] = new_rows.to(table.dtype)
        for s, value in zip(table_state, new_state):
            s[ids] = value
    if cls.catches_up:
        last_step[ids] = t
        advance_catch_up_table(catchup, lr, eps, beta1, beta2, t)
        begin, end = optim.Adam.swept_rows(tables[0].shape[0], catchup.shape[0] - 1, t)
        adam_catch_up(tables, state, last_step, catchup, step, begin, end)


@torch.no_grad()
def adam_catch_up(tables: List[Tensor], state: List[Tensor], last_step: Tensor, catchup: Tensor, step: Tensor,
                  row_begin: int = 0, row_end: int = -1) -> None:
    """Adam's rows in ``[row_begin, row_end)`` brought up to step ``step``, in place.

    A row last updated at step ``t0`` missed the steps ``s = t0 + k``, ``k = 1..j``; with zero gradient
    dense Adam decays its moments (``m beta1^k``, ``v beta2^k``) and moves it by the sum over ``k`` of
    ``a_s rho^k m / (sqrt(v) + eps W_k)`` (``csrc/fused_row_update.h`` derives it). Entry ``j`` of the
    catch-up table holds that sum as a 2-node Gauss rule and the decays ``beta1^j``, ``beta2^j``.
    """
    num_rows = tables[0].shape[0]
    row_end = num_rows if row_end < 0 else min(row_end, num_rows)
    catch_up_rows(tables, state, last_step, catchup, step, torch.arange(row_begin, row_end, device=last_step.device))


@torch.no_grad()
def catch_up_rows(tables: List[Tensor], state: List[Tensor], last_step: Tensor, catchup: Tensor, step: Tensor,
                  rows: Tensor) -> None:
    """`adam_catch_up` of the rows ``rows`` (unique), in place."""
    missed = int(step) - last_step[rows]
    behind = missed > 0
    rows, missed = rows[behind], missed[behind]
    if rows.numel() and int(missed.max()) >= catchup.shape[0]:
        raise ValueError("adam_catch_up: a row is further behind than the catch-up window")
    _catch_up(tables, state, rows, missed, catchup)
    last_step[rows] = int(step)


@torch.no_grad()
def adam_rows(tables: List[Tensor], state: List[Tensor], last_step: Tensor, catchup: Tensor, step: Tensor,
              rows: Tensor) -> List[Tensor]:
    """Copies of the rows ``rows`` of every table as `catch_up_rows` would leave them (nothing changed)."""
    copies = [t.clone() for t in tables]
    catch_up_rows(copies, [s.clone() for s in state], last_step.clone(), catchup, step, rows)
    return [c[rows] for c in copies]


def _catch_up(tables, state, rows, missed, catchup):
    """The rows ``rows`` of every table after ``missed`` (per row, >= 0) steps with zero gradient."""
    entry = catchup[missed.clamp(min=0)]  # entry 0: nothing missed, nothing moves
    for n, table in enumerate(tables):
        exp_avg, exp_avg_sq = state[2 * n], state[2 * n + 1]
        acc_dtype = exp_avg.dtype
        shape = (-1,) + (1,) * (table.dim() - 1)
        coeff = [entry[:, c].to(acc_dtype).reshape(shape) for c in range(5, 11)]
        alpha1, eps_x1, alpha2, eps_x2, decay1, decay2 = coeff
        m, v = exp_avg[rows], exp_avg_sq[rows]
        u = v.sqrt()
        # The floor of the kernels (kCatchUpFloor): only eps = 0 with v ~ 0, where m is 0 too.
        moved = m * (alpha1 / (u + eps_x1).clamp(min=1e-30) + alpha2 / (u + eps_x2).clamp(min=1e-30))
        moved = torch.where(missed.reshape(shape) > 0, moved, torch.zeros_like(m))
        table[rows] = (table[rows].to(acc_dtype) - moved).to(table.dtype)
        exp_avg[rows] = torch.where(missed.reshape(shape) > 0, m * decay1, m)
        exp_avg_sq[rows] = torch.where(missed.reshape(shape) > 0, v * decay2, v)


@torch.no_grad()
def advance_catch_up_table(catchup: Tensor, lr: float, eps: float, beta1: float, beta2: float, step: int) -> None:
    """The catch-up table after step ``step`` from the table after ``step - 1``, in place.

    Entry ``j`` (a row last updated ``j`` steps before ``step``) gains the term of the missed step
    ``step`` (``k = j``): weight ``beta_k = a / e * beta1^k`` at ``W_k = e * beta2^(-k/2)``, with
    ``e = sqrt(1 - beta2^step)`` and ``a = lr * e / (1 - beta1^step)``. Moments of order 0..3 about
    the entry's first ``W`` give the 2-node Gauss rule ``(alpha_i, x_i)`` of the catch-up sum.
    """
    window = catchup.shape[0] - 1
    prev = catchup.clone()
    j = torch.arange(window + 1, dtype=torch.float64, device=catchup.device)
    e = math.sqrt(1.0 - beta2**step)
    a = lr * e / (1.0 - beta1**step)
    decay1, decay2 = beta1**j, beta2**j
    weight = a / e * decay1
    w = e * beta2 ** (-0.5 * j)
    before = torch.cat([torch.zeros_like(prev[:1]), prev[:-1]])  # entry j - 1 of the previous table
    first = ~(before[:, 0] > 0)
    shift = torch.where(first, w, before[:, 4])
    d = w - shift
    keep = (~first).to(torch.float64)
    m = [weight * d**p + keep * before[:, p] for p in range(4)]
    safe_m0 = torch.where(m[0] > 0, m[0], torch.ones_like(m[0]))
    delta = m[1] / safe_m0
    c = shift + delta
    mu2 = m[2] / safe_m0 - delta**2
    mu3 = m[3] / safe_m0 - 3 * delta * m[2] / safe_m0 + 2 * delta**3
    two = mu2 > 1e-12 * c * c
    ratio = mu3 / torch.where(two, mu2, torch.ones_like(mu2))
    root = torch.sqrt(ratio**2 + 4 * mu2.clamp(min=0))
    y1, y2 = 0.5 * (ratio - root), 0.5 * (ratio + root)
    x1, x2 = c + y1, c + y2
    span = torch.where(two, y2 - y1, torch.ones_like(y1))
    alpha1, alpha2 = m[0] * y2 / span * x1, -m[0] * y1 / span * x2
    two = two & (x1 > 0) & (x2 > 0)
    alpha1 = torch.where(two, alpha1, m[0] * c)
    alpha2 = torch.where(two, alpha2, torch.zeros_like(alpha2))
    x1, x2 = torch.where(two, x1, c), torch.where(two, x2, c)
    empty = ~(m[0] > 0)
    alpha1 = torch.where(empty, torch.zeros_like(alpha1), alpha1)
    x1 = torch.where(empty, torch.ones_like(x1), x1)
    x2 = torch.where(empty, torch.ones_like(x2), x2)
    columns = m + [shift, alpha1, eps * x1, alpha2, eps * x2, decay1, decay2]
    out = torch.stack(columns, dim=1)
    out[0, :9] = 0.0  # gap 0: nothing missed
    catchup.copy_(out)


# ---- embedding_fm_step --------------------------------------------------------------------------

def embedding_fm_step(weight: Tensor, linear_weight: Tensor, indices: Tensor, offsets: Optional[Tensor],
                      per_sample_weights: Optional[Tensor], *, num_fields: int, mode: str, pooling, return_pooled: bool,
                      weight_state: List[Tensor], linear_state: List[Tensor], step: Tensor,
                      last_step: Optional[Tensor], catchup: Optional[Tensor], optimizer: int, lr: float, eps: float,
                      beta1: float, beta2: float, weight_decay: float, sync: int = 0) -> EmbeddingFMOutput:
    """`deepfm_fast.ops.embedding_fm_step` on the reference: `embedding_fm` whose backward takes the
    coalesced gradient through autograd (dense, so ``O(N)``: for tests and machines without the
    kernels), merges it across ranks under ``sync`` and applies `fused_row_update` in place. Adam's
    rows are first caught up in place, so that the forward reads them as dense Adam has them."""
    indices, offsets, per_sample_weights, _ = as_csr(indices, offsets, per_sample_weights, num_fields)
    states = list(weight_state) + list(linear_state)
    if last_step is not None:
        catch_up_rows([weight, linear_weight], states, last_step, catchup, step, torch.unique(indices.long()))
    update = dict(states=states, step=step, last_step=last_step, catchup=catchup, sync=sync,
                  args=(optimizer, lr, eps, beta1, beta2, weight_decay))
    forward = dict(num_fields=num_fields, mode=mode, pooling=pooling, return_pooled=return_pooled)
    return EmbeddingFMOutput(*_FusedStep.apply(weight, linear_weight, indices, offsets, per_sample_weights, forward,
                                               update))


class _FusedStep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, linear_weight, indices, offsets, per_sample_weights, forward, update):
        out = embedding_fm(weight, indices, offsets, per_sample_weights, linear_weight, **forward)
        ctx.tables, ctx.forward, ctx.update = (weight, linear_weight), forward, update
        ctx.save_for_backward(indices, offsets, per_sample_weights)
        if not forward["return_pooled"]:
            ctx.mark_non_differentiable(out.pooled)
        return tuple(out)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_fm, grad_linear, grad_pooled):
        indices, offsets, per_sample_weights = ctx.saved_tensors
        (weight, linear_weight), update = ctx.tables, ctx.update
        unique_ids, row_grads, linear_row_grads, grad_psw = _coalesced_grads(
            weight, linear_weight, indices, offsets, per_sample_weights, ctx.forward, grad_fm, grad_linear,
            grad_pooled)
        if merges_across_ranks(update["sync"]):
            unique_ids, (row_grads, linear_row_grads) = merge_rows(
                update["sync"], unique_ids, [row_grads, linear_row_grads], grad_fm.shape[0])
        fused_row_update([weight, linear_weight], update["states"], unique_ids, [row_grads, linear_row_grads],
                         update["step"], *update["args"], update["last_step"], update["catchup"], False)
        grad_psw = grad_psw if per_sample_weights is not None and ctx.needs_input_grad[4] else None
        return None, None, None, None, grad_psw, None, None


def _coalesced_grads(weight, linear_weight, indices, offsets, per_sample_weights, forward, grad_fm, grad_linear,
                     grad_pooled):
    """(unique ids, their rows' gradients of V and w, the gradient of the values) from autograd."""
    with torch.enable_grad():
        weight = weight.detach().requires_grad_()
        linear_weight = linear_weight.detach().requires_grad_()
        psw = per_sample_weights.detach().requires_grad_() if per_sample_weights is not None else None
        out = embedding_fm(weight, indices, offsets, psw, linear_weight, num_fields=forward["num_fields"],
                           mode=forward["mode"], pooling=forward["pooling"],
                           return_pooled=grad_pooled is not None and grad_pooled.numel() > 0)
        outputs, grads = [out.fm, out.linear], [grad_fm, grad_linear]
        if out.pooled.numel() > 0:
            outputs.append(out.pooled)
            grads.append(grad_pooled)
        inputs = [weight, linear_weight] + ([psw] if psw is not None else [])
        result = torch.autograd.grad(outputs, inputs, grads, allow_unused=True)
    unique_ids = torch.unique(indices.long())
    grad_psw = result[2] if psw is not None else None
    return unique_ids, result[0][unique_ids], result[1][unique_ids], grad_psw
