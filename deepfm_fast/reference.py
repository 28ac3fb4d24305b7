"""Pure-PyTorch versions of every deepfm_fast op: the oracle the tests compare the kernels with.

They are written for clarity, from the formulas in the DeepFM and FM papers, and differentiate
through ordinary autograd. The library falls back to them when the compiled kernels are missing.
"""
import torch
from torch import Tensor


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

from typing import NamedTuple, Optional, Sequence, Union  # noqa: E402

import torch.nn.functional as F  # noqa: E402

MODES = {"field": 0, "feature": 1}
POOLINGS = {"sum": 0, "mean": 1}


class EmbeddingFMOutput(NamedTuple):
    """What `embedding_fm` returns: ``fm [B]``, ``linear [B]`` and ``pooled [B, F, K]`` (or an empty
    tensor when ``return_pooled=False``)."""

    fm: Tensor
    linear: Tensor
    pooled: Tensor


def mode_code(mode: str) -> int:
    if mode not in MODES:
        raise ValueError(f"embedding_fm: mode must be one of {tuple(MODES)}, got {mode!r}")
    return MODES[mode]


def pooling_codes(pooling: Union[str, Sequence[str]], num_fields: int) -> list:
    """'sum' / 'mean' for every field, or one of them per field -> list of ints (0 sum, 1 mean)."""
    if isinstance(pooling, str):
        names = [pooling]
    else:
        names = list(pooling)
        if len(names) != num_fields:
            raise ValueError(f"embedding_fm: pooling must be a str or have one entry per field "
                             f"(num_fields = {num_fields}), got {len(names)} entries")
    for name in names:
        if name not in POOLINGS:
            raise ValueError(f"embedding_fm: pooling must be one of {tuple(POOLINGS)}, got {name!r}")
    return [POOLINGS[name] for name in names]


def as_csr(indices: Tensor, offsets: Optional[Tensor], per_sample_weights: Optional[Tensor],
           num_fields: Optional[int]):
    """Ids ``[B, F]`` (offsets None) or CSR -> (indices [nnz], offsets [B*F+1], weights [nnz] or None, F)."""
    if offsets is None:
        if indices.dim() != 2:
            raise ValueError(f"embedding_fm: without offsets, indices must be [batch, num_fields] (one id per "
                             f"field), got shape {tuple(indices.shape)}")
        batch, fields = indices.shape
        if num_fields is not None and num_fields != fields:
            raise ValueError(f"embedding_fm: num_fields = {num_fields} but indices has {fields} columns")
        offsets_dtype = indices.dtype if indices.dtype in (torch.int32, torch.int64) else torch.int64
        offsets = torch.arange(batch * fields + 1, dtype=offsets_dtype, device=indices.device)
        indices = indices.reshape(-1)
        if per_sample_weights is not None:
            if per_sample_weights.shape != (batch, fields) and per_sample_weights.shape != (batch * fields,):
                raise ValueError(f"embedding_fm: per_sample_weights must have shape [{batch}, {fields}] like "
                                 f"indices (or [{batch * fields}]), got {tuple(per_sample_weights.shape)}")
            per_sample_weights = per_sample_weights.reshape(-1)
        return indices, offsets, per_sample_weights, fields
    if num_fields is None:
        raise ValueError("embedding_fm: num_fields is required with CSR input (indices [nnz], offsets [B*F+1])")
    return indices, offsets, per_sample_weights, num_fields


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
