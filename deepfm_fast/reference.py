"""Pure-PyTorch versions of every deepfm_fast op: the oracle the tests compare the kernels with.

They are written for clarity, from the formulas in the DeepFM and FM papers, and differentiate
through ordinary autograd. The library falls back to them when the compiled kernels are missing.
"""
import math
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ._args import ADAGRAD, ADAM, MODES, ROWWISE_ADAGRAD, SGD, EmbeddingFMOutput, as_csr, mode_code, pooling_codes


def fm_interaction(emb: Tensor, reduce_sum: bool = True) -> Tensor:
    """FM second-order term over pre-gathered field embeddings (Rendle 2010, square-of-sum trick).

    Args:
        emb: ``[B, F, K]`` field embeddings.
        reduce_sum: sum over the embedding dimension.

    Returns:
        ``[B]`` ``0.5 * sum_k((sum_f e)^2 - sum_f e^2)``, or ``[B, K]`` without the sum over ``k``.
    """
    if emb.dim() != 3:
        raise ValueError(f"fm_interaction: emb must be a 3-D tensor [batch, fields, embedding_dim], got shape {tuple(emb.shape)}")
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


# ---- fused_row_update ---------------------------------------------------------------------------

STATES_PER_TABLE = {SGD: 0, ROWWISE_ADAGRAD: 1, ADAGRAD: 1, ADAM: 2}


@torch.no_grad()
def fused_row_update(tables: List[Tensor], state: List[Tensor], ids: Tensor, row_grads: List[Tensor], optimizer: int,
                     lr: float, eps: float, beta1: float, beta2: float, weight_decay: float, step: int) -> None:
    """One optimizer step on the rows ``ids`` (sorted, unique) of every table, in place.

    ``state`` lists each table's state tensors in turn; ``row_grads[t]`` is ``[U, D_t]``. The math,
    per touched row ``r`` with ``g = row_grads[r] + weight_decay * V_r`` (L2 on the touched rows only):

    - SGD: ``V_r -= lr * g``
    - row-wise Adagrad (FBGEMM ``EXACT_ROWWISE_ADAGRAD``): ``G_r += mean_k(g^2)``, ``V_r -= lr * g / (sqrt(G_r) + eps)``
    - Adagrad (``torch.optim.Adagrad``): ``G += g^2``, ``V -= lr * g / (sqrt(G) + eps)``
    - Adam on the touched rows (``torch.optim.SparseAdam``): the moments of the touched rows only,
      bias-corrected with the shared step count ``step``.
    """
    per_table = STATES_PER_TABLE[optimizer]
    for t, (table, grads) in enumerate(zip(tables, row_grads)):
        table_state = state[t * per_table:(t + 1) * per_table]
        acc_dtype = torch.float64 if table.dtype == torch.float64 else torch.float32
        rows = table[ids].to(acc_dtype)
        grad = grads.to(acc_dtype) + weight_decay * rows
        old = [s[ids] for s in table_state]
        if optimizer == SGD:
            new_rows, new_state = rows - lr * grad, []
        elif optimizer == ROWWISE_ADAGRAD:
            accumulator = old[0] + grad.pow(2).mean(dim=1)
            new_rows = rows - (lr / (accumulator.sqrt() + eps)).unsqueeze(1) * grad
            new_state = [accumulator]
        elif optimizer == ADAGRAD:
            accumulator = old[0] + grad * grad
            new_rows, new_state = rows - lr * (grad / (accumulator.sqrt() + eps)), [accumulator]
        elif optimizer == ADAM:
            exp_avg = old[0] + (grad - old[0]) * (1 - beta1)
            exp_avg_sq = old[1] + (grad * grad - old[1]) * (1 - beta2)
            step_size = lr * math.sqrt(1 - beta2**step) / (1 - beta1**step)
            new_rows = rows - step_size * (exp_avg / (exp_avg_sq.sqrt() + eps))
            new_state = [exp_avg, exp_avg_sq]
        else:
            raise ValueError(f"fused_row_update: unknown optimizer code {optimizer}")
        table[ids] = new_rows.to(table.dtype)
        for s, value in zip(table_state, new_state):
            s[ids] = value
